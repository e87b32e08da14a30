"""Search tool: BM25 against a brute-force reference, the official-format cache, load errors."""

from __future__ import annotations

import json
import math
import re
from collections import Counter

import numpy as np
import pytest

from arpo_ref.tools import (
    NO_RESULTS,
    BM25Index,
    Passage,
    SearchTool,
    SearchToolConfig,
    format_passages,
    load_corpus,
    load_query_cache,
    tokenize,
)
from arpo_ref.tools import bm25 as bm25_module

PASSAGES = [
    {"id": "p0", "title": "Paris", "text": "Paris is the capital and largest city of France."},
    {"id": "p1", "title": "Berlin", "text": "Berlin is the capital of Germany. Berlin has many museums."},
    {"title": "Mount Everest", "text": "Mount Everest is the highest mountain on Earth, in the Himalayas."},
    {"title": "Python (language)", "text": "Python is a programming language created by Guido van Rossum."},
    {"title": "Python (snake)", "text": "The python is a large constricting snake found in Africa and Asia."},
    {"title": "Lyon", "text": "Lyon is a city in France, known for its cuisine. " + "filler " * 30},
]


def write_corpus(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.fixture(autouse=True)
def fresh_memory_cache(monkeypatch):
    monkeypatch.setattr(bm25_module, "_MEMORY_CACHE", {})


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus.jsonl", PASSAGES)


def brute_force_bm25(documents, query, k1, b):
    """Okapi BM25 with the Lucene idf, written from the textbook formula with no shared code."""
    tokenized = [re.findall(r"\w+", document.lower()) for document in documents]
    average = sum(len(tokens) for tokens in tokenized) / len(tokenized)
    scores = []
    for tokens in tokenized:
        counts, score = Counter(tokens), 0.0
        for term in re.findall(r"\w+", query.lower()):
            containing = sum(term in other for other in tokenized)
            idf = math.log(1 + (len(tokenized) - containing + 0.5) / (containing + 0.5))
            tf = counts[term]
            score += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(tokens) / average))
        scores.append(score)
    return scores


@pytest.mark.parametrize("query", ["capital of France", "python snake", "Berlin Berlin museums",
                                   "highest mountain", "the", "unknownword"])
@pytest.mark.parametrize("k1, b", [(1.2, 0.75), (2.0, 0.0), (0.5, 1.0)])
def test_bm25_matches_brute_force(query, k1, b):
    documents = [f"{p['title']} {p['text']}" for p in PASSAGES]
    index = BM25Index.build([tokenize(document) for document in documents])
    expected = brute_force_bm25(documents, query, k1, b)
    np.testing.assert_allclose(index.scores(query, k1, b), expected, rtol=1e-12, atol=1e-12)
    ranked = [position for position, _ in index.search(query, 10, k1, b)]
    by_reference = sorted((i for i, s in enumerate(expected) if s > 0), key=lambda i: (-expected[i], i))
    assert ranked == by_reference


@pytest.mark.parametrize("query, best_title", [
    ("What is the capital of France?", "Paris"),
    ("capital of Germany", "Berlin"),
    ("highest mountain on Earth", "Mount Everest"),
    ("programming language by Guido", "Python (language)"),
    ("constricting snake", "Python (snake)"),
])
def test_known_answers_rank_first(corpus, query, best_title):
    tool = SearchTool(SearchToolConfig(corpus_path=str(corpus)))
    result = tool(query)
    assert result.ok and result.text.startswith(f"Page 1: {best_title}: ")


def test_result_format_top_k_and_snippet_cut(corpus):
    tool = SearchTool(SearchToolConfig(corpus_path=str(corpus), top_k=2, max_snippet_chars=20))
    text = tool("France city").text
    blocks = text.split("\n")
    assert len(blocks) == 2 and blocks[0].startswith("Page 1: ") and blocks[1].startswith("Page 2: ")
    assert all(len(block) <= len("Page 2: ") + 20 for block in blocks)
    assert tool("zzzz qqqq").text == NO_RESULTS
    assert format_passages([]) == NO_RESULTS
    assert format_passages([Passage("T", "x" * 2000)]) == "Page 1: T: " + "x" * 997


def test_index_is_saved_and_reused(corpus, tmp_path, monkeypatch):
    SearchTool(SearchToolConfig(corpus_path=str(corpus)))
    saved = list(tmp_path.glob("corpus.jsonl.bm25-*.npz"))
    assert len(saved) == 1
    monkeypatch.setattr(bm25_module, "_MEMORY_CACHE", {})
    monkeypatch.setattr(BM25Index, "build", classmethod(lambda cls, docs: pytest.fail("rebuilt")))
    assert SearchTool(SearchToolConfig(corpus_path=str(corpus)))("Everest").text.startswith("Page 1: Mount")


def test_changed_corpus_is_reindexed_and_cache_dir_is_used(corpus, tmp_path):
    folder = tmp_path / "index"
    config = SearchToolConfig(corpus_path=str(corpus), index_cache_dir=str(folder))
    assert SearchTool(config)("Lyon cuisine").text.startswith("Page 1: Lyon")
    write_corpus(corpus, PASSAGES + [{"title": "Marseille", "text": "Marseille is a port."}])
    assert SearchTool(config)("Marseille port").text.startswith("Page 1: Marseille")
    assert len(list(folder.glob("*.npz"))) == 2


