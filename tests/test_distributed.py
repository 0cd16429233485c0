"""Data parallelism on the CPU: 2 processes, the gloo backend, every wait bounded by a timeout (a hang fails)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ranks
from batchfit import distributed
from batchfit.cli import main
from batchfit.demos import ArrayDataset
from batchfit.engine import train
from batchfit.errors import ConfigError
from batchfit.finder import MemoryTrials, find_batch_size
from batchfit.workload import Workload
from conftest import make_tiny_workload
from ranks import WORLD


def _spawn(fn_name: str, tmp_path: Path, *args: Any) -> list[Any]:
    """Run this module's ``fn_name(rank, *args)`` on 2 gloo ranks (:func:`ranks.spawn`)."""
    return ranks.spawn(__name__, fn_name, tmp_path, *args)


class _Grads:
    """Capture the gradients the optimizer will use (after DDP's all-reduce), and count DDP's all-reduces."""

    def __init__(self) -> None:
        self.grads: list[list[torch.Tensor]] = []
        self.allreduces = 0

    def on_train_start(self, state: Any) -> None:
        if distributed.is_ddp(state.model):
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            def count(state, bucket):  # noqa: ANN001, ANN202 (DDP rejects string annotations here)
                self.allreduces += 1
                return default_hooks.allreduce_hook(None, bucket)

            state.model.register_comm_hook(None, count)

    def on_before_optimizer_step(self, state: Any) -> None:
        self.grads.append([p.grad.detach().clone() for p in state.model.parameters()])

    def on_train_end(self, state: Any, result: Any) -> None:
        self.params = [p.detach().clone() for p in state.model.parameters()]


def _ddp_train(rank: int) -> dict[str, Any]:
    wl = make_tiny_workload(n=96, optimizer="sgd")
    cap = _Grads()
    # per rank: batch 12 in micro-batches 5 + 5 + 2 (uneven); global batch 24; 3 optimizer steps
    r = train(wl, batch_size=12, micro_batch_size=5, world_size=WORLD, steps=3, lr=0.1, callbacks=[cap])
    return {"grads": cap.grads, "params": cap.params, "allreduces": cap.allreduces, "result": r.to_dict()}


def test_ddp_gradients_equal_single_process_big_batch(tmp_path: Path) -> None:
    ranks = _spawn("_ddp_train", tmp_path)
    cap = _Grads()
    single = train(make_tiny_workload(n=96, optimizer="sgd"), batch_size=24, steps=3, lr=0.1, callbacks=[cap])
    for rank in ranks:
        # the accumulated, all-reduced gradient of each step is the big-batch gradient; so are the weights after
        for step_ddp, step_single in zip(rank["grads"], cap.grads, strict=True):
            for g_ddp, g_single in zip(step_ddp, step_single, strict=True):
                torch.testing.assert_close(g_ddp, g_single, atol=1e-6, rtol=1e-5)
        for p_ddp, p_single in zip(rank["params"], cap.params, strict=True):
            torch.testing.assert_close(p_ddp, p_single, atol=1e-6, rtol=1e-5)
        # one all-reduce per optimizer step (one bucket for this small model): none on the micro-steps before
        assert rank["allreduces"] == 3
        res = rank["result"]
        assert (res["batch_size"], res["micro_batch_size"], res["accumulation_steps"], res["world_size"]) == \
            (24, 5, 3, 2)
        assert res["samples"] == single.samples == 72
        # the LR rule saw the global batch; the losses are the mean over both ranks' samples
        assert res["history"][-1]["train_loss"] == pytest.approx(single.history[-1]["train_loss"], rel=1e-5)
        assert res["history"][-1]["val_loss"] == pytest.approx(single.history[-1]["val_loss"], rel=1e-5)


