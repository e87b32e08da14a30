"""Okapi BM25 over a local passage corpus: the offline search backend (ARPO.md §5).

The official code searches the web (Bing) behind a query cache; this project searches a local
corpus so that runs are reproducible and work offline. Scoring, for query tokens q_1..q_n
(repeated tokens count once per occurrence) and a passage D of |D| tokens:

    score(D, Q) = Σ_i idf(q_i) · tf(q_i, D) · (k1 + 1) / (tf(q_i, D) + k1 · (1 − b + b · |D| / avgdl))
    idf(q)      = ln(1 + (N − df(q) + 0.5) / (df(q) + 0.5))

with N passages and df(q) passages containing q. This idf is the Lucene variant of Robertson–
Spärck Jones idf: it is never negative, so a very common word cannot push a passage down.
Tokens are lower-cased `\\w+` runs of "title text". Ties are broken by corpus order.

The index (postings in CSR form: for each term, the passages containing it and the counts) is
built once per corpus content and kept in memory, and saved as a `.npz` file keyed by the
corpus's SHA-256 (next to the corpus or in a cache folder) so later runs skip the build.
A corpus line that is not a JSON object with string `title` and `text` fails at load, naming
the file and the line.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import threading
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

INDEX_FORMAT_VERSION = 1
"""Bumped whenever tokenisation or the saved layout changes, so old index files are rebuilt."""
_TOKEN = re.compile(r"\w+")
_MEMORY_CACHE: dict[tuple, tuple[list[Passage], BM25Index]] = {}
_MEMORY_CACHE_LOCK = threading.Lock()


@dataclass(frozen=True)
class Passage:
    """One searchable passage of the corpus."""

    title: str
    text: str
    id: str | None = None


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens (letters, digits, underscore; any script)."""
    return _TOKEN.findall(text.lower())


