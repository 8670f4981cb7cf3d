"""What an ssp Tantivy index is on disk: schema, text analyzer, manifest, and how queries meet the analyzer.

Schema: `id` (stored, untokenized), `title` and `text` (stored, analyzed, with positions). Search is BM25 over
title and text, counted alike (how a query is built, and why without a title boost: `retriever/query.py`).

Analyzer "ssp_en" (the documented English choice): Tantivy's simple tokenizer (split on anything that is not a
Unicode letter or digit) -> drop tokens over 40 bytes (base64, URLs: noise that bloats the term dictionary) ->
lowercase -> ASCII folding (so an LLM's "Galati" finds "Galați", "Francois" finds "François") -> the Snowball
English stemmer (Porter 2: "directed"/"directing"/"director" share "direct"). No stop-word list: BM25's IDF already
makes "the"/"of" nearly free, and titles like "The Who" or "It" must stay findable. Tantivy does not store custom
analyzers in the index, so `open_index` registers it again on every open; the manifest records its name so an index
built with a different analyzer is refused rather than searched with mismatched terms.

Completeness: the manifest `ssp-index.json` is written last, inside the temporary build directory, which is then
renamed into place. A directory without it (an interrupted or foreign build) is not opened.
"""

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import tantivy

from ssp.retriever.errors import IndexOpenError

FORMAT_VERSION = 1
ANALYZER_NAME = "ssp_en"
MANIFEST_NAME = "ssp-index.json"
SEARCH_FIELDS = ["title", "text"]
MAX_TOKEN_BYTES = 40

_WORD = re.compile(r"[^\W_]+")  # runs of Unicode letters/digits: the words the simple tokenizer would find


@dataclass(frozen=True, slots=True)
class Manifest:
    """Written last by a build; its presence marks the index complete."""

    format: int
    """On-disk format of ssp indexes (FORMAT_VERSION when built)."""
    analyzer: str
    """Name of the text analyzer the title/text fields were indexed with."""
    docs: int
    """Number of passages in the index."""
    corpora: list[str]
    """Corpus files the index was built from, in order."""
    skipped_lines: int
    """Malformed corpus lines skipped with --skip-bad."""


def make_schema() -> tantivy.Schema:
    builder = tantivy.SchemaBuilder()
    builder.add_text_field("id", stored=True, tokenizer_name="raw", index_option="basic")
    builder.add_text_field("title", stored=True, tokenizer_name=ANALYZER_NAME)
    builder.add_text_field("text", stored=True, tokenizer_name=ANALYZER_NAME)
    return builder.build()


def make_analyzer() -> tantivy.TextAnalyzer:
    return (
        tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.simple())
        .filter(tantivy.Filter.remove_long(MAX_TOKEN_BYTES))
        .filter(tantivy.Filter.lowercase())
        .filter(tantivy.Filter.ascii_fold())
        .filter(tantivy.Filter.stemmer("english"))
        .build()
    )


def write_manifest(index_dir: Path, manifest: Manifest) -> None:
    (index_dir / MANIFEST_NAME).write_text(json.dumps(asdict(manifest), indent=2) + "\n")


def read_manifest(index_dir: Path) -> Manifest:
    """The manifest of a complete index; IndexOpenError (saying how to fix it) for anything else."""
    path = index_dir / MANIFEST_NAME
    if not index_dir.is_dir():
        raise IndexOpenError(
            f"index {index_dir} does not exist; build it with `ssp index build --corpus FILE... --out {index_dir}`"
        )
    if not path.is_file():
        raise IndexOpenError(
            f"{index_dir} is not a complete ssp index (no {MANIFEST_NAME}: an interrupted build or another tool's "
            f"directory); delete it and run `ssp index build --out {index_dir}` again"
        )
    try:
        manifest = Manifest(**json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise IndexOpenError(f"{path} is corrupt ({e}); delete {index_dir} and build the index again") from None
    if manifest.format != FORMAT_VERSION or manifest.analyzer != ANALYZER_NAME:
        raise IndexOpenError(
            f"{index_dir} has index format {manifest.format} / analyzer {manifest.analyzer!r}, this ssp reads format "
            f"{FORMAT_VERSION} / {ANALYZER_NAME!r}; rebuild it with `ssp index build`"
        )
    return manifest


def open_index(index_dir: Path) -> tantivy.Index:
    """Open a complete ssp index for searching, with its analyzer registered."""
    index_dir = Path(index_dir)
    read_manifest(index_dir)
    index = tantivy.Index.open(str(index_dir))
    index.register_tokenizer(ANALYZER_NAME, make_analyzer())
    return index


def query_text(query: str) -> str:
    """An LLM-written query reduced to plain words, safe for the analyzer and for Tantivy's query parser.

    Why: an agent's `<search>` text is not a query language, yet the parser gives meaning to quotes, `field:`,
    brackets, `+`/`-`, `AND`/`OR`/`NOT`, `*` and `~` and raises on unbalanced ones, and a lone surrogate cannot
    cross into Rust at all. Keeping only letter/digit runs, lowercased (so `AND`/`OR`/`IN`/`TO` are words, not
    operators), leaves a string every parse and every analysis succeeds on, with the words the analyzer saw when
    indexing. "" means no words.
    """
    return " ".join(_WORD.findall(query.lower()))
