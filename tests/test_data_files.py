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


def test_eval_task_files_are_read_the_same_way(tmp_path):
    """make eval's task files (evals.tasks) follow the same rules: held-out rows, GSM8K lines, MMLU CSVs."""
    from core.prompts import get_style
    from evals.tasks import TaskError, load_task

    qa = get_style("qa")
    rows = tmp_path / "heldout.jsonl"
    rows.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS).encode())
    task = load_task(rows, shots=0, template=qa)
    assert [item.gold for item in task.items] == [r["output"] for r in ROWS]  # one item per row, U+2028 kept inside
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_bytes(b"\xef\xbb\xbf" + json.dumps({"question": "What is 1\u2028+1?", "answer": "1+1=2\n#### 2"}).encode() + b"\n")
    assert load_task(gsm, shots=0, template=qa).items[0].gold == "2"
    mmlu = tmp_path / "x_test.csv"
    mmlu.write_bytes(b"\xef\xbb\xbfquestion,A,B,C,D,answer\n" + b"Pick A,a,b,c,d,A\n" * 2)
    assert [item.gold for item in load_task(mmlu, shots=1, template=qa).items] == ["A"]  # the header is a header
    for name, content, message in [
        ("empty.jsonl", b"\xef\xbb\xbf\n", "no rows"),
        ("latin.jsonl", '{"instruction": "caf\u00e9", "output": "x"}'.encode("latin-1"), "not UTF-8"),
        ("latin_test.csv", "question,A,B,C,D,answer\ncaf\u00e9,a,b,c,d,A\n".encode("latin-1"), "not UTF-8"),
        ("list.jsonl", b"[1, 2]\n", ":1: each row must be a JSON object"),
    ]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(TaskError, match=message) as info:
            load_task(tmp_path / name, shots=0, template=qa)
        assert str(tmp_path / name) in str(info.value)