def load_corpus(path: str | Path) -> list[Passage]:
    """Read a jsonl corpus; raise FileNotFoundError / ValueError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"search corpus {path} does not exist; set "
                                "tools.search.corpus_path to a jsonl file of passages")
    passages = []
    with path.open(encoding="utf-8") as corpus:
        for line_number, line in enumerate(corpus, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({error.msg}); each line "
                                 'must be {"title": ..., "text": ...}') from None
            if not (isinstance(record, dict) and isinstance(record.get("title"), str)
                    and isinstance(record.get("text"), str)):
                raise ValueError(f"{path}:{line_number}: expected a JSON object with string "
                                 f"fields 'title' and 'text', got {line.strip()[:120]!r}")
            identifier = record.get("id")
            passages.append(Passage(record["title"], record["text"],
                                    None if identifier is None else str(identifier)))
    return passages


class BM25Index:
    """Term postings of a corpus; `search` ranks passage indices by BM25 score."""

    def __init__(self, vocabulary: list[str], term_offsets: np.ndarray,
                 posting_passages: np.ndarray, posting_counts: np.ndarray,
                 passage_lengths: np.ndarray) -> None:
        self.vocabulary = vocabulary
        self.term_ids = {term: index for index, term in enumerate(vocabulary)}
        self.term_offsets = term_offsets          # (V + 1,) postings of term t: [o[t], o[t+1])
        self.posting_passages = posting_passages  # (P,) passage index of each posting
        self.posting_counts = posting_counts      # (P,) tf of the term in that passage
        self.passage_lengths = passage_lengths    # (N,) tokens per passage

    @classmethod
    def build(cls, tokenized_passages: list[list[str]]) -> BM25Index:
        """Index passages given as token lists."""
        term_ids: dict[str, int] = {}
        terms, passages, counts = [], [], []
        for passage_index, tokens in enumerate(tokenized_passages):
            for term, count in Counter(tokens).items():
                terms.append(term_ids.setdefault(term, len(term_ids)))
                passages.append(passage_index)
                counts.append(count)
        terms_array = np.asarray(terms, dtype=np.int64)
        order = np.argsort(terms_array, kind="stable")  # stable: postings stay in passage order
        postings_per_term = np.bincount(terms_array, minlength=len(term_ids))
        offsets = np.concatenate([[0], np.cumsum(postings_per_term)]).astype(np.int64)
        lengths = np.asarray([len(tokens) for tokens in tokenized_passages], dtype=np.int64)
        return cls(list(term_ids), offsets, np.asarray(passages, dtype=np.int64)[order],
                   np.asarray(counts, dtype=np.int64)[order], lengths)

    @property
    def num_passages(self) -> int:
        return len(self.passage_lengths)

    def scores(self, query: str, k1: float, b: float) -> np.ndarray:
        """BM25 score of every passage for `query`, shape (N,), float64 (module docstring)."""
        scores = np.zeros(self.num_passages, dtype=np.float64)
        if self.num_passages == 0:
            return scores
        average_length = max(float(self.passage_lengths.mean()), 1e-9)
        for token in tokenize(query):
            term = self.term_ids.get(token)
            if term is None:
                continue
            start, end = self.term_offsets[term], self.term_offsets[term + 1]
            passages = self.posting_passages[start:end]
            tf = self.posting_counts[start:end].astype(np.float64)
            df = end - start
            idf = np.log(1.0 + (self.num_passages - df + 0.5) / (df + 0.5))
            norm = k1 * (1.0 - b + b * self.passage_lengths[passages] / average_length)
            scores[passages] += idf * tf * (k1 + 1.0) / (tf + norm)
        return scores

    def search(self, query: str, top_k: int, k1: float, b: float) -> list[tuple[int, float]]:
        """The `top_k` (passage index, score) pairs with score > 0, best first."""
        scores = self.scores(query, k1, b)
        matching = np.flatnonzero(scores > 0)
        # lexsort's last key is primary: highest score first, then corpus order.
        order = matching[np.lexsort((matching, -scores[matching]))][:top_k]
        return [(int(index), float(scores[index])) for index in order]

    def save(self, path: Path, corpus_sha256: str) -> None:
        """Write the index atomically (a crash never leaves a half-written file)."""
        vocabulary = np.frombuffer("\n".join(self.vocabulary).encode("utf-8"), dtype=np.uint8)
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
        try:
            with os.fdopen(descriptor, "wb") as file:
                np.savez(file, version=np.int64(INDEX_FORMAT_VERSION), vocabulary=vocabulary,
                         corpus_sha256=np.frombuffer(corpus_sha256.encode(), dtype=np.uint8),
                         term_offsets=self.term_offsets, posting_passages=self.posting_passages,
                         posting_counts=self.posting_counts, passage_lengths=self.passage_lengths)
            os.replace(temporary, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)

    @classmethod
    def load(cls, path: Path, corpus_sha256: str) -> BM25Index | None:
        """The saved index, or None if absent, stale, or unreadable (then it is rebuilt)."""
        try:
            with np.load(path, allow_pickle=False) as saved:
                if (int(saved["version"]) != INDEX_FORMAT_VERSION
                        or saved["corpus_sha256"].tobytes().decode() != corpus_sha256):
                    return None
                words = saved["vocabulary"].tobytes().decode("utf-8")
                return cls(words.split("\n") if words else [], saved["term_offsets"],
                           saved["posting_passages"], saved["posting_counts"],
                           saved["passage_lengths"])
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            return None


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's content."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_indexed_corpus(corpus_path: str | Path, index_cache_dir: str | Path | None = None
                        ) -> tuple[list[Passage], BM25Index]:
    """Passages and their BM25 index, from memory, from a saved index, or built now."""
    path = Path(corpus_path).resolve()
    info = path.stat() if path.is_file() else None
    memory_key = (str(path), info.st_size, info.st_mtime_ns) if info else None
    with _MEMORY_CACHE_LOCK:
        if memory_key in _MEMORY_CACHE:
            return _MEMORY_CACHE[memory_key]
    passages = load_corpus(path)
    sha256 = file_sha256(path)
    folder = Path(index_cache_dir) if index_cache_dir is not None else path.parent
    index_path = folder / f"{path.name}.bm25-{sha256[:16]}.npz"
    index = BM25Index.load(index_path, sha256)
    if index is None or index.num_passages != len(passages):
        index = BM25Index.build([tokenize(f"{p.title} {p.text}") for p in passages])
        with contextlib.suppress(OSError):  # a read-only data folder only costs a rebuild
            folder.mkdir(parents=True, exist_ok=True)
            index.save(index_path, sha256)
    with _MEMORY_CACHE_LOCK:
        _MEMORY_CACHE[memory_key] = (passages, index)
    return passages, index
