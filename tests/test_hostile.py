"""Hostile inputs (issues 13 and 23): one table of cases across train / find / noise / sweep / tune / report and
the API.

Each case names the issue item it fences (``4``: item 4 of issue 13; ``23.10``: item 10 of issue 23). A CLI case
runs ``batchfit.cli.main`` in-process and checks the exit code and stderr: a refused input is exactly one line with
exit code 2, never a traceback or an "internal error". A few cases need a real process (``sys.exit`` at import,
Ctrl-C) and run ``python -m batchfit``. Workloads are tiny (192 samples, 8 features) so that the whole table runs in
about a minute on two CPU cores.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import batchfit
from batchfit.cli import main
from batchfit.errors import BatchfitError, ConfigError
from conftest import private_null_device

WORKLOADS = '''
import os
import sys
import time
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset
from batchfit import Workload
from batchfit.workload import accuracy

def _data(n=256, d=8, k=3):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=g), torch.randint(0, k, (n,), generator=g)

def _small(model_fn=None, **kw):
    x, y = _data()
    width = int(os.environ.get("HOSTILE_WIDTH", "16"))
    base = dict(
        name="hostile",
        model_fn=model_fn or (lambda: nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 3))),
        optimizer_fn=lambda p, lr: torch.optim.SGD(p, lr=lr),
        loss_fn=F.cross_entropy,
        train_data=TensorDataset(x[:192], y[:192]), val_data=TensorDataset(x[192:], y[192:]),
        metrics={"accuracy": accuracy}, base_batch_size=16, base_lr=0.05,
    )
    base.update(kw)
    return Workload(**base)

def ok():
    return _small()

def marker():
    open(os.environ["HOSTILE_MARKER"], "w").close()
    return _small()

def labels_out_of_range():
    x, y = _data()
    return _small(train_data=TensorDataset(x[:192], y[:192] + 10), val_data=TensorDataset(x[192:], y[192:] + 10))

def shape_mismatch():
    return _small(model_fn=lambda: nn.Sequential(nn.Linear(9, 16), nn.ReLU(), nn.Linear(16, 3)))

class _RaisesLater(nn.Module):
    def __init__(self, after):
        super().__init__()
        self.lin, self.calls, self.after = nn.Linear(8, 3), 0, after
    def forward(self, x):
        self.calls += 1
        if self.calls > self.after:
            raise RuntimeError("forward broke on call %d" % self.calls)
        return self.lin(x)

def forward_raises_midway():
    return _small(model_fn=lambda: _RaisesLater(3))

def forward_always_raises():
    return _small(model_fn=lambda: _RaisesLater(0))

def frozen():
    def model():
        m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        for p in m.parameters():
            p.requires_grad_(False)
        return m
    return _small(model_fn=model)

def not_an_optimizer():
    return _small(optimizer_fn=lambda p, lr: "sgd")

class _Short(Dataset):
    def __init__(self):
        self.x, self.y = _data()
    def __len__(self):
        return 1000
    def __getitem__(self, i):
        return self.x[i], self.y[i]

def len_too_large():
    return _small(train_data=_Short())

def metric_raises():
    return _small(metrics={"accuracy": lambda out, y: 1 / 0})

def metric_string():
    return _small(metrics={"accuracy": lambda out, y: "high"})

def no_val():
    return _small(val_data=None, metrics={})

def base_batch_1():
    return _small(base_batch_size=1, base_lr=0.01)

def exit0():
    sys.exit(0)

def exit3():
    sys.exit(3)

def one_sample():
    x, y = _data()
    return _small(train_data=TensorDataset(x[:1], y[:1]), base_batch_size=1)

class _BadItem(Dataset):
    """Item ``at`` fails inside a DataLoader worker (never in the main process): it raises, exits or is killed."""
    def __init__(self, how, at, n=192):
        self.x, self.y = _data()
        self.how, self.at, self.n = how, at, n
    def __len__(self):
        return self.n
    def __getitem__(self, i):
        if i == self.at and torch.utils.data.get_worker_info() is not None:
            if self.how == "exit":
                os._exit(3)
            if self.how == "kill":
                os.kill(os.getpid(), 9)
            raise ValueError("corrupt image #123")
        return self.x[i], self.y[i]

def _loader(how, at, n=192):
    return torch.utils.data.DataLoader(_BadItem(how, at, n), batch_size=16, shuffle=True, num_workers=1)

def worker_raises():
    return _small(train_data=_loader("raise", 100))

def val_worker_raises():
    return _small(val_data=_loader("raise", 5, n=64))

def worker_exits():
    return _small(train_data=_loader("exit", 100))

def worker_killed():
    return _small(train_data=_loader("kill", 100))

class _AtSeed(nn.Module):
    """A model built under seed 1 (tune's first racing replicate) fails in training: it raises ("raise"), or, with
    HOSTILE_KILL set, its process kills itself with SIGKILL ("kill": kill -9 while a racing trial runs)."""
    def __init__(self, how):
        super().__init__()
        self.lin, self.how, self.seed = nn.Linear(8, 3), how, torch.initial_seed()
    def forward(self, x):
        if self.training and self.seed == 1:
            if self.how == "raise":
                raise RuntimeError("seed 1 breaks")
            if os.environ.get("HOSTILE_KILL"):
                os.kill(os.getpid(), 9)
        return self.lin(x)

def seed_one_raises():
    return _small(model_fn=lambda: _AtSeed("raise"))

def seed_one_killed():
    return _small(model_fn=lambda: _AtSeed("kill"))

class _Slow(nn.Module):
    """With HOSTILE_SLOW=PATH: touches PATH at each training step and takes a second per step (a tune that holds
    its --out for a while)."""
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 3)
    def forward(self, x):
        flag = os.environ.get("HOSTILE_SLOW")
        if flag and self.training:
            open(flag, "w").close()
            time.sleep(1)
        return self.lin(x)

def slow():
    return _small(model_fn=_Slow)
class _NegativeLen(Dataset):
    """A map-style dataset whose __len__ returns -1 (len() itself raises ValueError)."""
    def __init__(self):
        self.x, self.y = _data()
    def __len__(self):
        return -1
    def __getitem__(self, i):
        return self.x[i], self.y[i]

def len_negative():
    return _small(train_data=_NegativeLen())

def val_len_negative():
    return _small(val_data=_NegativeLen())

def one_cycle():
    """OneCycleLR(pct_start=0.1) divides by zero at total_steps=10 (its warm-up phase is 0 steps long)."""
    return _small(lr_schedule=lambda opt, n: torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=opt.param_groups[0]["lr"], total_steps=n, pct_start=0.1, cycle_momentum=False))
'''


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: the workload files and stores every case may name


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("hostile")
    (root / "wl.py").write_text(WORKLOADS)
    (root / "exit_at_import.py").write_text("import sys\nsys.exit(3)\n")
    (root / "kbi_at_import.py").write_text("raise KeyboardInterrupt\n")
    proj = root / "proj"
    proj.mkdir()
    (proj / "helper.py").write_text(WORKLOADS)  # a sibling module; the workload file imports it by name
    (proj / "wl.py").write_text("from helper import ok\n\ndef make():\n    return ok()\n")
    (root / "afile").write_text("a regular file\n")
    (root / "random.db").write_bytes(os.urandom(8192))
    # a real Optuna store (made by Optuna itself, so these cases do not depend on the sweep), then a copy whose
    # pages after the SQLite header are overwritten
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    (root / "good").mkdir()
    good = root / "good" / "batchfit.db"
    study = optuna.create_study(study_name="hostile", storage=f"sqlite:///{good}")
    study.set_user_attr("batchfit", 1)
    del study
    data = bytearray(good.read_bytes())
    data[100:] = b"\xa5" * (len(data) - 100)
    (root / "corrupt.db").write_bytes(bytes(data))
    fixture = Path(__file__).with_name("_study_fixture.py")
    sys.path.insert(0, str(fixture.parent))
    from _study_fixture import make_results

    (root / "results.json").write_text(json.dumps(make_results()))
    return {"root": root, "wl": root / "wl.py", "good": good, "long": "x" * 300}


@dataclass(frozen=True)
class Case:
    id: str
    item: str  # the issue-13 item (or 12.6 / 10.6) the case fences
    argv: tuple[str, ...] = ()  # a CLI case: formatted with the files and {tmp}
    api: Callable[[dict[str, Any]], None] | None = None  # an API case: asserts by itself
    rc: tuple[int, ...] = (2,)
    err: str | None = None  # regex that stderr must match
    no_err: str | None = None  # regex stderr must not match
    check: Callable[[dict[str, Any], str, str], None] | None = None  # (ctx, stdout, stderr) after the run
    env: dict[str, str] = field(default_factory=dict)


def _fmt(argv: tuple[str, ...], ctx: dict[str, Any]) -> list[str]:
    return [a.format(**ctx) for a in argv]


def _run_cli(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's usage errors
        return int(exc.code or 0)


def _proc(argv: list[str], cwd: Path | None = None, timeout: float = 120, script: bool = False) -> Any:
    cmd = ([str(Path(sys.executable).with_name("batchfit"))] if script else [sys.executable, "-m", "batchfit"])
    return subprocess.run(cmd + argv, capture_output=True, text=True, timeout=timeout, cwd=cwd)


# ---------------------------------------------------------------------------------------------------------------
# Checks used by several cases


def _json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def _nothing_written(name: str) -> Callable[[dict[str, Any], str, str], None]:
    def check(ctx: dict[str, Any], out: str, err: str) -> None:
        assert not Path(ctx["tmp"], name).exists(), f"{name} was written although the command was refused"

    return check


def _no_work(ctx: dict[str, Any], out: str, err: str) -> None:
    assert not Path(ctx["tmp"], "marker").exists(), "the workload was loaded before the output path was checked"


def _fifo_result(ctx: dict[str, Any], out: str, err: str) -> None:
    ctx["reader"].join(20)
    assert json.loads(ctx["box"]["text"])["status"] in ("ok", "diverged")
    assert stat.S_ISFIFO(os.stat(ctx["fifo"]).st_mode)


def _setup_fifo(ctx: dict[str, Any]) -> None:
    fifo = Path(ctx["tmp"], "pipe")
    os.mkfifo(fifo)
    box: dict[str, str] = {}

    def read() -> None:
        with open(fifo) as f:
            box["text"] = f.read()

    t = threading.Thread(target=read, daemon=True)
    t.start()
    ctx.update(fifo=fifo, box=box, reader=t)


def _stdout_json(ctx: dict[str, Any], out: str, err: str) -> None:
    data = json.loads(out)
    assert isinstance(data, dict) and data


def _setup_null(ctx: dict[str, Any]) -> None:
    ctx["null"] = private_null_device(Path(ctx["tmp"]))


def _dev_null_kept(ctx: dict[str, Any], out: str, err: str) -> None:
    assert stat.S_ISCHR(os.stat(ctx["null"]).st_mode)


def _symlink_target(ctx: dict[str, Any], out: str, err: str) -> None:
    link, target = Path(ctx["tmp"], "link.json"), Path(ctx["tmp"], "target.json")
    assert link.is_symlink() and _json(target)["status"] == "ok"


def _setup_symlink(ctx: dict[str, Any]) -> None:
    Path(ctx["tmp"], "target.json").write_text('{"old": true}')
    Path(ctx["tmp"], "link.json").symlink_to(Path(ctx["tmp"], "target.json"))


def _batch_within_data(ctx: dict[str, Any], out: str, err: str) -> None:
    d = _json(Path(ctx["tmp"], "r.json"))  # with --no-drop-last the batch is clamped, said, and reported as what ran
    assert d["status"] == "ok" and d["batch_size"] == 1437 and d["requested_batch_size"] == 10**12, d
    assert d["steps"] == 1 and d["samples"] == 1437, d
    assert "larger than the training set (1437 samples)" in err and "full batch of 1437" in err, err


def _recommendation_on_train_loss(ctx: dict[str, Any], out: str, err: str) -> None:
    res = _json(Path(ctx["tmp"], "t", "results.json"))
    rec = res.get("recommendation")
    assert rec and rec.get("batch_size"), "no recommendation for a workload without validation data"
    assert "training loss" in json.dumps(rec).lower()


def _noise_measured_at_base_batch_1(ctx: dict[str, Any], out: str, err: str) -> None:
    """A base batch of 1 does not break tune's noise stage: it ran its 3 steps and measured a finite B_simple."""
    assert "error" not in err, err
    noise = _json(Path(ctx["tmp"], "t", "noise.json"))
    assert noise["steps"] == 3 and len(noise["history"]) == 3, noise
    assert noise["batch_size"] >= 2 and 0 < noise["b_simple"] < float("inf"), noise
    assert _json(Path(ctx["tmp"], "t", "results.json"))["noise"]["b_simple"] == noise["b_simple"]


def _table_not_cut(ctx: dict[str, Any], out: str, err: str) -> None:
    assert re.search(r"^\s*128\s", err, re.M), err[-2000:]
    assert "1…" not in err and "…" not in err.split("Recommendation")[0]


def _sweep_failed_recorded(ctx: dict[str, Any], out: str, err: str) -> None:
    trials = _json(Path(ctx["tmp"], "s", "sweep.json"))["trials"]
    assert trials and all(t["status"] == "failed" for t in trials)
    assert all("forward" in (t.get("error") or "") or "model" in (t.get("error") or "") for t in trials)


# ---------------------------------------------------------------------------------------------------------------
# API cases (each asserts by itself)


def _raises(exc: type[BaseException], pattern: str, fn: Callable[[], Any]) -> None:
    with pytest.raises(exc, match=pattern):
        fn()


WL = "demo:digits-mlp"


def api_train_seed_negative(ctx: dict[str, Any]) -> None:
    _raises(ConfigError, "seed", lambda: batchfit.train(WL, seed=-1, steps=1))


def api_find_seed_huge(ctx: dict[str, Any]) -> None:
    _raises(ConfigError, "seed", lambda: batchfit.find_batch_size(WL, seed=10**30, memory_budget="1MiB"))


def api_sweep_seed_negative(ctx: dict[str, Any]) -> None:
    _raises(ConfigError, "seed", lambda: batchfit.sweep(WL, seed=-1, batch_sizes=[16], budget="steps:1",
                                                        storage=f"sqlite:///{ctx['tmp']}/s.db"))


def api_find_nan_budget(ctx: dict[str, Any]) -> None:
    _raises(ConfigError, "memory_budget", lambda: batchfit.find_batch_size(WL, memory_budget=float("nan")))


def api_find_inf_budget(ctx: dict[str, Any]) -> None:
    _raises(ConfigError, "memory_budget", lambda: batchfit.find_batch_size(WL, memory_budget=float("inf")))


def api_train_overflow_budget(ctx: dict[str, Any]) -> None:
    _raises(ConfigError, "memory_budget", lambda: batchfit.train(WL, memory_budget="1e400", steps=1))


def api_train_grad_clip_string(ctx: dict[str, Any]) -> None:
    _raises(ConfigError, "grad_clip", lambda: batchfit.train(WL, grad_clip="1.0", steps=1))


def api_scale_lr_one_beta(ctx: dict[str, Any]) -> None:
    _raises(ConfigError, "betas", lambda: batchfit.scale_lr(1e-3, 32, 256, "adam-sqrt", betas=(0.9,), eps=1e-8))


def api_scale_lr_negative_eps(ctx: dict[str, Any]) -> None:
    _raises(ConfigError, "eps", lambda: batchfit.scale_lr(1e-3, 32, 256, "adam-sqrt", betas=(0.9, 0.999), eps=-1))


def api_scale_lr_beta_ge_1(ctx: dict[str, Any]) -> None:
    _raises(ConfigError, "betas", lambda: batchfit.scale_lr(1e-3, 32, 256, "adam-sqrt", betas=(1.0, 0.999),
                                                           eps=1e-8))


def api_load_workload_int(ctx: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as info:
        batchfit.load_workload(123)
    assert "empty" not in str(info.value) and "123" in str(info.value)


def api_mysql_store(ctx: dict[str, Any]) -> None:
    with pytest.raises(BatchfitError) as info:
        batchfit.sweep(f"{ctx['wl']}:ok", batch_sizes=[16], budget="steps:1", storage="mysql://u:p@localhost/db")
    assert "postgres" not in str(info.value).lower() and "mysql" in str(info.value).lower()


def api_sweep_lr_search_huge(ctx: dict[str, Any]) -> None:
    _raises(ConfigError, "lr_search", lambda: batchfit.sweep(WL, lr_search=3000, batch_sizes=[16],
                                                             budget="steps:1", storage=f"sqlite:///{ctx['tmp']}/x.db"))


def api_train_impossible_batch(ctx: dict[str, Any]) -> None:
    # drop_last=False: clamped to the full batch, said (a warning in keyword words), and reported as what ran
    with pytest.warns(UserWarning, match=r"batch_size 1000000000000 is larger than the training set \(1437"):
        res = batchfit.train(WL, batch_size=10**12, drop_last=False, steps=1)
    assert res.batch_size == 1437 and res.requested_batch_size == 10**12
    assert res.steps == 1 and res.samples == 1437 and not res.diverged


def api_find_restores_grads(ctx: dict[str, Any]) -> None:
    import torch

    wl = batchfit.load_workload(f"{ctx['wl']}:ok")
    model = wl.model_fn()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    wl.model_fn = lambda: model  # the user's own model object
    batchfit.find_batch_size(wl, memory_budget="2MiB", throughput=False)
    assert all(p.grad is not None and torch.all(p.grad == 0.5) for p in model.parameters())


def api_train_forward_error_is_workload_error(ctx: dict[str, Any]) -> None:
    wl = batchfit.load_workload(f"{ctx['wl']}:shape_mismatch")
    with pytest.raises(BatchfitError, match="model|forward"):
        batchfit.train(wl, steps=1)


def api_noise_labels_out_of_range(ctx: dict[str, Any]) -> None:
    wl = batchfit.load_workload(f"{ctx['wl']}:labels_out_of_range")
    with pytest.raises(BatchfitError, match="loss|target|label"):
        batchfit.noise_scale(wl, steps=2, batch_size=16)


def api_tune_stale_after_model_change(ctx: dict[str, Any]) -> None:
    """Item 3: same spec, options and data; a wider model must not be served the narrow model's results."""
    out = Path(ctx["tmp"], "t")
    argv = ["tune", "-w", f"{ctx['wl']}:ok", "-b", "16", "--budget", "steps:2", "--memory-budget", "4MiB",
            "--no-noise", "--no-precision-check", "--no-lr-calibration", "--out", str(out), "-q"]
    old = os.environ.get("HOSTILE_WIDTH")
    try:
        os.environ["HOSTILE_WIDTH"] = "4"
        assert _run_cli(argv) == 0
        narrow_find = _json(out / "find.json")
        narrow = _json(out / "results.json")
        os.environ["HOSTILE_WIDTH"] = "512"
        assert _run_cli(argv) == 0
        wide_find = _json(out / "find.json")
        wide = _json(out / "results.json")
    finally:
        if old is None:
            os.environ.pop("HOSTILE_WIDTH", None)
        else:
            os.environ["HOSTILE_WIDTH"] = old
    fixed = (narrow_find["memory_model"]["fixed_bytes"], wide_find["memory_model"]["fixed_bytes"])
    assert fixed[1] > fixed[0], f"find resumed the narrow model's memory model: {fixed}"
    peaks = [max(t["peak_memory_bytes"] for t in r["trials"]) for r in (narrow, wide)]
    assert peaks[1] > peaks[0], f"the sweep resumed the narrow model's trials: {peaks}"


def api_sweep_rerun_names_retry_failed(ctx: dict[str, Any]) -> None:
    """Item 6: a rerun of a sweep with failed trials names --retry-failed; tune offers it too."""
    argv = ["sweep", "-w", f"{ctx['wl']}:forward_raises_midway", "-b", "16", "--budget", "steps:6", "--no-noise",
            "--no-extremes", "--out", str(Path(ctx["tmp"], "s"))]
    _run_cli(argv)
    capsys = ctx["capsys"]
    capsys.readouterr()
    _run_cli(argv)
    err = capsys.readouterr().err
    assert "--retry-failed" in err, err
    from batchfit.cli import _subparser, build_parser

    # tune's own help lists the flag, and tune parses it (``tune --any-flag --help`` exits 0, so it proves nothing)
    parser = build_parser()
    assert "--retry-failed" in _subparser(parser, "tune").format_help()
    assert parser.parse_args(["tune", "--retry-failed"]).retry_failed is True
    assert parser.parse_args(["tune"]).retry_failed is False


def api_sweep_chmod_read_only_store(ctx: dict[str, Any]) -> None:
    """Item 10: a store file that cannot be written is named as read-only, exit 2, and left as it was. Root ignores
    file modes, so as root the file is made immutable (``chattr +i``: even root cannot write it); where the file
    system has no such attribute the case is skipped (a write to a read-only store is never expected to succeed)."""
    import shutil

    store = Path(ctx["tmp"], "ro.db")
    shutil.copy(ctx["good"], store)
    before = store.read_bytes()
    store.chmod(0o444)
    immutable = False
    if os.geteuid() == 0:
        chattr = shutil.which("chattr")
        p = subprocess.run([chattr, "+i", str(store)], capture_output=True, text=True) if chattr else None
        if p is None or p.returncode != 0:
            pytest.skip(f"root ignores file modes and cannot make {store} immutable here (chattr +i: "
                        f"{'not installed' if p is None else p.stderr.strip()[-200:]})")
        immutable = True
    try:
        rc, _, err = _cli(ctx, ["sweep", "-w", f"{ctx['wl']}:ok", *SMALL_SWEEP, "--store", f"sqlite:///{store}",
                                "-q"])
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(store)], check=True)
    _refused(rc, err)
    assert "read-only" in err, err
    assert store.read_bytes() == before, "the read-only store was changed"


