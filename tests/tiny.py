"""Tiny local models and tokenizers for tests: built from configs, saved, loaded back.

Nothing is downloaded: a byte-level BPE tokenizer is trained on a few sentences, tiny random
models of several architectures are created from their configs, and both go through
`save_pretrained` / `from_pretrained` so the real loading path runs.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma2Config,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

TEXT = [
    "The capital of Zorvia is Quellmar. Quellmar has 48213 people.",
    "<think> I should search. </think> <search> Zorvia capital </search>",
    "<python> print(48213 * 7) </python> <result> 337491 </result>",
    "<answer> The answer is \\boxed{337491} </answer>",
    "def add(a, b): return a + b  # numbers 0 1 2 3 4 5 6 7 8 9",
    "Entropy rises after tool calls; branch where the policy is unsure.",
] * 20

SPECIAL = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
TAGS = ["<think>", "</think>", "<search>", "</search>", "<python>", "</python>",
        "<result>", "</result>", "<answer>", "</answer>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_ROOT = Path(tempfile.mkdtemp(prefix="arpo_ref_tiny_"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)  # saved tokenizers and models: gone at exit


@functools.cache
def tokenizer_dir(tags_as_tokens: bool = True) -> str:
    """Train a byte-level BPE tokenizer (~400 ids) and save it as an HF folder."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TEXT, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|im_end|>", bos_token=None
    )
    if tags_as_tokens:
        fast.add_tokens(TAGS)
    fast.chat_template = CHAT_TEMPLATE
    path = _ROOT / f"tokenizer_{int(tags_as_tokens)}"
    fast.save_pretrained(path)
    return str(path)


def load_tokenizer(tags_as_tokens: bool = True):
    return AutoTokenizer.from_pretrained(tokenizer_dir(tags_as_tokens))


@functools.cache
def model_dir(arch: str = "qwen2", seed: int = 0, tags_as_tokens: bool = True) -> str:
    """Create a tiny random model of `arch` with a padded vocabulary, save it, return the folder."""
    vocab = len(load_tokenizer(tags_as_tokens))
    padded_vocab = (vocab + 63) // 64 * 64 + 64  # model vocab larger than the tokenizer's
    common = dict(
        vocab_size=padded_vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    if arch == "qwen2":
        config = Qwen2Config(**common)
    elif arch == "llama":
        config = LlamaConfig(**common)
    elif arch == "qwen3":
        config = Qwen3Config(**common, head_dim=16)
    elif arch == "mistral":  # a sliding window shorter than the tests' rows
        config = MistralConfig(**common, sliding_window=8)
    elif arch == "gemma2":  # alternating sliding/full layers, soft-capping, eager attention
        config = Gemma2Config(**common, head_dim=16, sliding_window=8)
    else:
        raise ValueError(f"unknown tiny arch {arch!r}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # Random init gives near-uniform logits; a larger output scale gives confident, varied
    # predictions so greedy ties are rare and entropies differ from token to token.
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    path = _ROOT / f"model_{arch}_{seed}_{int(tags_as_tokens)}"
    model.save_pretrained(path)
    return str(path)


def load_model(arch: str = "qwen2", seed: int = 0, tags_as_tokens: bool = True):
    model = AutoModelForCausalLM.from_pretrained(model_dir(arch, seed, tags_as_tokens), dtype=torch.float32)
    return model.eval()
