"""The systemd deployment: the installer, socket permissions, and the units under a real systemd.

The integration tests boot systemd as PID 1 in new PID, mount, network, UTS, IPC and cgroup
namespaces, on a root of its own: /usr read-only from this host, a copy of /etc, fresh tmpfs on
/run, /tmp, /var/tmp and /dev, its own /proc (/proc/sys read-only), /sys read-only with a
delegated cgroup2 tree. It sees only the unit files in BOOT_UNITS (no generators, no tmpfiles,
no getty, logind or this host's database units) and boots into a target of ours that starts
journald and nothing else: the units this host ships (tmpfiles, getty, logind, its databases)
do not exist for it. At the end it is told to exit (killed if it will not): with its PID 1 end
every process and mount it made; the test then removes its cgroup and files.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from uro_recs.app.install import UNITS
from uro_recs.core import protocol
from uro_recs.core.config import BrokerConfig

SYSTEMD = next(
    (p for p in (Path("/usr/lib/systemd/systemd"), Path("/lib/systemd/systemd")) if p.exists()),
    None,
)
# The only unit files the booted systemd can see besides ours.
BOOT_UNITS = (
    "basic.target",
    "exit.target",
    "final.target",
    "local-fs-pre.target",
    "local-fs.target",
    "paths.target",
    "shutdown.target",
    "slices.target",
    "sockets.target",
    "swap.target",
    "sysinit.target",
    "timers.target",
    "umount.target",
    "systemd-exit.service",
    "systemd-journald.service",
    "systemd-journald.socket",
    "systemd-journald-dev-log.socket",
)
SANDBOX_TARGET = """\
[Unit]
Description=uro-recs test sandbox: journald and nothing else
Requires=basic.target
Wants=systemd-journald.socket systemd-journald-dev-log.socket systemd-journald.service
After=basic.target systemd-journald.service
"""
PYTHON = f"python{sys.version_info.major}.{sys.version_info.minor}"
VENV = "/opt/uro-recs/venv"  # in the sandbox: a system Python with this venv's site-packages
# The shipped uro-recs.toml serves model "als" (numpy) with two workers; the test adds a DeepFM
# worker (TensorFlow) and installs again.
ALS_WORKERS = ("uro-recs-worker@als-1.service", "uro-recs-worker@als-2.service")
WORKERS = (*ALS_WORKERS, "uro-recs-worker@deepfm-1.service")
SERVICES = ("uro-recs-broker.service", *WORKERS)
WORKER_STOP = ("worker_draining", "worker_stopped")  # the log events of a clean worker stop

# Runs as PID 1 of the new namespaces; turns into systemd. $1: the work directory.
BOOT_SCRIPT = r"""
set -euo pipefail
W=$1 R=$1/root
bind_ro() { mount --bind "$1" "$2"; mount -o remount,bind,ro "$2"; }
mount --bind "$R" "$R"
for d in $HOST_DIRS; do bind_ro "/$d" "$R/$d"; done
# Where this host keeps unit files and generators, the sandbox finds BOOT_UNITS or nothing.
# ($R/lib is a symlink into usr/ on merged-/usr systems: nothing more to hide there.)
for d in usr/lib/systemd/system lib/systemd/system; do
  if [ -d "$R/$d" ] && [ ! -L "$R/${d%%/*}" ]; then bind_ro "$W/units" "$R/$d"; fi
done
for d in {usr/,,usr/local/}lib/systemd/system{-generators,-environment-generators} \
         usr/local/lib/systemd/system; do
  if [ -d "$R/$d" ] && [ ! -L "$R/${d%%/*}" ]; then
    mount -t tmpfs -o ro,mode=0755 hidden "$R/$d"
  fi
done
bind_ro "$SITE_PACKAGES" "$R$VENV_SITE_PACKAGES"
mount -t tmpfs -o mode=0755,nosuid,nodev run "$R/run"
mount -t tmpfs -o mode=1777,nosuid,nodev tmp "$R/tmp"
mount -t tmpfs -o mode=1777,nosuid,nodev vartmp "$R/var/tmp"
mount -t tmpfs -o mode=0755,nosuid dev "$R/dev"
for n in null zero full random urandom tty; do
  touch "$R/dev/$n"; mount --bind "/dev/$n" "$R/dev/$n"