# ---------------------------------------------------------------------------------------------------------------
# Subprocess cases: exits and Ctrl-C


def _interrupt(argv: list[str], json_path: Path, ready: Callable[[Any], bool], timeout: float = 90,
               sig: int = signal.SIGINT) -> Any:
    p = subprocess.Popen([sys.executable, "-m", "batchfit", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if json_path.exists():
                try:
                    if ready(_json(json_path)):
                        break
                except ValueError:
                    pass
            if p.poll() is not None:
                break
            time.sleep(0.1)
        p.send_signal(sig)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    return p.returncode, out, err


def proc_train_ctrl_c(ctx: dict[str, Any]) -> None:
    """Item 8: a train --json interrupted says "interrupted" (not "running"), exit 130."""
    out = Path(ctx["tmp"], "r.json")
    rc, _, err = _interrupt(["train", "-w", f"{ctx['wl']}:ok", "--steps", "1000000", "--eval-every", "2",
                             "--json", str(out), "-q"], out, lambda d: len(d.get("history", [])) >= 2)
    assert rc == 130 and "interrupted" in err
    assert _json(out)["status"] == "interrupted"


def proc_noise_ctrl_c(ctx: dict[str, Any]) -> None:
    """Item 8: noise --json keeps every finished step on Ctrl-C and says so."""
    out = Path(ctx["tmp"], "n.json")
    rc, _, err = _interrupt(["noise", "-w", f"{ctx['wl']}:ok", "--steps", "1000000", "--rel-ci", "0.0001",
                             "--json", str(out), "-q"], out, lambda d: len(d.get("history", [])) >= 3)
    d = _json(out)
    assert rc == 130 and d["status"] == "interrupted"
    assert d["steps"] == len(d["history"]) and d["steps"] >= 3


def proc_exit_at_import(ctx: dict[str, Any]) -> None:
    p = _proc(["train", "-w", f"{ctx['root']}/exit_at_import.py:make", "--steps", "1", "-q"])
    assert p.returncode == 2 and re.search(r"the workload .*called sys\.exit\(3\)", p.stderr), p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def proc_keyboard_interrupt_at_import(ctx: dict[str, Any]) -> None:
    p = _proc(["train", "-w", f"{ctx['root']}/kbi_at_import.py:make", "--steps", "1", "-q"])
    assert "results written so far are kept" not in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert p.returncode in (2, 130) and len(p.stderr.strip().splitlines()) == 1


def proc_script_imports_sibling(ctx: dict[str, Any]) -> None:
    """12.6: the `batchfit` script imports the workload file's sibling modules, from any working directory."""
    elsewhere = Path(ctx["tmp"], "elsewhere")
    elsewhere.mkdir()
    p = _proc(["train", "-w", f"{ctx['root']}/proj/wl.py:make", "--steps", "1", "-q"], cwd=elsewhere, script=True)
    assert p.returncode == 0, p.stderr


def cli_find_train_same_budget(ctx: dict[str, Any]) -> None:
    """Item 2: train at the finder's recommended batch inside the finder's budget must fit."""
    f = Path(ctx["tmp"], "f.json")
    assert _run_cli(["find", "--memory-budget", "300KiB", "--no-throughput", "-q", "--json", str(f)]) == 0
    b = _json(f)["recommended_batch_size"]
    assert _run_cli(["train", "-b", str(b), "--memory-budget", "300KiB", "--steps", "5", "-q"]) == 0


# ---------------------------------------------------------------------------------------------------------------
# Issue 23 (items 10, 11, 15, 16, 17): checkpoints, resume, replicate seeds, flag words, DataLoader workers


def _cli(ctx: dict[str, Any], argv: list[str]) -> tuple[int, str, str]:
    capsys = ctx["capsys"]
    capsys.readouterr()
    rc = _run_cli(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def _refused(rc: int, err: str) -> None:
    assert rc == 2, f"exit {rc}: {err[-1500:]}"
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and "internal error" not in err, err


def _checkpoint_step(source: bytes | Path) -> int:
    import io

    import torch

    f = io.BytesIO(source) if isinstance(source, bytes) else source
    return int(torch.load(f, map_location="cpu", weights_only=True)["state"]["step"])


def _private_full_device(folder: Path) -> str:
    """A character device equal to /dev/full inside ``folder`` (every write fails with ENOSPC); see
    :func:`conftest.private_null_device` for why it is private."""
    path = folder / "full"
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 7))
        return str(path)
    except OSError:
        if os.geteuid() != 0:  # without privileges /dev/full cannot be replaced: it is safe to use
            return "/dev/full"
        pytest.skip("cannot create a private character device here (root without CAP_MKNOD)")


def _no_work_no_json(ctx: dict[str, Any], out: str, err: str) -> None:
    _no_work(ctx, out, err)
    assert not Path(ctx["tmp"], "r.json").exists(), "--json was written (\"running\") for a refused checkpoint path"


def _no_stray_tmp(ctx: dict[str, Any], out: str, err: str) -> None:
    _no_work(ctx, out, err)
    assert not Path(f"{ctx['tmp']}.tmp").exists(), "a stray PATH.tmp was left beside the checkpoint path"


def proc_checkpoint_fifo(ctx: dict[str, Any]) -> None:
    """23.10: a FIFO given as the checkpoint is written in place (its reader gets the checkpoint); it stays a FIFO."""
    fifo = Path(ctx["tmp"], "ckpt.fifo")
    os.mkfifo(fifo)
    box: dict[str, bytes] = {}

    def read() -> None:
        with open(fifo, "rb") as f:
            box["data"] = f.read()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    rc, _, err = _cli(ctx, ["train", "-w", f"{ctx['wl']}:ok", "--steps", "2", "-q", "--checkpoint", str(fifo)])
    reader.join(10)
    assert rc == 0, err
    assert stat.S_ISFIFO(os.stat(fifo).st_mode), "the FIFO was replaced by a regular file"
    assert "data" in box and _checkpoint_step(box["data"]) == 2


def proc_checkpoint_char_device(ctx: dict[str, Any]) -> None:
    """23.10: a character device given as the checkpoint is written in place and stays a device."""
    null = private_null_device(Path(ctx["tmp"]))
    rc, _, err = _cli(ctx, ["train", "-w", f"{ctx['wl']}:ok", "--steps", "2", "-q", "--checkpoint", null])
    assert rc == 0, err
    assert stat.S_ISCHR(os.stat(null).st_mode), "the device was replaced by a regular file"


def proc_checkpoint_symlink(ctx: dict[str, Any]) -> None:
    """23.10: a symbolic link given as the checkpoint stays a link; its target gets the checkpoint."""
    target, link = Path(ctx["tmp"], "target.pt"), Path(ctx["tmp"], "link.pt")
    target.write_text("old")
    link.symlink_to(target)
    rc, _, err = _cli(ctx, ["train", "-w", f"{ctx['wl']}:ok", "--steps", "2", "-q", "--checkpoint", str(link)])
    assert rc == 0, err
    assert link.is_symlink(), "the link was replaced by a regular file"
    assert _checkpoint_step(target) == 2, "the link's target kept its old content"


def proc_checkpoint_write_fails_keeps_json(ctx: dict[str, Any]) -> None:
    """23.10: a checkpoint write that fails during training (a full device) is one line, exit 2, and --json keeps
    what was evaluated with "status": "failed" (never "running")."""
    full = _private_full_device(Path(ctx["tmp"]))
    out = Path(ctx["tmp"], "r.json")
    rc, _, err = _cli(ctx, ["train", "-w", f"{ctx['wl']}:ok", "--steps", "4", "--eval-every", "2", "-q",
                            "--checkpoint", full, "--checkpoint-every", "2", "--json", str(out)])
    _refused(rc, err)
    assert "--checkpoint cannot be written" in err, err
    data = _json(out)
    assert data["status"] == "failed" and data["history"] and "checkpoint" in data["error"], data
    assert stat.S_ISCHR(os.stat(full).st_mode)


def proc_checkpoint_read_only_mount(ctx: dict[str, Any]) -> None:
    """23.10: a checkpoint on a read-only file system is refused before any work, one line, exit 2. Root writes
    through file modes, so root uses a read-only bind mount, or else runs batchfit as an unprivileged user; without
    either the case is skipped (a write to a read-only place is never expected to succeed)."""
    argv = ["train", "-w", f"{ctx['wl']}:marker", "--steps", "2", "-q", "--checkpoint"]
    folder = Path(ctx["tmp"], "ro")
    folder.mkdir()
    if os.geteuid() != 0:  # file modes hold for an ordinary user
        folder.chmod(0o555)
        try:
            rc, _, err = _cli(ctx, [*argv, str(folder / "c.pt")])
        finally:
            folder.chmod(0o755)
        _refused(rc, err)
        assert "cannot write" in err and not Path(ctx["tmp"], "marker").exists(), err
        return
    source = Path(ctx["tmp"], "ro-source")
    source.mkdir()
    if subprocess.run(["mount", "--bind", str(source), str(folder)], capture_output=True).returncode == 0:
        try:
            if subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], capture_output=True).returncode == 0:
                rc, _, err = _cli(ctx, [*argv, str(folder / "c.pt")])
                _refused(rc, err)
                assert "Read-only file system" in err and "--checkpoint" in err, err
                assert not Path(ctx["tmp"], "marker").exists(), "the workload was loaded before the path was checked"
                return
        finally:
            subprocess.run(["umount", str(folder)], capture_output=True)
    _read_only_as_nobody()


