"""Sharded data parallelism (FSDP2) on the CPU: 2 gloo ranks, every wait bounded by a timeout (a hang fails)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ranks
from batchfit import distributed, sharding
from batchfit.cli import main
from batchfit.demos import ArrayDataset, TinyLM, tiny_lm
from batchfit.errors import ConfigError
from batchfit.workload import Workload
from ranks import WORLD


def _spawn(fn_name: str, tmp_path: Path, *args: Any) -> list[Any]:
    """Run this module's ``fn_name(rank, *args)`` on 2 gloo ranks (:func:`ranks.spawn`)."""
    return ranks.spawn(__name__, fn_name, tmp_path, *args)


def _lm() -> Workload:
    return tiny_lm(num_sequences=256, seq_len=16, vocab=16, val_sequences=32, width=32, depth=2, heads=2,
                   batch_size=16)


# -- 1. training: 2 sharded ranks = 1 process at the same global batch; 3. noise from shards ----------------------


def _losses(r: Any) -> list[float]:
    return [h["train_loss"] for h in r.history]


def _noise_step(world: int) -> tuple[float, float, int]:
    """One noise-probe step at fixed parameters on the same 16 sequences: 2 ranks x 2 micro-batches of 4, or one
    process whose 2 micro-batches of 8 are the same global micro-batches (every rank's i-th micro-batch)."""
    from batchfit import noise
    from batchfit.runtime import seed_everything
    from batchfit.step import TrainStep, build_model

    wl = _lm()
    x, y = wl.sample_batch(16)
    plan = noise._probe_plan(wl, batch_size=16, micro_batch_size=4 if world > 1 else 8, steps=1, min_steps=1,
                             device="cpu", precision="fp32", seed=0, rel_ci=0.1, train_steps=0, lr=None,
                             method="hooks", parallel="fsdp")
    seed_everything(0)
    model = build_model(wl)
    if world > 1:
        sharding.wrap_fsdp(model, torch.device("cpu"), "fp32", wl.shard)
        meter: Any = noise._ShardedMeter(model, world)
        rows = distributed.shard(torch.arange(16))
    else:
        meter = noise._make_meter("hooks", model, 1)
        rows = torch.tensor([0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15])
    step = TrainStep(wl, model, None, device=torch.device("cpu"), micro_batch_size=plan.micro_batch_size,
                     world_size=world, on_micro=[lambda mb: meter.end_micro(mb.samples, mb.last)])
    step.sync_every_micro = plan.sharded
    return noise._measure(step, meter, (x[rows], y[rows]), 16, plan, 1.0)


def _fsdp_train(rank: int) -> dict[str, Any]:
    from batchfit.engine import train
    from batchfit.noise import noise_scale

    r = train(_lm(), batch_size=8, micro_batch_size=4, steps=20, eval_every=1, world_size=WORLD, parallel="fsdp")
    probe = noise_scale(_lm(), batch_size=16, steps=3, min_steps=3, parallel="fsdp")
    torch.manual_seed(0)
    model = sharding.wrap_fsdp(TinyLM(16, 16, width=32, depth=2, heads=2), torch.device("cpu"), "fp32",
                               ("TransformerBlock",))
    return {"losses": _losses(r), "val": r.history[-1]["val_loss"], "result": r.to_dict(),
            "param_sq": sharding.sharded_sq_norm(list(model.parameters())),
            "noise_step": _noise_step(WORLD), "probe": (probe.b_simple, probe.micro_batch_size, probe.steps)}


