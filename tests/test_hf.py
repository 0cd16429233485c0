"""Hugging Face Transformers: the workload from model_init/datasets/TrainingArguments and the Trainer callback.

Tiny models are built from configs (nothing is downloaded)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="Hugging Face Transformers is not installed "
                                   "(pip install 'batchfit[hf]')")

from batchfit.engine import train  # noqa: E402
from batchfit.integrations.hf import (  # noqa: E402
    BatchfitCallback,
    hf_workload,
    logits_accuracy,
    trainer_workload,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

CONFIG = dict(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
              max_position_embeddings=64, num_labels=2)


def model_init() -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(transformers.BertConfig(**CONFIG))


def texts(n: int, seed: int) -> list[dict]:
    """Token sequences of varying length; the label says whether token 7 occurs; a raw 'text' column too."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        length = int(torch.randint(4, 24, (1,), generator=g))
        ids = torch.randint(10, 100, (length,), generator=g)
        label = int(torch.rand((), generator=g) < 0.5)
        if label:
            ids[int(torch.randint(0, length, (1,), generator=g))] = 7
        items.append({"input_ids": ids.tolist(), "label": label, "text": "unused by the model"})
    return items


def pad(items: list[dict]) -> dict:
    width = max(len(it["input_ids"]) for it in items)
    ids = torch.zeros(len(items), width, dtype=torch.long)
    mask = torch.zeros(len(items), width, dtype=torch.long)
    for r, it in enumerate(items):
        ids[r, : len(it["input_ids"])] = torch.tensor(it["input_ids"])
        mask[r, : len(it["input_ids"])] = 1
    assert "text" not in items[0]  # the model does not take it: dropped before collation, as Trainer does
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([it["label"] for it in items])}


def args(tmp_path, **kw) -> transformers.TrainingArguments:  # noqa: ANN001
    base = dict(output_dir=str(tmp_path / "hf"), report_to=[], learning_rate=1e-3, per_device_train_batch_size=8,
                gradient_accumulation_steps=2, weight_decay=0.01, max_grad_norm=0.5, lr_scheduler_type="linear",
                warmup_steps=0.25, num_train_epochs=1, logging_steps=1, save_strategy="no", use_cpu=True,
                disable_tqdm=True, seed=0)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def test_workload_takes_the_training_arguments(tmp_path) -> None:  # noqa: ANN001
    wl = hf_workload(model_init, texts(96, 0), texts(32, 1), pad, args=args(tmp_path),
                     metrics={"accuracy": logits_accuracy})
    assert wl.base_batch_size == 16 and wl.micro_batch_size == 8 and wl.base_lr == 1e-3 and wl.grad_clip == 0.5
    assert wl.loss_fn == "output" and wl.num_train == 96
    model = wl.model_fn()
    opt = wl.optimizer_fn(model.parameters(), 2e-3)
    decays = {g["weight_decay"]: len(g["params"]) for g in opt.param_groups}
    assert set(decays) == {0.01, 0.0} and decays[0.0] > 0  # biases and LayerNorm weights are not decayed
    assert opt.param_groups[0]["lr"] == 2e-3
    sched = wl.lr_schedule(opt, 8)  # linear with 25 % warm-up: 2 warm-up steps, then linear decay to 0
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:3] == pytest.approx([0.0, 1e-3, 2e-3]) and lrs[-1] == pytest.approx(2e-3 / 6)

    res = train(wl, batch_size=16, steps=12, eval_every=6, seed=0)
    first, last = res.history[0], res.history[-1]
    assert res.micro_batch_size == 8 and res.accumulation_steps == 2  # the user's accumulation setting
    assert math.isfinite(last["val_loss"]) and 0.0 <= last["val_metrics"]["accuracy"] <= 1.0
    assert last["train_loss"] < first["train_loss"] + 0.5


def test_logits_accuracy_ignores_minus_100() -> None:
    class Out:
        logits = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]])

    assert float(logits_accuracy(Out(), torch.tensor([[1, 1, -100]]))) == 0.5


class SeenBatches(transformers.TrainerCallback):
    def __init__(self) -> None:
        self.sizes: list[int] = []

    def on_train_begin(self, args, state, control, model=None, **kw):  # noqa: ANN001, ANN201
        model.register_forward_pre_hook(lambda m, a, k: self.sizes.append(int(k["input_ids"].shape[0])),
                                        with_kwargs=True)


