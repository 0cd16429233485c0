"""Batch-size schedules in the engine: the optimizer moves at a change point, accumulation stays exact, a run
resumes bit-exactly from its checkpoint, and ``train --json`` records the schedule as it ran (issue 14)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from batchfit.cli import main
from batchfit.engine import train
from batchfit.errors import ConfigError
from batchfit.workload import Workload


def _workload(opt: str = "adamw", dtype: torch.dtype = torch.float64, dropout: float = 0.0) -> Workload:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 6, generator=g, dtype=dtype)
    y = (x @ torch.randn(6, 3, generator=g, dtype=dtype)).argmax(1)

    def model_fn() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Dropout(dropout),
                                   torch.nn.Linear(16, 3)).to(dtype)

    def optimizer_fn(params, lr):  # noqa: ANN001, ANN202
        if opt == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=0.9)
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.1)

    return Workload(name=f"tiny-{opt}", model_fn=model_fn, optimizer_fn=optimizer_fn, loss_fn=F.cross_entropy,
                    train_data=TensorDataset(x, y), val_data=TensorDataset(x[:64], y[:64]),
                    base_batch_size=8, base_lr=0.01)


class _Watch:
    """Reads the optimizer right before each step (what the step uses)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_before_optimizer_step(self, state) -> None:  # noqa: ANN001
        g = state.optimizer.param_groups[0]
        self.rows.append({"lr": g["lr"], "beta2": g["betas"][1] if "betas" in g else math.nan,
                          "wd": g.get("weight_decay", 0.0), "batch": state.batch_size,
                          "micro": state.micro_batch_size, "acc": state.accumulation_steps})


def test_lr_beta2_and_weight_decay_move_at_the_change_point_with_warmup_on_top() -> None:
    w = _Watch()
    r = train(_workload(), batch_schedule="0:8,6:32", steps=10, warmup=8, beta2="power",
              weight_decay_timescale=True, callbacks=[w])
    base = 0.01  # adam-sqrt at the workload's base batch 8
    for i, row in enumerate(w.rows):
        k = 4 if i >= 6 else 1
        assert row["lr"] == pytest.approx(base * math.sqrt(k) * min(1.0, (i + 1) / 8), rel=1e-12)
        assert row["beta2"] == pytest.approx(0.99**k, rel=1e-12)  # Marek et al. 2025: half-life in samples
        assert row["wd"] == pytest.approx(0.1 * k / math.sqrt(k), rel=1e-12)  # tau = B / (eta lambda D) constant
        assert row["batch"] == 8 * k
    sched = r.to_dict()["batch_schedule"]
    assert [(e["step"], e["batch_size"]) for e in sched] == [(0, 8), (6, 32)]
    assert sched[1]["peak_lr"] == pytest.approx(0.02) and sched[1]["lr"] == pytest.approx(0.02 * 7 / 8)
    assert r.steps == 10 and r.samples == 6 * 8 + 4 * 32


def test_sgd_keeps_its_settings_but_the_lr_follows_the_linear_rule() -> None:
    w = _Watch()
    train(_workload("sgd"), batch_schedule=[(0, 16), (3, 64), (6, 32)], steps=8, callbacks=[w])
    lrs = [row["lr"] for row in w.rows]
    assert lrs[:3] == pytest.approx([0.02] * 3) and lrs[3:6] == pytest.approx([0.08] * 3)
    assert lrs[6:] == pytest.approx([0.04] * 2)  # a decrease divides by the factor


def test_a_user_lr_schedule_composes_with_the_transfer() -> None:
    wl = _workload("sgd")
    wl.lr_schedule = lambda opt, total: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    w = _Watch()
    train(wl, batch_schedule="0:8,4:16", steps=6, callbacks=[w])
    for i, row in enumerate(w.rows):
        assert row["lr"] == pytest.approx(0.01 * (2 if i >= 4 else 1) / (1 + i), rel=1e-12)


def _params(r_model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in r_model.parameters()])


class _Keep:
    def on_train_end(self, state, result) -> None:  # noqa: ANN001
        self.model = state.model


def test_accumulation_is_exact_across_a_change_point() -> None:
    """Micro-batches of <= 12 (uneven: 32 = 11 + 11 + 10) give the same run as whole batches, to 1e-10 in float64."""
    runs = []
    for limit in (None, 12):
        keep, w = _Keep(), _Watch()
        train(_workload(), batch_schedule="0:8,5:32,9:64", steps=12, micro_batch_limit=limit, callbacks=[keep, w])
        runs.append((_params(keep.model), w.rows))
    (a, rows_a), (b, rows_b) = runs
    assert [r["acc"] for r in rows_b] == [1] * 5 + [3] * 4 + [6] * 3
    assert [r["micro"] for r in rows_b] == [8] * 5 + [11] * 4 + [11] * 3
    assert [r["acc"] for r in rows_a] == [1] * 12
    assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), (a - b).abs().max()


