"""`ssp index build`: stream corpora into a multi-threaded Tantivy writer, atomically.

The index is written into a hidden sibling `.<name>.partial-<pid>-<random>` and renamed to the output directory only
after the commit, the merges and the manifest are done. So the output path either does not exist or holds a complete
index; a failed or interrupted build removes its partial directory (a killed one leaves it, and the next build
beside it deletes it once its process is gone). Python only parses JSON and hands documents over; tokenizing,
stemming and segment writing run on the writer's Rust threads.
"""

import glob
import logging
import os
import secrets
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import tantivy
from tqdm import tqdm

from ssp.retriever.corpus import CorpusReader
from ssp.retriever.errors import IndexBuildError
from ssp.retriever.index_format import (
    ANALYZER_NAME,
    FORMAT_VERSION,
    Manifest,
    make_analyzer,
    make_schema,
    read_manifest,
    write_manifest,
)

log = logging.getLogger(__name__)

HEAP_BYTES_PER_THREAD = 64_000_000
"""Writer memory per indexing thread before it flushes a segment (Tantivy's minimum is 3 MB)."""


@dataclass(frozen=True, slots=True)
class BuildReport:
    """What a build did, for the end-of-run summary."""

    out: Path
    docs: int
    skipped_lines: int
    bad_examples: list[str]
    seconds: float
    reused: bool
    """True when --if-missing found a complete index and nothing was built."""


def build_index(
    corpora: Sequence[Path],
    out: Path,
    *,
    threads: int = 2,
    skip_bad: bool = False,
    if_missing: bool = False,
    progress: bool = True,
) -> BuildReport:
    """Index `corpora` into `out`. Raises CorpusError for bad data, IndexBuildError for an unusable `out`."""
    out = Path(out)
    if threads < 1:
        raise IndexBuildError(f"--threads {threads}: must be >= 1 (Tantivy indexing threads)")
    if not corpora:
        raise IndexBuildError("no corpus given; pass --corpus FILE [FILE...] (JSONL or JSONL.gz)")
    if out.exists():
        if if_missing:
            manifest = read_manifest(out)  # a partial or foreign directory is an error, never "complete"
            log.info("index %s exists (%d docs); --if-missing: not rebuilding", out, manifest.docs)
            return BuildReport(out, manifest.docs, manifest.skipped_lines, [], 0.0, reused=True)
        raise IndexBuildError(
            f"--out {out} already exists; delete it to rebuild, choose another --out, or pass --if-missing to keep it"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out)
    partial = out.parent / f"{_partial_prefix(out)}{os.getpid()}-{secrets.token_hex(4)}"
    start = time.perf_counter()
    try:
        partial.mkdir()
        reader = CorpusReader(list(corpora), skip_bad=skip_bad)
        docs = _write(reader, partial, threads, progress)
        write_manifest(
            partial,
            Manifest(
                format=FORMAT_VERSION,
                analyzer=ANALYZER_NAME,
                docs=docs,
                corpora=[str(p) for p in corpora],
                skipped_lines=reader.bad_lines,
            ),
        )
        partial.rename(out)  # atomic on one file system: `out` appears complete or not at all
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return BuildReport(out, docs, reader.bad_lines, reader.bad_examples, time.perf_counter() - start, reused=False)


def _write(reader: CorpusReader, directory: Path, threads: int, progress: bool) -> int:
    index = tantivy.Index(make_schema(), path=str(directory))
    index.register_tokenizer(ANALYZER_NAME, make_analyzer())
    writer = index.writer(HEAP_BYTES_PER_THREAD * threads, threads)
    docs = 0
    try:
        with tqdm(desc="indexing", unit=" docs", unit_scale=True, disable=not progress, smoothing=0.1) as bar:
            for passage in reader:
                writer.add_document(tantivy.Document(id=passage.id, title=passage.title, text=passage.text))
                docs += 1
                if docs % 1024 == 0:
                    bar.update(1024)
            bar.update(docs % 1024)
    except BaseException:
        # Stop the writer's threads before the caller deletes the directory they write into.
        writer.rollback()
        writer.wait_merging_threads()
        raise
    writer.commit()
    writer.wait_merging_threads()
    return docs


def _remove_stale_partials(out: Path) -> None:
    """Delete partial directories beside `out` left by builds that were killed (their process no longer exists)."""
    prefix = _partial_prefix(out)
    for stale in out.parent.glob(f"{glob.escape(prefix)}*"):
        pid = stale.name[len(prefix) :].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            log.info("removing %s, left by an interrupted build", stale)
            shutil.rmtree(stale, ignore_errors=True)


def _partial_prefix(out: Path) -> str:
    return f".{out.name}.partial-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
