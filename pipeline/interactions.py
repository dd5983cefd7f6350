"""The interactions file `uro-recs train --csv` takes, checked before anything heavy is
imported: a person who gave the wrong file learns what is wrong with it in a second, in one
line that names the line and the column, not after TensorFlow loads.

The format: comma-separated, a header naming at least `user`, `item`, `label` and `time`
(other columns, such as `item_kind`, are kept); `label` a finite number (an interaction's
weight, 1.0 for "it happened"); `time` a number (Unix seconds) that orders each user's
interactions.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Final, TextIO

REQUIRED_COLUMNS: Final = ("user", "item", "label", "time")
_SNIFF_BYTES: Final = 64 * 1024


class InvalidInput(ValueError):
    """The file cannot be trained on; the message says why and where."""


def check_interactions_csv(path: Path) -> int:
    """The number of data rows in `path`, or InvalidInput naming the first problem."""
    try:
        handle = path.open(newline="", encoding="utf-8")
    except FileNotFoundError:
        raise InvalidInput(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InvalidInput(f"{path}: is a directory, not a CSV file") from None
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot read it: {exc.strerror}") from None
    with handle:
        try:
            return _check(path, handle)
        except UnicodeDecodeError:
            raise InvalidInput(f"{path}: is not UTF-8 text") from None
        except csv.Error as exc:
            raise InvalidInput(f"{path}: not a readable CSV file: {exc}") from None


def _check(path: Path, handle: TextIO) -> int:
    sample = handle.read(_SNIFF_BYTES)
    if not sample.strip():
        raise InvalidInput(f"{path}: is empty; expected a header {','.join(REQUIRED_COLUMNS)}")
    first_line = sample.splitlines()[0]
    for delimiter in (";", "\t", "|"):
        if delimiter in first_line and "," not in first_line:
            name = {";": "semicolons", "\t": "tabs", "|": "'|'"}[delimiter]
            raise InvalidInput(f"{path}: columns are separated by {name}; expected commas")
    handle.seek(0)
    reader = csv.reader(handle)
    header = [column.strip() for column in next(reader)]
    missing = [column for column in REQUIRED_COLUMNS if column not in header]
    if missing:
        # A header is the person's text: shown as written when printable, escaped otherwise,
        # so the message stays one line.
        shown = [c if c.isprintable() else repr(c) for c in header[:12]]
        found = ",".join(shown) + (",..." if len(header) > 12 else "")
        raise InvalidInput(
            f"{path}: lacks the columns {','.join(missing)}; expected a header with "
            f"{','.join(REQUIRED_COLUMNS)}, found {found}"
        )
    at = {column: header.index(column) for column in REQUIRED_COLUMNS}
    rows = 0
    for line, row in enumerate(reader, start=2):
        if not row:
            continue
        if len(row) != len(header):
            raise InvalidInput(f"{path}:{line}: {len(row)} fields, the header has {len(header)}")
        for column in ("user", "item"):
            if not row[at[column]].strip():
                raise InvalidInput(f"{path}:{line}: {column} is empty")
        _number(path, line, "label", row[at["label"]], "a number such as 1.0 (its weight)")
        _number(path, line, "time", row[at["time"]], "Unix seconds")
        rows += 1
    if rows == 0:
        raise InvalidInput(f"{path}: has a header but no interactions")
    return rows


def _number(path: Path, line: int, column: str, text: str, expected: str) -> None:
    try:
        value = float(text)
    except ValueError:
        raise InvalidInput(
            f"{path}:{line}: {column} {text[:40]!r} is not a number; expected {expected}"
        ) from None
    if not math.isfinite(value):
        raise InvalidInput(f"{path}:{line}: {column} {text!r} is not finite")
