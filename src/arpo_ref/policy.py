"""The policy to train or evaluate: loading, weight and compute precision, LoRA, memory estimate.

Precision (a deviation from loading checkpoints in bf16, as inference code does): the trained
weights stay float32 by default and the compute runs in bf16 autocast on GPUs. AdamW's step is
about lr per weight, and bf16 numbers near typical weights (~0.02) are ~1e-4 apart, so at the
paper's lr 1e-6 a bf16 weight mostly rounds back to its old value (tests/test_train.py measures it).
"""

from __future__ import annotations

import torch

from .config import Config
from .lora import apply_lora, has_lora
from .memory import estimate_memory


def load_policy(config: Config, device, training: bool = False):
    """The model and tokenizer of `config.model`; `training` resolves dtype auto to float32 and
    adds the LoRA adapters of `model.lora` when enabled (arpo_ref.lora)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = config.model.name_or_path
    if not name:
        raise ValueError("model.name_or_path is empty; set it to a hub name or a local model folder")
    dtype = config.model.dtype
    if dtype == "auto":
        dtype = "float32" if training or not bf16_gpu() else "bfloat16"
    tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=config.model.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=getattr(torch, dtype),
                                                 trust_remote_code=config.model.trust_remote_code)
    if training:  # before eval(): the adapters' dropout layers must follow the model's mode
        model = apply_lora(model, config.model.lora)
    return model.to(device).eval(), tokenizer


def bf16_gpu() -> bool:
    """Whether a GPU that computes in bfloat16 is present."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def mixed_precision_mode(value: str, cpu: bool) -> str:
    """`train.mixed_precision` as Accelerate takes it: auto = bf16 on a bf16 GPU, else no."""
    if value != "auto":
        return value
    return "bf16" if bf16_gpu() and not cpu else "no"


def check_trainable_precision(model, config: Config, log) -> None:
    """Warn when the trained weights are 16-bit: AdamW's steps (≈ lr) fall below their spacing.

    Measured with benchmarks/gpu_train_step.py --tiny at lr 1e-6: one update changed 28% of the
    float32 weights and 0.6% of the bfloat16 ones (the rest rounded back to the old value).
    """
    dtype = next((p.dtype for p in model.parameters() if p.requires_grad), torch.float32)  # LoRA: the adapters'
    if dtype in (torch.bfloat16, torch.float16):
        log(f"warning: training {dtype} weights: AdamW steps of about lr = {config.train.learning_rate:g} "
            "are mostly rounded away in 16-bit weights; use model.dtype=float32 (the default, auto) and "
            "train.mixed_precision=bf16 for 16-bit compute")


def memory_line(policy, config: Config, per_process: int, mixed_precision: str, processes: int = 1) -> str:
    """The start-up memory estimate of one of `processes` processes (arpo_ref.memory), as a log
    line; with `train.fsdp` the training state is sharded over the processes."""
    dtype = str(next(policy.parameters()).dtype).removeprefix("torch.")
    compute = {"bf16": "bfloat16", "fp16": "float16"}.get(mixed_precision, dtype)
    per_process = min(per_process, config.train.rollout_batch_prompts or per_process)  # live in the KV cache
    estimate = estimate_memory(policy.config, sum(p.numel() for p in policy.parameters()), dtype, per_process,
                               config.rollout.rollout_budget, 512, config.rollout.max_response_tokens,
                               config.train.micro_batch_leaves, config.train.gradient_checkpointing, compute,
                               sum(p.numel() for p in policy.parameters() if p.requires_grad), processes,
                               sharded=config.train.fsdp, reference=config.train.kl_coef > 0 and not has_lora(policy))
    return estimate.describe() + " (prompts assumed ≤ 512 tokens)"


def planned_memory_line(config: Config, processes: int, mixed_precision: str) -> str:
    """`memory_line` for a run of `processes` processes, without loading any weights: the model is
    built from its config.json on the meta device (with its LoRA adapters when enabled), so a
    user can size a run before starting it (`arpo-ref memory`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    name = config.model.name_or_path
    if not name:
        raise ValueError("model.name_or_path is empty; set it to a hub name or a local model folder")
    if config.train.prompts_per_step % (processes * config.train.mini_batches):
        raise ValueError(f"train.prompts_per_step ({config.train.prompts_per_step}) must be divisible by "
                         f"processes × mini_batches ({processes} × {config.train.mini_batches})")
    dtype = "float32" if config.model.dtype == "auto" else config.model.dtype  # as training loads it
    model_config = AutoConfig.from_pretrained(name, trust_remote_code=config.model.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, dtype=getattr(torch, dtype),
                                                 trust_remote_code=config.model.trust_remote_code)
        model = apply_lora(model, config.model.lora)
    return memory_line(model, config, config.train.prompts_per_step // processes, mixed_precision, processes)