done
mkdir "$R/dev/pts" "$R/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "$R/dev/pts"
mount -t tmpfs -o mode=1777,nosuid,nodev shm "$R/dev/shm"
ln -s pts/ptmx "$R/dev/ptmx"
ln -s /proc/self/fd "$R/dev/fd"
mount -t proc -o nosuid,nodev,noexec proc "$R/proc"
bind_ro "$R/proc/sys" "$R/proc/sys"
if [ -e "$R/proc/sysrq-trigger" ]; then bind_ro "$R/proc/sysrq-trigger" "$R/proc/sysrq-trigger"; fi
bind_ro /sys "$R/sys"
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$R/sys/fs/cgroup"
cd "$R"
mkdir .oldroot
pivot_root . .oldroot
umount -l /.oldroot
rmdir /.oldroot
exec env -i container=uro-recs-test "$SYSTEMD" --unit=sandbox.target --show-status=no
"""

# Runs in the sandbox as some user: one line of JSON per request until stdin closes.
LOOP_CLIENT = r"""
import json, select, sys, time
from uro_recs.sdk import Client, UroRecsError
users = json.loads(sys.argv[1])
with Client("ipc:///run/uro-recs/client.sock", model="als", timeout=5.0) as client:
    i = 0
    while not select.select([sys.stdin], [], [], 0)[0]:
        started = time.monotonic()
        try:
            client.recommend(users[i % len(users)], n=5)
            error = None
        except UroRecsError as exc:
            error = type(exc).__name__
        print(json.dumps({"t": started, "s": time.monotonic() - started, "error": error}),
              flush=True)
        i += 1
        time.sleep(0.02)
"""

# Runs in the sandbox: connect to each socket path given; print the errno name or "ok".
CONNECT_PROBE = r"""
import errno, json, socket, sys
result = {}
for path in sys.argv[1:]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        result[path] = "ok"
    except OSError as exc:
        result[path] = errno.errorcode.get(exc.errno, str(exc.errno))
    finally:
        s.close()
print(json.dumps(result))
"""


# --- without systemd ------------------------------------------------------------------------


def test_broker_makes_client_socket_group_accessible_and_the_others_owner_only(
    tmp_path: Path,
) -> None:
    import grp

    from uro_recs.broker.broker import Broker

    group = grp.getgrgid(os.getgid()).gr_name
    config = BrokerConfig(client_socket_mode="0660", client_socket_group=group)
    run = Path(f"/tmp/ur-{uuid.uuid4().hex[:8]}")  # IPC paths must stay short
    run.mkdir()
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        broker = Broker(
            config,
            client_endpoints=[f"ipc://{run}/client.sock"],
            worker_endpoint=f"ipc://{run}/workers.sock",
            control_endpoint=f"ipc://{run}/control.sock",
            context=context,
        )
        modes = {p.name: (p.stat().st_mode & 0o777, p.stat().st_gid) for p in run.iterdir()}
        broker.close()
    finally:
        context.destroy(linger=0)
        shutil.rmtree(run)
    gid = grp.getgrnam(group).gr_gid
    assert modes["client.sock"] == (0o660, gid)
    assert modes["control.sock"][0] == 0o600
    assert modes["workers.sock"][0] == 0o600


def test_client_socket_mode_must_be_octal() -> None:
    from uro_recs.core.config import ConfigError

    with pytest.raises(ConfigError, match="client_socket_mode"):
        BrokerConfig(client_socket_mode="660x")
    assert BrokerConfig(client_socket_mode="0660").client_socket_mode_bits == 0o660
    assert BrokerConfig().client_socket_mode_bits is None


def test_worker_instance_names_the_model() -> None:
    from uro_recs.app.cli import worker_instance_model

    assert worker_instance_model("als-1") == "als"
    assert worker_instance_model("two-towers-12") == "two-towers"
    with pytest.raises(SystemExit):
        worker_instance_model("als")


@pytest.fixture
def staged_root(tmp_path: Path) -> Path:
    """A file system root with this host's user tables and an executable to run."""
    if shutil.which("systemd-sysusers") is None:
        pytest.skip("systemd-sysusers is not installed")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for table in ("passwd", "group", "shadow", "gshadow"):
        if Path("/etc", table).exists():
            shutil.copy(Path("/etc", table), root / "etc" / table)
    executable = root / VENV.lstrip("/") / "bin/uro-recs"
    executable.parent.mkdir(parents=True)
    executable.write_text(f"#!{VENV}/bin/python\n")
    executable.chmod(0o755)
    return root


