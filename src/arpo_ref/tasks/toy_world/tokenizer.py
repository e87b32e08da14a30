"""A small byte-level BPE tokenizer trained on the toy world's text, saved as a Hugging Face folder.

Choices and why:
- Byte-level BPE (like GPT-2 / Qwen): every string round-trips exactly, tool output included.
- Digits are split into single-digit tokens before BPE (as Llama and Qwen do), so copying a number
  from a result into code is a per-digit copy a tiny model can learn, instead of memorising one
  token per number.
- The ARPO tags are single added tokens that are NOT special: they decode into text (the reward
  and the tag parser read them) and the generator can stop on one token.
- ChatML specials: `<|im_start|>`, `<|im_end|>` (end of turn = EOS) and `<|endoftext|>` (padding).
- Tags are removed from the BPE training text, so no merges are spent on pieces of them.
- The chat role names are part of the training text, so the chat scaffolding costs few tokens.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|endoftext|>"
START_TOKEN = "<|im_start|>"
END_TOKEN = "<|im_end|>"
TAGS = [
    "<think>", "</think>", "<search>", "</search>", "<python>", "</python>",
    "<result>", "</result>", "<answer>", "</answer>",
]
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
"""ChatML as in Qwen2.5, without an implicit default system message."""


def without_tags(text: str) -> str:
    # A tag is its own piece at encoding time, so the text after it starts a fresh word (no
    # leading space): a newline in its place gives BPE the same word boundaries.
    for tag in TAGS:
        text = text.replace(tag, "\n")
    return text


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on `texts` and wrap it with the chat tokens, tags and chat template.

    `vocab_size` bounds the BPE vocabulary (256 bytes + specials + merges); the ten tags are added
    after it, so `len(tokenizer)` is at most `vocab_size + 10`.
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, START_TOKEN, END_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator((without_tags(text) for text in texts), trainer)
    backend.add_tokens([AddedToken(tag, special=False, normalized=False) for tag in TAGS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=None,
        eos_token=END_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[START_TOKEN],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=1024,
    )
