"""``batchfit find`` end to end, and every bad-input path ends in one line on stderr and exit code 2."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from batchfit.cli import main

WORKLOAD_FILE = '''
import torch, torch.nn.functional as F
from torch import nn
from batchfit import Workload
from batchfit.demos import ArrayDataset

def make():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(600, 16, generator=g), torch.randint(0, 4, (600,), generator=g)
    return Workload(name="cli-mlp", model_fn=lambda: nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4)),
                    optimizer_fn=lambda p, lr: torch.optim.Adam(p, lr=lr), loss_fn=F.cross_entropy,
                    train_data=ArrayDataset(x[:500], y[:500]), val_data=ArrayDataset(x[500:], y[500:]))
'''


@pytest.fixture()
def workload_spec(tmp_path: Path) -> str:
    path = tmp_path / "wl.py"
    path.write_text(WORKLOAD_FILE)
    return f"{path}:make"


def test_find_writes_the_json_and_prints_the_table(workload_spec: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out" / "find.json"
    rc = main(["find", "-w", workload_spec, "--memory-budget", "200KiB", "--max-batch-size", "400",
               "--margin", "0.1", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    for key in ("device", "precision", "memory_budget_bytes", "max_batch_size", "recommended_batch_size",
                "throughput_knee_batch_size", "memory_model", "probes", "real_trials", "seconds"):
        assert key in data
    assert data["status"] == "ok"
    assert data["memory_budget_bytes"] == 200 * 1024
    assert data["margin"] == 0.1
    assert data["max_batch_size"] <= 400
    assert data["recommended_batch_size"] <= data["max_batch_size"]
    ok_sizes = {p["batch_size"] for p in data["probes"] if p["ok"] and p["phase"] != "eval"}
    assert data["max_batch_size"] in ok_sizes and data["recommended_batch_size"] in ok_sizes
    assert data["throughput_knee_batch_size"] in {p["batch_size"] for p in data["probes"]
                                                  if p["phase"] == "throughput"}
    err = capsys.readouterr().err
    assert "peak memory" in err and "samples/s" in err and "recommended batch" in err
    # and the budget that find used also works for train
    rc = main(["train", "-w", workload_spec, "--batch-size", str(data["recommended_batch_size"]), "--steps", "3",
               "--memory-budget", "200KiB", "--eval-batch-size", str(data["eval_batch_size"]), "-q"])
    assert rc == 0


def test_find_no_throughput(workload_spec: str, tmp_path: Path) -> None:
    rc = main(["find", "-w", workload_spec, "--memory-budget", "100KiB", "--no-throughput", "-q",
               "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "find.json").read_text())
    assert data["throughput_knee_batch_size"] is None
    assert data["limited_by"] == "memory"


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--memory-budget", "lots"], "memory-budget"),
        (["--memory-budget", "0"], "memory-budget"),
        (["--margin", "1.5"], "margin"),
        (["--margin", "x"], "margin"),
        (["--max-batch-size", "0"], "max-batch-size"),
        (["--max-batch-size", "2.5"], "max-batch-size"),
        (["--precision", "fp8"], "precision"),
        (["--device", "cuda:0"] if not __import__("torch").cuda.is_available() else ["--device", "tpu"], "device"),
        (["--memory-budget", "1KiB"], "even batch size 1"),
        (["--memory-budget", "1e400"], "memory-budget"),  # issue 13.12: was a 47-line OverflowError traceback
        (["--memory-budget", "nan"], "memory-budget"),
        (["--memory-budget", "inf"], "memory-budget"),
        (["--memory-budget", "-1"], "memory-budget"),
        (["--seed", str(10**30)], "seed"),  # issue 13.17: was an internal error
        (["-w", "demo:nope"], "unknown demo"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv: list[str], needle: str, workload_spec: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(["find", "-w", workload_spec, "--no-throughput", "-q", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def _run(argv: list[str]) -> int:
    """Exit code of the CLI, whether argparse exits (usage errors) or ``main`` returns."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def test_train_memory_budget_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(["train", "--memory-budget", "many", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "memory-budget" in err[0]


def test_interrupted_find_keeps_the_finished_trials_and_says_so(workload_spec: str, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from batchfit import finder

    real_run = finder.MemoryTrials.run
    calls = []

    def run_then_interrupt(self, b: int, phase: str) -> dict:  # noqa: ANN001
        calls.append(b)
        if len(calls) == 3:  # a real Ctrl-C: SIGINT to this process (the CLI tells it from a raised one)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler raises KeyboardInterrupt before this ends
        return real_run(self, b, phase)

    monkeypatch.setattr(finder.MemoryTrials, "run", run_then_interrupt)
    out = tmp_path / "find.json"
    assert _run(["find", "-w", workload_spec, "--memory-budget", "200KiB", "-q", "--json", str(out)]) == 130
    data = json.loads(out.read_text())
    assert data["status"] == "interrupted" and [p["batch_size"] for p in data["probes"]] == calls[:2]
