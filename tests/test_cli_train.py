from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from batchfit.cli import main


def test_train_writes_json(tmp_path, capsys) -> None:
    out = tmp_path / "r.json"
    rc = main(["train", "-b", "64", "-m", "16", "--epochs", "2", "--warmup", "5", "--json", str(out), "-q"])
    assert rc == 0
    d = json.loads(out.read_text())
    assert d["batch_size"] == 64 and d["micro_batch_size"] == 16 and d["accumulation_steps"] == 4
    assert d["lr_rule"] == "adam-sqrt" and d["status"] == "ok" and d["diverged"] is False
    assert len(d["history"]) == 2
    for rec in d["history"]:
        assert {"epoch", "step", "train_loss", "val_loss", "val_metrics", "samples_per_s", "seconds"} <= set(rec)
    assert d["peak_memory_bytes"] > 0 and d["seconds"] > 0


def test_train_out_dir_and_fixed_lr(tmp_path) -> None:
    rc = main(["train", "--steps", "3", "--lr", "0.01", "--out", str(tmp_path), "-q"])
    assert rc == 0
    d = json.loads((tmp_path / "train.json").read_text())
    assert d["lr"] == pytest.approx(0.01) and d["lr_rule"] == "fixed" and d["steps"] == 3


BAD = [
    (["--batch-size", "0"], "not positive"),
    (["--batch-size", "-4"], "not positive"),
    (["--batch-size", "3.5"], "not a whole number"),
    (["--batch-size", "5000"], "larger than the training set"),
    (["--batch-size", "8", "--micro-batch-size", "16"], "--micro-batch-size 16 is larger than --batch-size 8"),
    (["--workload", "demo:nope"], "unknown demo"),
    (["--workload", "missing_file.py:make"], "does not exist"),
    (["--workload", "json:nothing"], "has no attribute"),
    (["--precision", "fp16"], "fp16 training needs CUDA"),
    (["--lr", "-1"], "not a positive finite number"),
    (["--warmup", "2.5"], "whole number of steps"),
    (["-O", "hidden"], "key=value"),
    (["-O", "hidden=0"], "hidden must be"),
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