class _Stop(Exception):
    pass


class _StopAt:
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, state) -> None:  # noqa: ANN001
        if state.step == self.step:
            raise _Stop


@pytest.mark.parametrize("every", [10, 13])  # 10: at a change point; 13: inside a pass
def test_a_run_split_in_two_equals_the_uninterrupted_run(tmp_path, every: int) -> None:
    wl = _workload(dtype=torch.float32, dropout=0.2)  # dropout: the RNG state must travel too
    kw = dict(batch_schedule="0:8,10:16,20:64", steps=30, warmup=4, eval_every=7, micro_batch_limit=16)
    whole, keep = tmp_path / "whole.pt", _Keep()
    full = train(wl, checkpoint=whole, callbacks=[keep], **kw)
    part = tmp_path / "part.pt"
    with pytest.raises(_Stop):
        train(wl, checkpoint=part, checkpoint_every=every, callbacks=[_StopAt(every + 2)], **kw)
    keep2 = _Keep()
    resumed = train(wl, resume_from=part, callbacks=[keep2], **kw)
    assert resumed.extras["resumed_at_step"] == every
    assert torch.equal(_params(keep.model), _params(keep2.model))  # bit-exact
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in full.history]
    assert [h["val_loss"] for h in resumed.history] == [h["val_loss"] for h in full.history]
    assert resumed.extras["batch_schedule"] == full.extras["batch_schedule"]
    assert resumed.steps == full.steps == 30 and resumed.samples == full.samples


def test_resume_from_another_run_is_one_clear_error(tmp_path) -> None:
    ck = tmp_path / "c.pt"
    train(_workload(), batch_schedule="0:8,4:16", steps=6, checkpoint=ck)
    with pytest.raises(ConfigError, match="another run"):
        train(_workload(), batch_schedule="0:8,4:32", steps=6, resume_from=ck)
    (tmp_path / "junk.pt").write_text("no")
    with pytest.raises(ConfigError, match="not a batchfit checkpoint"):
        train(_workload(), steps=2, resume_from=tmp_path / "junk.pt")


def test_the_epoch_budget_counts_samples_across_phases() -> None:
    r = train(_workload(), batch_schedule="0:8,10:32", epochs=1)  # 512 samples: 10 x 8 + 13 x 32 = 496
    assert r.steps == 23 and r.samples == 496 and r.epochs == pytest.approx(496 / 512, abs=1e-4)


def test_bad_schedules_are_one_line_config_errors() -> None:
    with pytest.raises(ConfigError, match="integer factor"):
        train(_workload(), batch_schedule="0:8,5:12", steps=6)
    with pytest.raises(ConfigError, match="larger than the training set"):
        train(_workload(), batch_schedule="0:8,5:1024", steps=6)
    with pytest.raises(ConfigError, match="differs from the schedule"):
        train(_workload(), batch_size=16, batch_schedule="0:8,5:16", steps=6)


def test_train_json_records_the_schedule_as_it_ran(tmp_path) -> None:
    out = tmp_path / "r.json"
    rc = main(["train", "--batch-schedule", "0:16,5:32,9:64", "--micro-batch-limit", "32", "--steps", "12",
               "--json", str(out), "-q"])
    assert rc == 0
    d = json.loads(out.read_text())
    sched = d["batch_schedule"]
    assert [{k: e[k] for k in ("step", "batch_size", "micro_batch_size", "accumulation_steps")} for e in sched] == [
        {"step": 0, "batch_size": 16, "micro_batch_size": 16, "accumulation_steps": 1},
        {"step": 5, "batch_size": 32, "micro_batch_size": 32, "accumulation_steps": 1},
        {"step": 9, "batch_size": 64, "micro_batch_size": 32, "accumulation_steps": 2}]
    assert all(isinstance(e["lr"], float) and e["lr"] > 0 for e in sched)
    assert sched[1]["lr"] == pytest.approx(sched[0]["lr"] * math.sqrt(2))  # adam-sqrt on the demo's Adam
    assert d["steps"] == 12 and d["samples"] == 5 * 16 + 4 * 32 + 3 * 64


def test_train_cli_rejects_a_bad_schedule_with_exit_2(capsys) -> None:
    assert main(["train", "--batch-schedule", "0:16,5:24", "--steps", "3", "-q"]) == 2
    assert "integer factor" in capsys.readouterr().err


