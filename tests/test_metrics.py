"""The broker's Prometheus metrics, scraped by a real Prometheus server, and `uro-recs status`
over the same broker."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import Cluster
from tests.test_cli import run
from uro_recs.sdk import Client, UnknownModel

pytestmark = pytest.mark.timeout(180)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        text: str = response.read().decode()
        return text


@pytest.fixture(scope="module")
def cluster(trained_store: Path) -> Iterator[Cluster]:
    broker = {"metrics_address": f"127.0.0.1:{free_port()}"}
    with Cluster(trained_store, {"als": 1}, broker=broker).start() as running:
        with Client(running.client_endpoint, model="als") as client:
            for i in range(40):
                client.recommend(f"user-{i}", n=5)
            for _ in range(3):
                with pytest.raises(UnknownModel):
                    client.recommend("u", model="nope")
        yield running


def metrics_url(cluster: Cluster) -> str:
    address = cluster.config_path.read_text().split('metrics_address = "')[1].split('"')[0]
    return f"http://{address}/metrics"


def sample(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{") or line.startswith(f"{name} "):
            series, _, value = line.rpartition(" ")
            found = series[len(name) :].strip("{}")
            if ",".join(sorted(found.split(","))) == wanted:
                return float(value)
    raise AssertionError(f"no {name}{{{wanted}}} in the scrape")


def wait_for_snapshot(url: str, name: str, want: float, **labels: str) -> str:
    deadline = time.monotonic() + 10
    while True:
        text = get(url)
        try:
            if sample(text, name, **labels) >= want:
                return text
        except AssertionError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} never reached {want}:\n{text}")
        time.sleep(0.2)


def test_the_scrape_counts_requests_latency_workers_and_versions(cluster: Cluster) -> None:
    url = metrics_url(cluster)
    ok = {"model": "als", "op": "recommend", "outcome": "ok"}
    text = wait_for_snapshot(url, "uro_recs_requests_total", 40, **ok)
    assert sample(text, "uro_recs_requests_total", **ok) == 40
    unknown = {"model": "(unknown)", "op": "recommend", "outcome": "unknown_model"}
    assert sample(text, "uro_recs_requests_total", **unknown) == 3  # a typo names no series
    assert (
        sample(text, "uro_recs_request_duration_seconds_count", model="als", op="recommend") == 40
    )
    inf = {"model": "als", "op": "recommend", "le": "+Inf"}
    assert sample(text, "uro_recs_request_duration_seconds_bucket", **inf) == 40
    assert sample(text, "uro_recs_workers", model="als") == 1
    assert sample(text, "uro_recs_queued", model="als") == 0
    version = cluster.stats()["models"]["als"]["versions"][0]
    assert sample(text, "uro_recs_model_version_info", model="als", version=version) == 1
    assert sample(text, "uro_recs_broker_events_total", event="workers_joined") == 1
    # The worker's own figures, from the files it leaves for the broker: 40 users scored.
    assert sample(text, "uro_recs_worker_call_users_sum", model="als") == 40
    assert 1 <= sample(text, "uro_recs_worker_call_users_count", model="als") <= 40
    assert sample(text, "uro_recs_worker_call_seconds_count", model="als") >= 1


def test_a_prometheus_server_scrapes_it(cluster: Cluster, tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("the prometheus server is missing: apt-get install -y prometheus")
    target = metrics_url(cluster).removeprefix("http://").removesuffix("/metrics")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: uro-recs\n"
        f"    static_configs:\n      - targets: ['{target}']\n"
    )
    web = f"127.0.0.1:{free_port()}"
    server = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address={web}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        query = 'uro_recs_requests_total{model="als",op="recommend",outcome="ok"}'
        result = wait_for_query(web, query)
        assert float(result[0]["value"][1]) == 40
        assert float(wait_for_query(web, 'uro_recs_workers{model="als"}')[0]["value"][1]) == 1
        up = wait_for_query(web, 'up{job="uro-recs"}')
        assert float(up[0]["value"][1]) == 1
    finally:
        server.terminate()
        server.wait(timeout=30)


def wait_for_query(web: str, query: str) -> list[dict[str, Any]]:
    url = f"http://{web}/api/v1/query?{urllib.parse.urlencode({'query': query})}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            reply = json.loads(get(url))
            if reply.get("status") == "success" and reply["data"]["result"]:
                result: list[dict[str, Any]] = reply["data"]["result"]
                return result
        except OSError:
            pass  # the server is still starting
        time.sleep(0.5)
    raise AssertionError(f"Prometheus never answered {query}")


def test_status_shows_each_model_and_the_last_minute(cluster: Cluster) -> None:
    table = run("--config", str(cluster.config_path), "status")
    assert table.returncode == 0, table.stderr
    row = next(line for line in table.stdout.splitlines() if line.startswith("als "))
    assert "<= " in row  # a latency, not a dash
    as_json = run("--config", str(cluster.config_path), "status", "--json")
    minute = json.loads(as_json.stdout)["last_minute"]["als"]
    assert minute["requests"] >= 40 and minute["per_s"] > 0


def test_the_grafana_dashboard_asks_only_for_series_the_broker_exports(cluster: Cluster) -> None:
    dashboard = json.loads(
        (Path(__file__).parent.parent / "docs" / "grafana-dashboard.json").read_text()
    )
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    asked = {name for expr in exprs for name in re.findall(r"\buro_recs_\w+", expr)}
    exported = {line.split("{")[0].split(" ")[0] for line in get(metrics_url(cluster)).splitlines()}
    assert asked and asked <= exported, asked - exported
