"""`uro-recs install-systemd`: the user, directories, configuration and units of a deployment.

Run it again after an upgrade or after changing [[models]] or [ingest]: it rewrites the units
(they are ours) and the worker links, and never touches a configuration or environment file
that exists.
`root` lets packagers and tests lay everything out in another file system tree; paths written
into the units are always as seen from that root.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

from uro_recs.core.config import load_config

USER = GROUP = "uro-recs"
UNIT_DIR = Path("etc/systemd/system")
CONFIG_DIR = Path("etc/uro-recs")
STATE_DIR = Path("var/lib/uro-recs")
CONFIG_FILE = CONFIG_DIR / "uro-recs.toml"
ENV_FILE = CONFIG_DIR / "uro-recs.env"
SYSUSERS_FILE = Path("etc/sysusers.d/uro-recs.conf")
UNITS = (
    "uro-recs.target",
    "uro-recs-broker.service",
    "uro-recs-worker@.service",
    "uro-recs-ingest@.service",
    "uro-recs-retrain.service",
    "uro-recs-retrain.timer",
)
SHIPPED_EXECUTABLE = "/opt/uro-recs/venv/bin/uro-recs"  # the path the units in systemd/ name
HOME_DIRS = (Path("/home"), Path("/root"), Path("/run/user"))  # what ProtectHome=yes hides


class InstallError(Exception):
    pass


def shipped(name: str) -> str:
    return (resources.files("uro_recs.systemd") / name).read_text()


def default_executable() -> Path:
    beside_python = Path(sys.executable).parent / "uro-recs"
    if beside_python.exists():
        return beside_python
    on_path = shutil.which("uro-recs")
    if on_path is None:
        raise InstallError("no uro-recs executable next to this Python or on PATH: pass --exec")
    return Path(on_path)


def paths_hidden_by_protect_home(executable: Path) -> list[Path]:
    """The executable, its interpreter and their real locations that lie in a home directory."""
    paths = [executable, executable.resolve()]
    with executable.open("rb") as fh:
        first_line = fh.readline(512)
    if first_line.startswith(b"#!") and first_line[2:].split():
        interpreter = Path(os.fsdecode(first_line[2:].split()[0]))
        paths += [interpreter, interpreter.resolve()]
    return [p for p in paths if any(p == home or home in p.parents for home in HOME_DIRS)]


def render_unit(name: str, executable: Path) -> str:
    return shipped(name).replace(SHIPPED_EXECUTABLE, str(executable))


def wanted_units(config_file: Path) -> list[str]:
    """The worker instances uro-recs.target wants: one per configured model worker, plus the
    ingest workers when [ingest] is enabled."""
    config = load_config(config_file)
    units = [
        f"uro-recs-worker@{m.name}-{i}.service"
        for m in config.models
        for i in range(1, m.workers + 1)
    ]
    if config.ingest.enabled:
        units += [f"uro-recs-ingest@{i}.service" for i in range(1, config.ingest.workers + 1)]
    return units


def install_systemd(
    root: Path = Path("/"),
    executable: Path | None = None,
    members: list[str] | None = None,
    reload: bool = True,
) -> list[str]:
    """Lay out a deployment under `root`; returns what it did, one line per step."""
    root = root.absolute()
    executable = executable or default_executable()
    if not executable.is_absolute():
        raise InstallError(f"--exec must be an absolute path, got {executable}")
    in_root = root / executable.relative_to("/")
    if not os.access(in_root, os.X_OK):
        raise InstallError(f"{in_root} is not an executable")
    if root == Path("/") and (hidden := paths_hidden_by_protect_home(executable)):
        raise InstallError(
            f"{hidden[0]} is in a home directory, which ProtectHome=yes hides from the services: "
            "install into a virtualenv made from a system Python, e.g. "
            "`python3.11 -m venv /opt/uro-recs/venv`, and run its uro-recs"
        )
    done = [_create_user(root, members or [])]
    uid, gid = _user_id(root, USER), _group_id(root, GROUP)

    for path, mode, owner in (
        (CONFIG_DIR, 0o750, (0, gid)),
        (STATE_DIR, 0o750, (uid, gid)),
        (STATE_DIR / "models", 0o750, (uid, gid)),
    ):
        target = root / path
        target.mkdir(parents=True, exist_ok=True)
        _own(target, mode, owner)
    done.append(f"directories /{CONFIG_DIR} and /{STATE_DIR}/models")

    for path, source, mode, owner in (
        (CONFIG_FILE, "uro-recs.toml", 0o640, (0, gid)),
        (ENV_FILE, "uro-recs.env", 0o600, (0, 0)),  # secrets: systemd reads it as root
    ):
        target = root / path
        if target.exists():
            done.append(f"kept /{path} (exists)")
            continue
        target.write_text(shipped(source))
        _own(target, mode, owner)
        done.append(f"wrote /{path}")

    unit_dir = root / UNIT_DIR
    unit_dir.mkdir(parents=True, exist_ok=True)
    for name in UNITS:
        (unit_dir / name).write_text(render_unit(name, executable))
        (unit_dir / name).chmod(0o644)
    done.append(f"units in /{UNIT_DIR} running {executable}")

    wants = unit_dir / "uro-recs.target.wants"
    wants.mkdir(exist_ok=True)
    for stale in [*wants.glob("uro-recs-worker@*.service"), *wants.glob("uro-recs-ingest@*")]:
        stale.unlink()
    units = wanted_units(root / CONFIG_FILE)
    for unit in units:
        template = unit.split("@")[0] + "@.service"
        (wants / unit).symlink_to(Path("/") / UNIT_DIR / template)
    done.append(f"uro-recs.target wants {', '.join(units) or '(no workers)'}")

    if reload and root == Path("/") and Path("/run/systemd/system").exists():
        subprocess.run(["systemctl", "daemon-reload"], check=True)
        done.append("systemctl daemon-reload")
    config = f"/{CONFIG_FILE}"
    done.append(
        f"next: 1. edit {config} ([database] url, [[models]]); "
        f"2. publish a first model: sudo -u uro-recs uro-recs --config {config} sync "
        f"(or train --csv FILE --publish); "
        "3. systemctl enable --now uro-recs.target uro-recs-retrain.timer"
    )
    return done


def _create_user(root: Path, members: list[str]) -> str:
    target = root / SYSUSERS_FILE
    if target.exists():  # members added by an earlier run stay members
        earlier = [line.split()[1] for line in target.read_text().splitlines() if line[:2] == "m "]
        members = [*dict.fromkeys([*earlier, *members])]
    lines = [*shipped("uro-recs.sysusers").splitlines(), *(f"m {m} {GROUP}" for m in members)]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("\n".join(lines) + "\n")
    sysusers = shutil.which("systemd-sysusers")
    if sysusers is None:
        raise InstallError("systemd-sysusers is not installed")
    entries = [line for line in lines if line.strip() and not line.startswith("#")]
    command = [sysusers, f"--root={root}", "--inline", *entries]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise InstallError(f"systemd-sysusers failed: {result.stderr.strip()}")
    joined = f", members {', '.join(members)}" if members else ""
    return f"user and group {USER}{joined} (/{SYSUSERS_FILE})"


def _user_id(root: Path, name: str) -> int:
    return _lookup(root / "etc/passwd", name)


def _group_id(root: Path, name: str) -> int:
    return _lookup(root / "etc/group", name)


def _lookup(table: Path, name: str) -> int:
    """The id of `name` in an /etc/passwd or /etc/group style file (not this host's NSS)."""
    for line in table.read_text().splitlines():
        fields = line.split(":")
        if len(fields) > 2 and fields[0] == name:
            return int(fields[2])
    raise InstallError(f"{name} is not in {table}")


def _own(path: Path, mode: int, owner: tuple[int, int]) -> None:
    if os.geteuid() == 0:  # a packager staging a root as a normal user leaves ownership alone
        os.chown(path, *owner)
    path.chmod(mode)
