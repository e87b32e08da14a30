"""Answers in responses and their scores against gold answers, shared by the reward
(arpo_ref.rewards) and evaluation (arpo_ref.evaluate).

* `blank_tool_results`: the response with the text of inserted tool results blanked (the tags
  stay), so nothing the environment wrote counts as the policy's. What a call and an inserted
  result look like comes from `arpo_ref.tools.tags.ToolSyntax`; functions here take the tool
  names (`ToolRegistry.names`; default: the built-in tools) as plain values;
* `extract_answer`: the last balanced `\\boxed{…}` (or `\\boxed x`) of the response, inside the last
  `<answer>` block when there is one;
* `normalize_answer`, `f1_score`, `exact_match`: SQuAD-style normalisation (lower case, no
  punctuation or articles), token-level F1 and exact match, each the maximum over the golds;
* `parse_golds`: a ground truth as a list of golds (JSON lists of strings are decoded).
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Iterable

from ..tools.tags import BUILTIN_TOOL_NAMES, RESULT_CLOSE, tool_syntax

GroundTruth = str | Iterable[str]


# ---------------------------------------------------------------------------- tool results
def blank_tool_results(response: str, tool_names: Iterable[str] = BUILTIN_TOOL_NAMES
                       ) -> tuple[str, int]:
    """The response with the text of every inserted tool result removed, and how many there were.

    ARPO.md §5: results are inserted by the environment right after a call's closing tag, so
    any tag inside them is not the policy's. Tags stay: "</search> <result>…</result>" becomes
    "</search> <result></result>". A result cut off by the length limit keeps only "<result>".
    `tool_names`: the tags of the enabled tools; a closing tag of any of them may be followed
    by an inserted result (`ToolSyntax.inserted_result`).
    """
    inserted_result = tool_syntax(tool_names).inserted_result
    pieces, position, count = [], 0, 0
    while (match := inserted_result.search(response, position)) is not None:
        pieces.append(response[position : match.end()])
        count += 1
        end = response.find(RESULT_CLOSE, match.end())
        if end == -1:
            return "".join(pieces), count
        position = end
    pieces.append(response[position:])
    return "".join(pieces), count


# ---------------------------------------------------------------------------- answer extraction
def last_boxed_content(text: str) -> str | None:
    """Content of the last `\\boxed{…}` (nested braces allowed) or `\\boxed x` (ARPO.md §5).

    None when there is no `\\boxed` or its braces never close.
    """
    start = text.rfind("\\boxed")
    if start == -1:
        return None
    position = start + len("\\boxed")
    rest = text[position:]
    if rest[:1].isspace() and not rest.lstrip().startswith("{"):  # `\boxed 5`: to `$` or newline
        return re.split(r"[$\n]", rest.lstrip(), maxsplit=1)[0].strip() or None
    position += len(rest) - len(rest.lstrip())
    if not text.startswith("{", position):
        return None
    depth = 0
    for index in range(position, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[position + 1 : index]
    return None


def _answer_block(text: str) -> str | None:
    blocks = re.findall(r"<answer>(.*?)</answer>", text, flags=re.DOTALL)
    return blocks[-1] if blocks else None


def extract_answer(response: str, tool_names: Iterable[str] = BUILTIN_TOOL_NAMES) -> str | None:
    """The final answer of a trajectory (ARPO.md §5 `<answer>… \\boxed{…} </answer>`).

    Inserted tool results (after a closing tag of one of `tool_names`) are ignored. Returns
    the last balanced `\\boxed` content of the last `<answer>` block, else that block's
    stripped text; with no block, the last `\\boxed` of the whole response; None when there
    is neither.
    """
    text, _ = blank_tool_results(response, tool_names)
    block = _answer_block(text)
    boxed = last_boxed_content(block if block is not None else text)
    if boxed is not None:
        return boxed.strip()
    return block.strip() if block is not None else None


# ---------------------------------------------------------------------------- F1 and exact match
_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_YES_NO = frozenset({"yes", "no", "noanswer"})


def normalize_answer(text: str) -> str:
    """SQuAD normalisation used by Acc (eq. 8): lower-case, drop ASCII punctuation and a/an/the,
    collapse whitespace. Returns the normalised string (words separated by one space)."""
    text = "".join(character for character in text.lower() if character not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def parse_golds(ground_truth: GroundTruth) -> list[str]:
    """Gold answers of eq. 8's Acc as a list: a str is one gold unless it is a JSON list of strings.

    Lists, tuples and arrays (parquet list columns) give one gold per element. Raises
    ValueError on an empty list, which would make every answer silently wrong.
    """
    if isinstance(ground_truth, str):
        golds = [ground_truth]
        if ground_truth.lstrip().startswith("["):
            try:
                decoded = json.loads(ground_truth)
            except json.JSONDecodeError:
                decoded = None
            if isinstance(decoded, list) and decoded:
                golds = decoded if all(isinstance(item, str) for item in decoded) else golds
    elif isinstance(ground_truth, (int, float)):
        golds = [str(ground_truth)]
    else:
        golds = [str(item) for item in ground_truth]
    if not golds:
        raise ValueError("ground_truth: empty list of gold answers; give at least one answer")
    return golds


def _token_f1(prediction: str, gold: str) -> float:
    if (prediction in _YES_NO or gold in _YES_NO) and prediction != gold:
        return 0.0  # HotpotQA rule: "no" must not earn partial credit against "no way"
    prediction_tokens, gold_tokens = prediction.split(), gold.split()
    overlap = sum((Counter(prediction_tokens) & Counter(gold_tokens)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(prediction_tokens), overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, golds: GroundTruth) -> float:
    """Token-level F1 (Acc of eq. 8 during training), max over gold answers; in [0, 1].

    Tokens are the whitespace words of `normalize_answer`; shared tokens counted with
    multiplicity. An empty prediction scores 0. As in HotpotQA and the official reward,
    a yes/no/noanswer prediction or gold scores 0 unless both are the same word.
    """
    normalized = normalize_answer(prediction)
    return max(_token_f1(normalized, normalize_answer(gold)) for gold in parse_golds(golds))


def exact_match(prediction: str, golds: GroundTruth) -> float:
    """SQuAD exact match (paper §4 QA metric): 1.0 if the normalised prediction equals a
    normalised gold answer, else 0.0; max over golds."""
    normalized = normalize_answer(prediction)
    golds_normalized = {normalize_answer(gold) for gold in parse_golds(golds)}
    return float(bool(normalized) and normalized in golds_normalized)