def _noise_history(world: int) -> list[float | None]:
    from batchfit.noise import NoiseCallback

    cb = NoiseCallback(beta=0.0, flush_every=1)  # beta 0: each record is its step's own estimate
    r = train(make_tiny_workload(n=480, optimizer="sgd"), batch_size=64 // world, micro_batch_size=8,
              world_size=world, steps=30, lr=0.01, eval_every=10, callbacks=[cb])
    return [h["b_simple"] for h in r.extras["b_simple_history"]]


def _ddp_noise(rank: int) -> list[float | None]:
    return _noise_history(WORLD)


def test_noise_scale_under_ddp_equals_single_process(tmp_path: Path) -> None:
    # The same 8 micro-batches of 8 per step: 4 on each rank (their local gradients, before the all-reduce) or
    # all 8 in one process. Every rank must report exactly the single-process B_simple.
    single = _noise_history(1)
    assert len(single) >= 3 and all(v is not None and v > 0 for v in single)
    for ranked in _spawn("_ddp_noise", tmp_path):
        assert ranked == pytest.approx(single, rel=1e-6)


def _probe_history(world: int) -> list[float | None]:
    from batchfit.noise import noise_scale

    # micro-batch 16 of a batch of 32: in one process two micro-batches; on 2 ranks each rank's shard is one
    r = noise_scale(make_tiny_workload(n=480), batch_size=32, micro_batch_size=16 if world == 1 else None,
                    steps=12, min_steps=12, seed=3)
    assert r.batch_size == 32 and r.micro_batch_size == 16
    return [h["b_simple"] for h in r.history]


def _ddp_probe(rank: int) -> list[float | None]:
    return _probe_history(WORLD)


def test_noise_probe_under_torchrun_uses_the_ranks_as_micro_batches(tmp_path: Path) -> None:
    # The same batches, split into the same two halves: one process with 2 micro-batches, or 2 ranks each
    # holding one half (its local gradient before the sum over ranks). Every rank must read the same B_simple.
    single = _probe_history(1)
    assert len(single) >= 3 and all(v is not None for v in single)
    for ranked in _spawn("_ddp_probe", tmp_path):
        assert ranked == pytest.approx(single, rel=1e-6)


