"""When a generated row stops: an EOS id ('eos'), a stop string completed by the last token
('stop', e.g. a closing tool tag), or the length budget ('length').

Stop strings are matched on decoded text, since a tag may span several tokens or share a token
with neighbouring text. Decoding every row's tail at every step would be slow, so a per-vocabulary
mask first says which tokens could possibly complete a stop string (their text contains a stop
string's last character, or is partial UTF-8); only after such a token is the tail decoded.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class StopRules:
    """The stopping rules of one tokenizer and set of EOS ids; masks are cached per stop-string set."""

    def __init__(self, tokenizer, eos_token_ids: Sequence[int], vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(int(i) for i in eos_token_ids)
        self.vocab_size = vocab_size
        self._char_masks: dict[tuple[str, ...], torch.Tensor] = {}

    def char_mask(self, stop_strings: tuple[str, ...]) -> torch.Tensor | None:
        """[vocab] bool: tokens that might complete a stop string (cheap pre-check per step)."""
        if not stop_strings:
            return None
        if stop_strings not in self._char_masks:
            last_chars = {s[-1] for s in stop_strings}
            pieces = self.tokenizer.convert_ids_to_tokens(list(range(self.vocab_size)))
            texts = [self.tokenizer.convert_tokens_to_string([p]) if p is not None else "" for p in pieces]
            # A token whose text is partial UTF-8 decodes to U+FFFD: it might complete anything.
            flags = [any(c in t for c in last_chars) or "\ufffd" in t or t == "" for t in texts]
            self._char_masks[stop_strings] = torch.tensor(flags, dtype=torch.bool)
        return self._char_masks[stop_strings]

    def finish_reason(self, generated: list[int], stop_strings: Sequence[str], char_mask: torch.Tensor | None,
                      budget_left: int) -> str | None:
        """Why the row whose tokens so far are `generated` stops now, or None if it goes on."""
        token = generated[-1]
        if token in self.eos_token_ids:
            return "eos"
        if char_mask is not None and bool(char_mask[token]):
            if ends_with_new_stop(self.tokenizer, generated, stop_strings):
                return "stop"
        if budget_left <= 0:
            return "length"
        return None


def ends_with_new_stop(tokenizer, generated: list[int], stop_strings: Sequence[str]) -> bool:
    """Did the last token complete a stop string that was not complete before it?"""
    window = max(len(s) for s in stop_strings) + 2  # a token is at least one character
    tail = generated[-window:]
    text = tokenizer.decode(tail)
    before = tokenizer.decode(tail[:-1])
    return any(s in text and s not in before for s in stop_strings)


def default_eos_ids(model, tokenizer) -> list[int]:
    """The tokenizer's EOS id and the EOS ids of the model's generation config."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(config_eos, int):
        ids.add(config_eos)
    elif config_eos is not None:
        ids.update(int(i) for i in config_eos)
    return sorted(ids)
