"""Corpus reading: both record shapes, gzip, and malformed lines (error naming file:line, or counted with skip_bad)."""

import gzip
import json
from pathlib import Path

import pytest

from ssp.retriever.corpus import CorpusReader, Passage, join_contents, split_contents
from ssp.retriever.errors import CorpusError


def _write(path: Path, lines: list[str]) -> Path:
    data = "".join(line + "\n" for line in lines)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


def test_reads_both_shapes_and_gzip(tmp_path: Path) -> None:
    plain = _write(
        tmp_path / "a.jsonl",
        [
            json.dumps({"id": "a1", "title": "Ed Wood", "text": "A director.", "extra": 1}),
            "",
            json.dumps({"id": 7, "text": "t"}),
        ],
    )
    r1 = _write(tmp_path / "b.jsonl.gz", [json.dumps({"id": "b1", "contents": '"Galați"\nA city in Romania.\nMore.'})])
    passages = list(CorpusReader([plain, r1]))
    assert passages == [
        Passage("a1", "Ed Wood", "A director."),
        Passage("7", "", "t"),
        Passage("b1", "Galați", "A city in Romania.\nMore."),
    ]


def test_contents_round_trip() -> None:
    assert split_contents(join_contents('Say "hi"', "line1\nline2")) == ('Say "hi"', "line1\nline2")
    assert split_contents("no title line") == ("", "no title line")


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("{not json", "Expecting property name"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"title": "x", "text": "y"}', "'id' must be a non-empty string or an integer, got None"),
        ('{"id": true, "text": "y"}', "'id' must be a non-empty string or an integer, got True"),
        ('{"id": "x", "text": 5}', "'text' must be a string, got int"),
        ('{"id": "x", "title": ["t"], "text": "y"}', "'title' must be a string, got list"),
        ('{"id": "x", "contents": null}', "'contents' must be a string, got NoneType"),
        ('{"id": "x", "body": "y"}', "needs 'text' (with 'title') or Search-R1 'contents'; keys are ['body', 'id']"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path: Path, line: str, reason: str) -> None:
    path = _write(tmp_path / "c.jsonl", ['{"id": "ok", "text": "fine"}', line])
    with pytest.raises(CorpusError) as err:
        list(CorpusReader([path]))
    message = str(err.value)
    assert message.startswith(f"{path}:2: ")
    assert reason in message
    assert "pass --skip-bad" in message


def test_skip_bad_counts_and_reports(tmp_path: Path) -> None:
    lines = ['{"id": "1", "text": "a"}'] + ["garbage"] * 7 + ['{"id": "2", "text": "b"}']
    path = _write(tmp_path / "d.jsonl.gz", lines)
    reader = CorpusReader([path], skip_bad=True)
    assert [p.id for p in reader] == ["1", "2"]
    assert reader.bad_lines == 7
    assert len(reader.bad_examples) == 5 and reader.bad_examples[0].startswith(f"{path}:2: Expecting value")


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match=r"cannot open corpus .*missing\.jsonl: No such file"):
        list(CorpusReader([tmp_path / "missing.jsonl"]))
    truncated = tmp_path / "t.jsonl.gz"
    full = gzip.compress(b"".join(b'{"id": "%d", "text": "passage"}\n' % i for i in range(2000)))
    truncated.write_bytes(full[: len(full) // 2])
    with pytest.raises(CorpusError, match=r"t\.jsonl\.gz: unreadable after line \d+: .*truncated or not UTF-8"):
        list(CorpusReader([truncated]))
    latin1 = tmp_path / "l.jsonl"
    latin1.write_bytes('{"id": "1", "text": "café"}\n'.encode("latin-1"))
    with pytest.raises(CorpusError, match=r"l\.jsonl: unreadable after line 0: 'utf-8' codec"):
        list(CorpusReader([latin1]))
