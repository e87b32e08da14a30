"""BM25 on disk: a brute-force reference, index reuse and rebuild, atomic builds, corpus errors,
reads from many threads."""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from arpo_ref.tools import (
    BM25Index,
    Passage,
    SearchTool,
    SearchToolConfig,
    bm25_build,
    bm25_query,
    load_corpus,
    tokenize,
)
from arpo_ref.tools import bm25 as bm25_module
from arpo_ref.tools.bm25 import INDEX_ARRAYS, Vocabulary, load_indexed_corpus

WORDS = ["the", "of", "capital", "France", "Paris", "city", "river", "Été", "naïve", "日本", "x_y",
         "42", "snake", "python", "mountain"] + [f"w{i}" for i in range(60)]


def random_corpus_lines(seed: int, count: int) -> list[str]:
    """jsonl lines of Zipf-like random words: both record formats, blank lines, empty passages."""
    rng = random.Random(seed)
    weights = [1.0 / (rank + 1) for rank in range(len(WORDS))]
    lines = []
    for number in range(count):
        text = " ".join(rng.choices(WORDS, weights, k=rng.randint(0, 30)))
        if number % 7 == 3:
            lines.append(json.dumps({"id": number, "contents": f'"{rng.choice(WORDS)}"\n{text}'}))
        else:
            lines.append(json.dumps({"title": rng.choice(WORDS + [""]), "text": text + " ?!"},
                                    ensure_ascii=number % 2 == 0))
        if number % 11 == 0:
            lines.append("   ")
    return lines


def searchable_text(line: str) -> str:
    record = json.loads(line)
    return record["contents"] if "contents" in record else f"{record['title']} {record['text']}"


def brute_force_bm25(documents: list[str], query: str, k1: float, b: float) -> list[float]:
    """Okapi BM25 with the Lucene idf, from the textbook formula in plain loops, no shared code."""
    tokenized = [re.findall(r"\w+", document.lower()) for document in documents]
    average = sum(len(tokens) for tokens in tokenized) / len(tokenized)
    scores = []
    for tokens in tokenized:
        score = 0.0
        for term in re.findall(r"\w+", query.lower()):
            containing = 0
            for other in tokenized:
                if term in other:
                    containing += 1
            tf = 0
            for token in tokens:
                if token == term:
                    tf += 1
            idf = math.log(1 + (len(tokenized) - containing + 0.5) / (containing + 0.5))
            score += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(tokens) / average))
        scores.append(score)
    return scores


def ranking(scores: list[float], top_k: int) -> list[int]:
    return sorted((i for i, s in enumerate(scores) if s > 0), key=lambda i: (-scores[i], i))[:top_k]


@pytest.fixture(autouse=True)
def fresh_memory_cache(monkeypatch):
    monkeypatch.setattr(bm25_module, "_MEMORY_CACHE", {})


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(random_corpus_lines(seed=0, count=150)) + "\n", encoding="utf-8")
    return path


def no_rebuild(monkeypatch):
    def fail(*args, **kwargs):
        pytest.fail("the index was rebuilt")
    monkeypatch.setattr(bm25_module, "build_index_folder", fail)


# ---------------------------------------------------------------------------- reference
@pytest.mark.parametrize("k1, b", [(1.2, 0.75), (2.0, 0.0), (0.5, 1.0)])
def test_on_disk_index_matches_brute_force(corpus, monkeypatch, k1, b):
    monkeypatch.setattr(bm25_build, "CHUNK_POSTINGS", 97)  # many spilled chunks to merge
    passages, index = load_indexed_corpus(corpus)
    lines = [line for line in corpus.read_text(encoding="utf-8").splitlines() if line.strip()]
    documents = [searchable_text(line) for line in lines]
    rng = random.Random(1)
    queries = ["the", "capital of France", "ÉTÉ naïve 日本", "python python snake", "absent words"]
    queries += [" ".join(rng.choices(WORDS, k=rng.randint(1, 5))) for _ in range(25)]
    for query in queries:
        expected = brute_force_bm25(documents, query, k1, b)
        np.testing.assert_allclose(index.scores(query, k1, b), expected, rtol=1e-12, atol=1e-12)
        hits = index.search(query, 10, k1, b)
        assert [position for position, _ in hits] == ranking(expected, 10)
        np.testing.assert_allclose([s for _, s in hits], [expected[i] for i, _ in hits], rtol=1e-12)
    assert len(passages) == len(lines)
    for position in (0, 3, 10, len(lines) - 1):
        assert searchable_text(lines[position]).endswith(passages[position].text)