def _read_only_as_nobody() -> None:
    """Root without mount rights: batchfit run by the unprivileged user 65534 on a folder it may not write."""
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="batchfit-ro-"))
    try:
        base.chmod(0o755)
        folder = base / "ro"
        folder.mkdir(mode=0o555)
        folder.chmod(0o555)

        def drop() -> None:
            os.setgid(65534)
            os.setuid(65534)

        env = {**os.environ, "HOME": str(base)}
        probe = subprocess.run([sys.executable, "-c", "import batchfit.cli"], capture_output=True, text=True,
                               cwd=base, env=env, preexec_fn=drop, timeout=120)
        if probe.returncode != 0:
            pytest.skip(f"no read-only mount and no unprivileged user to run batchfit here: {probe.stderr[-200:]}")
        p = subprocess.run([sys.executable, "-m", "batchfit", "train", "--steps", "1", "-q", "--checkpoint",
                            str(folder / "c.pt")], capture_output=True, text=True, cwd=base, env=env,
                           preexec_fn=drop, timeout=120)
        assert p.returncode == 2 and "cannot write" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    finally:
        shutil.rmtree(base, ignore_errors=True)


def api_train_checkpoint_under_file(ctx: dict[str, Any]) -> None:
    """23.10: the API checks the checkpoint path before training (a ConfigError naming the keyword)."""
    steps: list[int] = []

    class Count:
        def on_step_end(self, state: Any) -> None:
            steps.append(state.step)

    with pytest.raises(ConfigError, match=r"^checkpoint .*afile.* is a file") as info:
        batchfit.train(f"{ctx['wl']}:ok", steps=2, checkpoint=Path(ctx["root"], "afile", "c.pt"), callbacks=[Count()])
    assert "--" not in str(info.value) and not steps, "training ran before the checkpoint path was checked"
    with pytest.raises(ConfigError, match=r"is a directory"):
        batchfit.train(f"{ctx['wl']}:ok", steps=2, checkpoint=ctx["tmp"], callbacks=[Count()])
    assert not steps and not Path(f"{ctx['tmp']}.tmp").exists()


def api_train_checkpoint_symlink(ctx: dict[str, Any]) -> None:
    """23.10: the API writes a checkpoint through a symbolic link to its target, as the CLI does."""
    target, link = Path(ctx["tmp"], "t.pt"), Path(ctx["tmp"], "l.pt")
    target.write_text("old")
    link.symlink_to(target)
    batchfit.train(f"{ctx['wl']}:ok", steps=2, checkpoint=link)
    assert link.is_symlink() and _checkpoint_step(target) == 2


def proc_resume_other_arguments(ctx: dict[str, Any]) -> None:
    """23.11: --resume with other arguments than the checkpointed run is one line naming each differing flag with
    its checkpointed value, exit 2; a longer --steps is another run too (the warm-up and schedule are laid out over
    the planned steps); the same arguments resume."""
    ck = str(Path(ctx["tmp"], "c.pt"))
    base = ["train", "-w", f"{ctx['wl']}:ok", "-q"]
    rc, _, err = _cli(ctx, [*base, "--steps", "8", "-b", "16", "--checkpoint", ck, "--checkpoint-every", "4"])
    assert rc == 0, err
    rc, _, err = _cli(ctx, [*base, "--steps", "8", "-b", "64", "--lr", "5.0", "--seed", "9", "--resume", ck])
    _refused(rc, err)
    for said in ("--batch-size=16 (this run: --batch-size=64)", "--lr not given (this run: --lr=5.0)",
                 "--seed=0 (this run: --seed=9)"):
        assert said in err, err
    assert not re.search(r"(?<![-\w])(batch_size|resume_from|lr|seed)=", err), err
    rc, _, err = _cli(ctx, [*base, "--steps", "16", "-b", "16", "--resume", ck])
    _refused(rc, err)
    assert "--steps=8 (this run: --steps=16)" in err, err
    rc, _, err = _cli(ctx, [*base, "--steps", "8", "-b", "16", "--no-drop-last", "--resume", ck])
    _refused(rc, err)
    assert "without --no-drop-last (this run: --no-drop-last)" in err, err
    rc, _, err = _cli(ctx, [*base, "--steps", "8", "-b", "16", "--resume", ck])
    assert rc == 0, err


def api_resume_other_arguments(ctx: dict[str, Any]) -> None:
    """23.11: train(resume_from=) refuses a checkpoint written with other arguments, naming the keywords."""
    ck = Path(ctx["tmp"], "c.pt")
    wl = batchfit.load_workload(f"{ctx['wl']}:ok")
    batchfit.train(wl, steps=4, checkpoint=ck)
    for changed, said in (({"batch_size": 32}, "batch_size=16"), ({"micro_batch_size": 8}, "micro_batch_size=16"),
                          ({"lr": 0.5}, "lr=None"), ({"lr_rule": "sqrt"}, "lr_rule='auto'"),
                          ({"weight_decay_rule": "timescale"}, "weight_decay_rule='keep'"),
                          ({"warmup": 2}, "warmup=0"), ({"seed": 1}, "seed=0"), ({"precision": "bf16"},
                                                                                   "precision='fp32'"),
                          ({"grad_clip": 1.0}, "grad_clip=None"), ({"batch_schedule": "0:16,2:32"},
                                                                   "batch_schedule=None")):
        with pytest.raises(ConfigError, match=re.escape(said)) as info:
            batchfit.train(wl, steps=4, resume_from=ck, **changed)
        assert "--" not in str(info.value)
    old = os.environ.get("HOSTILE_WIDTH")
    try:  # the same workload name and arguments, another model
        os.environ["HOSTILE_WIDTH"] = "32"
        with pytest.raises(ConfigError, match=r"model \d+ parameters"):
            batchfit.train(batchfit.load_workload(f"{ctx['wl']}:ok"), steps=4, resume_from=ck)
    finally:
        if old is None:
            os.environ.pop("HOSTILE_WIDTH", None)
        else:
            os.environ["HOSTILE_WIDTH"] = old
    assert batchfit.train(wl, steps=4, resume_from=ck).steps == 4


def api_sweep_seed_range(ctx: dict[str, Any]) -> None:
    """23.15: the last replicate seed is checked up front (the API names keywords)."""
    with pytest.raises(ConfigError, match=r"seed=4294967295 with seeds=2 .*4294967294") as info:
        batchfit.sweep(f"{ctx['wl']}:ok", seed=2**32 - 1, seeds=2, batch_sizes=[16], budget="steps:1",
                       storage=f"sqlite:///{ctx['tmp']}/s.db")
    assert "--" not in str(info.value)
    assert not Path(ctx["tmp"], "s.db").exists(), "the store was written before the seeds were checked"


