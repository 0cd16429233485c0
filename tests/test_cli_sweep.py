"""``batchfit sweep`` end to end on a tiny workload, resume, and every bad-input path (one line, exit code 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batchfit.cli import main

WORKLOAD = f"{Path(__file__).resolve().parent / 'test_sweep.py'}:classify"



def test_sweep_cli_writes_results_report_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    args = ["sweep", "-w", WORKLOAD, "-b", "4,8,32", "--budget", "epochs:2", "-m", "16", "--out", str(out),
            "--json", str(tmp_path / "r.json"), "--lr-search", "2", "--sharpness"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "critical batch" in err and "target:" in err
    data = json.loads((tmp_path / "r.json").read_text())
    assert json.loads((out / "sweep.json").read_text()) == data
    assert (out / "batchfit.db").is_file()  # the default store lives in --out
    assert len(data["trials"]) == 6 and {t["status"] for t in data["trials"]} == {"ok"}
    assert all(isinstance(t["sharpness"], float) for t in data["trials"])
    assert [t["batch_size"] for t in data["best_per_batch"]] == [4, 8, 32]
    try:
        import batchfit.report  # noqa: F401
    except ImportError:
        pass
    else:
        assert (out / "report.html").is_file() and (out / "results.json").is_file()
    # the same command again resumes: nothing left to run, same trials
    assert main(args) == 0
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert "6 of 6 trial(s) already done" in err
    assert json.loads((tmp_path / "r.json").read_text())["trials"] == data["trials"]


@pytest.mark.parametrize("extra, needle", [
    (["-b", "16,x"], "not a whole number"),
    (["-b", "16,,32"], "comma-separated"),
    (["-b", "0,16"], "positive integer"),
    (["--budget", "weeks:3"], "budget"),
    (["--budget", "epochs:-1"], "positive"),
    (["--budget", "steps:1.5"], "whole number"),
    (["--target", "1.5"], "abs:1.5"),
    (["--target", "best"], "target"),
    (["--lr-search", "0"], "positive"),
    (["--lr-rule", "cubic"], "invalid choice"),
    (["--micro-batch-size", "-4"], "must be a positive integer"),
    (["--warmup", "1.5"], "whole number of steps"),
])
def test_bad_arguments_one_line_exit_2(extra: list[str], needle: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["sweep", "-w", WORKLOAD, *extra])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


@pytest.mark.parametrize("extra, needle", [
    (["--store", "nosuchdriver://host/db"], "cannot open the store"),
    (["--store", "not-a-url"], "not a database URL"),
    (["-b", "8,100000"], "exceed the training set"),
    (["--lr-rule", "adam-sqrt"], "Adam-family"),
    (["-w", "demo:nope"], "unknown demo"),
    (["-O", "nosuch=1"], "does not take option"),
    (["--device", "tpu"], "device"),
])
def test_bad_input_at_run_time_one_line_exit_2(extra: list[str], needle: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    args = ["sweep", "-w", WORKLOAD, "-b", "8", "--budget", "steps:2", "--store",
            f"sqlite:///{tmp_path / 's.db'}", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_conflicting_study_settings_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = ["sweep", "-w", WORKLOAD, "-b", "8", "--store", f"sqlite:///{tmp_path / 's.db'}", "--study", "mine",
            "-m", "8", "--no-noise", "-q"]
    assert main([*base, "--budget", "steps:2"]) == 0
    capsys.readouterr()
    assert main([*base, "--budget", "steps:3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different settings" in err[0]


def test_every_trial_failed_exits_2_naming_the_first_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["sweep", "-w", WORKLOAD, "-O", "fail_always=true", "-b", "8,16", "--budget", "steps:2", "-m", "16",
            "--no-noise", "--store", f"sqlite:///{tmp_path / 's.db'}", "--json", str(tmp_path / "r.json")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "every trial of the sweep failed (2 of 2)" in err[-1] and "synthetic failure" in err[-1]
    data = json.loads((tmp_path / "r.json").read_text())  # the failed trials are written before the exit
    assert data["status"] == "failed" and [t["status"] for t in data["trials"]] == ["failed", "failed"]


def test_rerun_names_kept_failures_and_retry_flag(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = ["sweep", "-w", WORKLOAD, "-b", "8,16", "--budget", "steps:2", "-m", "16", "--no-noise", "--store",
            f"sqlite:///{tmp_path / 's.db'}", "--study", "mine"]
    assert main([*base, "-O", "fail_at_batch=16"]) == 0  # one of two failed: a result, exit 0
    capsys.readouterr()
    assert main(base) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "1 failed trial(s) kept; rerun with --retry-failed" in err
    assert main([*base, "--retry-failed"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "failed trial(s) kept" not in err and "failed:" not in err


@pytest.mark.parametrize("value", ["17", "3000"])
def test_lr_search_beyond_16_is_one_line(value: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["sweep", "-w", WORKLOAD, "-b", "8", "--budget", "steps:2", "--lr-search", value, "--store",
            f"sqlite:///{tmp_path / 's.db'}"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "at most 16" in err[0], err