@pytest.mark.parametrize("query", ["capital of France", "the", "unknownword"])
def test_in_memory_build_matches_brute_force(query):
    documents = ["Paris is the capital of France.", "Berlin is the capital of Germany.",
                 "The the the river.", "", "France France"]
    index = BM25Index.build([tokenize(document) for document in documents])
    expected = brute_force_bm25(documents, query, 1.2, 0.75)
    np.testing.assert_allclose(index.scores(query, 1.2, 0.75), expected, rtol=1e-12, atol=1e-12)
    assert [position for position, _ in index.search(query, 10, 1.2, 0.75)] == ranking(expected, 10)


def test_ties_are_broken_by_corpus_order_across_the_top_k_cut():
    """search() keeps every passage tied with the k-th best before sorting, so the cut is exact."""
    documents = ["b a", "a", "a b", "a", "c", "a", "a"]
    index = BM25Index.build([tokenize(document) for document in documents])
    expected = brute_force_bm25(documents, "a", 1.2, 0.75)
    for top_k in range(1, 8):
        assert [position for position, _ in index.search("a", top_k, 1.2, 0.75)] == ranking(expected, top_k)


def zipf_documents(rng: random.Random, count: int) -> list[str]:
    """Passages over 400 Zipf-distributed words; every 5th a copy of an earlier one and every
    9th a single common word, so that many scores tie."""
    words = [f"z{rank}" for rank in range(400)]
    weights = [1.0 / (rank + 1) for rank in range(400)]
    documents = []
    for number in range(count):
        if number % 5 == 4:
            documents.append(documents[rng.randrange(len(documents))])
        elif number % 9 == 8:
            documents.append(rng.choice(words[:3]))
        else:
            documents.append(" ".join(rng.choices(words, weights, k=rng.randint(0, 40))))
    return documents


@pytest.mark.parametrize("dense_fraction", [0.125, 10.0, 0.0])  # default, never dense, always
def test_pruned_top_k_equals_sorted_dense_scores(monkeypatch, dense_fraction):
    """search() (MaxScore pruning, bm25_query) returns exactly the top k of all dense scores by
    (score descending, corpus order), with bitwise equal scores, for many random queries."""
    monkeypatch.setattr(bm25_build, "CHUNK_POSTINGS", 1000)  # bounds merged over many chunks
    monkeypatch.setattr(bm25_query, "DENSE_FRACTION", dense_fraction)
    rng = random.Random(3)
    documents = zipf_documents(rng, 3000)
    index = BM25Index.build([tokenize(document) for document in documents])
    for term in range(len(index.vocabulary)):  # the stored bounds, from the postings themselves
        start, end = index.term_offsets[term], index.term_offsets[term + 1]
        counts = index.posting_counts[start:end]
        lengths = index.passage_lengths[index.posting_passages[start:end]]
        assert index.term_max_counts[term] == counts.max()
        assert index.term_min_lengths_per_count[term] == (lengths / counts).min()
    words = [f"z{rank}" for rank in range(400)]
    weights = [1.0 / (rank + 1) for rank in range(400)]
    queries = ["z0", "z0 z1 z2", "z0 z0 z0 z1", "z399 z0", "unknown", "unknown z0 nothing", "",
               "z0 z1 z2 z3 z4 z5 z6 z7 z8 z9", "z250 z250 z1 z0 z0"]
    for number in range(300):
        query = rng.choices(words, weights, k=rng.randint(1, 6))
        if number % 3 == 0:
            query.append(rng.choice(query))  # a repeated word
        if number % 4 == 0:
            query.insert(rng.randrange(len(query) + 1), "nosuchword")
        if number % 5 == 0:
            query = rng.choices(words[:6], k=rng.randint(1, 4))  # very common words only
        queries.append(" ".join(query))
    checked_ties = checked_short = 0
    for number, query in enumerate(queries):
        k1, b = [(1.2, 0.75), (2.0, 0.0), (0.5, 1.0), (0.0, 0.3)][number % 4]
        scores = index.scores(query, k1, b)
        ranked = [i for i in np.argsort(-scores, kind="stable") if scores[i] > 0]
        for top_k in (1, 3, 10, 40, 5000):
            expected = [(int(i), float(scores[i])) for i in ranked[:top_k]]
            assert index.search(query, top_k, k1, b) == expected, (query, top_k, k1, b)
            assert index.search_dense(query, top_k, k1, b) == expected
            checked_short += len(ranked) < top_k
            checked_ties += 0 < top_k < len(ranked) and scores[ranked[top_k - 1]] == scores[ranked[top_k]]
    assert checked_ties > 100 and checked_short > 100  # the cases this test is about did occur
    assert index.search("z0", 0, 1.2, 0.75) == [] and index.search("unknown", 5, 1.2, 0.75) == []


