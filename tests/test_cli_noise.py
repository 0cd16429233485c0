"""``batchfit noise`` and ``batchfit train --measure-noise`` end to end (in-process, tiny runs)."""

from __future__ import annotations

import json
import math

import pytest

from batchfit.cli import main


def test_noise_writes_json_and_prints_reading(tmp_path, capsys) -> None:
    out = tmp_path / "noise.json"
    rc = main(["noise", "-b", "64", "-m", "16", "--steps", "15", "--json", str(out), "--out", str(tmp_path / "d")])
    assert rc == 0
    d = json.loads(out.read_text())
    assert d == json.loads((tmp_path / "d" / "noise.json").read_text())
    assert d["batch_size"] == 64 and d["micro_batch_size"] == 16 and 1 <= d["steps"] <= 15
    low, high = d["b_simple_ci"]
    assert 0 < low <= d["b_simple"] <= high and math.isfinite(high)
    assert d["grad_norm_sq"] > 0 and d["trace_cov"] > 0
    assert d["b_simple"] == pytest.approx(d["trace_cov"] / d["grad_norm_sq"])
    assert [h["step"] for h in d["history"]] == list(range(1, d["steps"] + 1))
    assert d["history"][-1]["b_simple"] == pytest.approx(d["b_simple"])
    assert d["status"] in ("ok", "noisy") and d["status"] == ("ok" if d["converged"] else "noisy")
    err = capsys.readouterr().err
    # measured at initialisation: labelled so, and never compared with the batch as if it were the critical batch
    assert "B_simple at initialisation = " in err and "B_simple at initialisation ~" in err
    assert "critical batch of order" not in err and "near it" not in err


def test_noise_noisy_estimate_warns_in_one_line(tmp_path, capsys) -> None:
    out = tmp_path / "n.json"
    rc = main(["noise", "-b", "32", "--steps", "3", "--rel-ci", "0.01", "--json", str(out)])
    assert rc == 0
    d = json.loads(out.read_text())
    assert d["status"] == "noisy" and d["converged"] is False and d["steps"] == 3 and d["micro_batch_size"] == 8
    err = capsys.readouterr().err
    assert "warning:" in err and "wider than" in err


def test_noise_after_training_steps(tmp_path) -> None:
    out = tmp_path / "n.json"
    rc = main(["noise", "-b", "32", "--steps", "5", "--train-steps", "10", "--lr", "0.01", "--json", str(out), "-q"])
    assert rc == 0
    d = json.loads(out.read_text())
    assert d["train_steps"] == 10 and "after 10 training steps" in d["reading"]


def test_train_measure_noise(tmp_path, capsys) -> None:
    out = tmp_path / "t.json"
    rc = main(["train", "-b", "32", "--epochs", "2", "--measure-noise", "--json", str(out)])
    assert rc == 0
    d = json.loads(out.read_text())
    assert d["micro_batch_size"] == 16 and d["accumulation_steps"] == 2  # the documented default split
    assert len(d["history"]) == 2 and all(r["b_simple"] > 0 for r in d["history"])
    assert [h["b_simple"] for h in d["b_simple_history"]] == [r["b_simple"] for r in d["history"]]
    assert d["b_simple"] == d["history"][-1]["b_simple"] and d["b_simple_skipped_steps"] == 0
    assert "B_simple (gradient noise scale, EMA)" in capsys.readouterr().err


def test_train_measure_noise_keeps_a_given_split(tmp_path) -> None:
    out = tmp_path / "t.json"
    rc = main(["train", "-b", "30", "-m", "8", "--steps", "6", "--measure-noise", "--json", str(out), "-q"])
    assert rc == 0
    d = json.loads(out.read_text())
    assert d["micro_batch_size"] == 8 and d["accumulation_steps"] == 4 and d["b_simple"] is not None


BAD = [
    (["noise", "-b", "16", "-m", "16"], ">= 2 micro-batches per batch"),
    (["noise", "-b", "16", "-m", "32"], ">= 2 micro-batches per batch"),
    (["noise", "-b", "1"], "at least 2 samples"),
    (["noise", "-b", "5000"], "larger than the training set"),
    (["noise", "--rel-ci", "0"], "--rel-ci: must be a number in (0, 1), got 0.0; give e.g. 0.1 for ±10 %"),
    (["noise", "--rel-ci", "1.5"], "--rel-ci: must be a number in (0, 1), got 1.5"),
    (["noise", "--rel-ci", "nan"], "--rel-ci: must be a finite number"),
    (["noise", "--rel-ci", "ten"], "--rel-ci: 'ten' is not a number; give a fraction below 1"),
    (["noise", "--steps", "0"], "must be a positive integer"),
    (["noise", "--train-steps", "-1"], "must be an integer >= 0"),
    (["noise", "--lr", "0.1"], "give --train-steps > 0"),  # the CLI names its flags
    (["noise", "--workload", "demo:nope"], "unknown demo"),
    (["noise", "--precision", "fp16"], "fp16 training needs CUDA"),
    (["noise", "--device", "tpu"], "is not understood"),
    (["train", "--measure-noise", "-b", "16", "-m", "16"], "--measure-noise needs >= 2 micro-batches"),
    (["train", "--measure-noise", "-b", "1"], "at least 2 samples"),
]


@pytest.mark.parametrize(("argv", "msg"), BAD)
def test_bad_input_one_line_exit_2(argv: list[str], msg: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc_info:
        raise SystemExit(main([*argv, "--steps", "2", "-q"] if "--steps" not in argv else [*argv, "-q"]))
    assert exc_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert msg in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_json_path_is_a_directory(tmp_path, capsys) -> None:
    rc = main(["noise", "--steps", "2", "--json", str(tmp_path), "-q"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert "is a directory" in err and len(err.splitlines()) == 1


def test_interrupted_noise_keeps_every_measured_step_and_says_interrupted(tmp_path, monkeypatch) -> None:
    """Issue 13.8: 306 steps done must mean 306 in the file (it was written at most every 2 s: 82 of 306), with
    status "interrupted", not "running"."""
    import os
    import signal
    import time

    from batchfit import noise

    real_measure = noise._measure
    calls = []

    def measure_then_ctrl_c(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        if len(calls) == 8:  # a real Ctrl-C during the 8th step: 7 steps were measured
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler raises KeyboardInterrupt before this ends
        return real_measure(*args, **kwargs)

    monkeypatch.setattr(noise, "_measure", measure_then_ctrl_c)
    out = tmp_path / "noise.json"
    rc = main(["noise", "-b", "32", "--steps", "50", "--rel-ci", "0.001", "--json", str(out), "-q"])
    assert rc == 130
    d = json.loads(out.read_text())
    assert d["status"] == "interrupted"
    assert d["steps"] == 7 and [h["step"] for h in d["history"]] == list(range(1, 8))
