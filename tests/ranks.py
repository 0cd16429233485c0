"""Two gloo ranks for the data-parallel tests (test_distributed, test_fsdp): every wait bounded, so a hang fails.

``spawn(module, fn_name, tmp_path, *args)`` runs ``module.fn_name(rank, *args)`` on :data:`WORLD` processes joined
in one process group and returns each rank's result; ``torchrun(args, cwd)`` runs the CLI as users launch it.
"""

from __future__ import annotations

import datetime
import importlib
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

WORLD = 2
JOIN_TIMEOUT_S = 120  # a rank stuck in a collective shows up as a timeout here, not as a hung test suite


def _entry(rank: int, module: str, fn_name: str, store: str, out_dir: str, args: tuple) -> None:
    import torch.distributed as dist

    from batchfit import distributed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        result = getattr(importlib.import_module(module), fn_name)(rank, *args)
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
    finally:
        distributed.shutdown()  # collects the DDP wrapper first, or the rank may abort at exit


def spawn(module: str, fn_name: str, tmp_path: Path, *args: Any) -> list[Any]:
    """Run ``module.fn_name(rank, *args)`` on 2 gloo ranks; return each rank's result. Fails (never hangs) on a
    hang."""
    ctx = mp.start_processes(_entry, args=(module, fn_name, str(tmp_path / "store"), str(tmp_path), args),
                             nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the ranks did not finish within {JOIN_TIMEOUT_S} s (a hang)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in range(WORLD)]


def torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc-per-node 2 -m batchfit ARGS`` in ``cwd``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BATCHFIT_DIST_TIMEOUT": "60"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
           "-m", "batchfit", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=JOIN_TIMEOUT_S)
