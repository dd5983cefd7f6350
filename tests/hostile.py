"""Generated hostile client messages: what a broken or malicious caller can put on the wire.

`hostile_message(rng, max_bytes)` returns the frames of one message (after the DEALER's own
framing): deep nesting, huge or lying containers, wrong types in every field, ext types,
invalid UTF-8, bin keys, out-of-range integers, random frame counts, mutated valid requests,
and bodies around the size limit. Seeded, so a failure can be replayed.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from typing import Any

import msgpack

FIELDS = ("v", "id", "op", "model", "args", "timeout_ms")
ARG_FIELDS = ("user", "users", "n", "filter_consumed", "exclude", "seq", "items", "item", "events")
OPS = ("recommend", "predict", "similar_items", "info", "stats", "ingest", "rollout", "nope")


def _nest(rng: random.Random, depth: int, leaf: bytes = b"\x01") -> bytes:
    """`depth` levels of one-element arrays or maps around `leaf`, as raw msgpack."""
    out = bytearray()
    for _ in range(depth):
        out += b"\x91" if rng.random() < 0.5 else b"\x81\xa1k"
    return bytes(out) + leaf


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes([0x90 | n])
    if n < 1 << 16:
        return b"\xdc" + struct.pack(">H", n)
    return b"\xdd" + struct.pack(">I", n)


def _map_header(n: int) -> bytes:
    if n < 16:
        return bytes([0x80 | n])
    if n < 1 << 16:
        return b"\xde" + struct.pack(">H", n)
    return b"\xdf" + struct.pack(">I", n)


def _str_raw(data: bytes) -> bytes:
    """A msgpack str header over arbitrary bytes (invalid UTF-8 when they are)."""
    n = len(data)
    if n < 32:
        return bytes([0xA0 | n]) + data
    if n < 256:
        return b"\xd9" + bytes([n]) + data
    return (
        b"\xda" + struct.pack(">H", n) + data
        if n < 1 << 16
        else b"\xdb" + struct.pack(">I", n) + data
    )


def _ext(rng: random.Random) -> bytes:
    code = rng.randrange(-128, 128) & 0xFF
    size = rng.choice((1, 2, 4, 8, 16))
    fixed = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}[size]
    if rng.random() < 0.5:
        return bytes([fixed, code]) + rng.randbytes(size)
    n = rng.randrange(0, 300)
    return b"\xc7" + bytes([n, code]) + rng.randbytes(n) if n < 256 else b""


def _random_value(rng: random.Random) -> bytes:
    """One raw msgpack value of any kind, often a hostile one."""
    choice = rng.randrange(16)
    if choice in (0, 14, 15):  # deep nesting, the likeliest way to hurt a decoder
        return _nest(rng, rng.choice((2, 50, 500, 999, 1000, 1024, 1025, 3000)))
    if choice == 1:  # a container that claims more elements than follow
        return rng.choice((_array_header, _map_header))(rng.choice((5, 70_000, 2**32 - 1)))
    if choice == 2:
        return _array_header(3000) + b"\x90" * 3000  # many tiny containers
    if choice == 3:
        return _array_header(10_001) + b"\x01" * 10_001  # over the element limit
    if choice == 4:
        return _ext(rng)
    if choice == 5:
        return _str_raw(rng.randbytes(rng.randrange(1, 40)))  # usually invalid UTF-8
    if choice == 6:
        return msgpack.packb(rng.choice((2**63, 2**64 - 1, -(2**63) - 1 + 1, -(2**63))))
    if choice == 7:
        return msgpack.packb(rng.choice((None, True, False, 1.5, float("nan"), float("inf"))))
    if choice == 8:
        return msgpack.packb(rng.randbytes(rng.randrange(0, 50)))  # bin
    if choice == 9:
        return msgpack.packb(rng.choice((0, -1, 1, 1000, 1001, 3_600_001, 2**31)))
    if choice == 10:
        return msgpack.packb("x" * rng.choice((0, 1, 128, 129, 256, 257, 5000)))
    if choice == 11:
        return msgpack.packb([f"u{i}" for i in range(rng.choice((0, 1, 999, 1000, 1001)))])
    if choice == 12:
        return _map_header(300) + b"".join(msgpack.packb(f"k{i}") + b"\xc0" for i in range(300))
    return b"\xc1"  # never used in msgpack


def _body_with(fields: dict[str, bytes], rng: random.Random) -> bytes:
    """A map of raw values; sometimes with bin keys or non-string keys."""
    out = bytearray(_map_header(len(fields)))
    for key, raw in fields.items():
        kind = rng.random()
        if kind < 0.05:
            out += msgpack.packb(key.encode(), use_bin_type=True)  # bin key
        elif kind < 0.08:
            out += msgpack.packb(rng.randrange(100))  # integer key
        else:
            out += msgpack.packb(key)
        out += raw
    return bytes(out)


def _valid_fields(rng: random.Random) -> dict[str, bytes]:
    op = rng.choice(OPS)
    args: dict[str, Any] = {"user": "u1", "n": rng.randrange(1, 20)}
    return {
        "v": msgpack.packb(1),
        "id": msgpack.packb(rng.randrange(1, 1 << 40)),
        "op": msgpack.packb(op),
        "model": msgpack.packb(rng.choice(("als", "deepfm", "zzz"))),
        "args": msgpack.packb(args),
    }


def _field_attack(rng: random.Random) -> bytes:
    fields = _valid_fields(rng)
    for _ in range(rng.randrange(1, 3)):
        fields[rng.choice(FIELDS)] = _random_value(rng)
    return _body_with(fields, rng)


def _args_attack(rng: random.Random) -> bytes:
    fields = _valid_fields(rng)
    args: dict[str, bytes] = {}
    for _ in range(rng.randrange(1, 4)):
        args[rng.choice(ARG_FIELDS)] = _random_value(rng)
    fields["args"] = _body_with(args, rng)
    fields["op"] = msgpack.packb(rng.choice(OPS[:3]))
    return _body_with(fields, rng)


def _unknown_field_attack(rng: random.Random) -> bytes:
    fields = _valid_fields(rng)
    fields["op"] = msgpack.packb("stats")
    fields[f"x{rng.randrange(1000)}"] = _random_value(rng)
    return _body_with(fields, rng)


def _mutated_valid(rng: random.Random) -> bytes:
    body = bytearray(_body_with(_valid_fields(rng), random.Random(rng.random())))
    for _ in range(rng.randrange(1, 4)):
        position = rng.randrange(len(body))
        body[position] = rng.randrange(256)
    if rng.random() < 0.3:
        del body[rng.randrange(len(body)) :]
    return bytes(body)


def _random_bytes(rng: random.Random) -> bytes:
    return rng.randbytes(rng.randrange(0, 200))


def _near_limit(rng: random.Random, max_bytes: int) -> bytes:
    size = max_bytes + rng.choice((-2, -1, 0, 1, 2, 100))
    head = msgpack.packb({"v": 1, "id": rng.randrange(1 << 30), "op": "stats"})
    overhead = len(head) + len(msgpack.packb("pad")) + 5
    return _body_with(
        {
            "v": msgpack.packb(1),
            "id": msgpack.packb(7),
            "op": msgpack.packb("stats"),
            "pad": _str_raw(b"x" * max(0, size - overhead)),
        },
        random.Random(0),
    )


BODY_MAKERS: tuple[Callable[[random.Random], bytes], ...] = (
    _field_attack,
    _args_attack,
    _unknown_field_attack,
    _mutated_valid,
    _random_bytes,
)


def hostile_message(rng: random.Random, max_bytes: int) -> list[bytes]:
    """The frames of one hostile message; all of them are answerable (none is over 4x max)."""
    roll = rng.random()
    body = _near_limit(rng, max_bytes) if roll < 0.01 else rng.choice(BODY_MAKERS)(rng)
    if roll > 0.95:  # wrong framing
        shape = rng.randrange(4)
        if shape == 0:
            return [body]
        if shape == 1:
            return [b"x", body]
        if shape == 2:
            return [b"", body, b"extra"]
        return [b"", b"", b"", body][: rng.randrange(1, 5)]
    return [b"", body]
