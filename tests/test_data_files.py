"""JSON/JSONL reading edge cases: line separators inside strings, a byte-order mark, empty files."""

from __future__ import annotations

import json

import pytest

from finetune.data import DataError, load_rows

ROWS = [
    {"instruction": "line\u2028separator and\u2029paragraph", "input": "next\x85line", "output": "form\x0cfeed \x1c\x1d\x1e"},
    {"instruction": "plain", "input": "", "output": "answer"},
]


def test_jsonl_splits_on_newline_only(tmp_path):
    """U+2028, U+2029, NEL, FF and the file separators are valid raw inside a JSON string."""
    path = tmp_path / "rows.jsonl"
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS)
    path.write_text(text, encoding="utf-8")
    assert len(text.splitlines()) > len(ROWS)  # what the old reader split on
    assert load_rows(path) == [json.loads(line) for line in text.split("\n") if line]


def test_crlf_and_bom_accepted(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\r\n" for r in ROWS).encode())
    assert load_rows(path) == ROWS
    path = tmp_path / "rows.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(ROWS).encode())
    assert load_rows(path) == ROWS


@pytest.mark.parametrize("name, content", [("e.jsonl", b""), ("ws.jsonl", b"\n \n\r\n"), ("e.json", b"[]"), ("bom.jsonl", b"\xef\xbb\xbf")])
def test_empty_file_is_an_error_naming_it(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match="no rows") as info:
        load_rows(path)
    assert str(path) in str(info.value)


def test_non_utf8_file_named(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(json.dumps({"instruction": "caf\u00e9", "output": "x"}, ensure_ascii=False).encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8") as info:
        load_rows(path)
    assert str(path) in str(info.value)
