"""Property test (issue 13): whatever numbers, sizes, budgets and paths a user types, every command ends with exit
code 0 or 2, at most two lines on stderr (with -q), no traceback, and writes no file outside the outputs it was given.

Each example runs the command in-process in a fresh folder (the working directory too), on a tiny workload, and
compares the folder's listing before and after.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from batchfit.cli import main

TINY = '''
import torch, torch.nn as nn, torch.nn.functional as F
from torch.utils.data import TensorDataset
from batchfit import Workload
from batchfit.workload import accuracy

def make():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 4, generator=g), torch.randint(0, 2, (96,), generator=g)
    return Workload(name="tiny", model_fn=lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)),
                    optimizer_fn=lambda p, lr: torch.optim.SGD(p, lr=lr), loss_fn=F.cross_entropy,
                    train_data=TensorDataset(x[:64], y[:64]), val_data=TensorDataset(x[64:], y[64:]),
                    metrics={"accuracy": accuracy}, base_batch_size=8, base_lr=0.05)
'''

# --- value strategies: valid small values, boundary values, and hostile text ---------------------------------------
HOSTILE_TEXT = st.sampled_from(["", "abc", "nan", "inf", "-inf", "1e400", "-1", "0", "1.5", "0x10", " 3 ", "1_0",
                                "10**30", "9" * 40, "-0", "+4", "1e-400", "\u00bd"])
SMALL_INT = st.integers(min_value=-3, max_value=6).map(str)
ANY_INT = st.one_of(SMALL_INT, st.integers(min_value=-(2**70), max_value=2**70).map(str), HOSTILE_TEXT)
BATCH = st.one_of(st.integers(min_value=-2, max_value=80).map(str), st.just("1000000000000"), HOSTILE_TEXT)
STEPS = st.one_of(st.integers(min_value=-2, max_value=3).map(str), HOSTILE_TEXT.filter(lambda t: t != "9" * 40))
FLOAT = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.sampled_from(["0.5", "0.01", "2"]),
                  HOSTILE_TEXT)
FRACTION = st.one_of(st.floats(min_value=-1, max_value=2).map(repr), HOSTILE_TEXT)
SEED = st.one_of(st.integers(min_value=-5, max_value=2**33).map(str), st.just("1" + "0" * 30), HOSTILE_TEXT)
BUDGET_BYTES = st.one_of(
    st.builds(lambda n, u: f"{n}{u}", st.integers(min_value=-5, max_value=10**6),
              st.sampled_from(["", "B", "KiB", "MiB", "GiB", "TB", "k", "xb"])),
    st.sampled_from(["1e400", "nan", "inf", "-1", "1e30", "0.5KiB", "999999999999999999999999EiB"]),
    HOSTILE_TEXT,
)
BATCH_LIST = st.one_of(st.lists(st.integers(min_value=-2, max_value=70), min_size=0, max_size=3).map(
    lambda xs: ",".join(map(str, xs))), HOSTILE_TEXT, st.just("16,,32"), st.just("8,8"))
TRAIN_BUDGET = st.one_of(st.builds(lambda k, v: f"{k}:{v}", st.sampled_from(["steps", "epochs", "samples", "hours"]),
                                   st.sampled_from(["1", "2", "0", "-1", "0.5", "nan", "x", "1e400"])), HOSTILE_TEXT)
# output paths, relative to the example's folder ("afile" is a regular file there)
PATHS = st.sampled_from(["r.json", "sub/dir/r.json", "afile/r.json", "afile", "x" * 300 + "/r.json",
                         "y" * 256 + ".json", ".", "-", "/sys/batchfit-prop/r.json", "sub/" + "z" * 255])
OUT_DIRS = st.sampled_from(["out", "deep/out", "afile", "afile/out", "q" * 256, "/sys/batchfit-prop", "."])


FIXED = {  # defaults that keep every accepted run tiny and inside the example's folder (later flags win)
    "train": ["-w", "{wl}:make", "--steps", "1", "-q"],
    "find": ["-w", "{wl}:make", "--no-throughput", "-q"],
    "noise": ["-w", "{wl}:make", "--steps", "2", "-q"],
    "sweep": ["-w", "{wl}:make", "--no-noise", "--no-extremes", "--batch-sizes", "8", "--budget", "steps:1",
              "--out", "out", "-q"],
    "tune": ["-w", "{wl}:make", "--no-noise", "--no-precision-check", "--no-lr-calibration", "--no-find",
             "--batch-sizes", "8", "--budget", "steps:1", "--out", "out", "-q"],
    "report": ["{results}", "--out", "out", "-q"],
}

# every command's numeric, size, budget and path arguments, each with its value strategy
OPTIONS: dict[str, dict[str, st.SearchStrategy[str]]] = {
    "train": {"--batch-size": BATCH, "--micro-batch-size": BATCH, "--steps": STEPS, "--lr": FLOAT,
              "--warmup": FLOAT, "--memory-budget": BUDGET_BYTES, "--seed": SEED, "--eval-every": STEPS,
              "--grad-clip": FLOAT, "--eval-batch-size": BATCH, "--json": PATHS, "--out": OUT_DIRS},
    "find": {"--memory-budget": BUDGET_BYTES, "--max-batch-size": BATCH, "--margin": FRACTION, "--seed": SEED,
             "--json": PATHS, "--out": OUT_DIRS},
    "noise": {"--batch-size": BATCH, "--micro-batch-size": BATCH, "--steps": STEPS, "--rel-ci": FRACTION,
              "--train-steps": STEPS, "--lr": FLOAT, "--seed": SEED, "--json": PATHS, "--out": OUT_DIRS},
    "sweep": {"--batch-sizes": BATCH_LIST, "--budget": TRAIN_BUDGET, "--lr-search": ANY_INT, "--warmup": FLOAT,
              "--target": FLOAT, "--seed": SEED, "--micro-batch-size": BATCH, "--json": PATHS, "--out": OUT_DIRS,
              "--store": PATHS},
    "tune": {"--batch-sizes": BATCH_LIST, "--budget": TRAIN_BUDGET, "--lr-search": ANY_INT,
             "--tolerance": FRACTION, "--seed": SEED, "--memory-budget": BUDGET_BYTES, "--margin": FRACTION,
             "--json": PATHS, "--out": OUT_DIRS},
    "report": {"--tolerance": FRACTION, "--json": PATHS, "--out": OUT_DIRS},
}


def _draw_argv(data: st.DataObject, command: str) -> list[str]:
    """Up to three of the command's options, each with a drawn value (valid, boundary or hostile)."""
    options = OPTIONS[command]
    chosen = data.draw(st.lists(st.sampled_from(sorted(options)), max_size=3, unique=True), label="flags")
    argv = [command]
    for flag in chosen:
        argv += [flag, data.draw(options[flag], label=flag)]
    return argv


