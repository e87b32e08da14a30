"""Prompts with gold answers: loading and checking question/answer records.

Supported inputs (chosen by file extension):
* `.jsonl` — one JSON object per line with a question field and an answer field (names configurable);
* `.json` — a list of such objects;
* `.parquet` — the same columns, or the official ARPO layout: `prompt` (a list of chat messages whose
  last user message is the question), `reward_model.ground_truth` (the gold answer), `data_source`.
A malformed row is an error naming the file, the row index and the missing or bad field; nothing
is dropped silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


class DataError(ValueError):
    """A data file is missing, unreadable or has a malformed row."""


@dataclass
class Record:
    """One prompt: the question shown to the policy and its gold answer(s)."""

    question: str
    answer: str | list[str]
    source: str = ""
    """Which dataset the row came from (official parquet: `data_source`)."""
    extra: dict = field(default_factory=dict)


def load_records(path: str | Path, question_field: str = "question", answer_field: str = "answer") -> list[Record]:
    """Read every row of `path` into a `Record`, failing clearly on any malformed row."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist; check data.train_path / data.eval_path")
    rows = _read_rows(path)
    if not rows:
        raise DataError(f"data file {path} has no rows")
    return [_to_record(row, i, path, question_field, answer_field) for i, row in enumerate(rows)]


def _read_rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {number}: not valid JSON ({e.msg})") from None
        return rows
    if suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        return data
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json or .parquet")


def _to_record(row, index: int, path: Path, question_field: str, answer_field: str) -> Record:
    where = f"{path}, row {index}"
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with fields, got {type(row).__name__}")
    if question_field not in row and "prompt" in row and "reward_model" in row:
        return _official_record(row, where)
    for name in (question_field, answer_field):
        if name not in row:
            raise DataError(f"{where}: missing field {name!r} (fields present: {sorted(row)}); "
                            f"set data.question_field / data.answer_field if the names differ")
    question, answer = row[question_field], row[answer_field]
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: field {question_field!r} must be a non-empty string")
    if not _is_answer(answer):
        raise DataError(f"{where}: field {answer_field!r} must be a string or a list of strings, got {answer!r}")
    extra = {k: v for k, v in row.items() if k not in (question_field, answer_field)}
    return Record(question, answer, str(row.get("data_source", row.get("kind", ""))), extra)


def _official_record(row: dict, where: str) -> Record:
    """The official ARPO parquet layout: chat `prompt` + `reward_model.ground_truth`."""
    messages = row["prompt"]
    users = [m.get("content") for m in messages or [] if isinstance(m, dict) and m.get("role") == "user"]
    if not users or not isinstance(users[-1], str):
        raise DataError(f"{where}: field 'prompt' has no user message")
    truth = (row.get("reward_model") or {}).get("ground_truth")
    if not _is_answer(truth):
        raise DataError(f"{where}: field 'reward_model.ground_truth' is missing or not a string/list")
    return Record(users[-1], truth, str(row.get("data_source", "")), {"extra_info": row.get("extra_info")})


def _is_answer(value) -> bool:
    if isinstance(value, str):
        return True
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)
