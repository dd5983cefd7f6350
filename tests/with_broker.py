"""Run a command with a live broker: `python -m tests.with_broker CMD ...`.

The broker (no models) listens on a temporary run_dir; the command sees its client socket's
path in URO_RECS_BROKER_IPC. Used by `make test-elixir`, whose live ZMTP tests speak to it.
Exits with the command's status.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.cluster import Cluster


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m tests.with_broker COMMAND [ARG ...]", file=sys.stderr)
        return 2
    with (
        tempfile.TemporaryDirectory(prefix="ur-store-") as store,
        Cluster(Path(store), {}).start() as cluster,
    ):
        env = {**os.environ, "URO_RECS_BROKER_IPC": str(cluster.run_dir / "client.sock")}
        return subprocess.run(argv, env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
