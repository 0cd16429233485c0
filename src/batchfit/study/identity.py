"""What makes a sweep's results what they are: the study identity, and the default study name derived from it.

Re-running the same call resumes the same study, so the identity must cover everything that changes a result
(issue 13.3): the model (a fingerprint of its parameter names, shapes and dtypes), the optimizer (class and
defaults), the data sizes, the workload's own settings (forward, targets, LR schedule, clipping, accumulation,
options), the device, precision, budget, LR rule (and which version of the adam-sqrt rule's betas), weight-decay
rule, warm-up, base batch size and LR, seed and ranking metric. A wider model under the same workload name gets
another study; under an explicit ``study_name`` it is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from batchfit._io import to_jsonable
from batchfit.errors import BatchfitError, WorkloadError
from batchfit.metric import Metric
from batchfit.study.inputs import Budget
from batchfit.workload import Workload

__all__ = [
    "IDENTITY_KEYS_SINCE_FINGERPRINT",
    "WorkloadFingerprint",
    "default_study_name",
    "identity_differences",
    "study_identity",
    "workload_fingerprint",
]

# identity keys added with the fingerprint: a study stored before them has none, and is not refused for that
IDENTITY_KEYS_SINCE_FINGERPRINT = ("model", "optimizer", "num_val", "workload_settings")
# identity keys present only when not at their default, so the default settings keep their study names; a study
# stored without one had the default
OPTIONAL_IDENTITY_KEYS: dict[str, Any] = {"weight_decay_rule": "keep", "adam_sqrt": None, "world_size": 1,
                                          "parallel": None}
# the adam-sqrt rule's betas since issue 19.6 (beta1 held at 0.5 beyond k (1 - beta1) = 0.5, beta2 -> beta2^k):
# a study scaled by the earlier rule (beta1 clipped to 0, beta2 -> 1 - k (1 - beta2)) is another study
ADAM_SQRT_VERSION = "beta1-sde-to-0.5,beta2-power"


def _digest(obj: Any, n: int = 12) -> str:
    return hashlib.sha1(json.dumps(to_jsonable(obj), sort_keys=True).encode()).hexdigest()[:n]


def _callable_name(fn: Any) -> str | None:
    if fn is None or isinstance(fn, str):
        return fn
    if isinstance(fn, (list, tuple)):
        return ",".join(map(str, fn))
    return getattr(fn, "__qualname__", None) or type(fn).__qualname__


@dataclasses.dataclass(frozen=True)
class WorkloadFingerprint:
    """The model and optimizer a workload builds, reduced to what changes a result (cheap: one model build)."""

    model: dict[str, Any]  # {"parameters": count, "tensors": count, "digest": sha1 of names, shapes, dtypes}
    optimizer: dict[str, Any]  # {"class": "torch.optim.sgd.SGD", "defaults": {...}}
    adam_family: bool

    def to_dict(self) -> dict[str, Any]:
        return {"model": dict(self.model), "optimizer": dict(self.optimizer)}


def workload_fingerprint(workload: Workload) -> WorkloadFingerprint:
    """Build the workload's model and optimizer once and fingerprint them (also used for tune's caches)."""
    from batchfit.scaling import is_adam_family

    try:
        model = workload.model_fn()
        tensors = [(name, list(t.shape), str(t.dtype).removeprefix("torch."))
                   for name, t in [*model.named_parameters(), *model.named_buffers()]]
        optimizer = workload.optimizer_fn(model.parameters(), workload.base_lr)
    except BatchfitError:
        raise
    except Exception as exc:
        raise WorkloadError(
            f"workload {workload.name!r}: building the model and optimizer failed ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:300]}); check model_fn and optimizer_fn"
        ) from exc
    count = sum(int(p.numel()) for p in model.parameters())
    defaults = {k: v for k, v in getattr(optimizer, "defaults", {}).items() if k != "lr"}  # lr: base_lr/rule
    opt_type = type(optimizer)
    return WorkloadFingerprint(
        model={"parameters": count, "tensors": len(tensors), "digest": _digest(tensors)},
        optimizer={"class": f"{opt_type.__module__}.{opt_type.__qualname__}", "defaults": to_jsonable(defaults)},
        adam_family=is_adam_family(optimizer),
    )


def _workload_settings(workload: Workload) -> dict[str, Any]:
    """The workload's own settings that change training (fields added by the workload contract default to None)."""
    return {
        "loss": _callable_name(workload.loss_fn),
        "metrics": list(getattr(workload, "metrics", {}) or {}),
        "forward": _callable_name(getattr(workload, "forward", None)),
        "targets": _callable_name(getattr(workload, "targets", None)),
        "lr_schedule": _callable_name(getattr(workload, "lr_schedule", None)),
        "grad_clip": getattr(workload, "grad_clip", None),
        "micro_batch_size": getattr(workload, "micro_batch_size", None),
        "options": to_jsonable(getattr(workload, "options", None)),
    }


def study_identity(workload: Workload, fingerprint: WorkloadFingerprint, *, device: str, precision: str,
                   budget: Budget, lr_rule: str, warmup: Any, seed: int, metric: Metric,
                   weight_decay_rule: str = "keep", world_size: int = 1, parallel: str = "ddp") -> dict[str, Any]:
    """The settings that change a sweep's results (stored as the study's config; compared on resume). Under
    torchrun the world size and how the ranks hold the model (``ddp``/``fsdp``) change its timings and memory: another
    study."""
    identity = {
        "workload": workload.name, "workload_description": workload.description, "num_train": workload.num_train,
        "base_batch_size": workload.base_batch_size, "base_lr": workload.base_lr, "device": device,
        "precision": precision, "budget": budget.to_dict(), "lr_rule": lr_rule, "warmup": warmup, "seed": seed,
        "primary_metric": metric.name, "higher_is_better": metric.higher_is_better,
        "num_val": _num_val(workload),
        "model": fingerprint.model, "optimizer": fingerprint.optimizer,
        "workload_settings": _workload_settings(workload),
    }
    if weight_decay_rule != OPTIONAL_IDENTITY_KEYS["weight_decay_rule"]:
        identity["weight_decay_rule"] = weight_decay_rule
    if lr_rule == "adam-sqrt" or (lr_rule == "auto" and fingerprint.adam_family):
        identity["adam_sqrt"] = ADAM_SQRT_VERSION
    if world_size > 1:
        identity.update(world_size=world_size, parallel=parallel)
    return identity


def _num_val(workload: Workload) -> int | None:
    with contextlib.suppress(AttributeError):
        return workload.num_val  # type: ignore[attr-defined, no-any-return]
    data = getattr(workload, "val_data", None)
    try:
        return None if data is None else len(data)
    except TypeError:
        return None


def identity_differences(stored: Mapping[str, Any], identity: Mapping[str, Any]) -> list[str]:
    """The identity keys whose stored value differs (keys newer than the stored study are not compared)."""
    diff = []
    for key, value in identity.items():
        if key not in stored and key in IDENTITY_KEYS_SINCE_FINGERPRINT:
            continue
        if to_jsonable(stored.get(key)) != to_jsonable(value):
            diff.append(key)
    for key, default in OPTIONAL_IDENTITY_KEYS.items():
        if key not in identity and to_jsonable(stored.get(key, default)) != to_jsonable(default):
            diff.append(key)
    return diff


def default_study_name(identity: Mapping[str, Any]) -> str:
    """``sweep-<workload>-<10 hex digits of the identity>``: the same settings give the same study."""
    return f"sweep-{identity['workload']}-{_digest(identity, 10)}"
