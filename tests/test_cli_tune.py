from __future__ import annotations

import json
from pathlib import Path

import pytest

from batchfit.cli import main


def _rc(argv: list[str]) -> int:
    """main()'s exit code, whether it returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def _one_line_error(capsys: pytest.CaptureFixture[str], command: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"batchfit {command}: error:"), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--budget", "weeks:3"], "budget"),
        (["--budget", "epochs:-1"], "budget"),
        (["--batch-sizes", "16,abc"], "batch size"),
        (["--batch-sizes", "16,0"], "batch size"),
        (["--batch-sizes", "5000", "--no-find"], "exceeds the training set"),
        (["--target", "1.5"], "target"),
        (["--tolerance", "2"], "tolerance"),
        (["--lr-search", "0"], "lr-search"),
        (["--eval-every", "often"], "eval-every"),
        (["--lr-rule", "cubic"], "lr-rule"),
        (["--workload", "demo:nope"], "unknown demo"),
        (["--workload", "missing_file.py:make"], "does not exist"),
        (["--device", "tpu"], "device"),
        (["--precision", "fp16"], "fp16"),
        (["--memory-budget", "lots"], "memory"),
        (["--no-find", "--memory-budget", "1MiB"], "--no-find skips it"),
        (["--seeds", "0"], "seeds"),
        (["--max-cost", "0"], "--max-cost: must be a positive number, got 0.0; give runs of the train budget"),
        (["--max-cost", "inf"], "--max-cost: must be a finite number, got inf"),
        (["--max-cost", "lots"], "--max-cost: 'lots' is not a number; give runs of the train budget (e.g. 1.0), "
                                 "auto or none"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv: list[str], fragment: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert _rc(["tune", "--out", str(tmp_path / "out"), *argv]) == 2
    assert fragment in _one_line_error(capsys, "tune")
    assert not (tmp_path / "out" / "results.json").exists()


def test_max_cost_is_auto_none_or_runs_of_the_train_budget() -> None:
    from batchfit.cli.tune import max_cost_value

    assert max_cost_value("auto") == "auto" and max_cost_value(" None ") is None
    assert max_cost_value("0.5") == 0.5 and max_cost_value("2") == 2.0


def test_out_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "file"
    f.write_text("")
    assert main(["tune", "--out", str(f)]) == 2
    assert "is a file" in _one_line_error(capsys, "tune")


def test_tune_then_report_from_the_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    rc = main(["tune", "--batch-sizes", "64,128,256", "--budget", "epochs:1", "--noise-steps", "5", "--no-find",
               "--no-precision-check", "--no-lr-calibration", "--out", str(out),
               "--json", str(tmp_path / "tune.json"), "--quiet"])
    assert rc == 0
    data = json.loads((tmp_path / "tune.json").read_text())
    rec = data["recommendation"]
    assert rec["batch_size"] in (64, 128, 256)
    assert "only fp32 was measured" in " ".join(rec["reasons"])
    assert [t["batch_size"] for t in data["best_per_batch"]] == [64, 128, 256]
    for name in ("report.html", "report.md", "results.json", "noise.json", "batchfit.db"):
        assert (out / name).exists(), name
    assert not (out / "find.json").exists() and not (out / "lr.json").exists()
    assert data["lr_calibration"] is None
    # -q: no display and no table, but the one-line recommendation (12.6)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == [f"Recommendation: batch {rec['batch_size']} = micro-batch {rec['micro_batch_size']} x "
                   f"{rec['accumulation_steps']} accumulation step(s), LR {rec['lr']:.4g}, warm-up "
                   f"{rec['warmup_steps']} step(s), {rec['precision']} [cost {data['cost']['runs']:.2f} runs "
                   f"({data['cost']['samples']:,} samples, {data['cost']['seconds']:.0f} s training) of the train "
                   "budget epochs:1]"]

    # the report rebuilt from the store alone gives the same recommendation, and -q prints it in one line too
    rep = tmp_path / "rep"
    assert main(["report", str(out / "batchfit.db"), "--out", str(rep), "--quiet"]) == 0
    assert capsys.readouterr().err.strip() == err[0]
    again = json.loads((rep / "results.json").read_text())
    assert again["recommendation"] == rec
    assert again["noise"]["b_simple"] == data["noise"]["b_simple"]
    # the intervals and the tie rule survive the store: the report from it decides the same way (11)
    assert again["recommendation"]["intervals"] == rec["intervals"] and rec["decision_rule"]
    assert (rep / "report.html").read_text().count("<img") >= 3


def test_retry_failed_runs_failed_trials_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """13.6: `tune --retry-failed` re-runs the trials that failed; without it they are kept as failed."""
    wl = tmp_path / "flaky.py"
    wl.write_text(
        "import os\n"
        "from torch import nn\n"
        "from batchfit.demos import digits_mlp\n"
        "class Flaky(nn.Module):\n"
        "    def __init__(self, inner):\n"
        "        super().__init__()\n"
        "        self.inner = inner\n"
        "    def forward(self, x):\n"
        "        # every trial runs as one micro-batch (the recommended layout): only batch 64's trial fails\n"
        "        if os.environ.get('FLAKY') and self.training and x.shape[0] == 64:\n"
        "            raise RuntimeError('flaky forward')\n"
        "        return self.inner(x)\n"
        "def make():\n"
        "    base = digits_mlp()\n"
        "    make_model = base.model_fn\n"
        "    base.model_fn = lambda: Flaky(make_model())\n"
        "    return base\n"
    )
    argv = ["tune", "-w", f"{wl}:make", "--batch-sizes", "32,64", "--budget", "steps:2", "--no-find", "--no-noise",
            "--no-precision-check", "--no-lr-calibration", "--out", str(tmp_path / "out"), "-q"]
    monkeypatch.setenv("FLAKY", "1")
    main(argv)
    first = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {t["batch_size"]: t["status"] for t in first["trials"]} == {32: "ok", 64: "failed"}
    monkeypatch.delenv("FLAKY")
    assert main(argv) == 0  # without --retry-failed the failure is kept
    kept = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {t["batch_size"]: t["status"] for t in kept["trials"]} == {32: "ok", 64: "failed"}
    assert main([*argv, "--retry-failed"]) == 0
    retried = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {t["batch_size"]: t["status"] for t in retried["trials"]} == {32: "ok", 64: "ok"}
    capsys.readouterr()


def test_a_workload_without_validation_data_gets_a_recommendation(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """13.5 through the CLI: ranked on the training loss, said so, printed with -q, exit 0."""
    wl = tmp_path / "noval.py"
    wl.write_text("from batchfit.demos import digits_mlp\n"
                  "def make():\n"
                  "    base = digits_mlp()\n"
                  "    base.val_data = None\n"
                  "    return base\n")
    rc = main(["tune", "-w", f"{wl}:make", "--batch-sizes", "32,64", "--budget", "steps:4", "--no-find",
               "--no-noise", "--no-precision-check", "--no-lr-calibration", "--out", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 0, err
    assert len(err) == 1 and err[0].startswith("Recommendation: batch ")
    assert "(ranked on training loss: no validation data) [cost " in err[0]
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["primary_metric"] == "train_loss" and data["recommendation"]["metric"] == "train_loss"
    assert "ranked on the training loss" in (tmp_path / "out" / "report.md").read_text()


def test_no_usable_trial_is_one_error_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every trial diverged: the report is written, then one error line (not a silent exit 0)."""
    wl = tmp_path / "nan.py"
    wl.write_text("import math\n"
                  "import torch.nn.functional as F\n"
                  "from batchfit.demos import digits_mlp\n"
                  "def make():\n"
                  "    base = digits_mlp()\n"
                  "    base.loss_fn = lambda out, y: F.cross_entropy(out, y) * math.nan\n"
                  "    return base\n")
    rc = main(["tune", "-w", f"{wl}:make", "--batch-sizes", "32,64", "--budget", "steps:2", "--no-find",
               "--no-noise", "--no-precision-check", "--no-lr-calibration", "--out", str(tmp_path / "out"), "-q"])
    assert rc == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err[-1].startswith("batchfit tune: error: no recommendation") and "diverged" in err[-1]
    assert "No recommendation yet" in (tmp_path / "out" / "report.md").read_text()


def test_seeds_flag_trains_every_configuration_with_n_seeds(tmp_path: Path) -> None:
    """--seeds N: N seeds everywhere (no racing); each trial records its seed, the decision pools them."""
    out = tmp_path / "out"
    rc = main(["tune", "--batch-sizes", "64,128", "--budget", "steps:3", "--noise-steps", "5", "--no-find",
               "--no-precision-check", "--no-lr-calibration", "--seeds", "2", "--seed", "4", "--out", str(out),
               "--json", str(tmp_path / "tune.json"), "--quiet"])
    assert rc == 0
    data = json.loads((tmp_path / "tune.json").read_text())
    assert sorted((t["batch_size"], t["seed"]) for t in data["trials"]) == [(64, 4), (64, 5), (128, 4), (128, 5)]
    assert {e["seeds"] for e in data["recommendation"]["intervals"]} == {2}