def test_callback_sizes_the_batch_keeps_the_effective_batch_and_logs_b_simple(tmp_path) -> None:  # noqa: ANN001
    a = args(tmp_path, per_device_train_batch_size=32, gradient_accumulation_steps=1, warmup_steps=0)
    probe = BatchfitCallback(log_noise_scale=False, memory_budget="256MiB")
    probe.size(transformers.Trainer(model_init=model_init, args=args(tmp_path), train_dataset=texts(128, 0),
                                    data_collator=pad))
    mm = probe.result.memory_model  # a budget in which about 12 samples fit
    budget = int(mm["fixed_bytes"] + 12 * mm["per_sample_bytes"])
    cb, seen = BatchfitCallback(memory_budget=budget, noise_steps=6), SeenBatches()
    trainer = transformers.Trainer(model_init=model_init, args=a, train_dataset=texts(128, 0), data_collator=pad,
                                   callbacks=[cb, seen])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    micro, accumulation = cb.chosen["per_device_train_batch_size"], cb.chosen["gradient_accumulation_steps"]
    assert cb.result.max_batch_size < 32 and micro <= cb.result.recommended_batch_size
    assert accumulation >= 2 and micro * accumulation == 32  # the effective batch the arguments asked for
    assert set(seen.sizes) == {micro}  # the Trainer's dataloader uses the size found
    assert trainer.state.global_step == 128 // 32
    logged = [h["batchfit/b_simple"] for h in trainer.state.log_history if "batchfit/b_simple" in h]
    assert len(logged) == 1 and logged[0] > 0 and logged[0] == cb.noise.b_simple
    # issue 23.8: what batchfit chose is in log_history too, and no bound is logged as inf
    (entry,) = [h for h in trainer.state.log_history if "batchfit/per_device_train_batch_size" in h]
    assert entry["batchfit/per_device_train_batch_size"] == micro
    assert entry["batchfit/gradient_accumulation_steps"] == accumulation
    assert entry["batchfit/max_batch_size"] == cb.result.max_batch_size
    assert all(math.isfinite(v) for k, v in entry.items() if k.startswith("batchfit/"))


def test_the_callback_logs_its_choice_even_when_b_simple_is_unbounded(tmp_path) -> None:  # noqa: ANN001
    """Issue 23.8: a probe whose B_simple is inf (too few steps) still leaves the chosen batch in log_history."""
    import types

    cb = BatchfitCallback()
    logs: list[dict] = []
    cb.trainer = types.SimpleNamespace(log=logs.append)
    cb.chosen = {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 4, "effective_batch_size": 32,
                 "previous_batch_size": 32, "max_batch_size": 9, "recommended_batch_size": 8}
    cb.noise = types.SimpleNamespace(b_simple=math.inf, b_simple_ci=(12.0, math.inf), steps=6)
    cb.on_train_begin(None, None, None)
    (entry,) = logs
    assert entry["batchfit/per_device_train_batch_size"] == 8 and entry["batchfit/b_simple_low"] == 12.0
    assert "batchfit/b_simple" not in entry and "batchfit/b_simple_high" not in entry


def test_trainer_workload_copies_the_model(tmp_path) -> None:  # noqa: ANN001
    model = model_init()
    trainer = transformers.Trainer(model=model, args=args(tmp_path), train_dataset=texts(64, 0), data_collator=pad)
    wl = trainer_workload(trainer)
    before = [p.detach().clone() for p in model.parameters()]
    losses = [[h["train_loss"] for h in train(wl, batch_size=16, steps=4, eval_every=2).history] for _ in range(2)]
    assert losses[0] == losses[1]  # every trial starts from the same weights
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_hf_output_to_cross_entropy_hints_loss_fn_output() -> None:
    """Issue 23.5: a Hugging Face model output handed to ``F.cross_entropy`` says to set ``loss_fn="output"`` (was:
    "check that the targets fit the model's outputs")."""
    import torch.nn.functional as F

    from batchfit import Workload, WorkloadError

    wl = Workload(name="hf-ce", model_fn=model_init, optimizer_fn=lambda p, lr: torch.optim.AdamW(p, lr=lr),
                  loss_fn=F.cross_entropy,
                  train_data=[{k: v for k, v in it.items() if k != "text"} for it in texts(32, 0)], collate_fn=pad,
                  base_batch_size=8, base_lr=1e-4)
    with pytest.raises(WorkloadError, match=r"loss_fn raised TypeError: .*the model returns a "
                                            r"SequenceClassifierOutput \(with \.loss/\.logits\), not a tensor: set "
                                            r"loss_fn=\"output\""):
        train(wl, batch_size=8, steps=1)
