"""The default system prompt of the toy world: the tools and the tag format, in few tokens.

It is a constant rather than a data file so that it ships with any install of the package. It is
kept short because it precedes every prompt the tiny model reads, in SFT, RL and evaluation.
"""

from __future__ import annotations

SYSTEM_PROMPT = (
    "Answer questions about an invented world. Think in <think> </think>. "
    "Search facts with <search> query </search>. Compute with <python> print(...) </python>. "
    "Tools reply in <result> </result>. End with <answer> \\boxed{...} </answer>."
)


def chat_messages(question: str, system_prompt: str = SYSTEM_PROMPT) -> list[dict[str, str]]:
    """The chat messages of a toy-world prompt, ready for `tokenizer.apply_chat_template`."""
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": question}]