@pytest.mark.slow
def test_fsdp_loss_curve_and_noise_equal_single_process(tmp_path: Path) -> None:
    from batchfit.engine import train

    single = train(_lm(), batch_size=16, steps=20, eval_every=1)
    ranks = _spawn("_fsdp_train", tmp_path)
    for rank in ranks:
        # 20 steps in float32: 2 ranks x batch 8 (2 micro-batches of 4, gradients reduce-scattered once a step)
        # against one process at batch 16
        assert len(rank["losses"]) == 20
        assert rank["losses"] == pytest.approx(_losses(single), abs=1e-4)
        assert rank["val"] == pytest.approx(single.history[-1]["val_loss"], abs=1e-4)
        res = rank["result"]
        assert (res["batch_size"], res["micro_batch_size"], res["accumulation_steps"], res["world_size"]) == \
            (16, 4, 2, 2)
        assert res["parallel"] == "fsdp" and res["lr"] == single.lr
        # B_simple's squared norms from the shards equal one process's over the same global micro-batches
        small, big, k = rank["noise_step"]
        s1, b1, k1 = _noise_step(1)
        assert k == k1 == 2
        assert small == pytest.approx(s1, rel=1e-5) and big == pytest.approx(b1, rel=1e-5)
        torch.manual_seed(0)
        whole = TinyLM(16, 16, width=32, depth=2, heads=2)
        whole_sq = sum(float(p.detach().double().pow(2).sum()) for p in whole.parameters())
        assert rank["param_sq"] == pytest.approx(whole_sq, rel=1e-12)  # the full norm from the shards
        b_simple, micro, steps = rank["probe"]
        assert micro == 4 and steps == 3 and b_simple > 0
    assert ranks[0]["losses"] == ranks[1]["losses"]


# -- 2. the finder: an out-of-memory on one rank, mid-backward ----------------------------------------------------

INJECT_AT = 12  # rank 1 runs out of memory in the backward of any micro-batch this large


class _Inject(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.rows = x.shape[0]
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        if ctx.rows >= INJECT_AT and distributed.rank() == 1 and os.environ.get("BATCHFIT_TEST_INJECT") == "1":
            raise torch.OutOfMemoryError("CUDA out of memory (injected on rank 1 mid-backward)")
        return grad


class _Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.lin(_Inject.apply(x)))