def test_vocabulary_finds_terms_by_binary_search_in_byte_order():
    terms = ["b", "a", "é", "日本", "z9", "ab"]
    vocabulary, rank = Vocabulary.from_terms(terms)
    assert [vocabulary[i] for i in range(len(vocabulary))] == ["a", "ab", "b", "z9", "é", "日本"]
    assert [vocabulary.get(term) for term in terms] == list(rank) == [2, 0, 4, 5, 3, 1]
    assert [vocabulary.get(term) for term in ["", "c", "日", "aa", "zz"]] == [None] * 5
    assert Vocabulary.from_terms([])[0].get("a") is None


# ---------------------------------------------------------------------------- on disk
def test_index_folder_is_memory_mapped_and_passages_are_read_on_demand(corpus, tmp_path):
    passages, index = load_indexed_corpus(corpus)
    (folder,) = tmp_path.glob("corpus.jsonl.bm25-*")
    assert sorted(path.name for path in folder.iterdir()) == sorted(
        [f"{name}.npy" for name in INDEX_ARRAYS] + ["meta.json"])
    assert isinstance(index.posting_passages, np.memmap) and isinstance(passages.spans, np.memmap)
    first = json.loads(corpus.read_text(encoding="utf-8").splitlines()[0])
    assert passages[0] == Passage(first["title"], first["text"], None)
    assert passages[-1] == passages[len(passages) - 1] == list(passages)[-1]
    with pytest.raises(IndexError):
        passages[len(passages)]


def test_second_load_reuses_the_saved_index(corpus, monkeypatch):
    expected = load_indexed_corpus(corpus)[1].search("capital river", 5, 1.2, 0.75)
    monkeypatch.setattr(bm25_module, "_MEMORY_CACHE", {})
    no_rebuild(monkeypatch)
    assert load_indexed_corpus(corpus)[1].search("capital river", 5, 1.2, 0.75) == expected


def test_touched_corpus_is_hashed_once_and_reused(corpus, tmp_path, monkeypatch):
    load_indexed_corpus(corpus)
    info = corpus.stat()
    os.utime(corpus, ns=(info.st_atime_ns, info.st_mtime_ns + 10**9))
    monkeypatch.setattr(bm25_module, "_MEMORY_CACHE", {})
    no_rebuild(monkeypatch)
    load_indexed_corpus(corpus)
    (folder,) = tmp_path.glob("corpus.jsonl.bm25-*")
    assert json.loads((folder / "meta.json").read_text())["corpus_mtime_ns"] == info.st_mtime_ns + 10**9


def test_changed_corpus_is_rebuilt_into_a_new_folder(tmp_path):
    folder = tmp_path / "index"
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"title": "Lyon", "text": "Lyon is known for its cuisine."}) + "\n")
    config = SearchToolConfig(corpus_path=str(corpus), index_cache_dir=str(folder))
    assert SearchTool(config)("Lyon cuisine").text.startswith("Page 1: Lyon")
    with corpus.open("a") as file:
        file.write(json.dumps({"title": "Marseille", "text": "Marseille is a port."}) + "\n")
    assert SearchTool(config)("Marseille port").text.startswith("Page 1: Marseille")
    assert len(list(folder.glob("corpus.jsonl.bm25-*"))) == 2


