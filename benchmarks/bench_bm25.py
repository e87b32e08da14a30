"""Build, load and query the on-disk BM25 index of a synthetic corpus (tools/bm25.py).

    OMP_NUM_THREADS=1 python benchmarks/bench_bm25.py                   # 200k passages
    OMP_NUM_THREADS=1 python benchmarks/bench_bm25.py --passages 50000 --json

The corpus is N jsonl passages {"id", "title", "text"} of 20-100 words (60 on average) drawn from
a Zipf-like vocabulary (P(rank r) ∝ 1 / r^1.07, roughly English word frequencies), written to a
temporary folder that is deleted at the end. Reported:
- build: wall time of the first `load_indexed_corpus` (streams the corpus, writes the index) and
  the peak RSS of that process, next to the RSS of the same process just before the build;
- index size on disk next to the corpus size;
- load: wall time of `load_indexed_corpus` in a new process (the saved index, memory-mapped;
  the files are in the page cache, as on a second run on the same machine);
- query latency over --queries queries of 2-6 words from the same distribution, each a full
  `BM25Backend.search` (scoring, top-k, reading the hit passages from the corpus file);
- top-k latency of `BM25Index.search` (the pruned, exact top-k of bm25_query) next to
  `BM25Index.search_dense` (scores of all N passages, then top-k: the path before pruning) on
  the same queries in the same process, the order of the two alternating from query to query,
  and their ratio (dense / pruned); the two results are checked to be identical.
The build and the load each run in a fresh child process, so their RSS is theirs alone.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def zipf_vocabulary(rng: np.random.Generator, size: int) -> tuple[list[str], np.ndarray]:
    """`size` random lower-case words and their Zipf-like probabilities (rank r ∝ 1 / r^1.07)."""
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    lengths = rng.integers(2, 11, size=size)
    words = ["".join(rng.choice(letters, size=length)) for length in lengths]
    weights = 1.0 / np.arange(1, size + 1) ** 1.07
    return words, weights / weights.sum()


def write_corpus(path: Path, passages: int, vocabulary_size: int, seed: int) -> None:
    """N jsonl passages of 20-100 Zipf-distributed words each."""
    rng = np.random.default_rng(seed)
    words, probabilities = zipf_vocabulary(rng, vocabulary_size)
    with path.open("w", encoding="utf-8") as corpus:
        for first in range(0, passages, 10_000):
            count = min(10_000, passages - first)
            lengths = rng.integers(20, 101, size=count)
            drawn = rng.choice(vocabulary_size, size=int(lengths.sum()) + 2 * count, p=probabilities)
            position = 0
            for offset, length in enumerate(lengths):
                title = " ".join(words[i] for i in drawn[position:position + 2])
                text = " ".join(words[i] for i in drawn[position + 2:position + 2 + length])
                position += 2 + length
                corpus.write(json.dumps({"id": str(first + offset), "title": title, "text": text}) + "\n")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def child_build(corpus: Path, index_dir: Path) -> dict:
    from arpo_ref.tools.bm25 import load_indexed_corpus

    before = peak_rss_mb()
    start = time.perf_counter()
    load_indexed_corpus(corpus, index_dir, progress=False)
    return {"build_s": time.perf_counter() - start, "build_peak_rss_mb": peak_rss_mb(),
            "rss_before_build_mb": before}


def child_query(corpus: Path, index_dir: Path, args: argparse.Namespace) -> dict:
    from arpo_ref.tools.search import BM25Backend

    start = time.perf_counter()
    backend = BM25Backend(corpus, index_cache_dir=index_dir, progress=False)
    load_s = time.perf_counter() - start
    rng = np.random.default_rng(args.seed + 1)
    words, probabilities = zipf_vocabulary(np.random.default_rng(args.seed), args.vocabulary)
    queries = [" ".join(words[i] for i in rng.choice(len(words), size=rng.integers(2, 7), p=probabilities))
               for _ in range(args.queries)]
    latencies = []
    for query in queries:
        start = time.perf_counter()
        backend.search(query, args.top_k)
        latencies.append(time.perf_counter() - start)
    index, k1, b = backend.index, backend.k1, backend.b
    timings: dict[str, list[float]] = {"search": [], "search_dense": []}
    for number, query in enumerate(queries):
        results = {}
        for name in ("search", "search_dense")[:: 1 if number % 2 else -1]:
            start = time.perf_counter()
            results[name] = getattr(index, name)(query, args.top_k, k1, b)
            timings[name].append(time.perf_counter() - start)
        if results["search"] != results["search_dense"]:
            raise AssertionError(f"pruned and dense top-k differ for {query!r}")
    result = {"load_s": load_s, "query_mean_ms": 1000 * statistics.mean(latencies),
              "query_median_ms": 1000 * statistics.median(latencies),
              "query_max_ms": 1000 * max(latencies)}
    for name, label in (("search_dense", "topk_dense"), ("search", "topk_pruned")):
        result[f"{label}_mean_ms"] = 1000 * statistics.mean(timings[name])
        result[f"{label}_median_ms"] = 1000 * statistics.median(timings[name])
        result[f"{label}_max_ms"] = 1000 * max(timings[name])
    result["topk_speedup_mean"] = statistics.mean(timings["search_dense"]) / statistics.mean(timings["search"])
    result["topk_speedup_median"] = (statistics.median(timings["search_dense"])
                                     / statistics.median(timings["search"]))
    return {**result, "query_process_peak_rss_mb": peak_rss_mb()}


def run_child(stage: str, corpus: Path, index_dir: Path, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--child", stage, str(corpus), str(index_dir),
               "--vocabulary", str(args.vocabulary), "--queries", str(args.queries),
               "--top-k", str(args.top_k), "--seed", str(args.seed)]
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, default=200_000, help="N")
    parser.add_argument("--vocabulary", type=int, default=100_000, help="distinct words")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--child", nargs=3, metavar=("STAGE", "CORPUS", "INDEX_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        stage, corpus, index_dir = args.child[0], Path(args.child[1]), Path(args.child[2])
        result = child_build(corpus, index_dir) if stage == "build" else child_query(corpus, index_dir, args)
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory(prefix="bench-bm25-") as folder:
        corpus, index_dir = Path(folder) / "corpus.jsonl", Path(folder) / "index"
        start = time.perf_counter()
        write_corpus(corpus, args.passages, args.vocabulary, args.seed)
        results = {"passages": args.passages, "corpus_mb": corpus.stat().st_size / 2**20,
                   "generate_s": time.perf_counter() - start}
        results.update(run_child("build", corpus, index_dir, args))
        results["index_mb"] = sum(f.stat().st_size for f in index_dir.rglob("*") if f.is_file()) / 2**20
        results.update(run_child("query", corpus, index_dir, args))
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        for key, value in results.items():
            print(f"{key:28s} {value:.3f}" if isinstance(value, float) else f"{key:28s} {value}")


if __name__ == "__main__":
    main()