def test_auto_derives_the_schedule_from_a_branching_measurement() -> None:
    from batchfit.branching import BranchingResult, BranchPoint
    from batchfit.stats import Interval

    one = {8: Interval(1.0, None, None)}
    points = [BranchPoint(0, 0, 1.0, one, one, 8, (8, 8), None),
              BranchPoint(8, 64, 0.9, one, one, 32, (16, 64), None)]
    measured = BranchingResult("tiny-adamw", 8, "adam-sqrt", 0.2, 64, 2, [8, 16, 32], 64, points)
    r = train(_workload(), batch_schedule="auto", branching=measured, steps=20)
    assert [(e["step"], e["batch_size"]) for e in r.extras["batch_schedule"]] == [(0, 8), (8, 32)]
    assert r.extras["branching"]["points"][1]["local_critical_batch"] == 32


def test_auto_measures_by_branching_when_no_measurement_is_given() -> None:
    r = train(_workload("sgd"), batch_schedule="auto", steps=40)
    assert r.extras["branching"]["base_batch_size"] == 8
    assert [p["step"] for p in r.extras["branching"]["points"]] == [0, 4, 10, 20]
    batches = [e["batch_size"] for e in r.extras["batch_schedule"]]
    assert r.extras["batch_schedule"][0]["step"] == 0 and r.steps == 40
    assert all(b % 8 == 0 for b in batches) and batches == sorted(batches)  # B0 x 2^j, never decreasing


