"""Two gloo ranks for the data-parallel tests (test_distributed, test_fsdp): every wait bounded, so a hang fails.

``spawn(module, fn_name, tmp_path, *args)`` runs ``module.fn_name(rank, *args)`` on :data:`WORLD` processes joined
in one process group and returns each rank's result; ``torchrun(args, cwd)`` runs the CLI as users launch it.

The two rank processes are started once per test session and run every test's function in turn (each start costs
an interpreter, torch and batchfit in both processes: seconds on two CPU cores). A job that fails or hangs on
either rank ends them; the next job starts a fresh pair.
"""

from __future__ import annotations

import atexit
import datetime
import gc
import importlib
import os
import pickle
import queue
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch.multiprocessing as mp

WORLD = 2
JOIN_TIMEOUT_S = 120  # a rank stuck in a collective shows up as a timeout here, not as a hung test suite


def _next_job(jobs: Any, parent: int) -> Any:
    """The next job, or ``None`` when the test session says so or is gone (killed: nobody would send one)."""
    while True:
        try:
            return jobs.get(timeout=5)
        except queue.Empty:
            if os.getppid() != parent:
                return None


def _serve(rank: int, store: str, jobs: Any, done: Any, parent: int) -> None:
    """One rank: join the group, then run ``(module, fn_name, out_dir, args)`` jobs until ``None``; each result is
    pickled to ``out_dir/rank<rank>.pkl`` and ``(rank, None | traceback)`` reported on ``done``."""
    import torch._dynamo  # noqa: F401 - the first optimizer would import it; frozen with the rest below
    import torch.distributed as dist

    from batchfit import distributed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    gc.collect()
    gc.freeze()  # as conftest does: an out-of-memory error's gc.collect() skips torch's own objects
    try:
        while (job := _next_job(jobs, parent)) is not None:
            module, fn_name, out_dir, args = job
            try:
                result = getattr(importlib.import_module(module), fn_name)(rank, *args)
                with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
                    pickle.dump(result, f)
                done.put((rank, None))
            except BaseException:  # noqa: BLE001 - reported to the test, which fails with it
                done.put((rank, traceback.format_exc()))
            finally:
                gc.collect()  # the job's DDP/FSDP wrappers go now, not during the next job
    finally:
        distributed.shutdown()  # collects the DDP wrapper first, or the rank may abort at exit


class _Ranks:
    """:data:`WORLD` rank processes in one gloo group, waiting for jobs."""

    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self.folder = tempfile.mkdtemp(prefix="batchfit-ranks-")
        self.jobs = [ctx.Queue() for _ in range(WORLD)]
        self.done = ctx.Queue()
        self.procs = [ctx.Process(target=_serve, args=(r, os.path.join(self.folder, "store"), self.jobs[r],
                                                       self.done, os.getpid())) for r in range(WORLD)]
        for p in self.procs:
            p.start()

    def run(self, module: str, fn_name: str, out_dir: Path, args: tuple) -> dict[int, str | None]:
        """Run the job on every rank; ``{rank: None | its traceback}``, or pytest.fail on a hang or a dead rank."""
        for q in self.jobs:
            q.put((module, fn_name, str(out_dir), args))
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        errors: dict[int, str | None] = {}
        while len(errors) < WORLD:
            try:
                rank, error = self.done.get(timeout=1)
                errors[rank] = error
            except queue.Empty:
                dead = [f"rank {r} exited with code {p.exitcode}" for r, p in enumerate(self.procs) if not p.is_alive()]
                if dead:
                    pytest.fail(f"{fn_name}: {', '.join(dead)}")
                if time.monotonic() > deadline:
                    pytest.fail(f"{fn_name}: the ranks did not finish within {JOIN_TIMEOUT_S} s (a hang)")
        return errors

    def close(self, wait: bool = True) -> None:
        if wait:
            for q in self.jobs:
                q.put(None)
            for p in self.procs:
                p.join(timeout=30)
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join()
        shutil.rmtree(self.folder, ignore_errors=True)


_POOL: list[_Ranks] = []  # the running ranks, at most one pair


def _close_pool() -> None:
    while _POOL:
        _POOL.pop().close()


atexit.register(_close_pool)


def spawn(module: str, fn_name: str, tmp_path: Path, *args: Any) -> list[Any]:
    """Run ``module.fn_name(rank, *args)`` on 2 gloo ranks; return each rank's result. Fails (never hangs) on a
    hang."""
    if not _POOL:
        _POOL.append(_Ranks())
    ok = False
    try:
        errors = _POOL[0].run(module, fn_name, tmp_path, args)
        failed = {r: e for r, e in errors.items() if e is not None}
        if failed:
            pytest.fail("\n".join(f"{fn_name} failed on rank {r}:\n{e}" for r, e in sorted(failed.items())))
        ok = True
    finally:
        if not ok:  # a failed or hung job may leave the group mid-collective: the next job gets a fresh pair
            _POOL.pop().close(wait=False)
    return [pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in range(WORLD)]


def torchrun_start(args: list[str], cwd: Path) -> subprocess.Popen:
    """``python -m torch.distributed.run --standalone --nproc-per-node 2 -m batchfit ARGS`` in ``cwd``, started:
    :func:`finish` waits for it. Two independent jobs started together share the machine's cores (one job's
    launcher imports torch alone before its ranks start, and most of a small job is such starting)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BATCHFIT_DIST_TIMEOUT": "60"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
           "-m", "batchfit", *args]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = JOIN_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Wait for a job of :func:`torchrun_start` (killed after ``timeout`` s: subprocess.TimeoutExpired, as
    subprocess.run); ``.ended`` is when it was seen to end (time.monotonic())."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    done.ended = time.monotonic()  # type: ignore[attr-defined]
    return done


def finish_all(procs: list[subprocess.Popen]) -> list[subprocess.CompletedProcess]:
    """:func:`finish` each of ``procs``, in order; none is left running, whatever happens."""
    try:
        return [finish(p) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()


def torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc-per-node 2 -m batchfit ARGS`` in ``cwd``."""
    return finish(torchrun_start(args, cwd))
