"""make_retriever: built-in kinds, a user's module:Class, an entry point, and every way the name can be wrong."""

from pathlib import Path

import pytest

from ssp.retriever.client import HttpRetriever
from ssp.retriever.config import RetrieverConfig
from ssp.retriever.errors import RetrieverLoadError
from ssp.retriever.registry import make_retriever
from ssp.retriever.tantivy_index import TantivyRetriever

PASSAGES = {"p1": "Ed Wood directed films", "p2": "Tim Burton directed Ed Wood", "p3": "bananas are yellow"}


async def test_builtin_kinds(demo_index: Path) -> None:
    tantivy = make_retriever(RetrieverConfig(kind="tantivy", index_dir=demo_index, search_threads=1))
    assert isinstance(tantivy, TantivyRetriever)
    assert (await tantivy.search(["Scott Derrickson"], 1))[0][0].id == "hotpot300-1"
    await tantivy.close()
    http = make_retriever(RetrieverConfig(kind="http", url="http://127.0.0.1:9"))
    assert isinstance(http, HttpRetriever) and http.endpoint == "http://127.0.0.1:9/retrieve"
    await http.close()
    with pytest.raises(RetrieverLoadError, match=r"retriever.options \['x'\] is only for user retrievers"):
        make_retriever(RetrieverConfig(kind="tantivy", options={"x": 1}))


async def test_user_class_with_options() -> None:
    cfg = RetrieverConfig(kind="custom_retriever:KeywordRetriever", options={"passages": PASSAGES, "min_overlap": 2})
    retriever = make_retriever(cfg)
    results = await retriever.search(["ed wood films", "bananas"], 2)
    assert [[d.id for d in docs] for docs in results] == [["p1", "p2"], []]
    await retriever.close()
    assert retriever.closed  # type: ignore[attr-defined]


async def test_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A package that registers `[project.entry-points."ssp.retrievers"] keyword = ...` is found by name."""
    dist = tmp_path / "my_search-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-search\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[ssp.retrievers]\nkeyword = custom_retriever:KeywordRetriever\nbroken = no_such_module_xyz:Thing\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    retriever = make_retriever(RetrieverConfig(kind="keyword", options={"passages": PASSAGES}))
    assert (await retriever.search(["yellow"], 3))[0][0].id == "p3"
    with pytest.raises(RetrieverLoadError, match=r"entry point 'broken' in group 'ssp.retrievers' .* failed to load"):
        make_retriever(RetrieverConfig(kind="broken"))
    expected = r"retriever.kind = 'nope' is not known; .*installed: \['broken', 'keyword'\]"
    with pytest.raises(RetrieverLoadError, match=expected):
        make_retriever(RetrieverConfig(kind="nope"))


@pytest.mark.parametrize(
    ("kind", "options", "error"),
    [
        ("no_such_pkg.mod:Cls", {}, r"cannot import module 'no_such_pkg.mod' \(No module named 'no_such_pkg'\)"),
        ("custom_retriever:Missing", {}, r"module 'custom_retriever' has no class 'Missing'"),
        ("custom_retriever:NotARetriever", {}, r"NotARetriever, which lacks async method\(s\) \['search', 'close'\]"),
        ("custom_retriever:KeywordRetriever", {}, r"could not be constructed with retriever.options \{\}: .*passages"),
        ("custom_retriever:KeywordRetriever", {"passages": {}, "colour": 1}, r"unexpected keyword argument 'colour'"),
        ("bm25", {}, r"'bm25' is not known; use one of \['tantivy', 'http'\]"),
    ],
)
def test_bad_kinds(kind: str, options: dict[str, object], error: str) -> None:
    with pytest.raises(RetrieverLoadError, match=error):
        make_retriever(RetrieverConfig(kind=kind, options=options))
