"""Training in two CPU processes for the tests: `torchrun` runs tests/dist_train.py."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def train_two_processes(out: Path, *args: str) -> list[dict]:
    """`torchrun --standalone --nproc_per_node 2 dist_train.py out *args`; each process's report."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(HERE / "dist_train.py"), str(out), *map(str, args)]
    # A session of its own: torchrun and both workers are killed together afterwards, whatever
    # happened. (subprocess.run's timeout kills torchrun only; a worker once outlived a failed
    # run, waiting in a collective for its dead peer.)
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    if process.returncode != 0:  # every process's own error first (the others then fail in collectives)
        errors = [line for line in stderr.splitlines() if "Error" in line or "error:" in line]
        raise AssertionError("\n".join(errors[-20:]) + "\n--- stderr tail ---\n" + stderr[-3000:])
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def _mean_metrics_worker(rank: int, port: int, reported: list[dict], out: Path) -> None:
    import torch.distributed as dist

    from arpo_ref.training.metrics import mean_over_processes

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=len(reported))
    try:
        (out / f"rank{rank}.json").write_text(json.dumps(mean_over_processes(reported[rank])))
    finally:
        dist.destroy_process_group()


def mean_metrics_in_processes(reported: list[dict], out: Path) -> list[dict]:
    """`metrics.mean_over_processes` run by len(reported) gloo processes, process r reporting
    reported[r]; each process's result."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out.mkdir(parents=True, exist_ok=True)
    mp.spawn(_mean_metrics_worker, args=(port, reported, out), nprocs=len(reported))
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(len(reported))]


def in_processes(worker, parts: list, out: Path) -> list:
    """`worker(parts[r])` in process r of len(parts) gloo CPU processes, set up as torchrun sets
    them up (RANK, WORLD_SIZE, ... in the environment, so Accelerate finds the group); each
    process's return value. `worker` must be a module-level function (it is pickled)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out.mkdir(parents=True, exist_ok=True)
    mp.spawn(_run_part, args=(port, worker, parts, out), nprocs=len(parts))
    import torch

    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(len(parts))]


def _run_part(rank: int, port: int, worker, parts: list, out: Path) -> None:
    import torch
    import torch.distributed as dist

    world = str(len(parts))
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=world, LOCAL_WORLD_SIZE=world,
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=len(parts))
    try:
        torch.save(worker(parts[rank]), out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def estimate_worker(part) -> dict:
    """(estimator names, this process's batch) -> {name: its advantages}, computed by
    `advantages.estimate_advantages` (batch statistics over all processes)."""
    from arpo_ref.advantages import estimate_advantages, get_estimator

    names, batch = part
    return {name: estimate_advantages(get_estimator(name), batch) for name in names}


def update_worker(part) -> dict:
    """(model folder, config overrides, batch, advantages, reference log-probs) of this process ->
    the metrics of `update.ppo_update` run by DDP on this process's share, with SGD at lr 0."""
    import torch
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from arpo_ref.config import load_config
    from arpo_ref.training.update import ppo_update

    model_path, overrides, vocab_size, batch, advantages, reference = part
    accelerator = Accelerator(cpu=True)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    metrics = ppo_update(accelerator, model, optimizer, scheduler, batch, advantages, reference,
                         load_config(overrides=overrides), vocab_size)
    return metrics | {"world": float(accelerator.num_processes)}