def test_corrupt_saved_index_is_rebuilt(corpus, tmp_path, monkeypatch):
    SearchTool(SearchToolConfig(corpus_path=str(corpus)))
    saved = next(tmp_path.glob("*.npz"))
    saved.write_bytes(b"not a zip file")
    monkeypatch.setattr(bm25_module, "_MEMORY_CACHE", {})
    assert SearchTool(SearchToolConfig(corpus_path=str(corpus)))("Paris").text.startswith("Page 1: Paris")


# ---------------------------------------------------------------------------- query cache
@pytest.fixture
def official_cache(tmp_path):
    path = tmp_path / "search_cache.json"
    path.write_text(json.dumps({
        "capital of France": "Page 1: Paris is the capital of France.\n",
        "who wrote Hamlet": "Page 1: Hamlet is a tragedy by William Shakespeare.",
    }, indent=2))
    return path


def test_official_cache_loads_and_hits_verbatim(official_cache):
    tool = SearchTool(SearchToolConfig(cache_path=str(official_cache), cache_miss_policy="no_result"))
    assert tool("capital of France").text == "Page 1: Paris is the capital of France.\n"
    assert tool("  who wrote Hamlet ").text.endswith("William Shakespeare.")
    assert tool("something else").text == NO_RESULTS
    assert tool.metrics() == {"tools/search/cache_hits": 2.0, "tools/search/cache_misses": 1.0}


def test_cache_miss_falls_back_to_the_corpus(official_cache, corpus):
    tool = SearchTool(SearchToolConfig(cache_path=str(official_cache), corpus_path=str(corpus),
                                       cache_miss_policy="fallback"))
    assert tool("capital of France").text.startswith("Page 1: Paris is the capital")  # cached text
    assert tool("capital of Germany").text.startswith("Page 1: Berlin: ")            # BM25
    assert tool.cache_hits == 1 and tool.cache_misses == 1


@pytest.mark.parametrize("content, message", [
    ('{"a": "x",\n "b": }', r"search_cache.json:2: not valid JSON"),
    ('{"a": "x",\n "b": ["not", "a string"]}', r"search_cache.json:2: the result for query 'b' is a list"),
    ('["a", "b"]', r"search_cache.json: expected one JSON object"),
])
def test_corrupt_cache_names_the_file(tmp_path, content, message):
    path = tmp_path / "search_cache.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_query_cache(path)
    with pytest.raises(ValueError, match=message):
        SearchTool(SearchToolConfig(cache_path=str(path), cache_miss_policy="no_result"))


@pytest.mark.parametrize("lines, message", [
    (['{"title": "a", "text": "b"}', '{"title": "c", "text": "d"', ""], r"corpus.jsonl:2: not valid JSON"),
    (['{"title": "a", "text": "b"}', "", '{"title": "c"}'], r"corpus.jsonl:3: expected a JSON object"),
    (['{"title": 3, "text": "b"}'], r"corpus.jsonl:1: expected a JSON object with string fields"),
    (['["title", "text"]'], r"corpus.jsonl:1: expected a JSON object"),
])
def test_corrupt_corpus_names_the_file_and_line(tmp_path, lines, message):
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(lines))
    with pytest.raises(ValueError, match=message):
        load_corpus(path)
    with pytest.raises(ValueError, match=message):
        SearchTool(SearchToolConfig(corpus_path=str(path)))


def test_missing_files_fail_at_construction(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        SearchTool(SearchToolConfig(corpus_path=str(tmp_path / "nowhere.jsonl")))
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        SearchTool(SearchToolConfig(cache_path=str(tmp_path / "nowhere.json"),
                                    cache_miss_policy="no_result"))


# ---------------------------------------------------------------------------- plugged backends
class FixedBackend:
    def __init__(self):
        self.queries = []

    def search(self, query, top_k):
        self.queries.append((query, top_k))
        return [Passage(f"Title {i}", f"text for {query}") for i in range(20)]


class BrokenBackend:
    def search(self, query, top_k):
        raise ConnectionError("search service unreachable")


def test_a_plugged_backend_is_used_and_truncated_to_top_k():
    backend = FixedBackend()
    tool = SearchTool(SearchToolConfig(top_k=3), backend=backend)
    text = tool("hello").text
    assert backend.queries == [("hello", 3)]
    assert text.count("Page ") == 3 and text.startswith("Page 1: Title 0: text for hello")


def test_a_failing_backend_gives_an_error_result_not_an_exception():
    result = SearchTool(SearchToolConfig(), backend=BrokenBackend())("hello")
    assert not result.ok and result.error_kind == "backend"
    assert result.text == "Error: search failed: ConnectionError: search service unreachable"


def test_nothing_to_search_is_a_configuration_error():
    with pytest.raises(ValueError, match="nothing to search"):
        SearchTool(SearchToolConfig())