def api_tune_seed_range(ctx: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=r"seed=4294967295") as info:
        batchfit.tune(f"{ctx['wl']}:ok", out_dir=Path(ctx["tmp"], "t"), seed=2**32 - 1, seeds=2, batch_sizes=[16],
                      budget="steps:1", noise=False, precision_check=False, lr_calibration=False)
    assert "--" not in str(info.value)
    assert not Path(ctx["tmp"], "t", "results.json").exists()


def api_find_deprecated_cap_named(ctx: dict[str, Any]) -> None:
    """23.16: the API names the keyword the caller wrote (max_batch_size), not its new name."""
    with pytest.raises(ConfigError, match=r"^max_batch_size must be") as info:
        batchfit.find_batch_size(WL, max_batch_size=0)
    assert "batch_size_cap" not in str(info.value) and "--" not in str(info.value)


def api_train_batch_too_large_keywords(ctx: dict[str, Any]) -> None:
    """23.16: the API says drop_last=False (keyword spelling), and the advice is the right way round."""
    with pytest.raises(ConfigError, match=r"keep the last, smaller batch with drop_last=False") as info:
        batchfit.train(WL, batch_size=10**12, steps=1)
    assert "--" not in str(info.value)


def _b_simple_measured(ctx: dict[str, Any], out: str, err: str) -> None:
    data = _json(Path(ctx["tmp"], "r.json"))
    assert data["status"] == "ok" and data.get("b_simple_history"), list(data)
    # the schedule starts below the workload's batch (16): its first phase, not the base batch, is split in two
    assert [(p["batch_size"], p["accumulation_steps"]) for p in data["batch_schedule"]] == [(8, 2), (16, 4)]


# Every library keyword with a flag, per subcommand: (the API functions whose keywords these are, {keyword: flag}).
FLAG_WORDS: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    "train": (("train",), {
        "workload": "--workload", "batch_size": "--batch-size", "micro_batch_size": "--micro-batch-size",
        "lr": "--lr", "lr_rule": "--lr-rule", "weight_decay_rule": "--wd-rule", "warmup": "--warmup",
        "epochs": "--epochs", "steps": "--steps", "eval_every": "--eval-every", "eval_batch_size": "--eval-batch-size",
        "grad_clip": "--grad-clip", "drop_last": "--no-drop-last", "memory_budget": "--memory-budget",
        "batch_schedule": "--batch-schedule", "micro_batch_limit": "--micro-batch-limit", "beta2": "--beta2",
        "weight_decay_timescale": "--weight-decay-timescale", "checkpoint": "--checkpoint",
        "checkpoint_every": "--checkpoint-every", "resume_from": "--resume", "device": "--device",
        "precision": "--precision", "seed": "--seed", "parallel": "--parallel"}),
    "find": (("find_batch_size",), {
        "workload": "--workload", "memory_budget": "--memory-budget", "batch_size_cap": "--max-batch-size",
        "max_batch_size": "--max-batch-size", "margin": "--margin", "throughput": "--no-throughput",
        "device": "--device", "precision": "--precision", "seed": "--seed", "parallel": "--parallel"}),
    "noise": (("noise_scale",), {
        "workload": "--workload", "batch_size": "--batch-size", "micro_batch_size": "--micro-batch-size",
        "steps": "--steps", "rel_ci": "--rel-ci", "train_steps": "--train-steps", "lr": "--lr", "device": "--device",
        "precision": "--precision", "seed": "--seed", "parallel": "--parallel"}),
    "sweep": (("sweep",), {
        "workload": "--workload", "batch_sizes": "--batch-sizes", "budget": "--budget", "lr_rule": "--lr-rule",
        "weight_decay_rule": "--wd-rule", "seeds": "--seeds", "lr_search": "--lr-search", "warmup": "--warmup",
        "target": "--target", "storage": "--store", "study_name": "--study", "micro_batch_limit": "--micro-batch-limit",
        "micro_batch_size": "--micro-batch-size", "eval_every": "--eval-every", "sharpness": "--sharpness",
        "measure_noise": "--no-noise", "extremes": "--no-extremes", "retry_failed": "--retry-failed",
        "out_dir": "--out", "device": "--device", "precision": "--precision", "seed": "--seed",
        "parallel": "--parallel"}),
    "tune": (("tune",), {
        "workload": "--workload", "batch_sizes": "--batch-sizes", "train_budget": "--train-budget",
        "max_cost": "--max-cost", "budget": "--budget", "lr_rule": "--lr-rule", "weight_decay_rule": "--wd-rule",
        "lr_search": "--lr-search", "warmup": "--warmup", "target": "--target", "tolerance": "--tolerance",
        "seeds": "--seeds", "eval_every": "--eval-every", "storage": "--store", "study_name": "--study-name",
        "memory_budget": "--memory-budget", "batch_size_cap": "--max-batch-size",
        "max_batch_size": "--max-batch-size", "retry_failed": "--retry-failed", "margin": "--margin",
        "noise_steps": "--noise-steps", "find": "--no-find", "noise": "--no-noise",
        "precision_check": "--no-precision-check", "batch_schedule_check": "--batch-schedule-check",
        "lr_calibration": "--no-lr-calibration", "sharpness": "--sharpness", "out_dir": "--out",
        "workload_options": "--workload-option", "device": "--device", "precision": "--precision", "seed": "--seed",
        "parallel": "--parallel"}),
    "report": (("load_results", "write_report"), {
        "study_name": "--study-name", "out_dir": "--out", "tolerance": "--tolerance"}),
}
# flags with no keyword of that API function: output, display, and what the CLI does by other means
CLI_ONLY = {"--json", "--quiet", "--debug", "--workload-option", "--measure-noise", "--out"}


def api_keyword_flags_both_ways(ctx: dict[str, Any]) -> None:
    """23.16: every keyword-to-flag translation, both ways. Each keyword is a real keyword of the API and each flag a
    real flag of the subcommand; a CLI message says the flag (switches as typed: ``drop_last=False`` is
    ``--no-drop-last``, ``drop_last=True`` "without --no-drop-last"; ``lr=None`` "--lr not given"); the API's own
    message keeps the keyword; and every flag of a subcommand is in the table (a new flag needs its keyword)."""
    import argparse
    import inspect

    from batchfit.cli import _subparser, build_parser
    from batchfit.cli._common import to_flags

    parser = build_parser()
    for command, (functions, table) in FLAG_WORDS.items():
        sub = _subparser(parser, command)
        actions = {o: a for a in sub._actions for o in a.option_strings if o.startswith("--")}
        keywords = {k for f in functions for k in inspect.signature(getattr(batchfit, f)).parameters}
        named = set(table.values()) | CLI_ONLY | {"--help"}
        missing = [a.option_strings for a in sub._actions
                   if any(o.startswith("--") for o in a.option_strings) and not named & set(a.option_strings)]
        assert not missing, f"{command}: flags without a keyword in FLAG_WORDS: {missing}"
        for keyword, flag in table.items():
            assert keyword in keywords, f"{command}: {keyword!r} is not a keyword of {functions}"
            assert flag in actions, f"{command}: {flag} is not a flag of the subcommand"
            switch = isinstance(actions[flag], argparse._StoreTrueAction)
            for message in (f"{keyword} must be positive", f"x; {keyword}=True", f"x; {keyword}=3"):
                assert to_flags(message, None) == message  # the API's own words stay keywords
            if not switch:
                assert to_flags(f"{keyword} must be positive", sub) == f"{flag} must be positive", (command, keyword)
                assert to_flags(f"use {keyword}=3 here", sub) == f"use {flag}=3 here", (command, keyword)
                assert to_flags(f"{keyword}=None (this run: {keyword}=2)", sub) == \
                    f"{flag} not given (this run: {flag}=2)", (command, keyword)
            elif flag.startswith("--no-"):  # the switch clears the keyword
                assert to_flags(f"or {keyword}=False", sub) == f"or {flag}", (command, keyword)
                assert to_flags(f"{keyword}=True (this run: {keyword}=False)", sub) == \
                    f"without {flag} (this run: {flag})", (command, keyword)
                bare = f"the {keyword} option"
                assert flag not in to_flags(bare, sub), f"{command}: bare {keyword!r} became {flag} (the opposite)"
            else:  # the switch sets the keyword
                assert to_flags(f"or {keyword}=True", sub) == f"or {flag}", (command, keyword)
                assert to_flags(f"{keyword}=False here", sub) == f"without {flag} here", (command, keyword)


def _worker_failure_recorded(ctx: dict[str, Any], out: str, err: str) -> None:
    trials = _json(Path(ctx["tmp"], "s", "sweep.json"))["trials"]
    assert trials and all(t["status"] == "failed" for t in trials), trials
    for t in trials:
        error = t.get("error") or ""
        # seen in train_data's reading, or in whatever ran when torch noticed the dead worker: the loader is named
        assert re.search(r"data loader failed|reading a batch of train_data", error), error
        assert "DataLoader worker process" in error, error
        assert not re.search(r"in-place|fix the model|targets fit", error), error


# ---------------------------------------------------------------------------------------------------------------
# Issue 23 (items 12, 13, 14): retries that end, racing trials re-run after kill -9, one tune per --out


def _store_trials(db: Path) -> list[tuple[str, str | None, str | None]]:
    """``(state, configuration key, status)`` of every trial in a batchfit SQLite store, in trial order."""
    con = sqlite3.connect(db)
    try:
        rows = con.execute("SELECT trial_id, state FROM trials ORDER BY number").fetchall()
        attrs = {(tid, key): json.loads(value) for tid, key, value in
                 con.execute("SELECT trial_id, key, value_json FROM trial_user_attributes")}
    finally:
        con.close()
    return [(state, (attrs.get((tid, "batchfit_config")) or {}).get("key"), attrs.get((tid, "status")))
            for tid, state in rows]


class _Looped(BaseException):
    """:func:`_bounded`'s alarm: not an Exception, so no handler in batchfit turns it into an exit code."""