def _listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _allowed(argv: list[str], root: Path) -> list[str]:
    """The outputs named on the command line: --json PATH, --out DIR (and everything in it), --store PATH."""
    named = []
    for flag in ("--json", "--out", "--store"):
        if flag in argv:
            value = argv[len(argv) - 1 - argv[::-1].index(flag) + 1]  # the last one given wins
            if value != "-":
                named.append(os.path.normpath(value))
                if flag == "--store":  # SQLite's side files beside the store
                    named += [named[-1] + suffix for suffix in ("-journal", "-wal", "-shm", ".lock")]
    return named


def _inside(path: str, named: list[str]) -> bool:
    return any(n == "." or path == n or path.startswith(n + os.sep) or n.startswith(path + os.sep) for n in named)


@contextlib.contextmanager
def _cwd(path: Path) -> Any:
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("prop-inputs")
    (root / "tiny.py").write_text(TINY)
    sys.path.insert(0, str(Path(__file__).parent))
    from _study_fixture import make_results

    (root / "results.json").write_text(json.dumps(make_results()))
    return {"wl": str(root / "tiny.py"), "results": str(root / "results.json")}


# examples per command: 15, fewer where each accepted run renders the report's plots (about a second each) and the
# command has few options to combine (report: three; tune's runs are a whole tune)
EXAMPLES = {"report": 6, "tune": 10}


@pytest.mark.parametrize("command", sorted(OPTIONS))
def test_any_argument_exit_0_or_2_one_line_no_stray_files(command: str, inputs: dict[str, str],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    @settings(max_examples=EXAMPLES.get(command, 15), deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(data=st.data())
    def example(data: st.DataObject) -> None:
        _one_example(command, data, inputs, capsys)

    example()


def _one_example(command: str, data: st.DataObject, inputs: dict[str, str],
                 capsys: pytest.CaptureFixture[str]) -> None:
    argv = _draw_argv(data, command)
    argv = [command, *[a.format(**inputs) for a in FIXED[command]], *[a.format(**inputs) for a in argv[1:]]]
    with tempfile.TemporaryDirectory(prefix="batchfit-prop-") as tmp:
        root = Path(tmp)
        (root / "afile").write_text("a regular file\n")
        before = _listing(root)
        capsys.readouterr()
        with _cwd(root):
            try:
                rc = main(argv)
            except SystemExit as exc:  # argparse usage errors
                rc = exc.code
        out, err = capsys.readouterr()
        event(f"{command} exit {rc}")
        assert rc in (0, 2), f"exit {rc} for {argv}: {err[-800:]}"
        assert "Traceback" not in err and "internal error" not in err, f"{argv}: {err[-800:]}"
        assert len(err.strip().splitlines()) <= 2, f"{argv}: {err[-800:]}"
        named = _allowed(argv, root)
        stray = sorted(p for p in _listing(root) - before if not _inside(p, named))
        assert not stray, f"{argv} wrote outside its named outputs: {stray}"
        if rc == 2:
            assert len(err.strip().splitlines()) == 1, f"{argv}: {err!r}"
        if "--json" in argv and argv[len(argv) - argv[::-1].index("--json")] == "-" and rc == 0:
            json.loads(out)  # stdout is one JSON document
