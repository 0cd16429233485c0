from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest

from batchfit.cli import main


def test_train_writes_json(tmp_path, capsys) -> None:
    out = tmp_path / "r.json"
    t0 = time.perf_counter()
    rc = main(["train", "-b", "64", "-m", "16", "--epochs", "2", "--warmup", "5", "--json", str(out), "-q"])
    wall = time.perf_counter() - t0
    assert rc == 0
    d = json.loads(out.read_text())
    assert d["batch_size"] == 64 and d["micro_batch_size"] == 16 and d["accumulation_steps"] == 4
    assert d["lr_rule"] == "adam-sqrt" and d["status"] == "ok" and d["diverged"] is False
    assert len(d["history"]) == 2
    for rec in d["history"]:
        assert {"epoch", "step", "train_loss", "val_loss", "val_metrics", "samples_per_s", "seconds"} <= set(rec)
    assert d["peak_memory_bytes"] > 0
    # 2 epochs of the 1437 digits at 64 (drop_last): 22 steps each; the clocks run forward inside the call
    assert d["steps"] == 44 and d["samples"] == 44 * 64 and [r["step"] for r in d["history"]] == [22, 44]
    assert 0 < d["train_seconds"] <= d["seconds"] <= wall
    assert 0 < d["history"][0]["seconds"] <= d["history"][1]["seconds"] <= d["seconds"]


def test_train_out_dir_and_fixed_lr(tmp_path) -> None:
    rc = main(["train", "--steps", "3", "--lr", "0.01", "--out", str(tmp_path), "-q"])
    assert rc == 0
    d = json.loads((tmp_path / "train.json").read_text())
    assert d["lr"] == pytest.approx(0.01) and d["lr_rule"] == "fixed" and d["steps"] == 3


BAD = [
    (["--batch-size", "0"], "must be a positive integer, got 0"),
    (["--batch-size", "-4"], "must be a positive integer, got -4"),
    (["--batch-size", "3.5"], "not a whole number"),
    (["--batch-size", "5000"], "larger than the training set"),
    (["--batch-size", "8", "--micro-batch-size", "16"], "--micro-batch-size 16 is larger than --batch-size 8"),
    (["--workload", "demo:nope"], "unknown demo"),
    (["--workload", "missing_file.py:make"], "does not exist"),
    (["--workload", "json:nothing"], "has no attribute"),
    (["--precision", "fp16"], "fp16 training needs CUDA"),
    (["--lr", "-1"], "must be a positive number"),
    (["--lr", "nan"], "must be a finite number"),
    (["--warmup", "2.5"], "whole number of steps"),
    (["-O", "hidden"], "key=value"),
    (["-O", "hidden=0"], "hidden must be"),
    (["--seed", "1000000000000000000000000000000"], "--seed: must be an integer in [0, 4294967295]"),
    (["--seed", "-1"], "--seed: must be an integer in [0, 4294967295], got -1"),
    (["--memory-budget", "1e400"], "--memory-budget"),
    (["--memory-budget", "nan"], "--memory-budget"),
    (["--memory-budget", "inf"], "--memory-budget"),
    (["--memory-budget", "-1"], "--memory-budget"),
    (["--bogus"], "see 'batchfit train --help'"),
]


@pytest.mark.parametrize(("argv", "msg"), BAD)
def test_bad_input_one_line_exit_2(argv: list[str], msg: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc_info:
        rc = main(["train", "--steps", "1", "-q", *argv])
        raise SystemExit(rc)
    assert exc_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert msg in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def _write(tmp_path, body: str):  # noqa: ANN202
    f = tmp_path / "wl.py"
    f.write_text(textwrap.dedent(body))
    return f


def test_factory_raises_and_non_scalar_loss_and_nan_data(tmp_path, capsys) -> None:
    f = _write(tmp_path, """
        import torch
        import torch.nn.functional as F
        from batchfit.demos import digits_mlp
        def raises():
            raise ValueError("bad config")
        def vector_loss():
            wl = digits_mlp()
            wl.loss_fn = lambda out, y: F.cross_entropy(out, y, reduction="none")
            return wl
        def nan_data():
            wl = digits_mlp()
            wl.train_data.tensors[0][3, 5] = float("nan")
            return wl
    """)
    for factory, msg in (("raises", "raised ValueError: bad config"), ("vector_loss", "scalar"),
                         ("nan_data", "NaN")):
        rc = main(["train", "--steps", "1", "-q", "-w", f"{f}:{factory}"])
        err = capsys.readouterr().err.strip()
        assert rc == 2, factory
        assert msg in err and len(err.splitlines()) == 1


def test_debug_shows_traceback_subprocess() -> None:
    cmd = [sys.executable, "-m", "batchfit", "train", "-w", "demo:nope", "-q"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    p = subprocess.run([*cmd, "--debug"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" in p.stderr


def test_no_command_is_usage_error(capsys) -> None:
    assert main([]) == 2


def test_library_keywords_become_this_subcommands_flags() -> None:
    from batchfit.cli import _subparser, build_parser
    from batchfit.cli._common import to_flags

    train = _subparser(build_parser(), "train")
    sweep = _subparser(build_parser(), "sweep")
    assert to_flags("micro_batch_size 16 is larger than batch_size 8", train) == \
        "--micro-batch-size 16 is larger than --batch-size 8"
    assert to_flags("seed must be an integer in [0, 9], got -1", train) == "--seed must be an integer in [0, 9], got -1"
    assert to_flags("unknown precision 'x'; choose one of: fp32", train) == \
        "unknown --precision 'x'; choose one of: fp32"
    # prose is left alone; keywords the subcommand has no flag for stay keywords
    assert to_flags("lower the lr or add warm-up; the seed is fixed", train) == \
        "lower the lr or add warm-up; the seed is fixed"
    assert to_flags("storage must be a URL", train) == "storage must be a URL"
    assert to_flags("storage must be a URL; study_name x", sweep) == "--store must be a URL; --study x"
    # a message that already shows both spellings says the flag once
    assert to_flags("rerun with --retry-failed (retry_failed=True)", sweep) == "rerun with --retry-failed"


def test_library_error_reaches_the_user_in_flag_words(capsys) -> None:
    # the engine clamps an impossible batch with a warning naming batch_size; the CLI prints it as one line in flags
    rc = main(["train", "-b", "1000000000000", "--no-drop-last", "--steps", "1", "-q"])
    err = capsys.readouterr().err.strip()
    assert rc in (0, 2) and "--batch-size" in err and "batch_size" not in err
    assert len(err.splitlines()) == 1 and "UserWarning" not in err


def test_wide_tables_when_not_a_terminal(capsys) -> None:
    from batchfit.cli._common import WIDE, console

    con = console()
    assert not con.is_terminal and con.width >= WIDE  # stderr is captured here, as in a log file or CI
