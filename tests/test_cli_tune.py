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
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv: list[str], fragment: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert _rc(["tune", "--out", str(tmp_path / "out"), *argv]) == 2
    assert fragment in _one_line_error(capsys, "tune")
    assert not (tmp_path / "out" / "results.json").exists()


def test_out_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "file"
    f.write_text("")
    assert main(["tune", "--out", str(f)]) == 2
    assert "is a file" in _one_line_error(capsys, "tune")


def test_tune_then_report_from_the_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    rc = main(["tune", "--batch-sizes", "64,128,256", "--budget", "epochs:2", "--noise-steps", "5", "--no-find",
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
    capsys.readouterr()

    # the report rebuilt from the store alone gives the same recommendation
    rep = tmp_path / "rep"
    assert main(["report", str(out / "batchfit.db"), "--out", str(rep), "--quiet"]) == 0
    again = json.loads((rep / "results.json").read_text())
    assert again["recommendation"]["batch_size"] == rec["batch_size"]
    assert again["noise"]["b_simple"] == data["noise"]["b_simple"]
    assert "<img" in (rep / "report.html").read_text()
