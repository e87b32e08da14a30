"""The offline toy tool world of the CPU demo (DESIGN.md, "The embedded default").

A seeded synthetic world that needs ARPO's two tools the way the paper's domains do:
invented cities, people and companies whose facts can only be found by searching a generated
corpus; arithmetic a tiny model cannot do in its head; and questions needing both (two searches
then a python call, the case the multi-tool bonus r_M rewards). It writes train / eval questions,
cold-start SFT demonstrations produced with the real tools, a BPE tokenizer trained on the world's
text and a tiny randomly initialised model, all as ordinary files and Hugging Face folders.

    world = build_toy_world("runs/world", run_tool=my_tools)   # ~2 s
    tokenizer, model = world.load_tokenizer(), world.load_model()

Difficulty knobs (`ToyWorldConfig`) and why the defaults:
- `num_entities=60` (20 of each type, 180 facts): enough distinct facts for 400 train + 60 eval
  questions at one third search each, while names stay few enough to be learnt in a short SFT.
- `kind_mix` = equal thirds: each kind gets the same share of the reward signal.
- `python_digits=3`, `python_operands=2`: products of two 3-digit numbers (6 digits) are far beyond
  a tiny model's mental arithmetic, yet the call itself is a short copy of the question.
- `tokenizer_vocab_size=768` (+10 tags, model vocabulary padded to a multiple of 64): names become
  2-3 tokens, frequent words one token, digits one token each.
- `model_hidden_size=128`, `model_layers=4`, `model_heads=4`: about 1M parameters, a few
  milliseconds per forward pass on a laptop CPU.
Shrinking `num_entities` or `python_digits` makes the world easier; raising `python_operands`,
the "both" weight or the number of entities makes it harder.

Deviation from the paper: the paper's cold start uses 54K trajectories from stronger models; here
demonstrations are templates filled with gold facts, kept only when the real tools returned them.
"""

from arpo_ref.tasks.toy_world.corpus import Passage
from arpo_ref.tasks.toy_world.demonstrations import (
    RESULT_PREFIX,
    RESULT_SUFFIX,
    Demonstration,
    RunTool,
    Segment,
    build_demonstration,
    format_result,
)
from arpo_ref.tasks.toy_world.prompt import SYSTEM_PROMPT, chat_messages
from arpo_ref.tasks.toy_world.questions import KINDS, Fact, Question, evaluate_expression
from arpo_ref.tasks.toy_world.tiny_model import make_tiny_model, padded_vocab_size
from arpo_ref.tasks.toy_world.tokenizer import (
    CHAT_TEMPLATE,
    END_TOKEN,
    PAD_TOKEN,
    START_TOKEN,
    TAGS,
    train_tokenizer,
)
from arpo_ref.tasks.toy_world.world import ToyWorld, ToyWorldConfig, build_toy_world, load_toy_world

__all__ = [
    "CHAT_TEMPLATE", "END_TOKEN", "KINDS", "PAD_TOKEN", "RESULT_PREFIX", "RESULT_SUFFIX", "START_TOKEN",
    "SYSTEM_PROMPT", "TAGS", "Demonstration", "Fact", "Passage", "Question", "RunTool", "Segment",
    "ToyWorld", "ToyWorldConfig", "build_demonstration", "build_toy_world", "chat_messages",
    "evaluate_expression", "format_result", "load_toy_world", "make_tiny_model", "padded_vocab_size",
    "train_tokenizer",
]
