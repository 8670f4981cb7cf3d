"""The query rewrite (retriever/query.py): common terms pruned, title and text counted alike, BM25 otherwise unchanged.

The rewrite is what makes ssp's search several times cheaper than a plain `parse_query` (`ssp bench retrieval`);
these tests fail if it is removed or if the title boost comes back.
"""

from pathlib import Path

import pytest
import tantivy

from ssp.retriever.index_format import ANALYZER_NAME, make_analyzer, open_index
from ssp.retriever.query import QueryBuilder
from ssp.retriever.tantivy_index import TantivySearcher


@pytest.fixture(scope="module")
def searcher(demo_index: Path) -> TantivySearcher:
    return TantivySearcher(demo_index)


@pytest.fixture(scope="module")
def builder(demo_index: Path) -> QueryBuilder:
    index = open_index(demo_index)
    return QueryBuilder(index, index.searcher())


@pytest.fixture(scope="module")
def plain(demo_index: Path) -> tantivy.Index:
    """The same index opened as a tantivy-py user would, to search it with the plain query parser."""
    index = tantivy.Index.open(str(demo_index))
    index.register_tokenizer(ANALYZER_NAME, make_analyzer())
    return index


def _parsed(index: tantivy.Index, words: str, k: int) -> list[tuple[str, float]]:
    """(id, score) of the top k for `parse_query(words)` over title and text, no boost."""
    searcher = index.searcher()
    hits = searcher.search(index.parse_query(words, ["title", "text"]), k).hits
    return [(searcher.doc(address).get_first("id"), score) for score, address in hits]


def _ids_scores(searcher: TantivySearcher, query: str, k: int) -> list[tuple[str, float]]:
    return [(d.id, d.score) for d in searcher.search(query, k)]


def test_words_in_most_passages_are_pruned(builder: QueryBuilder, searcher: TantivySearcher) -> None:
    # "the", "of", "was" are each in about half the demo passages or more; "ed" and "wood" in few.
    assert builder.terms("Was the director of Ed Wood") == ["director", "ed", "wood"]
    # The pruned words change nothing: same passages, same scores as the question without them.
    assert _ids_scores(searcher, "Was the director of Ed Wood", 5) == _ids_scores(searcher, "director Ed Wood", 5)


def test_kept_terms_score_as_the_plain_parser_without_title_boost(
    searcher: TantivySearcher, plain: tantivy.Index
) -> None:
    # The last one repeats a word: the parser counts it once, and so must the rewrite.
    for words in ("scott derrickson", "director ed wood", "georges melies", "wood director ed wood"):
        ours, theirs = _ids_scores(searcher, words, 5), _parsed(plain, words, 5)
        assert [i for i, _ in ours] == [i for i, _ in theirs]
        assert [s for _, s in ours] == pytest.approx([s for _, s in theirs], rel=1e-5)


def test_a_query_of_common_words_only_is_searched_whole(
    builder: QueryBuilder, searcher: TantivySearcher, plain: tantivy.Index
) -> None:
    # Each of these is in over a third of the demo passages: with nothing rarer to search for, all of them count.
    assert builder.terms("As It Is") == ["as", "it", "is"]
    ours = _ids_scores(searcher, "As It Is", 3)
    assert ours and [i for i, _ in ours] == [i for i, _ in _parsed(plain, "as it is", 3)]


def test_an_opening_question_word_is_dropped(builder: QueryBuilder) -> None:
    assert builder.terms("Who directed Ed Wood?") == ["direct", "ed", "wood"]
    # Elsewhere it may be part of a name ("who" is in 14% of the demo passages: rare enough to keep).
    assert builder.terms("Doctor Who") == ["doctor", "who"]
    assert builder.terms("Who") == ["who"]  # nothing else to search for