def install(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "uro_recs.app.cli", "install-systemd", f"--root={root}"]
    command += [f"--exec={VENV}/bin/uro-recs", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)


def test_install_lays_out_user_directories_config_units_and_workers(staged_root: Path) -> None:
    done = install(staged_root, "--member=uro")
    # The hint puts publishing a first model before starting the units.
    hint = done.stdout.strip().splitlines()[-1]
    assert hint.index("publish a first model") < hint.index("systemctl enable --now")
    root = staged_root
    passwd = (root / "etc/passwd").read_text()
    assert "\nuro-recs:x:" in passwd
    assert any(
        line.startswith("uro-recs:") and line.split(":")[3].split(",") == ["uro"]
        for line in (root / "etc/group").read_text().splitlines()
    )
    units = root / "etc/systemd/system"
    for name in UNITS:
        text = (units / name).read_text()
        if "ExecStart=" in text:
            assert f"ExecStart={VENV}/bin/uro-recs --config /etc/uro-recs/uro-recs.toml" in text
    wants = sorted(p.name for p in (units / "uro-recs.target.wants").iterdir())
    assert wants == ["uro-recs-worker@als-1.service", "uro-recs-worker@als-2.service"]
    assert (root / "etc/uro-recs/uro-recs.toml").stat().st_mode & 0o777 == 0o640
    assert (root / "etc/uro-recs/uro-recs.env").stat().st_mode & 0o777 == 0o600
    assert (root / "var/lib/uro-recs/models").is_dir()


def test_install_again_keeps_config_and_members_and_follows_the_models(
    staged_root: Path,
) -> None:
    install(staged_root, "--member=uro")
    config = staged_root / "etc/uro-recs/uro-recs.toml"
    config.write_text(config.read_text().replace("workers = 2", "workers = 1"))
    config.write_text(config.read_text() + '\n[[models]]\nname = "deepfm"\nworkers = 1\n')
    config.write_text(config.read_text().replace("enabled = false", "enabled = true\nworkers = 2"))
    report = install(staged_root).stdout
    assert "kept /etc/uro-recs/uro-recs.toml" in report and "members uro" in report
    assert "m uro uro-recs" in (staged_root / "etc/sysusers.d/uro-recs.conf").read_text()
    wants = staged_root / "etc/systemd/system/uro-recs.target.wants"
    assert sorted(p.name for p in wants.iterdir()) == [
        "uro-recs-ingest@1.service",
        "uro-recs-ingest@2.service",
        "uro-recs-worker@als-1.service",
        "uro-recs-worker@deepfm-1.service",
    ]
    assert os.readlink(wants / "uro-recs-ingest@2.service").endswith("/uro-recs-ingest@.service")


def test_install_refuses_an_executable_that_protect_home_hides(tmp_path: Path) -> None:
    from uro_recs.app.install import paths_hidden_by_protect_home

    script = tmp_path / "uro-recs"
    script.write_text("#!/root/venv/bin/python\n")
    assert Path("/root/venv/bin/python") in paths_hidden_by_protect_home(script)
    script.write_text("#!/usr/bin/python3\n")
    assert not [p for p in paths_hidden_by_protect_home(script) if p.name.startswith("python")]


