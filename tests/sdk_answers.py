"""The Python SDK's answers to a list of requests: `python -m tests.sdk_answers ENDPOINT FILE`.

FILE holds a msgpack array of requests, each a map with `op` (`recommend`, `predict` or
`similar_items`), `model` and the op's arguments as the SDK names them (`user` or `users`,
`n`, `filter_consumed`, `exclude`, `seq`; `items`; `item`). Prints, as msgpack on stdout, one answer
per request: the result's fields as a map (a list of maps for `users`), or `{"error": code}`.
The Elixir client's integration tests compare its answers with these.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import msgpack

from uro_recs.sdk import Client, UroRecsError


def answer(client: Client, request: dict[str, Any]) -> Any:
    op, model = request["op"], request["model"]
    options = {k: request[k] for k in ("n", "filter_consumed", "exclude", "seq") if k in request}
    try:
        if op == "recommend" and "users" in request:
            many = client.recommend_many(request["users"], model=model, **options)
            return [asdict(r) for r in many]
        if op == "recommend":
            return asdict(client.recommend(request["user"], model=model, **options))
        if op == "predict":
            return asdict(client.predict(request["user"], request["items"], model=model))
        if op == "similar_items":
            return asdict(client.similar_items(request["item"], n=request["n"], model=model))
    except UroRecsError as exc:
        return {"error": exc.code.value}
    raise ValueError(f"unknown op {op!r}")


def main(endpoint: str, path: str) -> None:
    requests = msgpack.unpackb(Path(path).read_bytes())
    with Client(endpoint, timeout=10.0) as client:
        answers = [answer(client, request) for request in requests]
    sys.stdout.buffer.write(msgpack.packb(answers))


if __name__ == "__main__":
    main(*sys.argv[1:])