def test_same_size_edit_in_the_middle_is_rebuilt(tmp_path, monkeypatch):
    """Same size, same head and tail (the folder key), new mtime: the content hash decides."""
    monkeypatch.setattr(bm25_module, "HEAD_TAIL_BYTES", 16)
    corpus = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"title": f"T{i}", "text": "alpha beta gamma"}) for i in range(20)]
    corpus.write_text("\n".join(lines) + "\n")
    load_indexed_corpus(corpus)
    lines[9] = lines[9].replace("alpha", "zebra")
    corpus.write_text("\n".join(lines) + "\n")
    os.utime(corpus, ns=(corpus.stat().st_atime_ns, corpus.stat().st_mtime_ns + 10**9))
    monkeypatch.setattr(bm25_module, "_MEMORY_CACHE", {})
    passages, index = load_indexed_corpus(corpus)
    assert [position for position, _ in index.search("zebra", 3, 1.2, 0.75)] == [9]
    assert passages[9].text == "zebra beta gamma"
    assert len(list(tmp_path.glob("corpus.jsonl.bm25-*"))) == 1  # the same folder, replaced
    assert not list(tmp_path.glob(".corpus.jsonl.bm25-*"))  # no temporary or stale folder left


def test_index_of_an_older_format_is_rebuilt(corpus, tmp_path, monkeypatch):
    """A folder saved by an older version (format 2: no pruning bounds) is replaced by a new build."""
    expected = load_indexed_corpus(corpus)[1].search("the city", 5, 1.2, 0.75)
    (folder,) = tmp_path.glob("corpus.jsonl.bm25-*")
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "format_version": 2}))
    for name in ("term_max_counts", "term_min_lengths_per_count"):
        (folder / f"{name}.npy").unlink()
    monkeypatch.setattr(bm25_module, "_MEMORY_CACHE", {})
    assert load_indexed_corpus(corpus)[1].search("the city", 5, 1.2, 0.75) == expected
    assert json.loads((folder / "meta.json").read_text())["format_version"] == bm25_module.INDEX_FORMAT_VERSION
    assert (folder / "term_max_counts.npy").is_file() and not list(tmp_path.glob(".corpus.jsonl.bm25-*"))


@pytest.mark.parametrize("damage", ["truncate postings", "garbage meta", "no meta"])
def test_corrupt_saved_index_is_rebuilt(corpus, tmp_path, monkeypatch, damage):
    expected = load_indexed_corpus(corpus)[1].search("the city", 5, 1.2, 0.75)
    (folder,) = tmp_path.glob("corpus.jsonl.bm25-*")
    if damage == "truncate postings":
        path = folder / "posting_passages.npy"
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "garbage meta":
        (folder / "meta.json").write_text("{not json")
    else:
        (folder / "meta.json").unlink()
    monkeypatch.setattr(bm25_module, "_MEMORY_CACHE", {})
    assert load_indexed_corpus(corpus)[1].search("the city", 5, 1.2, 0.75) == expected


