"""The `arpo-ref` command line: one sub-command per stage of the pipeline.

    arpo-ref demo     [--config FILE] [--out DIR] [key=value ...]  the whole pipeline on the toy world
    arpo-ref config   [--config FILE] [key=value ...] [--explain]   resolve and print a config
    arpo-ref generate --model DIR --prompt TEXT [...]               sample with per-token entropy
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import ConfigError, explain, load_config, to_dict


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (default: built-in defaults)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rollout.entropy_weight=0.4")


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    config = load_config(args.config, args.overrides)
    print(explain(config) if args.explain else yaml.safe_dump(to_dict(config), sort_keys=False), end="")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .generation import Generator, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    prompt = tokenizer.encode(args.prompt, add_special_tokens=False)
    sampling = SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=args.seed)
    out = Generator(model, tokenizer).generate([prompt], sampling, stop_strings=args.stop)[0]
    print(f"{'token':>20}  {'logprob':>8}  {'entropy':>8}")
    for token, logprob, entropy in zip(out.token_ids, out.logprobs, out.entropies, strict=False):
        print(f"{tokenizer.decode([token])!r:>20}  {logprob:8.3f}  {entropy:8.3f}")
    print(f"finish reason: {out.finish_reason}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    config = Path(args.config)
    if not config.is_file():
        print(f"arpo-ref demo: {config} not found; run from the repository root or pass --config", file=sys.stderr)
        return 2
    run_demo(config, args.overrides, out_dir=args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arpo-ref", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("config", help="resolve a config (file + overrides) and print it")
    _add_config_args(p)
    p.add_argument("--explain", action="store_true", help="print every field with its documentation")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("demo", help="toy world -> cold-start SFT -> ARPO -> evaluation, on a CPU, offline")
    p.add_argument("--config", default="configs/demo.yaml", help="demo config (default: configs/demo.yaml)")
    p.add_argument("--out", default="runs/demo", help="run folder")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=10 world.num_train=200")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("generate", help="sample from a model, printing log-prob and entropy per token")
    p.add_argument("--model", required=True, help="hub name or local folder of a causal LM")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"arpo-ref: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
