"""Tag parsing (ARPO.md §5): find the tool call at the end of a turn and format its result.

A turn of generation stops on a closing tool tag (`</python>`, `</search>`, …). The call is the
closing tag at the end of the turn, and its content is the text between the LAST matching
opening tag and that closing tag, stripped. The result goes back into the trajectory as
`RESULT_TEMPLATE` (" <result>\\n" + text + "\\n</result>", the official training format).

Edge cases, decided here once for the whole package:
- unclosed tag (`<python>print(1)` then EOS or the length budget): no call (`None`);
- closing tag followed by whitespace (`</python>\\n`): still a call; the whitespace is ignored;
- nested opening tags (`<python>a<python>b</python>`): the innermost, i.e. last, opening wins
  (content "b"), the same rule as "the last opening tag";
- a closing tag with no opening tag at all: a call with `problem` set, so the model reads an
  error instead of the turn silently ending;
- empty content (`<python>  </python>`): a call with `problem` set (error result);
- unknown tags (`<browse>…</browse>`): parsed as a call; the registry answers that the tool is
  unknown and lists the known ones. Tags of the answer format (`think`, `answer`, `result`)
  are never calls.

Deviation from the official code: it matches a fixed tag list with regular expressions and
ignores empty or unmatched calls; here those cases produce an explicit error result, so every
stop on a closing tag gets exactly one `<result>`, which keeps the format reward's "every call
is followed by a result" rule (ARPO.md §6) satisfiable.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import NamedTuple

RESULT_TEMPLATE = " <result>\n{text}\n</result>"
"""The exact string inserted after a call (official training code)."""

NON_TOOL_TAGS = ("think", "answer", "result")
"""Tags of the answer format: a turn ending with one of them is not a tool call."""

_CLOSING_TAG_AT_END = re.compile(r"</([A-Za-z_][\w\-]*)>\s*\Z")


class ToolCall(NamedTuple):
    """A parsed call. A plain `(tag, content)` tuple, plus `problem` when it cannot run.

    `problem` is None for a well-formed call, otherwise the error text the model should read.
    """

    tag: str
    content: str
    problem: str | None = None


def format_result(text: str) -> str:
    """The string inserted into the trajectory for a tool result `text` (ARPO.md §5)."""
    return RESULT_TEMPLATE.format(text=text)


def stop_strings(tool_names: Iterable[str]) -> list[str]:
    """The closing tags generation stops on, one per tool: ["</python>", "</search>", …]."""
    return [f"</{name}>" for name in tool_names]


def parse_tool_call(text: str, non_tool_tags: Iterable[str] = NON_TOOL_TAGS) -> ToolCall | None:
    """The call completed at the end of `text` (one turn of generation), or None.

    Returns None when `text` does not end with a closing tag (trailing whitespace allowed) or
    ends with one of `non_tool_tags`. Otherwise returns `ToolCall(tag, content, problem)`,
    where content is the stripped text between the last `<tag>` and the final `</tag>`.
    """
    match = _CLOSING_TAG_AT_END.search(text)
    if match is None or match.group(1) in tuple(non_tool_tags):
        return None
    tag = match.group(1)
    before_closing = text[: match.start()]
    opening = f"<{tag}>"
    opening_at = before_closing.rfind(opening)
    if opening_at < 0:
        return ToolCall(tag, "", f"Error: found </{tag}> without a matching {opening}; "
                                 f"write the call as {opening}...</{tag}>.")
    content = before_closing[opening_at + len(opening):].strip()
    if not content:
        return ToolCall(tag, "", f"Error: the {opening} call is empty; put the input between "
                                 f"{opening} and </{tag}>.")
    return ToolCall(tag, content)