class _Net(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.inp = nn.Linear(8, width)
        self.blocks = nn.ModuleList(_Block(width) for _ in range(3))
        self.out = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for b in self.blocks:
            x = b(x)
        return self.out(x)


def _inject_workload() -> Workload:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = (x[:, :3] * torch.tensor([1.0, -1.0, 0.5])).argmax(1)
    return Workload(name="inject", model_fn=_Net, optimizer_fn=lambda p, lr: torch.optim.Adam(p, lr=lr),
                    loss_fn=F.cross_entropy, train_data=ArrayDataset(x, y), val_data=ArrayDataset(x[:32], y[:32]),
                    base_batch_size=16, base_lr=1e-2, shard=("_Block",), grad_clip=1.0)


def _fsdp_oom(rank: int) -> dict[str, Any]:
    from batchfit import memory
    from batchfit.finder import find_batch_size

    os.environ["BATCHFIT_TEST_INJECT"] = "1"
    from test_distributed import _seq_workload

    found = find_batch_size(_inject_workload(), memory_budget="1GiB", parallel="fsdp", throughput=True,
                            batch_size_cap=64).to_dict()
    # rank 1's worst-case batches are 32x longer: only rank 1 exceeds the (CPU, counted) budget
    budgeted = find_batch_size(_seq_workload(), memory_budget=300_000, parallel="fsdp", throughput=False,
                               batch_size_cap=8).to_dict()
    # the same, by hand: one guarded step at batch 32 fails on rank 1 mid-backward, every rank backs off, the model
    # is put back in a legal state, and the same model and optimizer train 40 more steps
    wl = _inject_workload()
    keeper = sharding.ShardedKeeper(wl, torch.device("cpu"), 0)
    model = keeper.get()
    guard = keeper.guard
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = wl.train_data.tensors

    def step(rows: slice) -> float:
        loss = F.cross_entropy(model(x[rows]), y[rows])
        loss.backward()
        guard.check()
        opt.step()
        opt.zero_grad()
        return float(loss)

    guard.active = True
    attempt = memory.try_oom(lambda: step(slice(0, 32)), model, opt)
    guard.after_oom(attempt.oom)
    error = None if attempt.ok else str(attempt.oom)
    keeper.recover(model)
    lo, hi = rank * 4, rank * 4 + 4  # each rank its own 4 rows of every batch of 8
    losses = [step(slice(lo + 8 * (i % 30), hi + 8 * (i % 30))) for i in range(40)]
    guard.active = False
    full = [p.full_tensor().detach().clone() for p in model.parameters()]
    keeper.close()
    return {"found": found, "budgeted": budgeted, "error": error, "losses": losses, "params": full}


@pytest.mark.slow
def test_fsdp_finder_one_rank_oom_mid_backward_all_back_off(tmp_path: Path) -> None:
    r0, r1 = _spawn("_fsdp_oom", tmp_path)
    f0, f1 = r0["found"], r1["found"]
    assert f0["max_batch_size"] == f1["max_batch_size"] == INJECT_AT - 1
    assert f0["recommended_batch_size"] == f1["recommended_batch_size"]
    assert [p["batch_size"] for p in f0["probes"]] == [p["batch_size"] for p in f1["probes"]]
    failed = [p for p in f0["probes"] if not p["ok"]]
    assert failed and all(p["batch_size"] >= INJECT_AT for p in failed)
    assert failed[0]["error"].startswith("rank 1:") and "injected" in failed[0]["error"]
    assert f0["world_size"] == 2 and f0["parallel"] == "fsdp"
    mm = f0["sharding"]
    assert mm["world_size"] == 2 and mm["largest_unit_bytes"] == (16 * 16 + 16) * 4
    assert mm["sharded_state_bytes"] > 0 and set(mm["per_rank_max_by_world"]) >= {"1", "2", "4", "8"}
    assert f0["global_batch"]["batch_size"] == 16 and f0["global_batch"]["world_size"] == 2
    b0, b1 = r0["budgeted"], r1["budgeted"]
    assert b0["max_batch_size"] == b1["max_batch_size"] >= 1
    assert [{k: v for k, v in p.items() if k != "seconds"} for p in b0["probes"]] == \
        [{k: v for k, v in p.items() if k != "seconds"} for p in b1["probes"]]
    over = [p for p in b0["probes"] if not p["ok"]]
    assert over and all(p["error"].startswith("rank 1:") for p in over)
    # the hand-made step: both ranks backed off (rank 0 because of rank 1), then trained 40 steps
    assert "injected" in r1["error"] and "every rank backs off" in r0["error"]
    for r in (r0, r1):
        assert len(r["losses"]) == 40 and all(torch.isfinite(torch.tensor(r["losses"])))
        assert sum(r["losses"][-10:]) < sum(r["losses"][:10])
    for a, b in zip(r0["params"], r1["params"], strict=True):
        torch.testing.assert_close(a, b)


# -- units, checks, the global batch (one process) ---------------------------------------------------------------


def test_shard_units_default_named_and_callable() -> None:
    model = TinyLM(vocab=16, seq_len=8, width=32, depth=3, heads=2)
    assert [type(m).__name__ for m in sharding.shard_units(model)] == ["TransformerBlock"] * 3
    assert len(sharding.shard_units(model, ("TransformerBlock",))) == 3
    assert sharding.shard_units(model, lambda m: isinstance(m, nn.LayerNorm) and m is model.ln_f) == [model.ln_f]
    with pytest.raises(ConfigError, match="Workload.shard names Nope, which the model does not contain"):
        sharding.shard_units(model, ("Nope",))
    with pytest.raises(ConfigError, match="class names"):
        sharding.shard_units(model, 3)
    tied = TinyLM(vocab=16, seq_len=8, width=32, depth=1, heads=2, tie_weights=True)
    # the tied embedding stays in the root: a unit may not share parameters with modules outside it
    assert tied.tok_emb not in sharding.shard_units(tied, lambda m: isinstance(m, nn.Embedding))


def test_parallel_is_checked_in_one_line(tiny_workload: Any) -> None:
    from batchfit.engine import train
    from batchfit.finder import find_batch_size
    from batchfit.noise import noise_scale

    for call in (lambda: train(tiny_workload, steps=1, parallel="zero3"),
                 lambda: find_batch_size(tiny_workload, parallel="zero3"),
                 lambda: noise_scale(tiny_workload, steps=2, parallel="zero3")):
        with pytest.raises(ConfigError, match="parallel must be one of: ddp, fsdp; got 'zero3'"):
            call()
    with pytest.raises(ConfigError, match="does not support precision fp16"):
        sharding.check_parallel("fsdp", "fp16")
    with pytest.raises(ConfigError, match="needs a process group"):
        sharding.wrap_fsdp(nn.Linear(2, 2), torch.device("cpu"))


def test_cli_parallel_flag_rejects_unknown_values(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["find", "--parallel", "zero3"])
    assert exc.value.code == 2 and "invalid choice: 'zero3'" in capsys.readouterr().err


def test_global_batch_kept_over_world_sizes() -> None:
    assert sharding.plan_global_batch(64, 2, 8) == {"batch_size": 64, "world_size": 2, "batch_size_per_rank": 32,
                                                    "micro_batch_size": 8, "accumulation_steps": 4}
    for world in (1, 2, 4, 8):
        split = sharding.plan_global_batch(96, world, 10)
        assert split is not None
        assert split["micro_batch_size"] * split["accumulation_steps"] * world == 96
        assert split["micro_batch_size"] <= 10
    assert sharding.plan_global_batch(10, 4, 8) is None  # does not divide over the ranks
    # per rank: the sharded state divides by the world size, the rest does not
    model = sharding.per_rank_model({"fixed_bytes": 1000, "per_sample_bytes": 10}, static_bytes=400,
                                    largest_unit_bytes=50, world_size=2, limit=2000, margin=0.1)
    by_world = model["per_rank_max_by_world"]
    assert by_world["2"] == 100  # (2000 - 1000) / 10: the world it was measured on
    assert by_world["1"] == 60 and by_world["4"] == 120  # fixed 600 + 800 / W
    assert model["per_rank_recommended_by_world"]["2"] == 80
    # every part is a line: the part that binds at the largest batch may not grow (the optimizer step), and the
    # part that grows still bounds the batch at every world size
    parts = {"optimizer": {"fixed_bytes": 1500, "per_sample_bytes": 0},
             "forward_backward": {"fixed_bytes": 1000, "per_sample_bytes": 10}}
    model = sharding.per_rank_model({"fixed_bytes": 1500, "per_sample_bytes": 0, "parts": parts}, static_bytes=400,
                                    largest_unit_bytes=50, world_size=2, limit=2000, margin=0.1)
    assert model["per_rank_max_by_world"]["2"] == 100 and model["per_rank_max_by_world"]["1"] == 60
    # the optimizer's fixed 1500 - 400 + 800 / 1 = 1900 fits under 2000 but not under the margin's 1800
    assert model["per_rank_recommended_by_world"]["1"] == 0 and model["per_rank_recommended_by_world"]["2"] == 80
    flat = sharding.per_rank_model({"fixed_bytes": 1500, "per_sample_bytes": 0,
                                    "parts": {"all": {"fixed_bytes": 1500, "per_sample_bytes": 0}}},
                                   static_bytes=400, largest_unit_bytes=50, world_size=2, limit=2000, margin=0.1)
    assert flat["per_rank_max_by_world"] == {} and "grew" in flat["note"]


# -- 5. torchrun: the CLI as users run it ---------------------------------------------------------------------------


_torchrun = ranks.torchrun


_LM_OPTS = ["-w", "demo:tiny-lm", "-O", "num_sequences=256", "-O", "seq_len=16", "-O", "vocab=16", "-O",
            "val_sequences=32", "-O", "width=32", "-O", "heads=2"]


@pytest.mark.slow
def test_torchrun_cli_find_and_train_fsdp(tmp_path: Path) -> None:
    # find and train are independent jobs: started together (see ranks.torchrun_start)
    proc, trained_proc = ranks.finish_all([
        ranks.torchrun_start(["find", *_LM_OPTS, "--parallel", "fsdp", "--device", "cpu", "--memory-budget", "4MiB",
                              "--no-throughput", "--json", "find.json"], tmp_path),
        ranks.torchrun_start(["train", *_LM_OPTS, "--parallel", "fsdp", "-b", "16", "-m", "4", "--steps", "5", "-q",
                              "--json", "train.json"], tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads((tmp_path / "find.json").read_text())
    assert found["status"] == "ok" and found["world_size"] == 2 and found["parallel"] == "fsdp"
    assert 1 <= found["recommended_batch_size"] <= found["max_batch_size"]
    assert "per_rank_max_by_world" in found["sharding"]
    out = proc.stderr + proc.stdout
    assert out.count("batchfit find: tiny-lm on cpu") == 1  # only rank 0 prints
    assert "largest gathered unit" in out and "x world 2" in out
    proc = trained_proc
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = json.loads((tmp_path / "train.json").read_text())
    assert (trained["world_size"], trained["batch_size"], trained["accumulation_steps"], trained["parallel"]) == \
        (2, 16, 2, "fsdp")
    assert trained["steps"] == 5 and trained["status"] == "ok"
    # one rank's error ends the whole job with that rank's one-line error, not a hang of the other rank
    (tmp_path / "wl_bad.py").write_text(
        "import os\n"
        "from batchfit.demos import tiny_lm\n"
        "def make():\n"
        "    wl = tiny_lm(num_sequences=64, seq_len=8, vocab=8, val_sequences=8, width=16, heads=2)\n"
        "    build = wl.model_fn\n"
        "    def model_fn():\n"
        "        if os.environ['RANK'] == '1':\n"
        "            raise RuntimeError('boom on rank 1')\n"
        "        return build()\n"
        "    wl.model_fn = model_fn\n"
        "    return wl\n")
    t0 = time.monotonic()
    bad = _torchrun(["train", "-w", "wl_bad.py:make", "--parallel", "fsdp", "-b", "8", "--steps", "2", "-q"],
                    tmp_path)
    assert bad.returncode != 0 and time.monotonic() - t0 < 60
    lines = [ln for ln in bad.stderr.splitlines() if "boom on rank 1" in ln]
    assert lines and "batchfit train (rank 1): error: model_fn raised RuntimeError: boom on rank 1" in lines[0]
    assert "Traceback" not in lines[0]


# -- 4. sweep and tune under sharding: rank 0 decides, every rank trains ------------------------------------------


SWEEP_STEPS = 8  # per trial, each evaluated: enough steps for the losses to part if sharding changed them


def _fsdp_sweep(rank: int, out: str) -> dict[str, Any]:
    from batchfit.study import sweep

    res = sweep(_lm(), batch_sizes=[16, 32], budget=f"steps:{SWEEP_STEPS}", eval_every=1, micro_batch_limit=4,
                out_dir=out, parallel="fsdp")
    return res.to_dict()


def _histories(results: dict[str, Any]) -> dict[int, list[float]]:
    return {t["batch_size"]: [h["train_loss"] for h in t["history"]] for t in results["trials"]}


@pytest.mark.slow
def test_fsdp_sweep_equals_single_process_and_every_rank_gets_rank_0s_result(tmp_path: Path) -> None:
    from batchfit.study import sweep

    single = sweep(_lm(), batch_sizes=[16, 32], budget=f"steps:{SWEEP_STEPS}", eval_every=1, micro_batch_limit=4,
                   out_dir=tmp_path / "one").to_dict()
    got = _spawn("_fsdp_sweep", tmp_path, str(tmp_path / "two"))
    assert got[0] == got[1]  # the follower returns what rank 0 decided, not a result of its own
    sharded = got[0]
    assert sharded["world_size"] == 2 and sharded["parallel"] == "fsdp" and sharded["status"] == "complete"
    for batch, losses in _histories(single).items():  # in float32, 2 sharded ranks vs one process
        assert len(losses) == SWEEP_STEPS
        assert _histories(sharded)[batch] == pytest.approx(losses, abs=1e-4)
    for t in sharded["trials"]:  # one rank's micro-batch: batch 16 = 4 per rank x 2 x 2 ranks
        assert t["micro_batch_size"] == 4 and t["accumulation_steps"] == t["batch_size"] // 8
        assert t["noise_method"] == "accumulation" and t["b_simple"] is not None and t["b_simple"] > 0
    # only rank 0 opened the store: one database, in rank 0's out_dir
    assert sorted(p.name for p in (tmp_path / "two").iterdir() if p.suffix == ".db") == ["batchfit.db"]


@pytest.mark.slow
def test_torchrun_cli_tune_fsdp(tmp_path: Path) -> None:
    proc = _torchrun(["tune", *_LM_OPTS, "--parallel", "fsdp", "--device", "cpu", "--train-budget", "epochs:2",
                      "--no-precision-check", "-q", "--out", "out", "--json", "tune.json"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("Recommendation:")]
    assert len(lines) == 1 and "per rank" in lines[0] and "x 2 ranks (fsdp)" in lines[0]  # rank 0 prints, once
    data = json.loads((tmp_path / "tune.json").read_text())
    rec = data["recommendation"]
    assert rec["world_size"] == 2 and rec["parallel"] == "fsdp"
    assert rec["batch_size"] == rec["micro_batch_size"] * rec["accumulation_steps"] * 2
    assert all(b % 2 == 0 for b in data["batch_sizes"])
    assert data["find"]["world_size"] == 2 and data["find"]["parallel"] == "fsdp"
    assert "fully_shard" in rec["recipe"]["snippets"]["pytorch"]
    assert data["cost"]["runs"] <= 1.0
    assert data.get("step_time") is None  # each rank's clock differs: the sweep's own trials time the candidates


# -- 2b. evaluation under sharding: one rank's out-of-memory halves every rank's evaluation batch -----------------


class _EvalOom(TinyLM):
    """Rank 1 runs out of memory in evaluation on any batch of 16 rows or more (an injected OOM)."""

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if not self.training and idx.shape[0] >= 16 and distributed.rank() == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected in evaluation on rank 1)")
        return super().forward(idx)


def _fsdp_eval_oom(rank: int) -> dict[str, Any]:
    import dataclasses

    from batchfit.engine import evaluate, train

    wl = dataclasses.replace(_lm(), model_fn=lambda: _EvalOom(16, 16, width=32, depth=2, heads=2))
    torch.manual_seed(0)
    model = sharding.wrap_fsdp(wl.model_fn(), torch.device("cpu"), "fp32", wl.shard)
    loss, _, used = evaluate(wl, model, batch_size=32, device=torch.device("cpu"))
    again = evaluate(wl, model, batch_size=8, device=torch.device("cpu"))[0]  # the model is in a legal state
    # and the same workload trains afterwards, its evaluations halved together on both ranks
    r = train(wl, batch_size=8, micro_batch_size=4, steps=5, eval_every=5, eval_batch_size=32, world_size=WORLD,
              parallel="fsdp")
    return {"loss": loss, "used": used, "again": again, "trained": r.history[-1]["val_loss"]}


@pytest.mark.slow
def test_fsdp_evaluation_oom_on_one_rank_halves_every_ranks_batch(tmp_path: Path) -> None:
    t0 = time.monotonic()
    got = _spawn("_fsdp_eval_oom", tmp_path)
    assert time.monotonic() - t0 < ranks.JOIN_TIMEOUT_S
    assert got[0]["used"] == got[1]["used"] == 8  # 32 and 16 failed on rank 1: both ranks halved to 8
    assert got[0]["loss"] == pytest.approx(got[1]["loss"], rel=1e-6)
    assert got[0]["again"] == pytest.approx(got[0]["loss"], rel=1e-6)
    assert got[0]["trained"] == pytest.approx(got[1]["trained"], rel=1e-6)