def test_killed_build_leaves_no_index_and_is_redone(corpus, tmp_path):
    """A build killed just before its rename leaves a complete but hidden temporary folder,
    which is never read: the next load builds the index anew."""
    script = ("import os, signal\nfrom arpo_ref.tools import bm25\n"
              "bm25._publish = lambda *args: os.kill(os.getpid(), signal.SIGKILL)\n"
              f"bm25.load_indexed_corpus({str(corpus)!r})\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()
    (leftover,) = tmp_path.glob(".corpus.jsonl.bm25-*.tmp-*")
    assert (leftover / "meta.json").is_file()
    assert not list(tmp_path.glob("corpus.jsonl.bm25-*"))
    passages, index = load_indexed_corpus(corpus)
    assert len(list(tmp_path.glob("corpus.jsonl.bm25-*"))) == 1 and index.num_passages == len(passages)


def test_a_usable_index_is_never_replaced_by_a_concurrent_build(corpus, tmp_path):
    """Processes of one run may all find the index missing and build it at once. The first to
    publish wins; a later builder must not move that folder away (others may be reading it)."""
    expected = load_indexed_corpus(corpus)[1].search("the city", 5, 1.2, 0.75)
    (folder,) = tmp_path.glob("corpus.jsonl.bm25-*")
    published = (folder / "posting_passages.npy").stat().st_ino
    bm25_module.build_index_folder(corpus, folder)  # a second builder, late
    assert (folder / "posting_passages.npy").stat().st_ino == published
    assert not list(tmp_path.glob(".corpus.jsonl.bm25-*"))  # its own build and no trash left
    bm25_module._MEMORY_CACHE.clear()
    assert load_indexed_corpus(corpus)[1].search("the city", 5, 1.2, 0.75) == expected


def test_processes_building_the_same_index_at_once_all_read_it(corpus, tmp_path):
    script = ("import json, sys\nfrom arpo_ref.tools.bm25 import load_indexed_corpus\n"
              "print(json.dumps(load_indexed_corpus(sys.argv[1])[1].search('the city', 5, 1.2, 0.75)))\n")
    runs = [subprocess.Popen([sys.executable, "-c", script, str(corpus)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outputs = [run.communicate(timeout=120) for run in runs]
    assert all(run.returncode == 0 for run in runs), [err[-500:] for _, err in outputs]
    assert len({out for out, _ in outputs}) == 1
    assert len(list(tmp_path.glob("corpus.jsonl.bm25-*"))) == 1 and not list(tmp_path.glob(".corpus.jsonl.bm25-*"))


def test_unwritable_index_folder_falls_back_to_a_temporary_folder(corpus, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.warns(UserWarning, match="cannot write the BM25 index"):
        passages, index = load_indexed_corpus(corpus, index_cache_dir=blocker / "index")
    assert index.search("the", 1, 1.2, 0.75) and passages[0].title is not None


def test_progress_bar_is_shown_only_when_asked_or_on_a_terminal(corpus, capsys):
    load_indexed_corpus(corpus)  # stderr is captured, not a terminal
    assert "BM25 index" not in capsys.readouterr().err
    bm25_module._MEMORY_CACHE.clear()
    load_indexed_corpus(corpus, index_cache_dir=corpus.parent / "other", progress=True)
    assert "BM25 index of corpus.jsonl" in capsys.readouterr().err


# ---------------------------------------------------------------------------- corpus errors
@pytest.mark.parametrize("lines, message", [
    (['{"title": "a", "text": "b"}', '{"title": "c", "text": "d"', ""], r"corpus.jsonl:2: not valid JSON"),
    (['{"title": "a", "text": "b"}', "", '{"title": "c"}'], r"corpus.jsonl:3: expected a JSON object"),
    (['{"title": 3, "text": "b"}'], r"corpus.jsonl:1: expected a JSON object with string fields"),
    (['{"contents": ["x"]}'], r"corpus.jsonl:1: expected a JSON object with string fields"),
    (['["title", "text"]'], r"corpus.jsonl:1: expected a JSON object"),
    (['{"title": "a", "text": "b"}', '{"title": "\xff", "text": "b"}'], r"corpus.jsonl:2: not UTF-8"),
])
def test_malformed_line_names_the_file_and_line(tmp_path, lines, message):
    path = tmp_path / "corpus.jsonl"
    path.write_bytes("\n".join(lines).encode("utf-8").replace("\xff".encode(), b"\xff"))
    with pytest.raises(ValueError, match=message):
        load_corpus(path)
    with pytest.raises(ValueError, match=message):
        SearchTool(SearchToolConfig(corpus_path=str(path)))
    assert list(tmp_path.iterdir()) == [path]  # the failed build left nothing behind


@pytest.mark.parametrize("content", ["", "\n  \n\n"])
def test_empty_corpus_is_an_error(tmp_path, content):
    path = tmp_path / "corpus.jsonl"
    path.write_text(content)
    for load in (load_corpus, load_indexed_corpus):
        with pytest.raises(ValueError, match=r"corpus.jsonl: the corpus has no passages"):
            load(path)


def test_contents_records_are_searched_as_their_text(tmp_path):
    path = tmp_path / "wiki.jsonl"
    path.write_text(json.dumps({"id": "7", "contents": '"Paris"\nParis is the capital of France.'})
                    + "\n" + json.dumps({"title": "Berlin", "text": "Berlin is in Germany."}) + "\n")
    passages, index = load_indexed_corpus(path)
    assert passages[0] == Passage("", '"Paris"\nParis is the capital of France.', "7")
    assert [position for position, _ in index.search("paris", 5, 1.2, 0.75)] == [0]


# ---------------------------------------------------------------------------- threads
def test_searches_from_many_threads_match_sequential_ones(corpus):
    tool = SearchTool(SearchToolConfig(corpus_path=str(corpus), top_k=5))
    rng = random.Random(2)
    queries = [" ".join(rng.choices(WORDS, k=3)) for _ in range(200)]
    sequential = [tool(query).text for query in queries]
    passages = tool.backend.passages
    with ThreadPoolExecutor(max_workers=8) as pool:
        assert list(pool.map(lambda query: tool(query).text, queries)) == sequential
        positions = [rng.randrange(len(passages)) for _ in range(2000)]
        assert list(pool.map(passages.__getitem__, positions)) == [passages[i] for i in positions]