def test_every_service_is_exposed_at_most_2_5(
    staged_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    install(staged_root)
    services = (
        "uro-recs-broker.service",
        "uro-recs-worker@als-1.service",
        "uro-recs-ingest@1.service",
    )
    scores = {unit: exposure(staged_root, unit) for unit in (*services, "uro-recs-retrain.service")}
    with capsys.disabled():
        print(f"\nsystemd-analyze security exposure: {scores}")
    assert all(score <= 2.5 for score in scores.values()), scores


def exposure(root: Path, unit: str) -> float:
    command = ["systemd-analyze", "security", "--offline=yes", f"--root={root}", unit]
    output = subprocess.run(command, capture_output=True, text=True, timeout=60).stdout
    last = [line for line in output.splitlines() if "Overall exposure level" in line]
    assert last, output
    return float(last[-1].split(":")[1].split()[0])


# --- under a real systemd -------------------------------------------------------------------


def cgroup2_mount() -> Path | None:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if fields[2] == "cgroup2":
            return Path(fields[1])
    return None


def why_systemd_cannot_boot() -> str | None:
    if os.geteuid() != 0:
        return "needs root: boots systemd as PID 1 in new namespaces"
    if SYSTEMD is None:
        return "systemd is not installed"
    for tool in ("unshare", "nsenter", "setpriv", "pivot_root", "systemd-sysusers"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not Path("/usr/bin", PYTHON).exists():
        return f"needs /usr/bin/{PYTHON}: the units' Python must live outside home directories"
    if cgroup2_mount() is None:
        return "no cgroup2 hierarchy is mounted"
    probe = subprocess.run(
        ["unshare", "--fork", "--pid", "--mount", "--net", "--cgroup", "true"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        return f"cannot create namespaces here: {probe.stderr.strip()}"
    return None


@dataclass
class Sandbox:
    work: Path
    cgroup: Path
    process: subprocess.Popen[bytes]
    pid1: int  # the booted systemd, as this host numbers it
    startup_s: float = 0.0  # systemctl start uro-recs.target

    def command(self, *argv: str, user: str | None = None) -> list[str]:
        enter = ["nsenter", f"--target={self.pid1}", "--all"]
        env = ["env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"]
        if user is not None:
            env = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", *env]
        return [*enter, *env, *argv]

    def run(
        self, *argv: str, user: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            self.command(*argv, user=user), capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{argv} failed ({result.returncode}): {result.stderr}")
        return result

    def python(self, code: str, *args: str, user: str | None = None) -> Any:
        return json.loads(self.run(f"{VENV}/bin/python", "-c", code, *args, user=user).stdout)

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, *(f"--property={p}" for p in properties))
        return dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)

    def journal(self, unit: str | None = None, since: float = 0.0) -> str:
        """The messages (of one unit) that journald received at `since` (time.time()) or later."""
        units = ["-u", unit] if unit else []
        out = self.run("journalctl", "--no-pager", "-o", "json", *units, check=False).stdout
        entries = [json.loads(line) for line in out.splitlines()]
        return "".join(
            f"{e['MESSAGE']}\n"
            for e in entries
            if int(e["__REALTIME_TIMESTAMP"]) >= since * 1e6 and isinstance(e["MESSAGE"], str)
        )

    def control(self, op: str) -> dict[str, Any]:
        """Ask the control socket, as the service user (root could too, but should not need to)."""
        code = (
            "import sys, zmq; s = zmq.Context().socket(zmq.DEALER); s.setsockopt(zmq.LINGER, 0);"
            "s.connect('ipc:///run/uro-recs/control.sock'); s.send_multipart([b'', bytes.fromhex("
            "sys.argv[1])]); assert s.poll(5000), 'no reply'; sys.stdout.write(s.recv_multipart()"
            "[1].hex())"
        )
        request = protocol.encode_request(1, op).hex()
        reply = self.run(f"{VENV}/bin/python", "-c", code, request, user="uro-recs").stdout
        decoded: dict[str, Any] = msgpack.unpackb(bytes.fromhex(reply))["result"]
        return decoded

    def teardown(self) -> None:
        if self.process.poll() is None and self.pid1:
            subprocess.run(self.command("systemctl", "exit"), capture_output=True, timeout=15)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=15)
        if self.process.poll() is None:
            self.process.kill()  # unshare --kill-child then kills the sandbox's PID 1, and so all
            self.process.wait(timeout=15)
        for _ in range(50):  # the kernel empties cgroups of killed processes asynchronously
            for directory in [*sorted(self.cgroup.rglob("*"), reverse=True), self.cgroup]:
                with contextlib.suppress(OSError):
                    directory.rmdir()
            if not self.cgroup.exists():
                break
            time.sleep(0.1)
        mounts = Path("/proc/self/mountinfo").read_text()
        assert f" {self.work}/" not in mounts, "a sandbox mount leaked into this namespace"
        shutil.rmtree(self.work)


def prepare_root(work: Path, store: Path) -> dict[str, str]:
    """Build the sandbox's root file system in `work`; returns the boot script's environment."""
    root = work / "root"
    host_dirs = ["usr"]
    for name in ("usr", "proc", "sys", "dev", "run", "tmp", "var/tmp", "var/log", "home", "root"):
        (root / name).mkdir(parents=True)
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        host = Path("/", name)
        if host.is_symlink():
            (root / name).symlink_to(os.readlink(host))
        elif host.is_dir():
            (root / name).mkdir()
            host_dirs.append(name)
    (root / "var/run").symlink_to("../run")
    (root / "var/lock").symlink_to("../run/lock")

    shutil.copytree("/etc", root / "etc", symlinks=True)
    for name in ("system", "system-generators", "system-environment-generators"):
        shutil.rmtree(root / "etc/systemd" / name, ignore_errors=True)
    (root / "etc/systemd/system").mkdir()
    (root / "etc/systemd/system/sandbox.target").write_text(SANDBOX_TARGET)
    (root / "etc/machine-id").write_text(uuid.uuid4().hex + "\n")
    (root / "etc/hostname").write_text("uro-recs-sandbox\n")

    units = work / "units"
    units.mkdir()
    assert SYSTEMD is not None
    for name in BOOT_UNITS:
        shutil.copy(SYSTEMD.parent / "system" / name, units / name)

    # The production layout: a virtualenv made from the system Python under /opt. Its
    # site-packages are this test's (bind-mounted read-only at boot).
    venv = root / VENV.lstrip("/")
    subprocess.run([f"/usr/bin/{PYTHON}", "-m", "venv", "--without-pip", venv], check=True)
    site_packages = f"{VENV}/lib/{PYTHON}/site-packages"
    executable = venv / "bin/uro-recs"
    executable.write_text(
        f"#!{VENV}/bin/python\nimport sys\nfrom uro_recs.app.cli import main\nsys.exit(main())\n"
    )
    executable.chmod(0o755)

    install(root, "--member=uro")
    users = ["u outsider - 'not in the uro-recs group'"]
    subprocess.run(["systemd-sysusers", f"--root={root}", "--inline", *users], check=True)
    models = root / "var/lib/uro-recs/models"
    for model in ("als", "deepfm"):
        shutil.copytree(store / model, models / model)
    config = root / "etc/uro-recs/uro-recs.toml"
    config.write_text(config.read_text() + '\n[[models]]\nname = "deepfm"\nworkers = 1\n')
    install(root)
    uid, gid = uid_gid(root, "uro-recs")
    for path in [models, *models.rglob("*")]:
        os.chown(path, uid, gid, follow_symlinks=False)

    import sysconfig

    return {
        "HOST_DIRS": " ".join(host_dirs),
        "SITE_PACKAGES": sysconfig.get_paths()["purelib"],
        "VENV_SITE_PACKAGES": site_packages,
        "SYSTEMD": str(SYSTEMD),
    }


def uid_gid(root: Path, user: str) -> tuple[int, int]:
    for line in (root / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == user:
            return int(fields[2]), int(fields[3])
    raise KeyError(user)


def boot(work: Path, env: dict[str, str]) -> Sandbox:
    mount = cgroup2_mount()
    assert mount is not None
    own = Path("/proc/self/cgroup").read_text().splitlines()
    base = next(line.split("::", 1)[1] for line in own if line.startswith("0::"))
    cgroup = mount / base.lstrip("/") / f"uro-recs-test-{os.getpid()}"
    cgroup.mkdir()
    # The shell joins the new cgroup, so the cgroup namespace unshare makes is rooted there.
    command = [
        "sh",
        "-c",
        'echo $$ > "$0/cgroup.procs" && exec "$@"',
        str(cgroup),
        "unshare",
        "--fork",
        "--pid",
        "--mount",
        "--net",
        "--uts",
        "--ipc",
        "--cgroup",
        "--propagation=private",
        "--kill-child",  # if unshare dies, so does everything in the sandbox
        "bash",
        "-c",
        BOOT_SCRIPT,
        "boot",
        str(work),
    ]
    with (work / "boot.log").open("wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env}
        )
    sandbox = Sandbox(work, cgroup, process, pid1=0)
    try:
        sandbox.pid1 = wait_for_systemd(process)
        deadline = time.monotonic() + 30
        state = ""
        while state not in ("running", "degraded") and time.monotonic() < deadline:
            time.sleep(0.1)  # systemctl fails until PID 1 listens on /run/systemd/private
            wait = sandbox.run("systemctl", "is-system-running", "--wait", check=False)
            state = wait.stdout.strip()
        assert state == "running", (state, sandbox.journal())
    except BaseException:
        print((work / "boot.log").read_text())
        sandbox.teardown()
        raise
    return sandbox


def wait_for_systemd(unshare: subprocess.Popen[bytes]) -> int:
    """The host PID of the sandbox's PID 1, once it is systemd."""
    children = Path(f"/proc/{unshare.pid}/task/{unshare.pid}/children")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and unshare.poll() is None:
        pids = children.read_text().split() if children.exists() else []
        if pids and Path(f"/proc/{pids[0]}/comm").read_text().strip() == "systemd":
            return int(pids[0])
        time.sleep(0.05)
    raise AssertionError("systemd did not start as PID 1 of the sandbox")


@pytest.fixture(scope="module")
def sandbox(trained_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    reason = why_systemd_cannot_boot()
    if reason is not None:
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("systemd", numbered=True)
    env = prepare_root(work, trained_store)
    booted = boot(work, env)
    try:
        started = time.monotonic()
        booted.run("systemctl", "start", "uro-recs.target", timeout=240)
        booted.startup_s = time.monotonic() - started
        yield booted
    finally:
        booted.teardown()


@dataclass
class Loop:
    """A client asking `recommend` in a loop inside the sandbox until stopped."""

    process: subprocess.Popen[str]

    @classmethod
    def start(cls, sandbox: Sandbox, users: Sequence[str], user: str = "uro") -> Loop:
        command = sandbox.command(
            f"{VENV}/bin/python", "-c", LOOP_CLIENT, json.dumps(list(users)), user=user
        )
        return cls(
            subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
            )
        )

    def stop(self) -> list[dict[str, Any]]:
        out, _ = self.process.communicate(timeout=30)  # closes stdin: the client's cue to stop
        return [json.loads(line) for line in out.splitlines()]


def test_sandbox_sees_only_the_units_it_boots_with_and_ours(sandbox: Sandbox) -> None:
    listed = sandbox.run("systemctl", "list-unit-files", "--no-legend", "--no-pager").stdout
    assert {line.split()[0] for line in listed.splitlines()} == {
        *BOOT_UNITS,
        *UNITS,
        "sandbox.target",
    }


def test_services_are_exposed_at_most_2_5_as_loaded(
    sandbox: Sandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    scores = {}
    for unit in (
        "uro-recs-broker.service",
        WORKERS[0],
        "uro-recs-ingest@1.service",
        "uro-recs-retrain.service",
    ):
        output = sandbox.run("systemd-analyze", "security", unit).stdout
        scores[unit] = float(output.split("Overall exposure level for")[1].split()[1])
    with capsys.disabled():
        print(f"\nsystemd-analyze security, online in the sandbox: {scores}")
    assert all(score <= 2.5 for score in scores.values()), scores


def test_units_verify_clean_in_the_booted_system(sandbox: Sandbox) -> None:
    paths = [f"/etc/systemd/system/{name}" for name in UNITS if "@" not in name]
    result = sandbox.run(
        "systemd-analyze",
        "verify",
        *paths,
        "uro-recs-worker@als-1.service",
        "uro-recs-ingest@1.service",
        check=False,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_target_brings_up_broker_and_workers_ready_to_answer(
    sandbox: Sandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    for unit in SERVICES:
        state = sandbox.show(unit, "ActiveState", "SubState", "Type", "User")
        assert state == {
            "ActiveState": "active",
            "SubState": "running",
            "Type": "notify",
            "User": "uro-recs",
        }, unit
    models = sandbox.control("stats")["models"]
    assert (models["als"]["workers"], models["deepfm"]["workers"]) == (2, 1)
    with capsys.disabled():
        print(
            f"\nuro-recs.target start (broker + {len(WORKERS)} workers ready): "
            f"{sandbox.startup_s:.1f} s"
        )


def test_uro_recs_group_member_gets_recommendations_and_outsider_is_refused(
    sandbox: Sandbox, demo_users: list[str]
) -> None:
    answer = json.loads(
        sandbox.run(
            f"{VENV}/bin/uro-recs",
            "--config",
            "/etc/uro-recs/uro-recs.toml",
            "recommend",
            demo_users[0],
            "--model",
            "als",
            "-n",
            "5",
            user="uro",
        ).stdout
    )
    assert len(answer["items"]) == 5 and answer["cold_start"] is False

    sockets = [f"/run/uro-recs/{name}.sock" for name in ("client", "control", "workers")]
    assert sandbox.python(CONNECT_PROBE, *sockets, user="uro") == {
        "/run/uro-recs/client.sock": "ok",
        "/run/uro-recs/control.sock": "EACCES",
        "/run/uro-recs/workers.sock": "EACCES",
    }
    assert set(sandbox.python(CONNECT_PROBE, *sockets, user="outsider").values()) == {"EACCES"}
    assert set(sandbox.python(CONNECT_PROBE, *sockets, user="uro-recs").values()) == {"ok"}
    modes = sandbox.run("stat", "-c", "%n %a %U:%G", "/run/uro-recs", *sockets).stdout
    assert modes.split("\n")[:4] == [
        "/run/uro-recs 750 uro-recs:uro-recs",
        "/run/uro-recs/client.sock 660 uro-recs:uro-recs",
        "/run/uro-recs/control.sock 600 uro-recs:uro-recs",
        "/run/uro-recs/workers.sock 600 uro-recs:uro-recs",
    ]


def test_systemd_restarts_a_killed_worker_while_requests_keep_succeeding(
    sandbox: Sandbox, demo_users: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    loop = Loop.start(sandbox, demo_users[:20])
    try:
        time.sleep(1.0)
        # Kill als-1, wait until it is back, then kill als-2: while als-2 is dead only the new
        # als-1 can answer, so every request succeeding shows it serving. Then deepfm-1, the
        # only worker of its model: the answer below can come from the new process alone.
        restarts = [restart_after_kill_9(sandbox, unit) for unit in WORKERS]
        time.sleep(0.5)
    finally:
        requests = loop.stop()
    failed = [r for r in requests if r["error"] is not None]
    assert failed == [] and len(requests) > 50, failed
    recommend = [f"{VENV}/bin/uro-recs", "--config", "/etc/uro-recs/uro-recs.toml", "recommend"]
    deepfm = sandbox.run(*recommend, demo_users[1], "--model", "deepfm", user="uro").stdout
    assert json.loads(deepfm)["cold_start"] is False
    models = sandbox.control("stats")["models"]
    assert (models["als"]["workers"], models["deepfm"]["workers"]) == (2, 1)
    with capsys.disabled():
        for unit, restart in zip(WORKERS, restarts, strict=True):
            print(
                f"\n{unit}: kill -9 -> new worker READY {restart.ready_s:.2f} s "
                f"(systemd saw the death after {restart.noticed_s:.3f} s, restarted it after "
                f"{restart.started_s:.2f} s, model load and warm-up took the rest)"
            )
        slowest = max(r["s"] for r in requests)
        print(f"{len(requests)} requests during the kills, none failed, slowest {slowest:.2f} s")


@dataclass(frozen=True)
class Restart:
    noticed_s: float  # kill -9 -> systemd saw the main process die
    started_s: float  # kill -9 -> the new main process started (RestartSec= later)
    ready_s: float  # kill -9 -> the new process sent READY=1: loaded, warm, in the broker


def restart_after_kill_9(sandbox: Sandbox, unit: str) -> Restart:
    before = sandbox.show(unit, "MainPID", "NRestarts")
    killed_at = time.monotonic()
    sandbox.run("kill", "-9", before["MainPID"])
    deadline = killed_at + 120
    while time.monotonic() < deadline:
        now = sandbox.show(
            unit,
            "MainPID",
            "NRestarts",
            "ActiveState",
            "ActiveExitTimestampMonotonic",
            "ExecMainStartTimestampMonotonic",
            "ActiveEnterTimestampMonotonic",
        )
        if now["NRestarts"] != before["NRestarts"] and now["ActiveState"] == "active":
            assert now["MainPID"] != before["MainPID"]
            # systemd's monotonic timestamps are this host's CLOCK_MONOTONIC, in microseconds.
            noticed, started, ready = (
                int(now[name]) / 1e6 - killed_at
                for name in (
                    "ActiveExitTimestampMonotonic",
                    "ExecMainStartTimestampMonotonic",
                    "ActiveEnterTimestampMonotonic",
                )
            )
            return Restart(noticed_s=noticed, started_s=started, ready_s=ready)
        time.sleep(0.1)
    raise AssertionError(f"{unit} was not restarted: {sandbox.journal(unit)[-3000:]}")


def test_watchdog_restarts_a_broker_whose_loop_is_stuck(
    sandbox: Sandbox, demo_users: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    unit = "uro-recs-broker.service"
    before = sandbox.show(unit, "MainPID", "NRestarts", "WatchdogUSec")
    stuck_at = time.monotonic()
    sandbox.run("kill", "-STOP", before["MainPID"])  # its loop stops, and with it WATCHDOG=1
    while sandbox.show(unit, "NRestarts")["NRestarts"] == before["NRestarts"]:
        assert time.monotonic() < stuck_at + 60, sandbox.journal(unit)[-3000:]
        time.sleep(0.2)
    restarted_s = time.monotonic() - stuck_at
    assert "Watchdog timeout" in sandbox.journal(unit)
    # The workers find the new broker and register again; clients are served again.
    deadline = time.monotonic() + 30
    while sandbox.show(unit, "ActiveState")["ActiveState"] != "active" or (
        sandbox.control("stats")["models"].get("als", {}).get("workers") != len(ALS_WORKERS)
    ):
        assert time.monotonic() < deadline, sandbox.journal()[-3000:]
        time.sleep(0.2)
    recommend = [f"{VENV}/bin/uro-recs", "--config", "/etc/uro-recs/uro-recs.toml", "recommend"]
    assert json.loads(sandbox.run(*recommend, demo_users[0], user="uro").stdout)["items"]
    with capsys.disabled():
        print(
            f"\n{unit}: loop stopped -> killed by the watchdog and restarted {restarted_s:.1f} s "
            f"(WatchdogSec={before['WatchdogUSec']} from its last ping, then RestartSec=1s)"
        )


def test_stopping_the_target_drains_every_service_cleanly(
    sandbox: Sandbox, demo_users: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    loop = Loop.start(sandbox, demo_users[:20])
    time.sleep(1.0)
    stop_began = time.time()
    started = time.monotonic()
    # The target stops first (its start was ordered after them); the services then drain.
    sandbox.run("systemctl", "stop", "uro-recs.target")
    while any(sandbox.show(u, "ActiveState")["ActiveState"] != "inactive" for u in SERVICES):
        assert time.monotonic() < started + 90, "the services did not stop"
        time.sleep(0.1)
    stop_s = time.monotonic() - started
    requests = loop.stop()
    for unit in SERVICES:
        state = sandbox.show(unit, "ActiveState", "Result", "ExecMainStatus")
        assert state == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}, (
            unit,
            state,
            sandbox.journal(unit, since=stop_began),
        )
        journal = sandbox.journal(unit, since=stop_began)
        # It exited by itself: neither died of SIGTERM nor was killed after TimeoutStopSec=.
        assert "code=killed" not in journal and "Killing process" not in journal, journal
        events = ("broker_draining", "broker_stopped") if "broker" in unit else WORKER_STOP
        assert all(event in journal for event in events), (unit, journal[-3000:])
        assert "drain_timeout" not in journal
    answered = [r for r in requests if r["t"] < started]
    assert answered and all(r["error"] is None for r in answered)
    lost = [r for r in requests if r["error"] not in (None, "Unavailable", "DeadlineExceeded")]
    assert lost == []
    assert "uro-recs" not in sandbox.run("ls", "/run").stdout.split()  # RuntimeDirectory= gone
    with capsys.disabled():
        print(f"\nsystemctl stop uro-recs.target: {stop_s:.2f} s, every service drained")