def _given_branching(b0: int, lcbs: list[tuple[int, int]]):  # noqa: ANN202
    from batchfit.branching import BranchingResult, BranchPoint
    from batchfit.stats import Interval

    one = {b0: Interval(1.0, None, None)}
    pts = [BranchPoint(s // b0, s, 1.0, one, one, c, (b0, c), None) for s, c in lcbs]
    return BranchingResult("tiny", b0, "linear", 0.2, 4 * b0, 2, [b0, 2 * b0, 4 * b0], 10, pts, 1.0, 0.05, 0.01)


def test_compare_trains_every_arm_on_the_same_budget_and_seeds() -> None:
    from batchfit.schedule_check import ScheduleCheck, compare

    r = compare(_workload("sgd", dtype=torch.float32), batch_size=8, epochs=2, seeds=(0, 1, 2), factors=(1, 4),
                branching=_given_branching(8, [(0, 8), (256, 32)]), cosine=True, lr_factors=(0.5,),
                micro_batch_limit=16)
    assert r.schedule == [{"step": 0, "batch_size": 8}, {"step": 32, "batch_size": 32}]
    assert [a.name for a in r.arms][:3] == ["schedule", "fixed 8", "fixed 32"]
    assert {a.kind for a in r.arms} == {"schedule", "fixed", "fixed-lr", "cosine"}
    for a in r.arms:
        assert [run["seed"] for run in a.runs] == [0, 1, 2]
        assert all(1024 - a.batch_size * 4 < run["samples"] <= 1024 for run in a.runs)  # 2 epochs of 512
    assert r.best_fixed.startswith("fixed") and r.target is not None
    assert r.branching_cost_share == pytest.approx(0.06 / r.arm("fixed 8").runs[0]["seconds"])
    assert r.recommended == (r.steps_saved is not None and r.steps_saved.low > 0 and "recommended:" in r.reason)
    assert ScheduleCheck.from_dict(json.loads(json.dumps(r.to_dict()))).to_dict() == json.loads(
        json.dumps(r.to_dict()))


def _arm(name: str, kind: str, b: int, steps: list[int], finals: list[float]):  # noqa: ANN202
    from batchfit.schedule_check import Arm

    runs = [{"seed": i, "final": f, "steps": s * 2, "samples": 0, "seconds": 1.0, "diverged": False,
             "history": [{"step": s, "samples": s * b, "train_seconds": s / 100, "val_loss": f, "val_metrics": {}},
                         {"step": 2 * s, "samples": 2 * s * b, "train_seconds": s / 50, "val_loss": f,
                          "val_metrics": {}}], "to_target": None} for i, (s, f) in enumerate(zip(steps, finals))]
    return Arm(name, kind, b, None, runs)


def test_the_schedule_is_recommended_only_beyond_the_noise() -> None:
    from batchfit.metric import Metric
    from batchfit.schedule_check import _decide

    metric, br = Metric("val_loss", False), _given_branching(8, [(0, 8)])
    fixed = _arm("fixed 8", "fixed", 8, [100, 104, 98], [0.50, 0.51, 0.49])
    clear = _arm("schedule", "schedule", 8, [60, 62, 59], [0.50, 0.505, 0.495])
    r = _decide("w", metric, 100, [0, 1, 2], br, [], clear, [fixed], fixed, 0.01, fixed)
    assert r.recommended and r.steps_saved.low > 0.3, r.reason
    noisy = _arm("schedule", "schedule", 8, [60, 130, 100], [0.50, 0.505, 0.495])
    r = _decide("w", metric, 100, [0, 1, 2], br, [], noisy, [fixed], fixed, 0.01, fixed)
    assert not r.recommended and "inside the noise" in r.reason
    slower = _arm("schedule", "schedule", 8, [150, 160, 155], [0.50, 0.505, 0.495])
    r = _decide("w", metric, 100, [0, 1, 2], br, [], slower, [fixed], fixed, 0.01, fixed)
    assert not r.recommended and "more optimizer steps" in r.reason and r.steps_saved.high < 0
    worse = _arm("schedule", "schedule", 8, [60, 62, 59], [0.70, 0.71, 0.69])
    r = _decide("w", metric, 100, [0, 1, 2], br, [], worse, [fixed], fixed, 0.01, fixed)
    assert not r.recommended and "worse beyond the noise" in r.reason


def test_the_report_shows_the_critical_batch_over_training_the_schedule_and_the_arms(tmp_path) -> None:
    from _study_fixture import make_results
    from batchfit.metric import Metric
    from batchfit.report import write_report
    from batchfit.schedule import Phase
    from batchfit.schedule_check import PLOT_NAME, _decide
    from batchfit.stats import Interval

    br = _given_branching(8, [(0, 8), (400, 32)])
    br.points[0].b_simple = Interval(12.0, 9.0, 15.0)
    br.points[1].b_simple = Interval(40.0, 30.0, math.inf)
    fixed = _arm("fixed 8", "fixed", 8, [100, 104, 98], [0.50, 0.51, 0.49])
    sched = _arm("schedule", "schedule", 8, [60, 62, 59], [0.50, 0.505, 0.495])
    check = _decide("w", Metric("val_loss", False), 100, [0, 1, 2], br, [Phase(0, 8), Phase(50, 32)], sched,
                    [fixed], fixed, 0.01, fixed).to_dict()
    results = make_results()
    results["batch_schedule_check"] = check
    paths = write_report(results, tmp_path)
    md = Path(paths["markdown"]).read_text()
    assert "## The batch size over training" in md and "recommended:" in md
    assert "| 50 | 32 |" in md  # the schedule table
    assert "12 [9, 15]" in md and "40 [30, inf]" in md  # B_simple with its interval beside the critical batch
    assert "| schedule | 0.5 [" in md and "fixed 8" in md
    assert PLOT_NAME in paths["plots"] and Path(paths["plots"][PLOT_NAME]).stat().st_size > 1000
    assert "The batch size over training" in Path(paths["html"]).read_text()
    assert json.loads(Path(paths["results"]).read_text())["batch_schedule_check"]["recommended"] is True


def test_the_lightning_callback_follows_a_schedule_by_accumulation() -> None:
    L = pytest.importorskip("lightning.pytorch")
    from batchfit.integrations.lightning import BatchfitBatchSchedule

    class Net(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.batch_size = 8
            self.net = torch.nn.Linear(6, 3)
            self.lrs: list[float] = []

        def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def on_before_optimizer_step(self, optimizer) -> None:  # noqa: ANN001
            self.lrs.append(optimizer.param_groups[0]["lr"])

        def configure_optimizers(self):  # noqa: ANN201
            return torch.optim.SGD(self.parameters(), lr=0.01)

        def train_dataloader(self):  # noqa: ANN201
            g = torch.Generator().manual_seed(0)
            x = torch.randn(64, 6, generator=g)
            return torch.utils.data.DataLoader(TensorDataset(x, x[:, :3].argmax(1)), batch_size=self.batch_size)

    cb = BatchfitBatchSchedule("0:8,8:32")
    model = Net()
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[cb])
    trainer.fit(model)
    assert [(e["step"], e["batch_size"], e["accumulation_steps"]) for e in cb.applied] == [(0, 8, 1), (8, 32, 4)]
    assert trainer.global_step == 8 + 2 + 2  # 64 samples: 8 steps of 8, then 2 steps of 32 per epoch
    assert model.lrs[:8] == pytest.approx([0.01] * 8) and model.lrs[8:] == pytest.approx([0.04] * 4)  # linear