def _bounded(ctx: dict[str, Any], argv: list[str], db: Path, timeout: float = 90,
             env: dict[str, str] | None = None) -> Any:
    """``batchfit ARGV``, which must end by itself within ``timeout`` s: a run that loops is stopped and fails the
    case with the number of trials it had queued (instead of hanging the suite). It runs in this process, stopped
    by SIGALRM (an interpreter start, torch and the report's imports cost seconds a run), or as ``python -m
    batchfit`` (killed) when it needs an environment of its own (``env``). Either way a CompletedProcess: exit
    code, stdout, stderr."""
    def fail() -> None:
        made = len(_store_trials(db)) if db.exists() else 0
        pytest.fail(f"batchfit {argv[0]} did not end within {timeout:g} s; it had made {made} trials (a loop)")

    if env is not None:
        try:
            return subprocess.run([sys.executable, "-m", "batchfit", *argv], capture_output=True, text=True,
                                  timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            fail()

    def alarm(signum: int, frame: Any) -> None:
        raise _Looped

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        rc, out, err = _cli(ctx, argv)
    except _Looped:
        fail()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return subprocess.CompletedProcess(argv, rc, out, err)


def _trial_guard(most: int) -> Callable[[Any], None]:
    """A progress function that stops a run (RuntimeError) once more than ``most`` sweep trials ended, so an API
    call that loops fails the case instead of hanging it."""
    ended: list[int] = []

    def progress(event: Any) -> None:
        if event.stage == "sweep" and event.data.get("event") == "trial_end":
            ended.append(1)
            if len(ended) > most:
                raise RuntimeError(f"more than {most} trial(s) ran: a retry loop")

    return progress


def proc_sweep_retry_failed_once(ctx: dict[str, Any]) -> None:
    """23.12: `sweep --retry-failed` on a failure that persists retries each failed trial once and ends: the failure
    recorded, one line, exit 2 (it queued a new failed trial every second or so, forever)."""
    out = Path(ctx["tmp"], "s")
    db = out / "batchfit.db"
    argv = ["sweep", "-w", f"{ctx['wl']}:forward_always_raises", "-b", "16,32", "--budget", "steps:2", "--no-noise",
            "--no-extremes", "--out", str(out), "-q"]
    rc, _, err = _cli(ctx, argv)
    _refused(rc, err)
    assert len(_store_trials(db)) == 2
    p = _bounded(ctx, [*argv, "--retry-failed"], db)
    _refused(p.returncode, p.stderr)
    assert "every trial of the sweep failed (2 of 2)" in p.stderr, p.stderr
    trials = _store_trials(db)
    assert sorted(k or "" for _, k, _ in trials) == ["b16_m1", "b16_m1", "b32_m1", "b32_m1"], trials
    assert all(state == "FAIL" and status == "failed" for state, _, status in trials), trials


def proc_tune_retry_failed_once(ctx: dict[str, Any]) -> None:
    """23.12: `tune --retry-failed` retries the failed trial once; nothing finished, so no recommendation: the usual
    one line, exit 2 (it reached 519 trials in 12 minutes)."""
    out = Path(ctx["tmp"], "t")
    db = out / "batchfit.db"
    argv = ["tune", "-w", f"{ctx['wl']}:forward_always_raises", *SMALL_TUNE, "--no-find", "--out", str(out), "-q"]
    rc, _, err = _cli(ctx, argv)
    assert rc == 2 and len(_store_trials(db)) == 1, err
    p = _bounded(ctx, [*argv, "--retry-failed"], db)
    _refused(p.returncode, p.stderr)
    assert "every trial of the sweep failed" in p.stderr, p.stderr
    assert [(k, state) for state, k, _ in _store_trials(db)] == [("b16_m1", "FAIL"), ("b16_m1", "FAIL")]
    assert _json(out / "results.json").get("recommendation") is None


def api_sweep_retry_failed_once_per_call(ctx: dict[str, Any]) -> None:
    """23.12: sweep(retry_failed=True) retries each failed trial once per call, and returns the failure."""
    db = Path(ctx["tmp"], "s.db")
    wl = f"{ctx['wl']}:forward_always_raises"
    kw = dict(batch_sizes=[16, 32], budget="steps:2", storage=f"sqlite:///{db}", measure_noise=False,
              extremes=False, micro_batch_limit=32)
    assert batchfit.sweep(wl, **kw).status == "failed"
    for total in (4, 6):
        res = batchfit.sweep(wl, retry_failed=True, progress=_trial_guard(2), **kw)
        assert res.status == "failed" and res.counts.get("failed") == 2, res.counts
        assert len(_store_trials(db)) == total


def api_tune_retry_failed_once(ctx: dict[str, Any]) -> None:
    """23.12: tune(retry_failed=True) retries each failed trial once per tune (over all its sweep calls)."""
    out = Path(ctx["tmp"], "t")
    wl = f"{ctx['wl']}:forward_always_raises"
    kw = dict(out_dir=out, batch_sizes=[16], budget="steps:2", find=False, noise=False, precision_check=False,
              lr_calibration=False)
    assert batchfit.tune(wl, **kw).recommendation is None
    res = batchfit.tune(wl, retry_failed=True, progress=_trial_guard(1), **kw)
    assert res.recommendation is None and len(_store_trials(out / "batchfit.db")) == 2


def proc_tune_racing_seed_fails(ctx: dict[str, Any]) -> None:
    """23.12: a racing seed that fails every time stops racing, recorded, instead of being asked for forever (the
    run never ended, even without --retry-failed); the recommendation comes from what finished. --retry-failed
    retries it once."""
    out = Path(ctx["tmp"], "t")
    db = out / "batchfit.db"
    argv = ["tune", "-w", f"{ctx['wl']}:seed_one_raises", *SMALL_TUNE, "--no-find", "--out", str(out), "-q"]
    for retry, failures in (([], 1), (["--retry-failed"], 2)):
        p = _bounded(ctx, [*argv, *retry], db)
        assert p.returncode == 0, p.stderr[-1500:]
        trials = _store_trials(db)
        assert [k for state, k, _ in trials if state == "COMPLETE"] == ["b16_m1"], trials
        assert [(k, status) for state, k, status in trials if state != "COMPLETE"] == \
            [("b16_m1_s1", "failed")] * failures, trials
        assert _json(out / "results.json")["recommendation"]["batch_size"] == 16


def proc_tune_racing_trial_killed(ctx: dict[str, Any]) -> None:
    """23.13: a racing trial killed with kill -9 is re-run by the next tune, also when racing's verdict, read again
    from the trials, no longer asks for its seed (as when the other trials of its round finished meanwhile; here
    forced): every configuration ends with its seeds ok, no "worker process died" failure counted; a further rerun
    re-runs nothing."""
    import batchfit.tuning

    out = Path(ctx["tmp"], "t")
    db = out / "batchfit.db"
    argv = ["tune", "-w", f"{ctx['wl']}:seed_one_killed", "-b", "16", "--budget", "steps:4", "--no-find",
            "--no-noise", "--no-precision-check", "--no-lr-calibration", "--out", str(out), "-q"]
    p = _bounded(ctx, argv, db, env={**os.environ, "HOSTILE_KILL": "1"})  # racing's seed 1 kills its own process
    assert p.returncode == -signal.SIGKILL, p.stderr[-1500:]
    assert [(k, state) for state, k, _ in _store_trials(db)] == [("b16_m1", "COMPLETE"), ("b16_m1_s1", "RUNNING")]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(batchfit.tuning, "race_round", lambda results, **kw: ({}, "settled"))
        rc, _, err = _cli(ctx, argv)
    assert rc == 0, err
    res = _json(out / "results.json")
    assert sorted((t["batch_size"], t["seed"], t["status"]) for t in res["trials"]) == [(16, 0, "ok"), (16, 1, "ok")]
    assert not res["counts"].get("failed") and "worker process died" not in json.dumps(res["trials"])
    rc, _, err = _cli(ctx, argv)  # racing as usual: it may add a seed; nothing finished is run again
    assert rc == 0, err
    trials = _store_trials(db)
    done = [k for state, k, _ in trials if state == "COMPLETE"]
    assert len(done) == len(set(done)) and {"b16_m1", "b16_m1_s1"} <= set(done), trials
    assert [(state, status) for state, k, status in trials if k == "b16_m1_s1"] == \
        [("FAIL", "interrupted"), ("COMPLETE", "ok")], trials
    assert not _json(out / "results.json")["counts"].get("failed")


def proc_tune_two_processes_one_out(ctx: dict[str, Any]) -> None:
    """23.14: a second tune on the --out of a running one stops at once: one line naming the first one's pid, exit
    2 (both used to run find, noise and the LR check and print different answers). The lock dies with its process:
    after kill -9 of the first, the same command runs."""
    out = Path(ctx["tmp"], "t")
    started = Path(ctx["tmp"], "slow-started")
    argv = ["tune", "-w", f"{ctx['wl']}:slow", "-b", "16", "--budget", "steps:60", "--no-find", "--no-noise",
            "--no-precision-check", "--no-lr-calibration", "--out", str(out), "-q"]
    first = subprocess.Popen([sys.executable, "-m", "batchfit", *argv], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, "HOSTILE_SLOW": str(started)})
    try:
        deadline = time.monotonic() + 90
        while not started.exists():  # the first tune is training (a second per step)
            assert first.poll() is None, first.communicate()[1][-1500:]
            assert time.monotonic() < deadline, "the first tune did not start training"
            time.sleep(0.1)
        files = sorted(p.name for p in out.iterdir())
        rc, _, err = _cli(ctx, argv)
        _refused(rc, err)
        assert re.search(rf"another batchfit tune is writing to \S*t \(pid {first.pid}\); wait for it or use another "
                         r"--out$", err.strip()), err
        assert sorted(p.name for p in out.iterdir()) == files, "the second tune wrote into the first one's --out"
        assert first.poll() is None, "the first tune did not survive the second"
    finally:
        first.kill()
        first.communicate()
    rc, _, err = _cli(ctx, argv)  # the killed holder's lock is gone with it; its RUNNING trial is re-run
    assert rc == 0, err
    assert _json(out / "results.json")["recommendation"]["batch_size"] == 16


def api_tune_out_dir_lock_released(ctx: dict[str, Any]) -> None:
    """23.14: tune(out_dir=) holds the folder's lock only while it runs: an interrupted tune (KeyboardInterrupt, as
    Ctrl-C) releases it, so the next one in the same process runs; while it is held, another tune on the folder is
    a ConfigError naming the holder's pid in keyword words."""
    from batchfit.tuning import out_dir_lock

    out = Path(ctx["tmp"], "t")
    wl = f"{ctx['wl']}:ok"
    kw = dict(out_dir=out, batch_sizes=[16], budget="steps:2", find=False, noise=False, precision_check=False,
              lr_calibration=False)

    def ctrl_c(event: Any) -> None:
        if event.data.get("event") == "trial_start":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        batchfit.tune(wl, progress=ctrl_c, **kw)
    assert batchfit.tune(wl, **kw).recommendation is not None
    with out_dir_lock(out), pytest.raises(ConfigError, match=rf"another batchfit tune is writing to .* \(pid "
                                                            rf"{os.getpid()}\); wait for it or use another out_dir$"):
        batchfit.tune(wl, **kw)
    assert batchfit.tune(wl, **kw).recommendation is not None


# ---------------------------------------------------------------------------------------------------------------
# Issue 23 (items 18, 19): no "internal error" on damaged stores and stage files, closed pipes, bad API values;
# checks before the work, no writes to a store a report reads, SIGTERM as Ctrl-C


_made: dict[str, Path] = {}  # results made once per module (a real sweep store, a real tune --out), copied per case


def _swept_store(ctx: dict[str, Any]) -> Path:
    """A copy (in the case's tmp) of a real 2-trial sweep store, made once with SMALL_SWEEP."""
    import shutil

    if "sweep" not in _made:
        out = Path(ctx["root"], "swept")
        rc, _, err = _cli(ctx, ["sweep", "-w", f"{ctx['wl']}:ok", *SMALL_SWEEP, "--out", str(out), "-q"])
        assert rc == 0, err
        _made["sweep"] = out / "batchfit.db"
    copy = Path(ctx["tmp"], "damaged.db")
    shutil.copy(_made["sweep"], copy)
    return copy


def _damage(db: Path, sql: str) -> None:
    con = sqlite3.connect(db)
    try:
        con.execute(sql)
        con.commit()
    finally:
        con.close()


BROKEN_TRIAL_ATTR = "UPDATE trial_user_attributes SET value_json = '{broken' WHERE key = 'result'"
OOPS_STUDY_CONFIG = "UPDATE study_user_attributes SET value_json = '\"oops\"' WHERE key = 'config'"


def _damaged_store_refused(command: str, sql: str, pattern: str) -> Callable[[dict[str, Any]], None]:
    """23.18: ``report`` / ``sweep`` on a valid SQLite store with damaged content (an attribute that is not JSON, a
    study config that is a string): one line naming the store and what is damaged, exit 2 (was: "internal error:
    JSONDecodeError" / "TypeError: string indices must be integers")."""

    def case(ctx: dict[str, Any]) -> None:
        db = _swept_store(ctx)
        _damage(db, sql)
        if command == "report":
            argv = ["report", str(db), "--out", str(Path(ctx["tmp"], "rep")), "-q"]
        else:
            argv = ["sweep", "-w", f"{ctx['wl']}:ok", *SMALL_SWEEP, "--store", f"sqlite:///{db}", "-q"]
        rc, _, err = _cli(ctx, argv)
        _refused(rc, err)
        assert re.search(rf"the store .*damaged\.db.* is damaged: {pattern}.*restore it from a copy", err), err

    return case


def _tuned_out(ctx: dict[str, Any]) -> tuple[Path, list[str]]:
    """A copy (in the case's tmp) of a real tune --out with every stage file but noise and precision, made once;
    and the argv that resumes it."""
    import shutil

    argv = ["tune", "-w", f"{ctx['wl']}:ok", "-b", "16,32", "--budget", "steps:2", "--no-find", "--no-noise",
            "--no-precision-check"]
    if "tune" not in _made:
        out = Path(ctx["root"], "tuned")
        rc, _, err = _cli(ctx, [*argv, "--out", str(out), "-q"])
        assert rc == 0, err
        _made["tune"] = out
    copy = Path(ctx["tmp"], "t")
    shutil.copytree(_made["tune"], copy)
    return copy, [*argv, "--out", str(copy), "-q"]


def _hand_edited_stage_file(name: str, content: str) -> Callable[[dict[str, Any]], None]:
    """23.18: a hand-edited stage file in tune's --out (lr.json, step_time.json, tune_state.json of the wrong kind)
    is ignored with one warning line naming it, and that stage is measured again: exit 0 with a recommendation, the
    file rewritten as tune writes it (was: "internal error: TypeError: LRCheck.__init__() missing 5 required
    positional arguments" / "AttributeError: 'int' object has no attribute 'items'")."""

    def case(ctx: dict[str, Any]) -> None:
        out, argv = _tuned_out(ctx)
        (out / name).write_text(content)
        rc, _, err = _cli(ctx, argv)
        assert rc == 0, err[-1500:]
        assert "internal error" not in err and "Traceback" not in err, err[-1500:]
        warned = [line for line in err.splitlines() if "warning:" in line]
        assert len(warned) == 1 and re.search(rf"warning: \S*{re.escape(name)} is damaged \(.*\); .*again", warned[0]),\
            err[-1500:]
        assert isinstance(_json(out / name), dict) and _json(out / name) != json.loads(content)
        assert _json(out / "results.json")["recommendation"]["batch_size"] in (16, 32)

    return case


