"""Streamed corpus reading: JSONL or JSONL.gz passages, in ssp's `{id, title, text}` or Search-R1's `{id, contents}`.

Search-R1 (and FlashRAG) store a passage as `contents = '"Title"\\ntext'`; `split_contents` and `join_contents`
convert between that and (title, text), and the /retrieve server and client use the same pair, so a passage makes
the round trip corpus -> index -> wire -> Doc unchanged.

A malformed line is a `CorpusError` naming the file and line number. With `skip_bad=True` such lines are counted
instead (`CorpusReader.bad_lines`, with the first few locations in `bad_examples`) and the caller reports them at the
end; a file that cannot be opened or decompressed is always an error.

    reader = CorpusReader([Path("wiki.jsonl.gz")], skip_bad=True)
    for passage in reader:
        ...
    print(reader.bad_lines, reader.bad_examples)
"""

import gzip
import json
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ssp.retriever.errors import CorpusError

BAD_EXAMPLES_KEPT = 5
"""How many bad-line locations a skipping reader remembers for its end-of-run report."""


@dataclass(frozen=True, slots=True)
class Passage:
    """One corpus passage as indexed: a unique id, the article title (may be empty) and the passage text."""

    id: str
    title: str
    text: str


def split_contents(contents: str) -> tuple[str, str]:
    """Search-R1 `contents` -> (title, text): the first line, without its surrounding quotes, is the title."""
    head, sep, rest = contents.partition("\n")
    if not sep:
        return "", contents
    if len(head) >= 2 and head.startswith('"') and head.endswith('"'):
        head = head[1:-1]
    return head, rest


def join_contents(title: str, text: str) -> str:
    """(title, text) -> Search-R1 `contents`, the inverse of `split_contents`."""
    return f'"{title}"\n{text}'


def parse_passage(record: Any) -> Passage:
    """Validate one decoded JSON line; raises ValueError with the rule broken (the reader adds file and line)."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    pid = record.get("id")
    if isinstance(pid, bool) or not isinstance(pid, str | int) or pid == "":
        raise ValueError(f"'id' must be a non-empty string or an integer, got {pid!r}")
    if "contents" in record:
        contents = record["contents"]
        if not isinstance(contents, str):
            raise ValueError(f"'contents' must be a string, got {type(contents).__name__}")
        title, text = split_contents(contents)
    elif "text" in record:
        title, text = record.get("title", ""), record["text"]
        if not isinstance(title, str):
            raise ValueError(f"'title' must be a string, got {type(title).__name__}")
        if not isinstance(text, str):
            raise ValueError(f"'text' must be a string, got {type(text).__name__}")
    else:
        raise ValueError(f"needs 'text' (with 'title') or Search-R1 'contents'; keys are {sorted(record)}")
    return Passage(id=str(pid), title=title, text=text)


def _open_text(path: Path) -> IO[str]:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open("r", encoding="utf-8")


@dataclass
class CorpusReader:
    """Iterate the passages of one or more corpus files in order, streaming (constant memory)."""

    paths: Sequence[Path]
    skip_bad: bool = False
    bad_lines: int = 0
    """Malformed lines skipped so far (only with skip_bad)."""
    bad_examples: list[str] = field(default_factory=list)
    """'file:line: reason' of the first few skipped lines."""

    def __iter__(self) -> Iterator[Passage]:
        for path in self.paths:
            yield from self._read(Path(path))

    def _read(self, path: Path) -> Iterator[Passage]:
        try:
            f = _open_text(path)
        except OSError as e:
            raise CorpusError(
                f"cannot open corpus {path}: {e.strerror or e}; pass an existing JSONL(.gz) file"
            ) from None
        lineno = 0
        try:
            with f:
                for lineno, line in enumerate(f, start=1):
                    if not line.strip():
                        continue  # blank lines (e.g. a trailing one) carry no passage
                    try:
                        yield parse_passage(json.loads(line))
                    except ValueError as e:  # json.JSONDecodeError is a ValueError too
                        self._bad(f"{path}:{lineno}: {e}")
        except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
            raise CorpusError(
                f"{path}: unreadable after line {lineno}: {e}; the file is truncated or not UTF-8 JSONL(.gz)"
            ) from None

    def _bad(self, where_and_why: str) -> None:
        if not self.skip_bad:
            raise CorpusError(f"{where_and_why}; fix the line, or pass --skip-bad to skip and count such lines")
        self.bad_lines += 1
        if len(self.bad_examples) < BAD_EXAMPLES_KEPT:
            self.bad_examples.append(where_and_why)