def _seq_workload(long: bool | None = None) -> Workload:
    """Bag-of-embeddings classifier whose worst-case batch (``sample_batch``) is 32x longer on rank 1: the ranks'
    data differ, so only rank 1 runs out of memory at a size rank 0 handles."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 50, (64, 16), generator=g), torch.randint(0, 3, (64,), generator=g)

    def model_fn() -> nn.Module:
        return nn.Sequential(nn.Embedding(50, 32), _Mean(), nn.Linear(32, 3))

    def sample_batch(b: int) -> tuple[torch.Tensor, torch.Tensor]:
        length = 512 if (distributed.rank() == 1 if long is None else long) else 16
        return torch.randint(0, 50, (b, length), generator=torch.Generator().manual_seed(b)), y[:b]

    return Workload(name="seq", model_fn=model_fn, optimizer_fn=lambda p, lr: torch.optim.SGD(p, lr=lr),
                    loss_fn=F.cross_entropy, train_data=ArrayDataset(x, y), val_data=ArrayDataset(x[:16], y[:16]),
                    sample_batch=sample_batch, base_batch_size=8, base_lr=0.1)


class _Mean(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


def _peak(b: int, long: bool) -> int:
    trials = MemoryTrials(_seq_workload(long), torch.device("cpu"), "fp32", 0, limit=1 << 40, enforce_bytes=1 << 40)
    rec = trials.memory_trial(b, "probe")
    assert rec["ok"]
    return rec["peak_bytes"]


def _ddp_find(rank: int, budget: int) -> dict[str, Any]:
    return find_batch_size(_seq_workload(), memory_budget=budget, throughput=True, batch_size_cap=8).to_dict()


def test_finder_one_rank_out_of_memory_makes_every_rank_back_off(tmp_path: Path) -> None:
    long1, long2, short2 = _peak(1, True), _peak(2, True), _peak(2, False)
    budget = (long1 + long2) // 2
    assert short2 < budget  # rank 0 alone would take batch 2 (and more); rank 1 fits batch 1 but not batch 2
    r0, r1 = _spawn("_ddp_find", tmp_path, budget)
    first = r0["probes"][0]
    assert first["batch_size"] == 2 and not first["ok"]
    assert first["error"].startswith("rank 1:") and "memory budget exceeded" in first["error"]
    assert r0["max_batch_size"] == r1["max_batch_size"] == 1
    assert r0["recommended_batch_size"] == r1["recommended_batch_size"] == 1
    assert [{k: v for k, v in p.items() if k != "seconds"} for p in r0["probes"]] == \
        [{k: v for k, v in p.items() if k != "seconds"} for p in r1["probes"]]
    # rank 0 on its own goes further in the same budget: the back-off came from rank 1
    alone = find_batch_size(_seq_workload(long=False), memory_budget=budget, throughput=False, batch_size_cap=8)
    assert alone.max_batch_size > 1


def test_world_size_without_process_group_is_an_error(tiny_workload: Any) -> None:
    with pytest.raises(ConfigError, match="torchrun --nproc-per-node 2"):
        train(tiny_workload, batch_size=8, world_size=2, steps=1)


def test_report_refuses_torchrun(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                 tmp_path: Path) -> None:
    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    rc = main(["report", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "does not run under torchrun; run it in one process" in err[0]
    assert "train, find, noise, sweep, tune" in err[0]


_torchrun = ranks.torchrun


@pytest.mark.slow
def test_torchrun_cli_train_matches_single_process(tmp_path: Path) -> None:
    common = ["train", "-w", "demo:digits-mlp", "-b", "64", "-m", "16", "--epochs", "1"]
    # the two torchrun jobs and the single process are independent: started together (ranks.torchrun_start)
    jobs = [ranks.torchrun_start([*common, "--json", "ddp.json"], tmp_path),
            ranks.torchrun_start(["train", "-w", "demo:digits-mlp", "-b", "33", "--steps", "1", "-q"], tmp_path)]
    try:
        single_rc = main([*common, "-q", "--json", str(tmp_path / "one.json")])
    finally:
        proc, bad = ranks.finish_all(jobs)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.count("batchfit train: digits-mlp") == 1  # only rank 0 prints
    ddp = json.loads((tmp_path / "ddp.json").read_text())
    assert (ddp["world_size"], ddp["batch_size"], ddp["micro_batch_size"], ddp["accumulation_steps"]) == \
        (2, 64, 16, 2)
    assert single_rc == 0
    one = json.loads((tmp_path / "one.json").read_text())
    assert one["world_size"] == 1 and one["accumulation_steps"] == 4 and ddp["lr"] == one["lr"]
    assert ddp["steps"] == one["steps"] and ddp["samples"] == one["samples"]
    assert ddp["history"][-1]["val_loss"] == pytest.approx(one["history"][-1]["val_loss"], rel=1e-5)
    assert bad.returncode != 0 and "does not split evenly over 2 ranks" in bad.stderr


# -- sweep and tune: rank 0 decides, every rank trains (distributed.run_led) --------------------------------------


@pytest.mark.slow
def test_torchrun_sweep_stops_on_a_rank_0_error_or_a_followers_failure_without_a_hang(tmp_path: Path) -> None:
    # two independent jobs, started together (ranks.torchrun_start), each timed from the start
    (tmp_path / "wl_late.py").write_text(
        "import os\n"
        "from batchfit.demos import digits_mlp\n"
        "def make():\n"
        "    wl = digits_mlp()\n"
        "    seen = {'n': 0}\n"
        "    def forward(model, batch):\n"
        "        x = batch[0]\n"
        "        if os.environ['RANK'] == '1' and x.shape[0] >= 32 and model.training:\n"
        "            seen['n'] += 1\n"
        "            if seen['n'] > 3:\n"
        "                raise RuntimeError('boom on rank 1')\n"
        "        return model(x)\n"
        "    wl.forward = forward\n"
        "    return wl\n")
    t0 = time.monotonic()
    bad, late = ranks.finish_all([
        ranks.torchrun_start(["sweep", "-w", "demo:digits-mlp", "-b", "33,64", "--budget", "steps:2", "--out", "o1",
                              "-q"], tmp_path),
        ranks.torchrun_start(["sweep", "-w", "wl_late.py:make", "-b", "32,64", "--budget", "steps:6", "--no-noise",
                              "--micro-batch-size", "64", "--out", "o2", "-q"], tmp_path)])  # rank 1 fails at 64 only
    # rank 0's own check fails before any work: it prints one line, the follower leaves silently with its code
    assert bad.returncode != 0 and bad.ended - t0 < 60
    errors = [ln for ln in bad.stderr.splitlines() if ": error:" in ln]
    assert errors == ["batchfit sweep (rank 0): error: batch size(s) 33 do not split evenly over 2 ranks; give "
                      "multiples of 2"]
    # a trial that fails on the follower only (mid-run) ends the job with that rank's one line, not a hang; the
    # trials done before it are kept in the store
    assert late.returncode != 0 and late.ended - t0 < 90
    lines = [ln for ln in late.stderr.splitlines() if "boom on rank 1" in ln]
    assert lines and lines[0].startswith("batchfit sweep (rank 1): error:") and "Traceback" not in lines[0]
    from batchfit.study import load_results

    kept = load_results(f"sqlite:///{tmp_path / 'o2' / 'batchfit.db'}")
    assert [t.batch_size for t in kept.trials if t.status == "ok"] == [32]  # batch 32 finished before the failure


def test_a_lead_sends_the_workload_as_a_reference_with_its_picklable_changes(tiny_workload: Any) -> None:
    import dataclasses

    from batchfit.distributed import _as_ref, _resolve, _WorkloadRef

    assert _as_ref(tiny_workload, tiny_workload) == _WorkloadRef()
    moved = dataclasses.replace(tiny_workload, base_lr=0.123)
    ref = _as_ref(moved, tiny_workload)
    assert ref == _WorkloadRef((("base_lr", 0.123),))
    assert _resolve(ref, tiny_workload).base_lr == 0.123 and tiny_workload.base_lr != 0.123
    assert _as_ref(7, tiny_workload) == 7  # anything else is sent as it is
    with pytest.raises(RuntimeError, match="derive it inside the job function"):
        _as_ref(dataclasses.replace(tiny_workload, forward=lambda m, b: m(b[0])), tiny_workload)
    # without torchrun (or outside a lead) a job runs here, once
    calls = []
    assert distributed.everywhere(lambda x: calls.append(x) or x * 2, 21) == 42 and calls == [21]
    with distributed.lead(tiny_workload) as leader:
        assert not distributed.leading() and leader.workload is tiny_workload


@pytest.mark.parametrize("kwargs, match", [
    ({"sharpness": True}, "sharpness does not run under torchrun"),
    ({"batch_schedule_check": True}, "the batch-schedule check does not run under torchrun"),
    ({"batch_sizes": [16, 33]}, r"batch size\(s\) 33 do not split evenly over 2 ranks"),
    ({"parallel": "zero3"}, "parallel"),
])
def test_tune_under_torchrun_refuses_what_it_cannot_do_before_any_work(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kwargs: dict[str, Any], match: str) -> None:
    """Rank 0's own checks under 2 ranks (the process group faked: nothing is sent): one ConfigError, nothing
    measured."""
    from batchfit.tuning import tune

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr("batchfit.finder.find_batch_size", lambda *a, **k: pytest.fail("work began"))
    with pytest.raises(ConfigError, match=match):
        tune(make_tiny_workload(), out_dir=tmp_path / "o", budget="steps:2", **kwargs)
    assert not (tmp_path / "o").exists()
