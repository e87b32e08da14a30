"""The passage corpus of the offline search backend: a jsonl file read by line and by byte range.

Format: one passage per line, either {"title": ..., "text": ...} or {"contents": ...} (the
Pyserini / FlashRAG Wikipedia dumps; title "" and text = contents), each with an optional "id".
Blank lines are skipped; any other line that is not such an object fails, naming the file and
the line; a corpus without passages fails too.

Deviation from the official code, which searches the web (Bing): the corpus is a local file, and
a Wikipedia-size one (millions of passages) is never held in memory. `scan_passages` streams it
once, giving each passage with the byte range [start, end) of its line (and feeding every line to
a hash, so the build hashes the file at no extra read); `PassageFile` keeps only those ranges and
reads a passage back when it is asked for, with os.pread (no shared file position, so safe from
many threads). bm25.py indexes the scan and saves the ranges with the index, so editing the
corpus while a search tool has it open makes that tool read wrong passages (a new tool rebuilds).
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

_RECORD_HELP = 'each line must be {"title": ..., "text": ...} or {"contents": ...}'


@dataclass(frozen=True)
class Passage:
    """One searchable passage of the corpus."""

    title: str
    text: str
    id: str | None = None


def parse_passage(line: bytes | str, location: str) -> Passage:
    """One corpus line as a Passage; raise ValueError starting with `location` ("file:line")."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{location}: not valid JSON ({error.msg}); {_RECORD_HELP}") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{location}: not UTF-8 text ({error.reason})") from None
    if not isinstance(record, dict):
        record = {}
    if isinstance(record.get("title"), str) and isinstance(record.get("text"), str):
        title, text = record["title"], record["text"]
    elif isinstance(record.get("contents"), str):
        title, text = "", record["contents"]
    else:
        shown = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
        raise ValueError(f"{location}: expected a JSON object with string fields 'title' and "
                         f"'text' (or 'contents'), got {shown.strip()[:120]!r}")
    identifier = record.get("id")
    return Passage(title, text, None if identifier is None else str(identifier))


def existing_corpus(path: str | Path) -> Path:
    """`path` resolved; FileNotFoundError saying which setting to fix if it is not a file."""
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"search corpus {path} does not exist; set "
                                "tools.search.corpus_path to a jsonl file of passages")
    return path


def no_passages(path: Path) -> ValueError:
    """The error for a corpus file without a single passage."""
    return ValueError(f"{path}: the corpus has no passages (empty or blank file); {_RECORD_HELP}")


def scan_passages(path: Path, on_line: Callable[[bytes], object] | None = None,
                  progress: bool | None = False, description: str = "",
                  ) -> Iterator[tuple[Passage, int, int]]:
    """Each passage of corpus `path`, in file order, with the byte range [start, end) of its line.

    `on_line` gets every raw line, blank ones too (e.g. a hash's `update`). `progress`: a tqdm
    bar of bytes read, titled `description`; None = only when stderr is a terminal. A bad line
    raises ValueError naming file:line; so does a file without passages, once it is read through.
    """
    offset, found = 0, False
    disable = None if progress is None else not progress  # None: tqdm shows it on a terminal only
    with path.open("rb") as corpus, tqdm(total=path.stat().st_size, unit="B", unit_scale=True,
                                         desc=description, disable=disable) as bar:
        for number, line in enumerate(corpus, start=1):
            if on_line is not None:
                on_line(line)
            if line.strip():
                found = True
                yield parse_passage(line, f"{path}:{number}"), offset, offset + len(line)
            offset += len(line)
            if number % 4096 == 0:
                bar.update(offset - bar.n)
        bar.update(offset - bar.n)
    if not found:
        raise no_passages(path)


def load_corpus(path: str | Path) -> list[Passage]:
    """Read a whole jsonl corpus into memory (small corpora; the search backend streams instead)."""
    return [passage for passage, _, _ in scan_passages(existing_corpus(path))]


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's content."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class PassageFile(Sequence[Passage]):
    """The corpus's passages, each read from the jsonl file on demand by its byte range."""

    def __init__(self, path: Path, spans: np.ndarray) -> None:
        self.path, self.spans = path, spans  # spans (N, 2) int64: [start, end) of each line
        self._descriptor = os.open(path, os.O_RDONLY)
        weakref.finalize(self, os.close, self._descriptor)

    def __len__(self) -> int:
        return len(self.spans)

    def __getitem__(self, index: int) -> Passage:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"passage {index} of a corpus of {len(self)}")
        start, end = (int(offset) for offset in self.spans[index])
        line = os.pread(self._descriptor, end - start, start)  # no shared position: thread-safe
        return parse_passage(line, f"{self.path} at byte {start} (changed since it was indexed?)")
