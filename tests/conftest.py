"""Shared fixtures: tiny workloads that train in milliseconds on the CPU."""

from __future__ import annotations

import gc
import os
import signal
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from batchfit.demos import ArrayDataset
from batchfit.workload import Workload, accuracy

# A shell without job control starts background commands with SIGINT ignored, and an ignored signal stays ignored
# across exec: the Ctrl-C tests' subprocesses would then never see their SIGINT. With a handler here, children
# start with the default disposition (Python's KeyboardInterrupt), however the suite was launched.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _temporary_files_in_memory(folder: str = "/dev/shm", min_free: int = 2 << 30) -> None:
    """This process's temporary files (tmp_path and tempfile: the stores, results and reports the tests write,
    their subprocesses' too) on tmpfs when the machine has one with room: every sweep and tune commits its SQLite
    store after each evaluation, and each commit waits for the disk (fsync: 3-10 ms here, hundreds per test); in
    memory it does not (test_sweep.py: 76 s -> 40 s on 2 busy cores). A TMPDIR that is set, or ``--basetemp``, is
    kept; a tmpfs without device files (nodev) or with too little room (a container's 64 MiB /dev/shm) is not
    used. Subprocesses keep the usual TMPDIR for their own scratch files (torchrun's logs)."""
    if os.environ.get("TMPDIR") or not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
        return
    fs = os.statvfs(folder)
    if fs.f_flag & os.ST_NODEV or fs.f_bavail * fs.f_frsize < min_free:
        return
    tempfile.tempdir = folder  # pytest's tmp_path_factory asks tempfile.gettempdir() when the first test needs it


_temporary_files_in_memory()


def make_tiny_workload(n: int = 96, n_val: int = 32, features: int = 8, classes: int = 3, optimizer: str = "sgd",
                       lr: float = 0.1, base_batch_size: int = 16, dtype: torch.dtype = torch.float32,
                       seed: int = 0) -> Workload:
    """A linear-ish classifier on a fixed random dataset (deterministic for a given seed)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(features, classes, generator=g)
    x = torch.randn(n + n_val, features, generator=g, dtype=torch.float64).to(dtype)
    y = (x.double() @ w.double()).argmax(dim=1)

    def model_fn() -> nn.Module:
        return nn.Sequential(nn.Linear(features, 16), nn.Tanh(), nn.Linear(16, classes)).to(dtype)

    def optimizer_fn(params, lr):  # noqa: ANN001, ANN202
        if optimizer == "adam":
            return torch.optim.Adam(params, lr=lr)
        return torch.optim.SGD(params, lr=lr)

    return Workload(
        name="tiny",
        model_fn=model_fn,
        optimizer_fn=optimizer_fn,
        loss_fn=F.cross_entropy,
        train_data=ArrayDataset(x[:n], y[:n]),
        val_data=ArrayDataset(x[n:], y[n:]),
        metrics={"accuracy": accuracy},
        base_batch_size=base_batch_size,
        base_lr=lr,
    )


def capped_lr_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, score):  # noqa: ANN001, ANN201
    """tune's capped LR check (a race, 2,816 samples of a 5,120-sample run at base batch 16, base LR 0.01) on
    fake runs whose accuracy is ``score(multiplier, steps)``; returns the :class:`LRCheck`."""
    import batchfit.tuning as tuning
    from batchfit.study import parse_budget

    def lr_run(workload, run, metric, batch, steps, m, seed=None):  # noqa: ANN001, ANN202
        return {"multiplier": m, "lr": 0.01 * m, "score": score(m, steps), "diverged": False, "seconds": 0.0,
                "samples": steps * batch, "seed": seed}

    monkeypatch.setattr(tuning, "_lr_run", lr_run)
    wl = make_tiny_workload(n=512, n_val=1000, lr=0.01)
    run = tuning._Run(tmp_path, None, {"workload": "tiny"}, "cpu", "fp32", 0)
    return tuning._calibrate_lr(wl, run, budget=parse_budget("epochs:20"),
                                multipliers=tuning.LR_CALIBRATION_MULTIPLIERS, tolerance=0.0, max_samples=2_816,
                                train_samples=5_120)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The test models are tiny: one intra-op thread is faster for them and avoids thread contention on a
    busy 2-core machine (restored after the session)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_finish(session: pytest.Session) -> None:
    """What collection imported (torch and its compiler, keras, transformers...: hundreds of thousands of objects)
    moves to the garbage collector's permanent generation. batchfit collects garbage after every out-of-memory
    error (memory.release_memory), and a full collection over those objects took 0.3-1 s each time: the finder's
    and the memory tests' repeated OOMs spent most of their time there. Objects the tests make are collected as
    before; only cycles among the frozen ones (modules, classes) are no longer looked at. torch's compiler is
    imported first: the first optimizer a test builds would import it (torch.optim's dynamo guards) after the
    freeze."""
    import torch._dynamo  # noqa: F401

    gc.collect()
    gc.freeze()


@pytest.fixture
def tiny_workload() -> Workload:
    return make_tiny_workload()


# -- a real PostgreSQL server (tests/pg.py): started once per session, a fresh database per test -----------------


@pytest.fixture(scope="session")
def postgres_server():  # noqa: ANN201
    pytest.importorskip("psycopg2", reason="psycopg2-binary is not installed (pip install -e '.[test]')")
    from pg import find_bindir, postgres_server

    if find_bindir() is None:
        pytest.skip("no PostgreSQL server binaries (initdb) found; set BATCHFIT_PG_BIN or install postgresql")
    with postgres_server() as server:
        yield server


@pytest.fixture
def postgres_url(postgres_server) -> str:  # noqa: ANN001
    return postgres_server.create_database()


def private_null_device(folder: Path) -> str:
    """A character device equal to /dev/null inside ``folder`` (root: mknod), so a test that checks that batchfit
    writes devices in place cannot, if batchfit regresses, replace the machine's own /dev/null with a file."""
    import os
    import stat

    path = folder / "null"
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        with open(path, "w") as f:
            f.write("")
        return str(path)
    except OSError:
        if os.geteuid() != 0:  # without privileges /dev/null cannot be replaced: it is safe to use
            return "/dev/null"
        pytest.skip("cannot create a private character device here (root without CAP_MKNOD)")
