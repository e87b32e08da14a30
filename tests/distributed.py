"""Training in two CPU processes for the tests: `torchrun` runs tests/dist_train.py."""

from __future__ import annotations

import json
import os
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
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:  # every process's own error first (the others then fail in collectives)
        errors = [line for line in done.stderr.splitlines() if "Error" in line or "error:" in line]
        raise AssertionError("\n".join(errors[-20:]) + "\n--- stderr tail ---\n" + done.stderr[-3000:])
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def _mean_metrics_worker(rank: int, port: int, reported: list[dict], out: Path) -> None:
    import torch.distributed as dist

    from arpo_ref.metrics import mean_over_processes

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