def _stdout_closed(argv: list[str]) -> Callable[[dict[str, Any]], None]:
    """23.18: ``--json -`` whose reader closed the pipe before the result came (``... | (exec 0<&-; sleep 2)``):
    BrokenPipeError is one warning line, exit 0, the other outputs written (was: "internal error: BrokenPipeError",
    exit 1)."""

    def case(ctx: dict[str, Any]) -> None:
        read, write = os.pipe()
        os.close(read)  # the reader is gone before batchfit writes
        try:
            p = subprocess.run([sys.executable, "-m", "batchfit", *_fmt(tuple(argv), ctx)], stdout=write,
                               stderr=subprocess.PIPE, text=True, timeout=120)
        finally:
            os.close(write)
        assert p.returncode == 0, p.stderr[-1500:]
        assert "internal error" not in p.stderr and "Traceback" not in p.stderr and "Exception ignored" not in \
            p.stderr, p.stderr[-1500:]
        assert re.search(r"warning: the reader of standard output closed it", p.stderr), p.stderr[-1500:]
        assert Path(ctx["tmp"], "o", "results.json").exists()

    return case


def api_train_batch_schedule_malformed(ctx: dict[str, Any]) -> None:
    """23.18: train(batch_schedule=...) that is no schedule is a ConfigError naming batch_schedule (was: ValueError
    "too many values to unpack", TypeError "'int' object is not iterable")."""
    for schedule in ([(0, 32, 1)], 123, [None]):
        with pytest.raises(ConfigError, match=r"^batch_schedule .*(pair|list of \(step, batch\))") as info:
            batchfit.train(WL, batch_schedule=schedule, steps=1)
        assert "--" not in str(info.value)


def api_train_branching_garbage(ctx: dict[str, Any]) -> None:
    """23.18: train(branching=...) that is no branching measurement is a ConfigError naming branching (was: "garbage"
    ignored and trained; {} a KeyError with batch_schedule="auto")."""
    for branching, schedule in (("garbage", None), ({}, None), ("garbage", "auto"), ({}, "auto")):
        with pytest.raises(ConfigError, match=r"^branching (must be|is not) ") as info:
            batchfit.train(WL, branching=branching, batch_schedule=schedule, steps=1)
        assert "--" not in str(info.value)


def _no_stage_files(ctx: dict[str, Any], out: str, err: str) -> None:
    written = [n for n in ("find.json", "noise.json", "lr.json", "step_time.json", "tune_state.json")
               if Path(ctx["tmp"], "t", n).exists()]
    assert not written, f"refused only after {written} were written"


def proc_tune_corrupt_store_in_out_up_front(ctx: dict[str, Any]) -> None:
    """23.19: a corrupted store in tune's --out (the default store) is found before the first stage: one line, exit
    2, no stage file written (was: found by the sweep, after find, noise and the LR check)."""
    import shutil

    out = Path(ctx["tmp"], "t")
    out.mkdir()
    shutil.copy(Path(ctx["root"], "corrupt.db"), out / "batchfit.db")
    rc, _, err = _cli(ctx, ["tune", "-w", f"{ctx['wl']}:ok", "-b", "16", "--budget", "steps:2", "--noise-steps", "3",
                            "--no-precision-check", "--out", str(out), "-q"])
    _refused(rc, err)
    assert "not a valid SQLite database" in err, err
    _no_stage_files(ctx, "", err)


def proc_report_dropped_table_read_only(ctx: dict[str, Any]) -> None:
    """23.19: report on a store with a dropped table is one line naming the table, exit 2, and the store's bytes
    are unchanged (was: exit 0 "no trial finished", the table re-created: report wrote to the store)."""
    import hashlib

    db = _swept_store(ctx)
    _damage(db, "DROP TABLE trial_user_attributes")
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    rc, _, err = _cli(ctx, ["report", str(db), "--out", str(Path(ctx["tmp"], "rep")), "-q"])
    _refused(rc, err)
    assert re.search(r"damaged: missing table\(s\) trial_user_attributes", err), err
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before, "report wrote to the store"


def proc_report_fifo_store(ctx: dict[str, Any]) -> None:
    """23.19: report given a FIFO as the store is refused at once, one line, exit 2 (was: blocked forever waiting for
    a writer); with a .json name too."""
    for name in ("store.fifo", "results.json"):
        fifo = Path(ctx["tmp"], name)
        os.mkfifo(fifo)
        try:
            p = _proc(["report", str(fifo), "--out", str(Path(ctx["tmp"], "rep")), "-q"], timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"report on a FIFO ({name}) did not end within 60 s")
        _refused(p.returncode, p.stderr)
        assert "not a regular file" in p.stderr, p.stderr


def api_train_warmup_beyond_the_run(ctx: dict[str, Any]) -> None:
    """23.19: train(warmup=N steps) longer than the run is a ConfigError naming warmup, before training; a fraction
    below 1 and a warm-up as long as the run are fine."""
    with pytest.raises(ConfigError, match=r"^warmup must be at most 2 steps .*got 1e\+308") as info:
        batchfit.train(WL, warmup=1e308, steps=2)
    assert not re.search(r"\d{20}", str(info.value))
    assert batchfit.train(f"{ctx['wl']}:ok", warmup=2, steps=2).warmup_steps == 2


def proc_train_sigterm(ctx: dict[str, Any]) -> None:
    """23.19: SIGTERM to train --json is handled as Ctrl-C: "interrupted" in the JSON (not "running"), one line, exit
    143 (was: killed by the signal, exit -15, nothing said)."""
    out = Path(ctx["tmp"], "r.json")
    rc, _, err = _interrupt(["train", "-w", f"{ctx['wl']}:ok", "--steps", "1000000", "--eval-every", "2",
                             "--json", str(out), "-q"], out, lambda d: len(d.get("history", [])) >= 2,
                            sig=signal.SIGTERM)
    assert rc == 143 and re.fullmatch(r"batchfit train: interrupted \(SIGTERM\); results written so far are kept",
                                      err.strip()), (rc, err)
    assert _json(out)["status"] == "interrupted" and _json(out)["history"]


def proc_noise_sigterm(ctx: dict[str, Any]) -> None:
    """23.19: SIGTERM to noise --json keeps every measured step, says "interrupted", exit 143."""
    out = Path(ctx["tmp"], "n.json")
    rc, _, err = _interrupt(["noise", "-w", f"{ctx['wl']}:ok", "--steps", "1000000", "--rel-ci", "0.0001",
                             "--json", str(out), "-q"], out, lambda d: len(d.get("history", [])) >= 3,
                            sig=signal.SIGTERM)
    d = _json(out)
    assert rc == 143 and "interrupted (SIGTERM)" in err and len(err.strip().splitlines()) == 1, (rc, err)
    assert d["status"] == "interrupted" and d["steps"] == len(d["history"]) and d["steps"] >= 3


def api_load_workload_imports_siblings(ctx: dict[str, Any]) -> None:
    """23.6: ``batchfit.load_workload("path/to/wl.py:make")`` from another folder makes the file's folder importable,
    as the CLI does (was: ``No module named 'helper'``). In a fresh process: the CLI cases put the folder on this
    process's ``sys.path``."""
    spec = str(ctx["root"] / "proj" / "wl.py") + ":make"
    code = f"import batchfit; wl = batchfit.load_workload({spec!r}); print('loaded', wl.name)"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ctx["tmp"])
    assert p.returncode == 0 and "loaded hostile" in p.stdout, p.stderr[-1500:]


