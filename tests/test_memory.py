"""The start-up memory estimate (arpo_ref.training.memory) against measured sizes: the KV cache the
generator actually holds, AdamW's actual state, and the split across FSDP shards."""

from __future__ import annotations

import pytest
import torch
from tiny import model_dir, tokenizer_dir
from transformers import AutoModelForCausalLM, AutoTokenizer

from arpo_ref.engine.generation import Generator
from arpo_ref.training.memory import estimate_memory


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(model_dir("qwen2")).eval()


def estimate(model, **kwargs):
    settings = dict(model_config=model.config, num_parameters=sum(p.numel() for p in model.parameters()),
                    dtype="float32", prompts_per_process=3, rollout_budget=1, prompt_tokens=7, response_tokens=0,
                    micro_batch_leaves=2)
    return estimate_memory(**(settings | kwargs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_estimate_equals_the_generators_cache(model, dtype):
    generator = Generator(model.to(dtype), AutoTokenizer.from_pretrained(tokenizer_dir()))
    rows = generator.prefill([[5, 6, 7, 8, 9, 10, 11]] * 3)
    measured = tensor_bytes(t for layer in rows.cache.layers for t in (layer.keys, layer.values))
    assert measured > 0
    # A prompt's last token is pending (fed with the first decoding step): 6 of 7 are cached.
    got = estimate(model, compute_dtype=str(dtype).removeprefix("torch."), prompt_tokens=6)
    assert got.kv_cache == measured
    model.float()


def test_weights_gradients_and_adamw_state_estimates_equal_measured_bytes(model):
    trained = AutoModelForCausalLM.from_pretrained(model_dir("qwen2"))
    optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-3)
    trained(input_ids=torch.tensor([[5, 6, 7]])).logits.sum().backward()
    optimizer.step()
    moments = [v for state in optimizer.state.values() for k, v in state.items() if k != "step"]
    got = estimate(trained)
    assert got.weights == tensor_bytes(trained.parameters())
    assert got.gradients == tensor_bytes(p.grad for p in trained.parameters())
    assert got.optimizer == tensor_bytes(moments)


def test_the_peak_is_the_largest_phase(model):
    rollout_heavy = estimate(model, prompts_per_process=400, micro_batch_leaves=1)
    update_heavy = estimate(model, prompts_per_process=1, micro_batch_leaves=400)
    assert rollout_heavy.total == rollout_heavy.rollout > rollout_heavy.update
    assert update_heavy.total == update_heavy.update > update_heavy.rollout
    kept = rollout_heavy.weights + rollout_heavy.optimizer
    assert rollout_heavy.rollout == kept + rollout_heavy.kv_cache
    assert update_heavy.old_logprobs == kept + update_heavy.logits
    assert update_heavy.update == kept + update_heavy.gradients + update_heavy.activations + update_heavy.logits


def test_ddp_keeps_gradients_all_run(model):
    single, ddp = estimate(model), estimate(model, processes=2)
    assert ddp.gradients == single.gradients and ddp.update == single.update
    assert ddp.rollout == single.rollout + single.gradients  # the buckets outlive the update


def test_a_kl_reference_model_is_kept_in_its_own_dtype(model):
    without = estimate(model, compute_dtype="bfloat16")
    with_reference = estimate(model, compute_dtype="bfloat16", reference_dtype="bfloat16")
    assert with_reference.reference == sum(p.numel() for p in model.parameters()) * 2
    assert estimate(model, compute_dtype="bfloat16", reference_dtype="float32").reference == 2 * with_reference.reference
    assert with_reference.rollout == without.rollout + with_reference.reference
    assert with_reference.update == without.update + with_reference.reference


def test_sharding_divides_the_training_state_and_adds_the_gathered_weights(model):
    whole = estimate(model, compute_dtype="bfloat16")
    sharded = estimate(model, compute_dtype="bfloat16", processes=4, sharded=True)
    parameters = sum(p.numel() for p in model.parameters())
    for name in ("weights", "gradients", "optimizer"):
        assert getattr(sharded, name) == getattr(whole, name) / 4
    assert sharded.gathered == parameters * 2 and whole.gathered == 0
    text = model.config
    tables = 1 if text.tie_word_embeddings else 2
    assert sharded.embeddings == text.vocab_size * text.hidden_size * tables * 2 and whole.embeddings == 0
    assert sharded.rollout == pytest.approx(whole.rollout - 0.75 * (whole.weights + whole.optimizer) + parameters * 2)
    assert sharded.update == pytest.approx(whole.update - 0.75 * (whole.weights + whole.optimizer + whole.gradients)
                                           + sharded.embeddings)
    assert sharded.total == max(sharded.rollout, sharded.old_logprobs, sharded.update)
    assert "gathered" in sharded.describe() and "gathered" not in whole.describe()


def test_memory_command_prints_the_estimate_training_prints(tmp_path, capsys):
    """`arpo-ref memory` builds the model on the meta device; its line equals the one training
    logs at start-up after loading the weights (and LoRA / FSDP change it as they should)."""
    import json
    import shutil

    from arpo_ref.cli import main
    from arpo_ref.config import load_config
    from arpo_ref.training.policy import load_policy, memory_line

    shutil.copytree(tokenizer_dir(), tmp_path / "model", dirs_exist_ok=True)
    shutil.copytree(model_dir("qwen2"), tmp_path / "model", dirs_exist_ok=True)
    (tmp_path / "data.jsonl").write_text(json.dumps({"question": "What is 1 + 1?", "answer": "2"}) + "\n")
    overrides = [f"model.name_or_path={tmp_path / 'model'}", "train.prompts_per_step=8", "train.mini_batches=2",
                 "rollout.max_response_tokens=64", "train.micro_batch_leaves=2"]

    def planned(*args: str) -> str:
        assert main(["memory", *args, *overrides]) == 0
        return capsys.readouterr().out.strip().split(": ", 1)[1]

    config = load_config(overrides=overrides)
    loaded = load_policy(config, torch.device("cpu"), training=True)[0]
    assert planned("--mixed-precision", "no") == memory_line(loaded, config, 8, "no")
    assert planned("--processes", "2", "--mixed-precision", "bf16") == memory_line(loaded, config, 4, "bf16", 2)
    sharded = planned("--processes", "2", "--mixed-precision", "bf16", "train.fsdp=true")
    fsdp = load_config(overrides=overrides + ["train.fsdp=true"])
    assert sharded == memory_line(loaded, fsdp, 4, "bf16", 2) and "gathered" in sharded
    pytest.importorskip("peft")
    lora = load_config(overrides=overrides + ["model.lora.enabled=true", "model.lora.rank=4"])
    with_adapters = load_policy(lora, torch.device("cpu"), training=True)[0]
    assert planned("--mixed-precision", "no", "model.lora.enabled=true", "model.lora.rank=4") == \
        memory_line(with_adapters, lora, 8, "no")
    assert main(["memory", "--processes", "3", *overrides]) == 2
    assert "divisible" in capsys.readouterr().err
