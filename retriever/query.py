"""From an agent's search text to the Tantivy query that answers it: the question's terms, common ones pruned.

Why prune. An agent writes questions ("who was the first president of the united states"), and a BM25 query over
every word walks the posting list of every word: "the" and "of" are in nearly every passage, "which", "who" and
"first" in 13-31% of the 211k-passage enwiki bench corpus. On 500 NQ questions a plain query reads 466k postings
(text field) on average; without the terms in more than COMMON_TERM_DOC_FRACTION of the passages and without an
opening question word (QUESTION_WORDS), 34k. Those terms add little to the ranking: above a fifth of the passages a
term's IDF is below ln 5 = 1.6, against 4.6 and more (a term in 1% of the passages or fewer) for the names and rare
words that pick the passage. A query made only of common terms ("As It Is") keeps them all, as before.

Why Tantivy does not skip them itself (block-max WAND). tantivy-py's `Searcher.search` collects through a
MultiCollector, which has no top-k pruning path, so WAND never runs from Python, whatever the query's shape
(the query parser's is already a flat disjunction of term queries): measured, "moon" alone takes 0.02 ms on the
enwiki index, "moon" with three stop words 3.2 ms.

Why no title boost. Doubling the title's score cost answer-hit@3 on NQ questions (14.0% -> 11.8% over 500
questions on the enwiki corpus, 7.2% -> 5.0% on the demo index); title and text count alike, as in a plain
`parse_query` over both fields.

Scoring is otherwise BM25 exactly as the query parser builds it for the kept words: the index's analyzer, each
distinct term matched in title and in text, the scores summed. `ssp bench retrieval` measures speed and
answer-hit@3 of this against a plain `parse_query`, side by side.
"""

from functools import lru_cache, partial

import tantivy

from ssp.retriever.index_format import SEARCH_FIELDS, make_analyzer, query_text

COMMON_TERM_DOC_FRACTION = 0.2
"""A term in more than this fraction of the passages (text field) is pruned from a query that has rarer terms.
Answer-hit@3 minus a plain `parse_query`'s, in points, the opening question word dropped in every row:

    threshold   enwiki 211k: NQ  TriviaQA  HotpotQA   demo 19k: HotpotQA  2Wiki  NQ    postings read, NQ enwiki
    0.1                    +0.4    -0.7      -0.4              -2.0      +0.1  -0.6   20k
    0.15                   +0.2    -0.1      -0.2              -0.3      +0.1  -0.6   30k
    0.2                    +0.2     0.0      -0.1               0.0      +0.8  -0.6   34k
    0.3                    +0.2     0.0      -0.1              +0.7      +0.7  -0.6   37k

(500, 1,000, 1,000, 300, 720 and 500 questions). 0.2 is the cheapest that loses no more than 0.1 point on any set
but NQ on the demo index, where dropping the opening question word costs 3 of 36 hits at every threshold."""
FREQUENCY_FIELD = "text"
"""The field whose document frequencies decide what is common (titles are too short to say)."""
QUESTION_WORDS = frozenset({"who", "whom", "whose", "what", "which", "when", "where", "why", "how"})
"""A query opening with one of these is a question, and the word names the kind of answer wanted: the passage with
the answer need not contain it ("who wrote Hamlet" is answered by "Hamlet ... by William Shakespeare"), while "who"
is in 13% of the enwiki passages and "when" in 14%, the costliest words a question keeps. Only the opening word
goes: in "Doctor Who" or "the who" the word is part of a name."""
DOC_FREQ_CACHE_TERMS = 100_000
"""Document frequencies remembered per index. A lookup costs 2-12 us (it reads every segment's term dictionary),
and the same words ("who", "the", "first") come back in nearly every query; 100k terms take about 20 MB."""


class QueryBuilder:
    """Builds queries for one opened index; thread-safe (it only reads the index)."""

    def __init__(self, index: tantivy.Index, searcher: tantivy.Searcher) -> None:
        self._schema = index.schema
        self._doc_freq = lru_cache(maxsize=DOC_FREQ_CACHE_TERMS)(partial(searcher.doc_freq, FREQUENCY_FIELD))
        self._analyzer = make_analyzer()
        self._common_above = COMMON_TERM_DOC_FRACTION * searcher.num_docs

    def terms(self, text: str) -> list[str]:
        """The distinct analyzed terms a query searches for, in order: without an opening question word, the rare
        ones, or all of them when none is rare."""
        words = query_text(text).split()
        asked = words[1:] if words and words[0] in QUESTION_WORDS else words
        terms = self._distinct_terms(asked) or self._distinct_terms(words)
        rare = [t for t in terms if self._doc_freq(t) <= self._common_above]
        return rare or terms

    def _distinct_terms(self, words: list[str]) -> list[str]:
        # The query parser counts a repeated word once; so does this.
        return list(dict.fromkeys(self._analyzer.analyze(" ".join(words))))

    def build(self, text: str) -> tantivy.Query | None:
        """The BM25 query for `text`: each kept term in every search field, scores summed; None when no words."""
        terms = self.terms(text)
        if not terms:
            return None
        # index_option "freq": BM25 reads term frequencies; positions are for phrases, which these queries have none of.
        clauses = [
            (tantivy.Occur.Should, tantivy.Query.term_query(self._schema, field, term, index_option="freq"))
            for term in terms
            for field in SEARCH_FIELDS
        ]
        return tantivy.Query.boolean_query(clauses)