def api_tune_schedule_checked_before_find(ctx: dict[str, Any]) -> None:
    """23.2: the API's tune checks the schedule at every total of its plan before the finder: a WorkloadError naming
    the sweep's total, and nothing written but the lock."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("hostile_wl_23_2", ctx["wl"])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(batchfit.WorkloadError, match=r"the sweep's trials at batch 16 have 10 steps: your "
                                                     r"lr_schedule failed at total_steps=10: ZeroDivisionError"):
        batchfit.tune(mod.one_cycle(), out_dir=ctx["tmp"] / "t", batch_sizes=[16], budget="samples:160",
                      noise=False, precision_check=False, lr_calibration=False)
    _no_stage_files(ctx, "", "")


# ---------------------------------------------------------------------------------------------------------------
# The table

T = "{tmp}"
SMALL_TUNE = ("-b", "16", "--budget", "steps:2", "--no-noise", "--no-precision-check", "--no-lr-calibration")
SMALL_SWEEP = ("-b", "16", "--budget", "steps:2", "--no-noise", "--no-extremes")
BIG_SEED = "1000000000000000000000000000000"

CASES: list[Case] = [
    # 1. output writes: FIFOs, devices, symlinks and stdout
    Case("train-json-fifo", "1", ("train", "-w", "{wl}:ok", "--steps", "2", "--eval-every", "1", "-q", "--json",
                                  T + "/pipe"), rc=(0,), check=_fifo_result),
    Case("find-json-dev-null", "1", ("find", "-w", "{wl}:ok", "--memory-budget", "2MiB", "--no-throughput", "-q",
                                     "--json", "{tmp}/null"), rc=(0,), check=_dev_null_kept),
    Case("train-json-symlink", "1", ("train", "-w", "{wl}:ok", "--steps", "1", "-q", "--json", T + "/link.json"),
         rc=(0,), check=_symlink_target),
    Case("noise-json-stdout", "1", ("noise", "-w", "{wl}:ok", "--steps", "3", "--json", "-"), rc=(0,),
         check=_stdout_json),
    Case("report-json-stdout", "1", ("report", "{root}/results.json", "--out", T + "/rep", "--json", "-"), rc=(0,),
         check=_stdout_json),
    # 2. the finder's budget is the one training holds
    Case("find-then-train-same-budget", "2", api=cli_find_train_same_budget),
    # 3. stale results after the model changes
    Case("tune-model-changed", "3", api=api_tune_stale_after_model_change),
    # 4. errors in the user's model, loss, metric or data: one line naming the part, exit 2
    Case("train-resume-missing-checkpoint", "10.6", ("train", "-w", "{wl}:ok", "--resume", T + "/none.pt", "--steps",
                                                     "1", "-q"), err=r"--resume '.*none\.pt' is not a file",
         no_err="resume_from"),
    Case("train-labels-out-of-range", "4", ("train", "-w", "{wl}:labels_out_of_range", "--steps", "2", "-q"),
         err=r"loss|target|label"),
    Case("train-shape-mismatch", "4", ("train", "-w", "{wl}:shape_mismatch", "--steps", "2", "-q"),
         err=r"model|forward"),
    Case("train-forward-raises-midway", "4", ("train", "-w", "{wl}:forward_raises_midway", "--steps", "6", "-q"),
         err=r"forward broke"),
    Case("train-all-frozen", "4", ("train", "-w", "{wl}:frozen", "--steps", "2", "-q"),
         err=r"(?i)param|requires_grad|frozen|train"),
    Case("train-not-an-optimizer", "4", ("train", "-w", "{wl}:not_an_optimizer", "--steps", "2", "-q"),
         err=r"optimizer"),
    Case("train-len-too-large", "4", ("train", "-w", "{wl}:len_too_large", "--epochs", "1", "-q"),
         err=r"(?i)data|len|index"),
    Case("train-metric-raises", "4", ("train", "-w", "{wl}:metric_raises", "--steps", "2", "-q"), err=r"metric"),
    Case("train-metric-string", "4", ("train", "-w", "{wl}:metric_string", "--steps", "2", "-q"), err=r"metric"),
    Case("find-forward-raises", "4", ("find", "-w", "{wl}:forward_always_raises", "--memory-budget", "2MiB", "-q"),
         err=r"forward broke"),
    Case("noise-shape-mismatch", "4", ("noise", "-w", "{wl}:shape_mismatch", "--steps", "2", "-q"),
         err=r"model|forward"),
    Case("api-train-shape-mismatch", "4", api=api_train_forward_error_is_workload_error),
    Case("api-noise-labels-out-of-range", "4", api=api_noise_labels_out_of_range),
    Case("sweep-trial-error-recorded", "4,15", ("sweep", "-w", "{wl}:forward_always_raises", *SMALL_SWEEP, "--out",
                                               T + "/s", "-q"), rc=(1, 2), err=r"fail",
         check=_sweep_failed_recorded),
    # 5. no validation data
    Case("tune-without-val-data", "5", ("tune", "-w", "{wl}:no_val", *SMALL_TUNE, "--no-find", "--out", T + "/t",
                                        "-q"), rc=(0,), check=_recommendation_on_train_loss),
    # 6. failed trials can be retried
    Case("sweep-rerun-names-retry-failed", "6", api=api_sweep_rerun_names_retry_failed),
    Case("tune-accepts-retry-failed", "6", ("tune", "-w", "{wl}:ok", *SMALL_TUNE, "--no-find", "--retry-failed",
                                            "--out", T + "/t", "-q"), rc=(0,)),
    # 7. bad output paths, refused before any work, the same way in every command
    Case("train-json-under-file", "7", ("train", "-w", "{wl}:marker", "--json", "{root}/afile/sub/r.json"),
         err=r"afile.* is a file", check=_no_work),
    Case("find-json-under-file", "7", ("find", "-w", "{wl}:marker", "--json", "{root}/afile/r.json"),
         err=r"is a file", check=_no_work),
    Case("noise-out-under-file", "7", ("noise", "-w", "{wl}:marker", "--out", "{root}/afile/o"),
         err=r"is a file", check=_no_work),
    Case("sweep-json-under-file", "7", ("sweep", "-w", "{wl}:marker", *SMALL_SWEEP, "--json",
                                        "{root}/afile/r.json"), err=r"is a file", check=_no_work),
    Case("tune-out-is-file", "7", ("tune", "-w", "{wl}:marker", *SMALL_TUNE, "--out", "{root}/afile"),
         err=r"is a file", check=_no_work),
    Case("report-json-under-file", "7", ("report", "{root}/results.json", "--out", T + "/rep", "--json",
                                         "{root}/afile/r.json"), err=r"is a file", check=_nothing_written("rep")),
    Case("train-json-long-component", "7", ("train", "-w", "{wl}:marker", "--json", T + "/{long}/r.json"),
         err=r"255", check=_no_work),
    Case("find-out-long-component", "7", ("find", "-w", "{wl}:marker", "--out", T + "/{long}"), err=r"255",
         check=_no_work),
    Case("sweep-store-under-file", "7", ("sweep", "-w", "{wl}:marker", *SMALL_SWEEP, "--store",
                                         "sqlite:///{root}/afile/x.db"), err=r"is a file", check=_no_work),
    Case("noise-json-unwritable-dir", "7", ("noise", "-w", "{wl}:marker", "--json", "{unwritable}/r.json"),
         err=r"cannot write", check=_no_work),
    Case("train-json-is-directory", "7", ("train", "-w", "{wl}:marker", "--json", T), err=r"is a directory",
         check=_no_work),
    # 8. Ctrl-C keeps what it promises
    Case("train-ctrl-c-interrupted", "8", api=proc_train_ctrl_c),
    Case("noise-ctrl-c-keeps-steps", "8", api=proc_noise_ctrl_c),
    # 9. exits that bypass the guard
    Case("train-factory-exit-0", "9", ("train", "-w", "{wl}:exit0", "--steps", "1", "-q"),
         err=r"the workload .*called sys\.exit\(0\)"),
    Case("find-factory-exit-3", "9", ("find", "-w", "{wl}:exit3", "-q"), err=r"called sys\.exit\(3\)"),
    Case("tune-factory-exit-3", "9", ("tune", "-w", "{wl}:exit3", *SMALL_TUNE, "--out", T + "/t", "-q"),
         err=r"called sys\.exit\(3\)"),
    Case("train-exit-at-import", "9", api=proc_exit_at_import),
    Case("train-keyboard-interrupt-at-import", "9", api=proc_keyboard_interrupt_at_import),
    # 10. corrupted and read-only stores
    Case("report-random-bytes-db", "10", ("report", "{root}/random.db", "--out", T + "/rep", "-q"),
         err=r"not a (valid )?SQLite database"),
    Case("report-corrupt-db", "10", ("report", "{root}/corrupt.db", "--out", T + "/rep", "-q"),
         err=r"not a valid SQLite database"),
    Case("sweep-random-bytes-store", "10", ("sweep", "-w", "{wl}:ok", *SMALL_SWEEP, "--store",
                                            "sqlite:///{root}/random.db", "-q"), err=r"not a valid SQLite database"),
    Case("tune-corrupt-store", "10", ("tune", "-w", "{wl}:ok", *SMALL_TUNE, "--no-find", "--store",
                                      "sqlite:///{root}/corrupt.db", "--out", T + "/t", "-q"),
         err=r"not a valid SQLite database"),
    Case("sweep-read-only-store", "10", ("sweep", "-w", "{wl}:ok", *SMALL_SWEEP, "--store",
                                         "sqlite:///file:{good}?mode=ro&uri=true", "-q"), err=r"read-only"),
    Case("tune-read-only-store", "10", ("tune", "-w", "{wl}:ok", *SMALL_TUNE, "--no-find", "--store",
                                        "sqlite:///file:{good}?mode=ro&uri=true", "--out", T + "/t", "-q"),
         err=r"read-only"),
    Case("sweep-chmod-444-store", "10", api=api_sweep_chmod_read_only_store),
    # 11. base batch size 1
    Case("tune-base-batch-1", "11", ("tune", "-w", "{wl}:base_batch_1", "-b", "16", "--budget", "steps:2",
                                     "--noise-steps", "3", "--no-precision-check", "--no-lr-calibration",
                                     "--no-find", "--out", T + "/t", "-q"), rc=(0,),
         check=_noise_measured_at_base_batch_1),
    # 12. memory budgets that are not sizes
    Case("find-budget-1e400", "12", ("find", "--memory-budget", "1e400", "-q"), err=r"--memory-budget"),
    Case("train-budget-nan", "12", ("train", "--memory-budget", "nan", "--steps", "1", "-q"), err=r"--memory-budget"),
    Case("tune-budget-inf", "12", ("tune", "--memory-budget", "inf", "--out", T + "/t", "-q"),
         err=r"--memory-budget"),
    Case("find-budget-negative", "12", ("find", "--memory-budget", "-1", "-q"), err=r"--memory-budget"),
    Case("train-budget-1e400", "12", ("train", "--memory-budget", "1e400", "--steps", "1", "-q"),
         err=r"--memory-budget"),
    Case("api-find-nan-budget", "12", api=api_find_nan_budget),
    Case("api-find-inf-budget", "12", api=api_find_inf_budget),
    Case("api-train-1e400-budget", "12", api=api_train_overflow_budget),
    # 13. an impossible batch
    Case("train-batch-1e12", "13", ("train", "-b", "1000000000000", "--no-drop-last", "--steps", "1", "-q",
                                    "--json", T + "/r.json"), rc=(0,), err=r"larger",
         check=_batch_within_data),
    Case("api-train-batch-1e12", "13", api=api_train_impossible_batch),
    # 14. the finder restores gradients
    Case("api-find-restores-grads", "14", api=api_find_restores_grads),
    # 15. a sweep whose every trial failed: see sweep-trial-error-recorded above
    # 16. tune --no-find with a memory budget says what happens to it
    Case("tune-no-find-memory-budget", "16", ("tune", "-w", "{wl}:ok", *SMALL_TUNE, "--no-find", "--memory-budget",
                                              "1MiB", "--out", T + "/t", "-q"), rc=(0, 2), err=r"--memory-budget"),
    # 17. one seed check everywhere
    Case("train-seed-huge", "17", ("train", "--seed", BIG_SEED, "--steps", "1", "-q"), err=r"--seed"),
    Case("find-seed-huge", "17", ("find", "--seed", BIG_SEED, "-q"), err=r"--seed"),
    Case("noise-seed-huge", "17", ("noise", "--seed", BIG_SEED, "-q"), err=r"--seed"),
    Case("sweep-seed-huge", "17", ("sweep", "--seed", BIG_SEED, "-q"), err=r"--seed"),
    Case("tune-seed-huge", "17", ("tune", "--seed", BIG_SEED, "-q"), err=r"--seed"),
    Case("train-seed-negative", "17", ("train", "--seed", "-1", "--steps", "1", "-q"), err=r"--seed"),
    Case("api-train-seed-negative", "17", api=api_train_seed_negative),
    Case("api-find-seed-huge", "17", api=api_find_seed_huge),
    Case("api-sweep-seed-negative", "17", api=api_sweep_seed_negative),
    # 18. --lr-search bounded
    Case("sweep-lr-search-3000", "18", ("sweep", "--lr-search", "3000", "-q"), err=r"--lr-search"),
    Case("tune-lr-search-3000", "18", ("tune", "--lr-search", "3000", "--out", T + "/t", "-q"), err=r"--lr-search"),
    Case("api-sweep-lr-search-3000", "18", api=api_sweep_lr_search_huge),
    # 19. report on a hand-edited results.json
    Case("report-trial-missing-keys", "19", ("report", "{edited_missing}", "--out", T + "/rep", "-q"),
         err=r"(?i)trial"),
    Case("report-trial-not-a-dict", "19", ("report", "{edited_string}", "--out", T + "/rep", "-q"),
         err=r"(?i)trial"),
    Case("report-trial-bad-types", "19", ("report", "{edited_types}", "--out", T + "/rep", "-q"),
         err=r"(?i)trial|batch_size"),
    # 20. the Python API
    Case("api-train-grad-clip-string", "20", api=api_train_grad_clip_string),
    Case("api-scale-lr-one-beta", "20", api=api_scale_lr_one_beta),
    Case("api-scale-lr-negative-eps", "20", api=api_scale_lr_negative_eps),
    Case("api-scale-lr-beta-ge-1", "20", api=api_scale_lr_beta_ge_1),
    Case("api-load-workload-int", "20", api=api_load_workload_int),
    Case("api-mysql-store", "20", api=api_mysql_store),
    # 12.6 / 10.6: the CLI as users expect
    Case("script-imports-sibling-module", "12.6", api=proc_script_imports_sibling),
    Case("find-bogus-flag-subcommand-help", "12.6", ("find", "--bogus"), err=r"see 'batchfit find --help'"),
    Case("report-table-not-cut-off-terminal", "12.6", ("report", "{root}/results.json", "--out", T + "/rep"),
         rc=(0,), check=_table_not_cut),
    Case("train-warning-names-flag", "10.6", ("train", "-b", "1000000000000", "--no-drop-last", "--steps", "1",
                                              "-q"), rc=(0, 2), err=r"--batch-size", no_err=r"\bbatch_size\b"),
    # 23.10 train --checkpoint: the one output writer, and the path checked before any work (CLI and API)
    Case("train-checkpoint-fifo", "23.10", api=proc_checkpoint_fifo),
    Case("train-checkpoint-char-device", "23.10", api=proc_checkpoint_char_device),
    Case("train-checkpoint-symlink", "23.10", api=proc_checkpoint_symlink),
    Case("train-checkpoint-under-file", "23.10", ("train", "-w", "{wl}:marker", "--steps", "2", "-q", "--json",
                                                  T + "/r.json", "--checkpoint", "{root}/afile/c.pt"),
         err=r"--checkpoint .*afile.* is a file", check=_no_work_no_json),
    Case("train-checkpoint-is-directory", "23.10", ("train", "-w", "{wl}:marker", "--steps", "2", "-q",
                                                    "--checkpoint", T), err=r"--checkpoint .* is a directory",
         check=_no_stray_tmp),
    Case("train-checkpoint-long-name", "23.10", ("train", "-w", "{wl}:marker", "--steps", "2", "-q", "--checkpoint",
                                                 T + "/{long}.pt"), err=r"--checkpoint.*255", check=_no_work),
    Case("train-checkpoint-read-only-mount", "23.10", api=proc_checkpoint_read_only_mount),
    Case("train-checkpoint-write-fails-keeps-json", "23.10", api=proc_checkpoint_write_fails_keeps_json),
    Case("api-train-checkpoint-under-file", "23.10", api=api_train_checkpoint_under_file),
    Case("api-train-checkpoint-symlink", "23.10", api=api_train_checkpoint_symlink),
    # 23.11 --resume continues one run: every argument that changes the result must match the checkpoint
    Case("train-resume-other-arguments", "23.11", api=proc_resume_other_arguments),
    Case("api-train-resume-other-arguments", "23.11", api=api_resume_other_arguments),
    # 23.15 the last replicate seed is checked before any work
    Case("sweep-seed-range", "23.15", ("sweep", "-w", "{wl}:ok", *SMALL_SWEEP, "--seed", "4294967295", "--seeds", "2",
                                       "--out", T + "/s", "-q"), err=r"--seed=4294967295 with --seeds=2 .*4294967294",
         check=_nothing_written("s/sweep.json")),
    Case("tune-seed-range", "23.15", ("tune", "-w", "{wl}:ok", *SMALL_TUNE, "--no-find", "--seed", "4294967295",
                                      "--seeds", "2", "--out", T + "/t", "-q"), err=r"--seed=4294967295",
         check=_nothing_written("t/results.json")),
    Case("api-sweep-seed-range", "23.15", api=api_sweep_seed_range),
    Case("api-tune-seed-range", "23.15", api=api_tune_seed_range),
    # 23.16 flags in CLI messages, keywords in API messages, the right way round
    Case("train-batch-too-large-flag-words", "23.16", ("train", "-b", "1000000000000", "--steps", "1", "-q"),
         err=r"keep the last, smaller batch with --no-drop-last\s*$",
         no_err=r"=False|=True|drop_last|with --no-drop-last;"),
    Case("train-batch-schedule-too-large-flag-words", "23.16", ("train", "--batch-schedule", "0:1000000000000",
                                                                "--steps", "1", "-q"), err=r"--batch-schedule",
         no_err=r"--batch-size|batch_size"),
    Case("tune-one-sample-names-no-noise", "23.16", ("tune", "-w", "{wl}:one_sample", "--budget", "steps:2",
                                                     "--no-precision-check", "--no-lr-calibration", "--out",
                                                     T + "/t", "-q"), err=r"--no-noise", no_err=r"noise="),
    Case("train-measure-noise-with-schedule", "23.16", ("train", "-w", "{wl}:ok", "--batch-schedule", "0:8,2:16",
                                                        "--measure-noise", "--steps", "4", "--eval-every", "2", "-q",
                                                        "--json", T + "/r.json"), rc=(0,), check=_b_simple_measured),
    Case("api-find-deprecated-cap-named", "23.16", api=api_find_deprecated_cap_named),
    Case("api-train-batch-too-large-keywords", "23.16", api=api_train_batch_too_large_keywords),
    Case("keyword-flags-both-ways", "23.16", api=api_keyword_flags_both_ways),
    # 23.17 DataLoader worker failures name the data loader and the worker's own error
    Case("train-worker-raises", "23.17", ("train", "-w", "{wl}:worker_raises", "--steps", "20", "-q"),
         err=r"train_data: DataLoader worker process \d+ raised ValueError: corrupt image #123",
         no_err=r"Original Traceback"),
    Case("train-val-worker-raises", "23.17", ("train", "-w", "{wl}:val_worker_raises", "--steps", "2", "-q"),
         err=r"val_data: DataLoader worker process \d+ raised ValueError: corrupt image #123",
         no_err=r"Original Traceback"),
    Case("train-worker-exits", "23.17", ("train", "-w", "{wl}:worker_exits", "--steps", "20", "-q"),
         err=r"DataLoader worker process (\(pid [^)]*\) exited unexpectedly|stopped while handing over a batch)",
         no_err=r"fix the model|targets fit|in-place"),
    Case("sweep-worker-killed", "23.17", ("sweep", "-w", "{wl}:worker_killed", "-b", "16", "--budget", "steps:14",
                                          "--no-noise", "--no-extremes", "--out", T + "/s", "-q"),
         err=r"DataLoader worker process", check=_worker_failure_recorded),
    # 23.12 --retry-failed retries each failed trial once per invocation; a racing seed that keeps failing ends racing
    Case("sweep-retry-failed-once", "23.12", api=proc_sweep_retry_failed_once),
    Case("tune-retry-failed-once", "23.12", api=proc_tune_retry_failed_once),
    Case("api-sweep-retry-failed-once-per-call", "23.12", api=api_sweep_retry_failed_once_per_call),
    Case("api-tune-retry-failed-once", "23.12", api=api_tune_retry_failed_once),
    Case("tune-racing-seed-fails", "23.12", api=proc_tune_racing_seed_fails),
    # 23.13 an interrupted racing trial is re-run
    Case("tune-racing-trial-killed", "23.13", api=proc_tune_racing_trial_killed),
    # 23.14 one tune per --out
    Case("tune-two-processes-one-out", "23.14", api=proc_tune_two_processes_one_out),
    Case("api-tune-out-dir-lock-released", "23.14", api=api_tune_out_dir_lock_released),
    # 23.18 no "internal error" for the user's data, damaged stores and stage files, closed pipes, bad API values
    Case("train-len-negative", "23.18", ("train", "-w", "{wl}:len_negative", "--steps", "2", "-q"),
         err=r"train_data: len\(\) failed \(ValueError: __len__\(\) should return >= 0\); make its __len__ return"),
    Case("sweep-val-len-negative", "23.18", ("sweep", "-w", "{wl}:val_len_negative", *SMALL_SWEEP, "--out", T + "/s",
                                             "-q"), err=r"val_data: len\(\) failed"),
    Case("report-store-attr-not-json", "23.18",
         api=_damaged_store_refused("report", BROKEN_TRIAL_ATTR, r".*attribute that is not valid JSON")),
    Case("report-store-config-oops", "23.18",
         api=_damaged_store_refused("report", OOPS_STUDY_CONFIG, r"the attribute 'config' of study .* is 'oops'")),
    Case("sweep-store-attr-not-json", "23.18",
         api=_damaged_store_refused("sweep", BROKEN_TRIAL_ATTR, r".*attribute that is not valid JSON")),
    Case("sweep-store-config-oops", "23.18",
         api=_damaged_store_refused("sweep", OOPS_STUDY_CONFIG, r"the attribute 'config' of study .* is 'oops'")),
    Case("tune-hand-edited-lr-json", "23.18", api=_hand_edited_stage_file("lr.json", '{"runs": 5, "lr": 3}')),
    Case("tune-hand-edited-step-time-json", "23.18",
         api=_hand_edited_stage_file("step_time.json", '{"seconds": 3, "rounds": 2}')),
    Case("tune-hand-edited-state-json", "23.18", api=_hand_edited_stage_file("tune_state.json", '"oops"')),
    Case("report-stdout-closed", "23.18", api=_stdout_closed(["report", "{root}/results.json", "--out", T + "/o",
                                                               "--json", "-", "-q"])),
    Case("tune-stdout-closed", "23.18", api=_stdout_closed(["tune", "-w", "{wl}:ok", *SMALL_TUNE, "--no-find",
                                                             "--out", T + "/o", "--json", "-", "-q"])),
    Case("api-train-batch-schedule-malformed", "23.18", api=api_train_batch_schedule_malformed),
    Case("api-train-branching-garbage", "23.18", api=api_train_branching_garbage),
    # 23.19 checked before the work; a report never writes to its store; SIGTERM as Ctrl-C
    Case("tune-lr-search-3000-up-front", "23.19", ("tune", "-w", "{wl}:ok", "-b", "16", "--budget", "steps:2",
                                                   "--noise-steps", "3", "--no-precision-check", "--lr-search",
                                                   "3000", "--out", T + "/t", "-q"),
         err=r"--lr-search must be at most 16, got 3000", check=_no_stage_files),
    Case("tune-corrupt-store-in-out-up-front", "23.19", api=proc_tune_corrupt_store_in_out_up_front),
    Case("report-dropped-table-read-only", "23.19", api=proc_report_dropped_table_read_only),
    Case("report-fifo-store", "23.19", api=proc_report_fifo_store),
    Case("train-warmup-1e308", "23.19", ("train", "-w", "{wl}:ok", "--warmup", "1e308", "--steps", "2", "-q"),
         err=r"--warmup must be at most 2 steps \(the run is 2 steps long\), got 1e\+308", no_err=r"\d{20}"),
    Case("sweep-warmup-1e308", "23.19", ("sweep", "-w", "{wl}:ok", *SMALL_SWEEP, "--warmup", "1e308", "--out",
                                         T + "/s", "-q"), err=r"--warmup must be at most 2 steps", no_err=r"\d{20}",
         check=_nothing_written("s/sweep.json")),
    Case("tune-warmup-1e308", "23.19", ("tune", "-w", "{wl}:ok", "-b", "16", "--budget", "steps:2", "--noise-steps",
                                        "3", "--no-precision-check", "--warmup", "1e308", "--out", T + "/t", "-q"),
         err=r"--warmup must be at most 2 steps", no_err=r"\d{20}", check=_no_stage_files),
    Case("sweep-warmup-longer-than-a-large-batch-trial", "23.19", ("sweep", "-w", "{wl}:ok", "-b", "16,64",
                                                                   "--budget", "epochs:1", "--no-noise",
                                                                   "--no-extremes", "--warmup", "5", "--out",
                                                                   T + "/s", "-q"), rc=(0,)),
    Case("api-train-warmup-beyond-the-run", "23.19", api=api_train_warmup_beyond_the_run),
    Case("train-sigterm-interrupted", "23.19", api=proc_train_sigterm),
    Case("noise-sigterm-keeps-steps", "23.19", api=proc_noise_sigterm),
    # issue 23, items 2 and 6
    Case("tune-schedule-fails-at-the-lr-check-total", "23.2",
         ("tune", "-w", "{wl}:one_cycle", "-b", "16", "--budget", "steps:40", "--no-noise", "--no-precision-check",
          "--out", T + "/t", "-q"),
         err=r": error: the LR check's runs \(batch 16\) have 10 steps: your lr_schedule failed at total_steps=10: "
             r"ZeroDivisionError: .*; make lr_schedule work for any total_steps", check=_no_stage_files),
    Case("api-tune-schedule-fails-at-a-sweep-total", "23.2", api=api_tune_schedule_checked_before_find),
    Case("api-load-workload-imports-siblings", "23.6", api=api_load_workload_imports_siblings),
]


def _edited_results(root: Path) -> dict[str, Path]:
    base = _json(root / "results.json")
    out = {}
    for name, mutate in (
        ("edited_missing", lambda t: [{k: v for k, v in t[0].items() if k not in ("batch_size", "status")}] + t[1:]),
        ("edited_string", lambda t: ["not a trial", *t[1:]]),
        ("edited_types", lambda t: [{**t[0], "batch_size": "sixteen", "history": 5}, *t[1:]]),
    ):
        data = dict(base, trials=mutate(list(base["trials"])))
        path = root / f"{name}.json"
        path.write_text(json.dumps(data))
        out[name] = path
    return out


def _unwritable(root: Path) -> str:
    if os.geteuid() == 0:
        return "/sys/batchfit-hostile"  # root may write anywhere but sysfs
    d = root / "locked"
    d.mkdir(exist_ok=True)
    d.chmod(0o555)
    return str(d / "sub")


def test_issue_13_items_are_all_covered() -> None:
    covered = {i for c in CASES for i in c.item.split(",")}
    assert {str(i) for i in range(1, 21)} <= covered, sorted(covered)
    assert len(CASES) >= 60
    assert {"train", "find", "noise", "sweep", "tune", "report"} <= {c.argv[0] for c in CASES if c.argv}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile(case: Case, files: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a command that writes a default output (./batchfit.db) writes it here
    ctx: dict[str, Any] = {**files, "tmp": tmp_path, "capsys": capsys, **_edited_results(files["root"]),
                           "unwritable": _unwritable(files["root"])}
    monkeypatch.setenv("HOSTILE_MARKER", str(tmp_path / "marker"))
    if case.api is not None:
        case.api(ctx)
        return
    if "pipe" in " ".join(case.argv):
        _setup_fifo(ctx)
    if "link.json" in " ".join(case.argv):
        _setup_symlink(ctx)
    if "{tmp}/null" in case.argv:
        _setup_null(ctx)
    capsys.readouterr()
    rc = _run_cli(_fmt(case.argv, ctx))
    out, err = capsys.readouterr()
    assert rc in case.rc, f"exit {rc}, expected {case.rc}; stderr: {err[-1500:]}"
    assert "Traceback" not in err and "internal error" not in err, err[-1500:]
    if rc == 2:
        assert len(err.strip().splitlines()) == 1, f"not one line: {err!r}"
    if case.err is not None:
        assert re.search(case.err, err), f"stderr does not match {case.err!r}: {err[-1500:]}"
    if case.no_err is not None:
        assert not re.search(case.no_err, err), f"stderr matches {case.no_err!r}: {err[-1500:]}"
    if case.check is not None:
        case.check(ctx, out, err)


def test_issue_23_items_are_covered() -> None:
    covered = {i for c in CASES for i in c.item.split(",")}
    assert {"23.10", "23.11", "23.12", "23.13", "23.14", "23.15", "23.16", "23.17", "23.18", "23.19"} <= covered, \
        sorted(covered)


def test_corrupt_fixture_is_really_corrupt(files: dict[str, Any]) -> None:
    """The corrupted store must fail in SQLite itself, so the report cases test the mapping, not the fixture."""
    con = sqlite3.connect(files["root"] / "corrupt.db")
    with pytest.raises(sqlite3.DatabaseError):
        con.execute("SELECT * FROM studies").fetchall()
    con.close()
