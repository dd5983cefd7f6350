"""The training CSV's check (pipeline/interactions.py) on any file a person can hand it."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from uro_recs.pipeline.interactions import InvalidInput, check_interactions_csv

HEADER = "user,item,label,time\n"
cells = st.text(alphabet=st.characters(codec="utf-8"), max_size=12)
rows = st.lists(st.lists(cells, min_size=0, max_size=6), max_size=20)


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=2_000)
    | rows.map(lambda r: HEADER + "\n".join(",".join(c) for c in r))
    | rows.map(lambda r: "\n".join(",".join(c) for c in r))  # any header at all
)
def test_any_file_is_counted_or_refused_in_one_line(content: bytes | str) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "interactions.csv"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        try:
            counted = check_interactions_csv(path)
        except InvalidInput as refused:
            message = str(refused)
            assert message.startswith(str(path)) and "\n" not in message.strip()
        else:
            assert counted >= 1


def test_a_header_with_a_line_break_in_a_quoted_name_still_gives_one_line(tmp_path: Path) -> None:
    path = tmp_path / "odd.csv"
    path.write_text('"us\ner",item\nx,y\n')
    try:
        check_interactions_csv(path)
    except InvalidInput as refused:
        assert "\n" not in str(refused) and "found 'us\\ner',item" in str(refused)
    else:
        raise AssertionError("a header without label and time was accepted")


def test_a_line_longer_than_the_csv_field_limit_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "huge.csv"
    path.write_text(HEADER + "u," + "i" * 200_000 + ",1,0\n")
    try:
        check_interactions_csv(path)
    except InvalidInput as refused:
        assert "not a readable CSV file" in str(refused)
    else:
        raise AssertionError("a 200,000-character field was accepted")
