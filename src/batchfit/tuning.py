"""``tune``: the main job, as one recipe — find, noise, lr_check, step_time, sweep, precision, report.

The stages, in order (the names of their progress events, :data:`STAGES`):

========= ================================================================= ====================
stage     what it measures                                                  written to
========= ================================================================= ====================
find      the largest micro-batch that fits and the throughput knee         ``find.json``
noise     the gradient noise scale B_simple at initialisation               ``noise.json``
lr_check  the base LR at the base batch, x1/4 ... x8 (short runs)           ``lr.json``
step_time seconds per step at every candidate batch, interleaved rounds     ``step_time.json``
sweep     every candidate batch at its rule-scaled LR, persisted in Optuna  ``batchfit.db``
precision the recommended configuration in fp32 and bf16                    ``precision.json``
report    the table, the recommendation, the plots                          ``results.json``, ...
========= ================================================================= ====================

Every stage writes its result into ``out_dir`` as soon as it finishes (the LR check after each of its runs), so
nothing computed is lost; re-running the same call resumes: a stage whose inputs did not change is read back, and
the sweep resumes from its store. A stage's inputs (its cache key) include a fingerprint of the model (parameter
names, shapes and dtypes) and of the optimizer (class and defaults), the workload's options and base point, the
device, precision and seed (:func:`batchfit.study.identity.workload_fingerprint`, the one the sweep's study
name is made from), so a changed model never resumes another model's numbers.

The store holds the sweep's trials only; what ``tune`` measures beside the sweep, and the tolerance it decided
with, go to ``out_dir/stages.json`` (:func:`_write_stages`), so ``load_results(out_dir)`` returns everything the
report needs and ``recommend(load_results(out_dir))`` is what ``batchfit report out_dir`` prints.

The capabilities underneath (finder, noise, sweep, recommend, report) do not know about this module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchfit.cost import measure
from batchfit.errors import BatchfitError, ConfigError, NoisyEstimateWarning, WorkloadError
from batchfit.progress import ProgressEvent, ProgressFn, emit

if TYPE_CHECKING:  # the CLI imports this module to build its parser: keep torch out of that path
    from batchfit.decide import LRCheck, PrecisionCheck, PrecisionRun
    from batchfit.recommend import Recommendation
    from batchfit.study import SweepResult
    from batchfit.workload import Workload

def _lr_check_type() -> type:
    """:class:`batchfit.decide.LRCheck`, imported when first used (decide pulls in numpy and the study)."""
    from batchfit.decide import LRCheck

    return LRCheck


def __getattr__(name: str) -> Any:  # ``batchfit.tuning.LRCheck``, where the class lived before decide.py
    if name == "LRCheck":
        return _lr_check_type()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_BUDGET",
    "DEFAULT_NOISE_STEPS",
    "LRCheck",
    "RACE_MAX_SEEDS",
    "STAGES",
    "TuneResult",
    "default_batch_sizes",
    "framework_of",
    "lr_interval",
    "noise_probe_batch",
    "out_dir_lock",
    "race_round",
    "seeds_per_batch",
    "tune",
    "unfinished_replicates",
]

# Defaults sized so that `batchfit tune` on demo:digits-mlp (1,437 training samples) finishes in under 3 minutes
# on 2 CPU cores (docs/report.md has the measurement): 8 batch sizes from 16 to full batch, 20 epochs each at the
# rule's LR, a <= 100-step noise probe, and 4 evaluations per epoch at the smallest batch (at least one per epoch
# at every batch).
DEFAULT_BUDGET = "epochs:20"
DEFAULT_NOISE_STEPS = 100
STAGES = ("find", "noise", "lr_check", "step_time", "sweep", "precision", "batch_schedule_check", "report")
EVALS_PER_EPOCH = 4  # at the smallest batch size: finer steps-to-target at little cost
PRECISION_CHECK_STEPS = 48  # in PRECISION_ROUNDS interleaved rounds per precision
PRECISION_ROUNDS = 6
PRECISION_MIN_ROUND_STEPS = 4
LR_CALIBRATION_MULTIPLIERS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
LR_CALIBRATION_EXTEND = 3  # extra x2 steps when the best LR is at an edge of the range
LR_CALIBRATION_BUDGET_DIVISOR = 4  # each check run gets 1/4 of a sweep trial's steps at the base batch
LR_CHECK_SEEDS = 3  # seeds (in all) for the base and the best multiplier when their scores are close
PAIRED_MIN_SEEDS = 3  # the LR check's paired test needs this many shared seeds (else the unpaired intervals decide)
LR_CHECK_MIN_STEPS = 8  # a capped LR check runs at least this many steps (below, it would measure nothing)
LR_SHORT_CHECK_MAX_MOVE = 4.0  # a capped one-rung LR check far shorter than the run moves the base LR at most this
LR_RACE_MULTIPLIERS = (0.25, 1.0, 4.0, 16.0, 64.0)  # the race's first rung: x4 apart, x1/4 to x64 (docs/decisions.md)
LR_RACE_ETA = 4  # the capped LR check's second rung runs at least this many times the first rung's steps
LR_RACE_RUNG1_LRS = 4  # runs its second rung plans for: the first rung's best, its x1/2 and x2 neighbours, one more x2
#                        step past the rung's edge when the best is there
LR_CHECK_SMALLER_BATCH = (2, 4)  # a capped check whose share affords no race at the base batch tries base/2, base/4
LR_HORIZON_EXPONENT = 0.3  # the best LR falls as horizon^-0.3 (Bjorck et al. 2025): from the check's horizon to the run
LR_HORIZON_EXPONENT_RANGE = (0.2, 0.5)  # exponents measured or reported (docs/decisions.md): the LR interval spans them
LR_INTERVAL_EDGE_STEP = 2.0  # an LR interval whose tied LRs reach an edge of those tried reaches this much beyond
NOISE_MIN_STEPS = 10  # a capped noise probe with room for fewer steps is skipped
NOISE_PROBE_BATCH = 16  # the probe's batch when the workload's base batch is too small to split (B = 1)
STATE_FILE = "tune_state.json"
LOCK_FILE = ".batchfit.lock"  # in out_dir: held (flock) by the one tune writing there
RACE_MAX_SEEDS = 3  # racing adds seeds to undecided batch sizes up to this many
MAX_SEEDS = 64


# ---------------------------------------------------------------------------------------------------------------
# Typed results


@dataclass
class TuneResult:
    """Everything ``tune`` measured, composed: the sweep's result and, beside it, the finder's, the noise probe's,
    the LR check's and the precision check's, then the recommendation and the report's paths.

    ``to_dict()`` is results.json: the sweep's results with ``"find"``, ``"noise"``, ``"lr_calibration"``,
    ``"precision_check"`` and ``"step_time"`` (only when they ran), ``"recommendation"``, ``"tune_seconds"`` and
    ``"report"``.
    """

    sweep: Any  # batchfit.study's SweepResult (or its dict form)
    find: dict[str, Any] | None = None
    noise: dict[str, Any] | None = None
    lr_check: LRCheck | None = None
    precision_check: PrecisionCheck | None = None
    step_time: dict[str, Any] | None = None  # batchfit.steptime.StepTimeCalibration.to_dict()
    recommendation: Recommendation | None = None
    batch_schedule_check: dict[str, Any] | None = None  # tune(batch_schedule_check=True): batchfit.schedule_check
    train_budget: dict[str, Any] | None = None  # what the user will train, the cap, the per-trial budget
    report: dict[str, Any] = field(default_factory=dict)
    seconds: float | None = None
    tolerance: float | None = None  # the non-inferiority margin the recommendation was made with
    framework: str | None = None  # framework_of(workload): the recipe's snippets in the project's own form
    batch_form: dict[str, Any] | None = None  # batch_form_of(workload): how the project feeds its model

    def results(self) -> dict[str, Any]:
        """The measurements (the sweep's results and tune's stages) without the recommendation and report: the
        one place tune's stages join the sweep's results (the interim reports and racing read it too)."""
        data = dict(self.sweep.to_dict()) if hasattr(self.sweep, "to_dict") else dict(self.sweep)  # a copy
        data.update(find=self.find, noise=self.noise,
                    lr_calibration=self.lr_check.to_dict() if self.lr_check is not None else None)
        if self.precision_check is not None:
            data["precision_check"] = self.precision_check.to_dict()
        else:
            data.pop("precision_check", None)
        if self.step_time is not None:
            data["step_time"] = self.step_time
        if self.framework is not None:
            data["framework"] = self.framework
        if self.batch_form is not None:
            data["batch_form"] = self.batch_form
        if self.seconds is not None:
            data["tune_seconds"] = self.seconds
        if self.batch_schedule_check is not None:
            data["batch_schedule_check"] = self.batch_schedule_check
        if self.train_budget is not None:
            data["train_budget"] = self.train_budget
        if self.tolerance is not None:
            data["tolerance"] = self.tolerance
        from batchfit.cost import cost_of

        data["cost"] = cost_of(data).to_dict()
        return data

    def to_dict(self) -> dict[str, Any]:
        data = self.results()
        data["recommendation"] = self.recommendation.to_dict() if self.recommendation is not None else None
        data["report"] = dict(self.report)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TuneResult:
        from batchfit.decide import PrecisionCheck
        from batchfit.recommend import Recommendation

        own = ("find", "noise", "lr_calibration", "precision_check", "step_time", "recommendation", "report",
               "tune_seconds", "train_budget", "cost", "framework", "batch_form")
        cal, rec, check = data.get("lr_calibration"), data.get("recommendation"), data.get("precision_check")
        form = data.get("batch_form")
        return cls(
            sweep={k: v for k, v in data.items() if k not in own}, find=data.get("find"), noise=data.get("noise"),
            lr_check=_lr_check_type().from_dict(cal) if isinstance(cal, Mapping) else None,
            precision_check=PrecisionCheck.from_dict(check) if isinstance(check, Mapping) else None,
            step_time=data.get("step_time"),
            recommendation=Recommendation.from_dict(rec) if isinstance(rec, Mapping) else None,
            report=dict(data.get("report") or {}), seconds=data.get("tune_seconds"),
            train_budget=data.get("train_budget") if isinstance(data.get("train_budget"), Mapping) else None,
            tolerance=data.get("tolerance"), framework=data.get("framework"),
            batch_form=dict(form) if isinstance(form, Mapping) else None,
        )


# ---------------------------------------------------------------------------------------------------------------
# Settings


def default_batch_sizes(num_train: int, max_micro_batch: int | None = None,
                        base_batch_size: int | None = None) -> list[int]:
    """tune's candidates: the sweep's powers of two from 16 (extended past the memory limit by accumulation, up to
    64 x the largest micro-batch that fits) and the base batch, plus the full batch on small training sets, but not
    B = 1 (N steps per epoch is too slow for a default run). On demo:digits-mlp: 16, 32, ..., 1024 and 1437; on
    100,000 samples with no memory limit: 16 ... 65536 and the base batch."""
    from batchfit.study import FULL_BATCH_MAX_N, MAX_ACCUMULATION
    from batchfit.study import default_batch_sizes as sweep_defaults

    sizes = sweep_defaults(num_train, max_micro_batch, base_batch_size, extremes=False)
    upper = num_train if max_micro_batch is None else max_micro_batch * MAX_ACCUMULATION
    if num_train <= FULL_BATCH_MAX_N and num_train <= upper and num_train not in sizes:
        sizes.append(num_train)
    return sorted(sizes)


def noise_probe_batch(base_batch_size: int, num_train: int, fits: int | None) -> int:
    """The noise probe's batch: the base batch, or :data:`NOISE_PROBE_BATCH` when the base batch is 1 (the probe
    splits its batch into micro-batches), never more than the training set or the largest batch that fits."""
    batch = base_batch_size if base_batch_size >= 2 else NOISE_PROBE_BATCH
    limit = min(num_train, fits) if fits else num_train
    batch = min(batch, limit)
    if batch < 2:
        raise ConfigError(
            f"the noise probe needs a batch of at least 2 samples (it compares micro-batch gradients), but only "
            f"{limit} fit(s) here; skip it with noise=False"
        )
    return batch


def _auto_eval_every(num_train: int, smallest_batch: int, budget_kind: str) -> int | None:
    """4 evaluations per epoch at the smallest batch (finer steps-to-target for the batches with the most steps;
    the engine also evaluates at every epoch end); ``None`` (the sweep's ~16 per trial) for step/sample budgets."""
    if budget_kind != "epochs":
        return None
    per_epoch = max(1, num_train // smallest_batch)
    every = per_epoch // EVALS_PER_EPOCH
    return every if 1 <= every < per_epoch else None


def _jsonable(value: Any) -> Any:
    from batchfit._io import to_jsonable

    return json.loads(json.dumps(to_jsonable(value), sort_keys=True, default=repr))


def _identity(workload: Workload, options: Mapping[str, Any], *, device: str, precision: str,
              seed: int, parallel: str = "ddp") -> dict[str, Any]:
    """What every stage's result depends on (each stage adds its own settings to it); under torchrun the world
    size and how the ranks hold the model too."""
    from batchfit import distributed
    from batchfit.study.identity import workload_fingerprint

    regime = {name: getattr(workload, name, None) for name in ("grad_clip", "micro_batch_size")}
    return {"workload": workload.name, "num_train": workload.num_train, "options": _jsonable(dict(options)),
            "fingerprint": workload_fingerprint(workload).to_dict(), "base_batch_size": workload.base_batch_size,
            "base_lr": workload.base_lr, "regime": _jsonable(regime), "device": device, "precision": precision,
            "seed": seed, **({"world_size": distributed.world_size(), "parallel": parallel}
                             if distributed.world_size() > 1 else {})}


# ---------------------------------------------------------------------------------------------------------------
# Resume: a stage's result is reused when the settings it was computed with are unchanged


@dataclass(frozen=True)
class _Run:
    """One call of ``tune``: where results go, who hears about progress, and what every stage depends on."""

    out: Path
    progress: ProgressFn | None
    identity: dict[str, Any]
    device: str
    precision: str
    seed: int
    parallel: str = "ddp"  # under torchrun: ddp | fsdp
    lr_rule: str = "auto"  # the sweep's LR rule: an LR-check run below the base batch scales its LR by it ...
    weight_decay_rule: str = "keep"  # ... and its weight decay by this, as the sweep's trials at that batch do

    def emit(self, stage: str, kind: str, message: str = "", **kw: Any) -> None:
        emit(self.progress, stage, kind, message, **kw)

    def key(self, **settings: Any) -> dict[str, Any]:
        return _jsonable({**self.identity, **settings})

    def nested(self) -> ProgressFn | None:
        """For a capability that reports its own progress (the finder): its updates and records pass through,
        its start and end are tune's to announce (with the stage's one-line result)."""
        if self.progress is None:
            return None
        progress = self.progress

        def forward(event: ProgressEvent) -> None:
            if event.kind in ("update", "record"):
                progress(event)

        return forward


@contextlib.contextmanager
def out_dir_lock(out: Path) -> Iterator[None]:
    """Hold ``out/.batchfit.lock`` exclusively for the whole tune: a second tune on the same folder stops at once
    with one line naming the holder's pid (two tunes there would each run find, noise and the LR check, and print
    recommendations of which the files keep only one).

    An ``flock`` on an open descriptor: released when the tune ends, by an exception or Ctrl-C (closing it), and by
    the kernel when the process dies (``kill -9``), so a stale lock file never blocks. Where the platform or file
    system has no ``flock`` (Windows, some network mounts), tune runs unlocked, as before.
    """
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    path = out / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ConfigError(f"cannot write to out_dir {str(out)!r} ({exc.strerror}); give a folder you can write "
                          "to") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise ConfigError(f"another batchfit tune is writing to {out}{who}; wait for it or use another out_dir") \
                from None
        except OSError:  # no flock on this file system: run unlocked
            pass
        else:
            with contextlib.suppress(OSError):  # who holds it, for the message of the next one
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# A stage file (find.json ... precision.json) or tune_state.json that was hand-edited or cut short is not trusted:
# it is ignored with one warning line naming it, and that stage is measured again (its file is then rewritten).
_STAGE_WORDS = {"find": "the finder", "noise": "the noise probe", "lr": "the LR check",
                "step_time": "the step timing", "precision": "the precision check"}
_warned: set[tuple[str, int, int]] = set()  # (path, size, mtime): one warning per damaged file version


def _warn_damaged(path: Path, reason: str, then: str) -> None:
    try:
        st = path.stat()
        mark = (str(path), st.st_size, st.st_mtime_ns)
    except OSError:
        mark = (str(path), -1, -1)
    if mark in _warned:
        return
    _warned.add(mark)
    warnings.warn(f"{path} is damaged ({reason}); {then}", stacklevel=3)


def _load_json(path: Path) -> tuple[Any, str | None]:
    """``(data, None)``, or ``(None, why it cannot be read)``; a missing file is ``(None, None)``."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None, None
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"unreadable: {exc}"
    try:
        data = json.loads(text)
    except ValueError as exc:
        return None, f"not valid JSON: {' '.join(str(exc).split())}"
    return (data, None) if data is not None else (None, "it holds null, not an object")


def _read_state(out: Path, *, warn: bool = True) -> dict[str, Any]:
    """tune_state.json: which stage files hold which settings' results ({} when there is none, or it is damaged:
    every stage is then measured again)."""
    path = out / STATE_FILE
    data, why = _load_json(path)
    if why is None and data is not None and not isinstance(data, dict):
        why = f"it holds a {type(data).__name__}, not an object"
    if why is not None:
        if warn:
            _warn_damaged(path, why, "it is ignored and every stage is measured again")
        return {}
    return data or {}


def _number(value: Any, *, positive: bool = False) -> bool:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return ok and (value > 0 if positive else True)


def _run_problem(runs: Any) -> str | None:
    """What is wrong with the LR check's list of runs, if anything."""
    if not isinstance(runs, list):
        return f"runs is {type(runs).__name__}, not a list"
    for i, r in enumerate(runs):
        if not isinstance(r, Mapping):
            return f"runs[{i}] is {type(r).__name__}, not an object"
        if not _number(r.get("multiplier"), positive=True):
            return f"runs[{i}] has multiplier {r.get('multiplier')!r}"
        if r.get("score") is not None and not _number(r["score"]):
            return f"runs[{i}] has score {r['score']!r}"
        if r.get("seed") is not None and (isinstance(r["seed"], bool) or not isinstance(r["seed"], int)):
            return f"runs[{i}] has seed {r['seed']!r}"
    return None


def _lr_problem(data: Mapping[str, Any], partial: bool) -> str | None:
    """lr.json as :meth:`LRCheck.to_dict` writes it (partial: the runs so far)."""
    problem = _run_problem(data.get("runs"))
    if problem is not None or partial:
        return problem
    kinds = {"batch_size": "positive int", "steps": "positive int", "metric": "str", "base_lr": "positive",
             "best_multiplier": "positive", "lr": "positive", "kept_base": "bool", "intervals": "object",
             "decision": "str"}
    for name, kind in kinds.items():
        v = data.get(name)
        ok = {"positive int": isinstance(v, int) and not isinstance(v, bool) and v >= 1, "str": isinstance(v, str),
              "positive": _number(v, positive=True), "bool": isinstance(v, bool),
              "object": isinstance(v, Mapping)}[kind]
        if not ok:
            return f"{name} is {v!r}" if name in data else f"no {name}"
    if not math.isclose(data["lr"], data["base_lr"] * data["best_multiplier"], rel_tol=1e-6):
        return f"lr {data['lr']!r} is not base_lr x best_multiplier"
    return None


def _step_time_problem(data: Mapping[str, Any], partial: bool) -> str | None:
    """step_time.json as :meth:`StepTimeCalibration.to_dict` writes it (every timed step a positive number)."""
    from batchfit.steptime import StepTimeCalibration

    seconds = data.get("seconds")
    if not isinstance(seconds, Mapping):
        return f"seconds is {seconds!r}" if "seconds" in data else "no seconds"
    for b, values in seconds.items():
        if not (str(b).isdigit() and isinstance(values, list) and all(_number(x, positive=True) for x in values)):
            return f"seconds[{b!r}] is not a list of positive numbers"
    for name in ("micro_batch", "errors", "cost"):
        if data.get(name) is not None and not isinstance(data[name], Mapping):
            return f"{name} is {type(data[name]).__name__}, not an object"
    try:
        StepTimeCalibration.from_dict(data).intervals()
    except (TypeError, ValueError, AttributeError) as exc:
        return " ".join(str(exc).split())[:120]
    return None


def _find_problem(data: Mapping[str, Any], partial: bool) -> str | None:
    """find.json: what tune reads from it (the micro-batch that fits; the largest that fits, when there)."""
    if "recommended_batch_size" not in data:
        return "no recommended_batch_size"
    for name in ("recommended_batch_size", "max_batch_size"):
        v = data.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            return f"{name} is {v!r}"
    return None


def _noise_problem(data: Mapping[str, Any], partial: bool) -> str | None:
    """noise.json: its B_simple (null when unbounded)."""
    if "b_simple" not in data:
        return "no b_simple"
    v = data["b_simple"]
    return None if v is None or _number(v) else f"b_simple is {v!r}"


_PROBLEMS: dict[str, Callable[[Mapping[str, Any], bool], str | None]] = {
    "find": _find_problem, "noise": _noise_problem, "lr": _lr_problem, "step_time": _step_time_problem}


def _cached(out: Path, stage: str, key: Mapping[str, Any], *, partial: bool = False) -> dict[str, Any] | None:
    """The stored result of ``stage`` when it was computed with ``key`` (``partial``: an unfinished one). A file
    that is not what tune writes (not JSON, not an object, or a value of the wrong kind where tune reads one) is
    ignored with one warning line, and the stage is measured again."""
    state = _read_state(out)
    if state.get(f"{stage}:partial" if partial else stage) != _jsonable(key):
        return None
    path = out / f"{stage}.json"
    data, why = _load_json(path)
    if why is None and data is not None and not isinstance(data, dict):
        why = f"it holds a {type(data).__name__}, not an object"
    if why is None and isinstance(data, dict) and stage in _PROBLEMS:
        why = _PROBLEMS[stage](data, partial)
    if why is not None:
        _warn_damaged(path, why, f"{_STAGE_WORDS.get(stage, stage)} is measured again")
        return None
    return data


def _store(out: Path, stage: str, key: Mapping[str, Any], data: Mapping[str, Any], *, partial: bool = False) -> None:
    """Write a stage's result, then the note of the settings it was computed with (complete or ``partial``)."""
    from batchfit._io import write_json

    write_json(out / f"{stage}.json", data)  # the result first, then the note that it is there
    state = _read_state(out, warn=False)  # a damaged state was named when it was read; it is replaced now
    state.pop(f"{stage}:partial", None)
    state.pop(stage, None)
    state[f"{stage}:partial" if partial else stage] = _jsonable(key)
    write_json(out / STATE_FILE, state)


def _write_stages(out: Path, tolerance: float, stages: Mapping[str, Any]) -> None:
    """tune's stage results and tolerance in ``out``'s stages file (:data:`batchfit.study.results.STAGES_FILE`),
    beside the store that holds the trials: ``load_results(out)`` reads both. The store holds trials only."""
    from batchfit._io import write_json
    from batchfit.study.results import STAGES_FILE

    write_json(out / STAGES_FILE, {"tolerance": tolerance, "stages": _jsonable(
        {k: v for k, v in stages.items() if v is not None})})


# ---------------------------------------------------------------------------------------------------------------
# Stages


def _find(workload: Workload, run: _Run, *, memory_budget: int | None, batch_size_cap: int | None,
          margin: float, throughput: bool = True, why_cap: str | None = None) -> dict[str, Any]:
    """The finder; ``throughput=False`` under a cost cap (the step timing times the candidates; the finder's
    throughput curve costs several runs on a small workload)."""
    key = run.key(memory_budget=memory_budget, batch_size_cap=batch_size_cap, margin=margin,
                  **({} if throughput else {"throughput": False}))
    cached = _cached(run.out, "find", key)
    if cached is not None:
        run.emit("find", "end", f"resumed: fits {cached.get('recommended_batch_size')}, knee "
                                f"{cached.get('throughput_knee_batch_size')}", resumed=True)
        return cached
    from batchfit import distributed
    from batchfit.finder import find_batch_size, plan_vs_measured_line

    run.emit("find", "start", "largest batch that fits" + (", and the throughput knee" if throughput else ""))
    with measure() as spent:
        result = distributed.everywhere(
            find_batch_size, workload, device=run.device, precision=run.precision, memory_budget=memory_budget,
            batch_size_cap=batch_size_cap, margin=margin, throughput=throughput, seed=run.seed,
            progress=run.nested(), parallel=run.parallel).to_dict()
    result["cost"] = spent.to_dict()
    result.setdefault("margin", margin)
    planned = result.get("plan")  # the finder's extras, at the top of its dict
    if planned:  # on CUDA the finder started from batchfit.plan: its prediction next to the measurement
        result["plan_vs_measured"] = plan_vs_measured_line(planned)
        run.emit("find", "update", f"plan vs measured: {result['plan_vs_measured']}")
    if why_cap and result.get("limited_by") == "max_batch_size":  # the cap, not memory, ended the search: say why
        result["search_cap_reason"] = why_cap
        run.emit("find", "update", why_cap)
    _store(run.out, "find", key, result)
    run.emit("find", "end", f"fits {result.get('recommended_batch_size')} (with {margin:.0%} margin), throughput "
                            f"knee {result.get('throughput_knee_batch_size')}, {result.get('real_trials')} real trials")
    return result


def _noise(workload: Workload, run: _Run, *, steps: int, batch_size: int) -> dict[str, Any]:
    key = run.key(steps=steps, batch_size=batch_size)
    cached = _cached(run.out, "noise", key)
    if cached is not None:
        b = cached.get("b_simple")
        run.emit("noise", "end", "resumed: B_simple at initialisation "
                 + (f"{b:.3g}" if isinstance(b, (int, float)) else "unbounded"), resumed=True)
        return cached
    from batchfit import distributed
    from batchfit.noise import noise_scale

    run.emit("noise", "start", f"gradient noise scale B_simple at initialisation (batch {batch_size})", total=steps)

    def on_step(event: ProgressEvent) -> None:
        if event.kind != "update":
            return
        b = event.data.get("b_simple")
        run.emit("noise", "update", f"B_simple {b:.3g}" if isinstance(b, (int, float)) and math.isfinite(b) else "",
                 completed=int(event.data.get("step", 0)), total=steps)

    with warnings.catch_warnings(record=True) as caught:  # a wide interval is shown in the display, not as a
        warnings.simplefilter("always", NoisyEstimateWarning)  # Python warning in the middle of the live view
        try:
            with measure() as spent:
                result = distributed.everywhere(
                    noise_scale, workload, batch_size=batch_size, steps=steps, device=run.device,
                    precision=run.precision, seed=run.seed, progress=on_step, parallel=run.parallel)
        except ConfigError as exc:
            raise ConfigError(f"the noise probe at batch {batch_size} cannot run: {exc}; skip it with noise=False")\
                from exc
    data = result.to_dict()
    data["cost"] = spent.to_dict()
    noisy = [str(w.message) for w in caught if issubclass(w.category, NoisyEstimateWarning)]
    if noisy:
        data["warning"] = noisy[-1]
    _store(run.out, "noise", key, data)
    run.emit("noise", "end", result.reading() + (" (wide interval: an order-of-magnitude guide)" if noisy else ""))
    return data


def _lr_run(workload: Workload, run: _Run, metric: Any, batch: int, steps: int, m: float,
            seed: int | None = None) -> dict[str, Any]:
    """One LR-check run; its score is the mean of its last 3 evaluations (:func:`batchfit.decide.quality_of_trial`),
    not the maximum over its evaluations, which is biased up by the noise. At the base batch the LR is ``m`` x the
    base LR; below it, ``m`` x the sweep's LR rule's LR for ``batch`` (with everything else the rule moves), so
    ``m`` always multiplies the base LR."""
    from batchfit.decide import quality_of_trial
    from batchfit.study.trial import train_everywhere

    seed = run.seed if seed is None else seed
    common = dict(steps=steps, device=run.device, precision=run.precision, seed=seed, parallel=run.parallel)
    if batch >= _base_check_batch(workload):
        lr = workload.base_lr * m
        r = train_everywhere(workload, batch_size=batch, lr=lr, **common)
    else:  # below the base batch (a capped check's race, :func:`_check_batch`): the rule's LR there, x m
        r = train_everywhere(dataclasses.replace(workload, base_lr=workload.base_lr * m), batch_size=batch,
                             lr_rule=run.lr_rule, weight_decay_rule=run.weight_decay_rule, **common)
        lr = r.lr
    values = [v for h in r.history if (v := metric.of_record(h)) is not None]
    score = None if r.diverged or not values else quality_of_trial({"history": r.history}, metric)
    return {"multiplier": m, "lr": lr, "score": score, "diverged": r.diverged, "seconds": r.seconds,
            "samples": r.samples, "seed": seed}


def _lr_intervals(runs: Sequence[Mapping[str, Any]], metric: Any, num_val: int | None,
                  tolerance: float) -> dict[float, Any]:
    """Each multiplier's score as an interval: a t interval over its seeds, with one seed the validation set's
    sampling interval (binomial for an accuracy on ``num_val`` samples), widened to ``tolerance / 2``.

    Centred on the seed-adjusted estimate (:func:`_seed_adjusted`): the extra seeds go to two multipliers only, so
    a plain mean would compare their average seed with the other multipliers' first seed."""
    from batchfit.decide import sampling_interval
    from batchfit.stats import mean_interval

    by_m: dict[float, list[float]] = {}
    for r in runs:
        if r.get("score") is not None:
            by_m.setdefault(float(r["multiplier"]), []).append(float(r["score"]))
    adjusted = _seed_adjusted(runs)
    out = {}
    for m, vals in sorted(by_m.items()):
        iv = mean_interval(vals) if len(vals) > 1 else sampling_interval({"val_samples": num_val}, vals[0], metric,
                                                                           0.95)
        shift = adjusted.get(m, iv.estimate) - iv.estimate
        if shift:
            iv = dataclasses.replace(iv.shifted(shift), method=iv.method + "+seed-adjusted")
        out[m] = iv.with_margin(tolerance / 2)
    return out


def _scores(runs: Sequence[Mapping[str, Any]]) -> dict[tuple[float, int], float]:
    """``{(multiplier, seed): score}`` of the runs that scored (a repeated run: its last)."""
    return {(float(r["multiplier"]), int(r.get("seed") or 0)): float(r["score"]) for r in runs
            if r.get("score") is not None}


def _seed_adjusted(runs: Sequence[Mapping[str, Any]]) -> dict[float, float]:
    """Each multiplier's score with the seeds' effects taken out: least squares on ``score = a_m + b_seed``, read
    at the seeds' average (``a_m + mean(b)``). Every LR-check run of a seed shares its initialization and data
    order (common random numbers), and the check adds seeds to two multipliers only (the base and the best); a
    plain mean would put theirs on their seeds' average and the others on the first seed's. Balanced data (every
    multiplier on the same seeds) gives the plain means."""
    import numpy as np

    cells = _scores(runs)
    ms = sorted({m for m, _ in cells})
    seeds = sorted({s for _, s in cells}, key=lambda s: (-sum(1 for _, t in cells if t == s), s))
    if len(seeds) < 2 or all((m, s) in cells for m in ms for s in seeds):
        return {m: float(np.mean([v for (mm, _), v in cells.items() if mm == m])) for m in ms}
    x = np.zeros((len(cells), len(ms) + len(seeds) - 1))
    y = np.zeros(len(cells))
    for i, ((m, s), v) in enumerate(cells.items()):
        x[i, ms.index(m)] = 1.0
        if seeds.index(s):
            x[i, len(ms) + seeds.index(s) - 1] = 1.0
        y[i] = v
    coef = np.linalg.lstsq(x, y, rcond=None)[0]
    seed_mean = float(np.sum(coef[len(ms):])) / len(seeds)  # the first seed's effect is 0
    return {m: float(coef[i]) + seed_mean for i, m in enumerate(ms)}


def _paired_gain(runs: Sequence[Mapping[str, Any]], metric: Any, m: float, base: float = 1.0) -> Any:
    """``m``'s score minus ``base``'s on the seeds both ran (positive = ``m`` better), with a t interval over
    those paired differences: what a seed does to both runs cancels. ``None`` with fewer than
    :data:`PAIRED_MIN_SEEDS` shared seeds (two differences give a standard deviation on one degree of freedom:
    two equal ones by chance would give a zero-width interval), and when every difference is the same (an
    accuracy on a small validation set moves in steps of 1/n: equal differences by chance say nothing of the
    spread)."""
    from batchfit.stats import mean_interval

    cells = _scores(runs)
    sign = 1.0 if metric.higher_is_better else -1.0
    diffs = [sign * (cells[(m, s)] - cells[(base, s)]) for (mm, s) in cells if mm == m and (base, s) in cells]
    if len(diffs) < PAIRED_MIN_SEEDS or max(diffs) - min(diffs) <= 1e-12 * max(1.0, abs(diffs[0])):
        return None
    return mean_interval(diffs)


def _lr_decision(runs: Sequence[Mapping[str, Any]], metric: Any, num_val: int | None,
                 tolerance: float, contender: float | None = None) -> tuple[float, bool, dict[float, Any]]:
    """``(chosen multiplier, decided beyond the noise, intervals)``: the base LR (x1) is kept unless another
    multiplier is better beyond the noise; then the chosen multiplier is the peak of the LR-response curve
    (:func:`_lr_peak`), not the argmax of the noisy scores.

    "Beyond the noise": on one seed each, the best's interval lies entirely on the better side of the base's;
    once both have run on :data:`PAIRED_MIN_SEEDS` or more shared seeds, their paired difference
    (:func:`_paired_gain`) is above zero at 95 % and its estimate above the margin two intervals widened by
    ``tolerance / 2`` would need -- a paired test, as the batch-size decision's, since both runs of a seed share
    its initialization and data order. ``contender``: the multiplier tested against x1 (the one the extra seeds
    went to; default the best estimate); the chosen multiplier is still the curve's peak around the best."""
    ivs = _lr_intervals(runs, metric, num_val, tolerance)
    if not ivs:
        return 1.0, True, ivs
    best = _best_multiplier(ivs, metric)
    if 1.0 not in ivs:  # the base LR diverged (or gave nothing): the best that trained
        return _lr_peak(ivs, metric, best), True, ivs
    test = contender if contender in ivs else best
    if best == 1.0 or test == 1.0:
        return 1.0, True, ivs
    gain = _paired_gain(runs, metric, test)
    if gain is not None and gain.known:
        margin = tolerance / 2 * (abs(ivs[test].estimate) + abs(ivs[1.0].estimate))  # as two widened intervals
        better = gain.low > 0 and gain.estimate > margin  # type: ignore[operator]
    else:
        better = not ivs[test].overlaps(ivs[1.0])
    return (_lr_peak(ivs, metric, best), True, ivs) if better else (1.0, False, ivs)


def lr_interval(base_lr: float, chosen: float, ivs: Mapping[float, Any], metric: Any, tried: Sequence[float],
                factor: float, fraction: float) -> tuple[list[float], list[str]]:
    """The LR check's interval for the whole run and the sides where it is open.

    The multipliers tied with the best at the check's horizon (score intervals overlapping the best's; ``chosen``
    when none scored), carried to the train budget with the steepest and the flattest exponent of
    :data:`LR_HORIZON_EXPONENT_RANGE` (``fraction``: the check's horizon as a share of the run; ``factor``: the
    carrying actually applied). Where the tied multipliers reach an edge of ``tried`` (every multiplier run at the
    deciding rung; a diverged one too, since it bounds its side) nothing measured shows the response falling beyond
    it, so the interval reaches one :data:`LR_INTERVAL_EDGE_STEP` further that way, and that side is named
    (``"below"``, ``"above"``)."""
    best = _best_multiplier(ivs, metric)
    tied = [m for m in ivs if best is not None and ivs[m].overlaps(ivs[best])] or [chosen]
    steep, flat = (fraction ** e for e in (max(LR_HORIZON_EXPONENT_RANGE), min(LR_HORIZON_EXPONENT_RANGE)))
    low, high = min(min(tied), chosen), max(max(tied), chosen)
    edges = sorted({float(m) for m in tried})
    sides = [side for side, reached in (("below", len(edges) > 1 and low <= edges[0]),
                                         ("above", len(edges) > 1 and high >= edges[-1])) if reached]
    low /= LR_INTERVAL_EDGE_STEP if "below" in sides else 1.0
    high *= LR_INTERVAL_EDGE_STEP if "above" in sides else 1.0
    return [base_lr * low * min(steep, factor), base_lr * high * max(flat, factor)], sides


def _lr_peak(ivs: Mapping[float, Any], metric: Any, best: float) -> float:
    """The peak of the LR-response curve around the best-scoring multiplier: the vertex of the parabola through
    the best and its two neighbours in log2(LR) (classic three-point peak interpolation), kept inside the range of
    multipliers tied with the best (intervals overlapping its). Two LRs that score the same (x16 0.9528, x32
    0.9528) give the geometric middle instead of whichever a seed's noise put first; at the edge of the tried range,
    or where the curve is not peaked, the best multiplier itself."""
    ms = sorted(ivs)
    i = ms.index(best)
    tied = [m for m in ms if ivs[m].overlaps(ivs[best])]
    if i == 0 or i == len(ms) - 1:
        return best
    from batchfit.stats import three_point_peak

    pts = [(math.log2(ms[j]), -_order(metric, ivs[ms[j]].estimate)) for j in (i - 1, i, i + 1)]  # larger is better
    vertex = three_point_peak(pts)
    if vertex is None:  # not peaked (flat or convex): nothing to interpolate
        return best
    lo, hi = max(pts[0][0], math.log2(min(tied))), min(pts[2][0], math.log2(max(tied)))
    return float(2 ** min(max(vertex, lo), hi))


def _order(metric: Any, value: float) -> float:
    """Smaller is better."""
    return -value if metric.higher_is_better else value


def _best_multiplier(ivs: Mapping[float, Any], metric: Any) -> float | None:
    """The multiplier with the best score estimate, the one nearest x1 on a tie; ``None`` when nothing scored."""
    return min(ivs, key=lambda m: (_order(metric, ivs[m].estimate), abs(math.log2(m)))) if ivs else None


def _next_multiplier(runs: Sequence[Mapping[str, Any]], metric: Any) -> float | None:
    """Past an edge that is the best so far: one more x2 (or x1/2) step that way; else ``None``."""
    scored = [x for x in runs if x["score"] is not None]
    tried = sorted(x["multiplier"] for x in runs)
    if not scored or len(tried) < 2:
        return None
    best = min(scored, key=lambda x: metric.sort_key(x["score"]))
    if best["multiplier"] not in (tried[0], tried[-1]):
        return None
    return best["multiplier"] * (2.0 if best["multiplier"] == tried[-1] else 0.5)


def _lr_check_steps(batch: int, budget_steps: int, max_samples: int | None, multipliers: int,
                    replicates: int = LR_CHECK_SEEDS,
                    race_multipliers: int = len(LR_RACE_MULTIPLIERS)) -> tuple[int, int | None]:
    """``(steps of the first rung, steps of the second rung or None)`` for the LR check at ``batch``.

    Uncapped: one rung of ``multipliers`` LRs, each run a quarter of a sweep trial's steps (``budget_steps``).
    Capped (``max_samples``, the check's share of the cost cap): a race when the share affords it
    (:func:`_calibrate_lr`) -- the ``race_multipliers`` LRs of :data:`LR_RACE_MULTIPLIERS` for ``s0`` steps, then
    :data:`LR_RACE_RUNG1_LRS` runs for ``s1 >= LR_RACE_ETA * s0`` steps, ``s1`` as long as the share allows; else one
    rung of ``multipliers`` LRs sized for every run it may make (extensions and seeds too)."""
    steps = max(1, budget_steps // LR_CALIBRATION_BUDGET_DIVISOR)
    if max_samples is None:
        return steps, None
    room = max_samples // batch  # steps the share buys at this batch
    s0 = max(LR_CHECK_MIN_STEPS, int(room / (race_multipliers / LR_RACE_ETA + LR_RACE_RUNG1_LRS)) // LR_RACE_ETA)
    s1 = (room - race_multipliers * s0) // LR_RACE_RUNG1_LRS
    if s1 >= LR_RACE_ETA * s0:
        return s0, s1
    most_runs = multipliers + LR_CALIBRATION_EXTEND + 2 * (replicates - 1)
    return max(LR_CHECK_MIN_STEPS, min(steps, max_samples // (most_runs * batch))), None


def _base_check_batch(workload: Workload) -> int:
    """The batch the LR check runs at unless its share is too small for a race there: the base batch."""
    return _per_world(min(workload.base_batch_size, workload.num_train))


def _check_batch(workload: Workload, budget: Any, max_samples: int | None, multipliers: int, replicates: int,
                 race_multipliers: int, smallest: int | None) -> tuple[int, int, int | None]:
    """``(batch, s0, s1)`` of the LR check (:func:`_lr_check_steps`): at the base batch; but when the check's
    share of the cap cannot afford the race's second rung there, at the smallest of x1/4, x1/2 the base batch
    (not below ``smallest``, the smallest candidate; ``None``: not below the base batch) where it can -- the same
    samples buy 2-4x the steps -- with the LR rule carrying its LRs (:func:`_lr_run`); else at the base batch,
    one rung."""
    base = _base_check_batch(workload)
    s0, s1 = _lr_check_steps(base, budget.steps_for(base, workload.num_train), max_samples, multipliers,
                             replicates, race_multipliers)
    if max_samples is None or s1 is not None or smallest is None:
        return base, s0, s1
    for div in sorted(LR_CHECK_SMALLER_BATCH, reverse=True):  # the smallest allowed first: the most steps
        b = _per_world(max(1, base // div))
        if b >= base or b < smallest:
            continue
        t0, t1 = _lr_check_steps(b, budget.steps_for(b, workload.num_train), max_samples, multipliers,
                                 replicates, race_multipliers)
        if t1 is not None:
            return b, t0, t1
    return base, s0, s1


def _calibrate_lr(workload: Workload, run: _Run, *, budget: Any, multipliers: Sequence[float],
                  tolerance: float, replicates: int = LR_CHECK_SEEDS, max_samples: int | None = None,
                  train_samples: int | None = None,
                  race_multipliers: Sequence[float] = LR_RACE_MULTIPLIERS, smallest: int | None = None) -> LRCheck:
    """Check the workload's base LR (at its base batch, or below it under a small cap: :func:`_check_batch`); move it
    only when another LR is better beyond the noise.

    Every rule scales the LR *from* the base point, so an untuned base LR skews every batch size's result alike;
    Shallue et al. (2019) show that comparisons between batch sizes are only fair with the LR tuned. Each score is
    an interval (:func:`_lr_intervals`); when the best multiplier's overlaps the base's, both get more seeds (up to
    ``replicates`` in all; racing, Maron & Moore 1997) and the base LR moves only if the best is then better beyond
    the noise -- else it is kept and the check says so. Each finished run is saved at once (``lr.json``, marked
    partial), so a rerun after an interruption does not redo it.

    Uncapped, each run is a quarter of a sweep trial. Under the cost cap (``max_samples``, ``train_samples``) runs
    are far shorter than the run the answer is for, and short runs favour large LRs (Wu et al. 2018): measured on
    demo:mnist1d and demo:digits, the best LR at 6-20 % of the run is x1.4-x2 the best for the whole run, and at
    ~1 % (8 steps) up to x16. So the capped check is a race (successive halving, Jamieson & Talwalkar 2016): the
    ``race_multipliers`` (x4 apart, x1/4 to x64: the best at 1-5 % of the run lay at x16-x64 of the base on both
    demos, past the one-rung grid's x8) for a few steps to find the region, then the best and its x1/2 and x2
    neighbours for as long as the check's share allows; the LR is the peak at that longer horizon, scaled to the
    train budget by the power law the best LR follows in the horizon,
    ``(horizon / train budget) ** LR_HORIZON_EXPONENT`` (Bjorck et al. 2025).
    A share too small for the second rung runs one rung whose move is held at :data:`LR_SHORT_CHECK_MAX_MOVE`.
    """
    from batchfit.metric import Metric

    batch, s0, s1 = _check_batch(workload, budget, max_samples, len(multipliers), replicates, len(race_multipliers),
                                 smallest)
    below = batch < _base_check_batch(workload)  # the race below the base batch, through the LR rule
    short = bool(max_samples is not None and train_samples and 4 * (s1 or s0) * batch < train_samples)
    key = run.key(batch=batch, steps=s0, multipliers=list(multipliers), tolerance=tolerance,
                  replicates=replicates, score="smoothed-3", decision="paired, x1 in the second rung",
                  **({"race": [s0, s1], "horizon_exponent": LR_HORIZON_EXPONENT, "train_samples": train_samples,
                      "race_multipliers": list(race_multipliers)} if s1 else {}),
                  **({"lr_rule": run.lr_rule, "weight_decay_rule": run.weight_decay_rule}
                     if below else {}),
                  **({"short_clamp": LR_SHORT_CHECK_MAX_MOVE} if short and not s1 else {}))
    cached = _cached(run.out, "lr", key)
    if cached is not None:
        check = _lr_check_type().from_dict(cached)
        run.emit("lr_check", "end", f"resumed: base LR x{check.best_multiplier:g} = {check.lr:.3g}", resumed=True)
        return check
    partial = _cached(run.out, "lr", key, partial=True) or {}
    race = _LRRace(workload, run, Metric.for_workload(workload), batch, tolerance, key, max_samples,
                   {(r["multiplier"], r.get("seed", run.seed), r.get("steps", s0)): r
                    for r in partial.get("runs") or []})
    then = f", then the best 3 (one more past an edge) x {s1} steps" if s1 else ""
    first = race_multipliers if s1 else multipliers
    where = (f"(batch {workload.base_batch_size}) checked at batch {batch} through the LR rule" if below else
             f"at batch {batch}")
    run.emit("lr_check", "start", f"base LR {workload.base_lr:.3g} {where}: {len(first)} LRs x {s0} steps{then}",
             total=len(first) + (LR_RACE_RUNG1_LRS if s1 else 0))
    if s1:
        check = race.two_rungs(race_multipliers, s0, s1, replicates, train_samples)
        if below:
            check.decision += (f"; checked at batch {batch}, not the base batch {workload.base_batch_size}: the "
                               f"check's share of the cap buys the race's {s1}-step second rung only there, and "
                               f"each multiplier scales the LR rule's LR for batch {batch} (the base LR's)")
    else:
        check = race.one_rung(multipliers, s0, replicates, extend=not short, clamp=short,
                              train_samples=train_samples)
    _store(run.out, "lr", key, check.to_dict())
    run.emit("lr_check", "end", check.decision)
    return check


class _LRRace:
    """The LR check's runs (:func:`_calibrate_lr`): one rung, or two rungs of a race; every run saved at once."""

    def __init__(self, workload: Workload, run: _Run, metric: Any, batch: int, tolerance: float, key: Any,
                 max_samples: int | None, done: dict[tuple[float, int, int], dict[str, Any]]) -> None:
        self.wl, self.run, self.metric, self.batch, self.tolerance, self.key = (workload, run, metric, batch,
                                                                                tolerance, key)
        self.max_samples, self.done = max_samples, done
        self.gain: Any = None  # (contender, its paired difference from x1 or None) when extra seeds went to it
        self.check = _lr_check_type()(batch_size=batch, steps=0, metric=metric.name, base_lr=workload.base_lr, runs=[])

    def spent(self) -> int:
        return sum(int(r.get("samples") or 0) for r in self.check.runs)

    def affords(self, steps: int) -> bool:
        return self.max_samples is None or self.spent() + steps * self.batch <= self.max_samples

    def one(self, m: float, seed: int, steps: int, rung: int, left: int) -> None:
        if (m, seed, steps) in self.done:
            self.check.runs.append(self.done[(m, seed, steps)])
        else:
            r = _lr_run(self.wl, self.run, self.metric, self.batch, steps, m, seed=seed)
            self.check.runs.append({**r, "steps": steps, "rung": rung})
            _store(self.run.out, "lr", self.key, self.check.to_dict(), partial=True)
        score = self.check.runs[-1]["score"]
        self.run.emit("lr_check", "update", (f"x{m:g} {steps} steps seed {seed}: {self.metric.name} {score:.4g}"
                                             if score is not None else f"x{m:g} seed {seed}: diverged"),
                      completed=len(self.check.runs), total=len(self.check.runs) + left)

    def rung(self, steps: int) -> list[dict[str, Any]]:
        return [r for r in self.check.runs if r.get("steps", steps) == steps]

    def decide(self, steps: int, rung: int,
               replicates: int) -> tuple[float, float | None, bool, dict[float, Any]]:
        """``(chosen, best, decided, intervals)`` on the runs of ``steps`` steps; when the best is inside the base's
        noise, more seeds for both (while the share affords them)."""
        num_val = self.wl.num_val
        runs = self.rung(steps)
        chosen, decided, ivs = _lr_decision(runs, self.metric, num_val, self.tolerance)
        contender = _best_multiplier(ivs, self.metric)  # the extra seeds go to it and x1, so that they pair
        for extra_seed in range(1, replicates):
            if decided or contender is None or not self.affords(2 * steps):
                break
            for m in (1.0, contender):
                self.one(m, self.run.seed + extra_seed, steps, rung, 0)
            runs = self.rung(steps)
            chosen, decided, ivs = _lr_decision(runs, self.metric, num_val, self.tolerance, contender=contender)
        self.gain = None
        if contender not in (None, 1.0) and 1.0 in ivs and any(r.get("seed", self.run.seed) != self.run.seed
                                                               for r in runs):
            self.gain = (contender, _paired_gain(runs, self.metric, contender))
        return chosen, _best_multiplier(ivs, self.metric), decided, ivs

    def one_rung(self, multipliers: Sequence[float], steps: int, replicates: int, *, extend: bool, clamp: bool,
                 train_samples: int | None) -> LRCheck:
        check, todo, extended = self.check, list(multipliers), 0
        check.steps = steps
        while todo:
            self.one(todo.pop(0), self.run.seed, steps, 0, len(todo))
            nxt = _next_multiplier(check.runs, self.metric) if not todo and extend and \
                extended < LR_CALIBRATION_EXTEND else None
            if nxt is not None:
                extended += 1
                todo.append(nxt)
                self.run.emit("lr_check", "update", f"best at the edge: trying x{nxt:g}",
                              completed=len(check.runs), total=len(check.runs) + 1)
        chosen, best, decided, ivs = self.decide(steps, 0, replicates)
        text = _lr_decision_text(self.wl.base_lr, chosen, best, decided, ivs, self.metric.name,
                                 self.gain)
        if clamp and not (1 / LR_SHORT_CHECK_MAX_MOVE <= chosen <= LR_SHORT_CHECK_MAX_MOVE):
            chosen = min(max(chosen, 1 / LR_SHORT_CHECK_MAX_MOVE), LR_SHORT_CHECK_MAX_MOVE)
            text += (f"; held at x{chosen:g}: runs of {steps} steps ({steps * self.batch / train_samples:.0%} of the "
                     f"train budget) move the base LR at most x{LR_SHORT_CHECK_MAX_MOVE:g} (short runs favour large "
                     "LRs)")
        return self._finish(chosen, ivs, text, 1.0, tried=[r["multiplier"] for r in check.runs])

    def two_rungs(self, multipliers: Sequence[float], s0: int, s1: int, replicates: int,
                  train_samples: int | None) -> LRCheck:
        check = self.check
        check.steps = s1
        todo = list(multipliers)
        while todo:
            self.one(todo.pop(0), self.run.seed, s0, 0, len(todo) + LR_RACE_RUNG1_LRS)
        _, decided0, ivs0 = _lr_decision(self.rung(s0), self.metric, self.wl.num_val, self.tolerance)
        if not ivs0:
            return self._finish(1.0, ivs0, _lr_decision_text(self.wl.base_lr, 1.0, None, True, ivs0,
                                                             self.metric.name), 1.0)
        c = _best_multiplier(ivs0, self.metric)
        # the first rung only locates the region; a best inside x1's noise there (every LR at chance, say) has not
        # shown that the base LR should move at all, so x1 runs at the longer horizon too, and the decision there
        # compares against it (it takes the place of the step past an edge)
        with_base = c != 1.0 and 1.0 not in (c / 2, c * 2) and not decided0
        for m in (*((1.0,) if with_base else ()), c, c / 2, c * 2):  # (x1 first: the decision needs it)
            if self.affords(s1):
                self.one(m, self.run.seed, s1, 1, 0)
        for _ in range(LR_CALIBRATION_EXTEND):  # the best at the second rung's edge: one more x2 that way
            nxt = _next_multiplier(self.rung(s1), self.metric)
            if nxt is None or not self.affords(s1):
                break
            self.one(nxt, self.run.seed, s1, 1, 0)
        chosen, best, decided, ivs = self.decide(s1, 1, replicates)
        x1_ran = any(float(r["multiplier"]) == 1.0 for r in self.rung(s1))
        text = _lr_decision_text(self.wl.base_lr, chosen, best, decided, ivs, self.metric.name, self.gain,
                                 no_base=(f"x1 diverged at {s1} steps" if x1_ran else
                                          f"x1 was left at the first rung, where x{c:g} beat it beyond the noise"))
        if with_base:
            text += (f"; the first rung's best, x{c:g}, was inside x1's noise at {s0} steps, so x1 ran at {s1} "
                     "steps too")
        fraction = min(1.0, s1 * self.batch / train_samples) if train_samples else 1.0
        factor = fraction ** LR_HORIZON_EXPONENT if chosen != 1.0 else 1.0
        check.rungs = [{"steps": s0, "multipliers": sorted(ivs0)}, {"steps": s1, "multipliers": sorted(ivs)}]
        check.horizon_fraction = round(fraction, 6)
        lo, hi = min(LR_HORIZON_EXPONENT_RANGE), max(LR_HORIZON_EXPONENT_RANGE)
        if factor != 1.0:
            text += (f"; x{chosen:.3g} is the best at {s1} steps ({fraction:.1%} of the train budget), and the best "
                     f"LR falls with the horizon as horizon^-{LR_HORIZON_EXPONENT:g} (Bjorck et al. 2025): "
                     f"x{factor:.3g} for the whole run -> x{chosen * factor:.3g} (x{chosen * fraction ** hi:.3g}-"
                     f"x{chosen * fraction ** lo:.3g} with exponents {lo:g}-{hi:g}: the train budget is "
                     f"{1 / fraction:.0f}x the check's horizon, an extrapolation)")
        return self._finish(chosen, ivs, text, factor, fraction if factor != 1.0 else 1.0,
                            tried=[r["multiplier"] for r in self.rung(s1)])

    def _finish(self, chosen: float, ivs: Mapping[float, Any], text: str, factor: float,
                fraction: float = 1.0, tried: Sequence[float] = ()) -> LRCheck:
        """The check's result, its ``lr_interval`` and the sides it is open on from :func:`lr_interval` (``tried``:
        every multiplier run at the deciding rung)."""
        check = self.check
        check.best_multiplier = chosen * factor
        check.lr, check.kept_base = self.wl.base_lr * chosen * factor, chosen == 1.0
        check.lr_at_check_horizon = self.wl.base_lr * chosen
        check.horizon_factor = factor
        check.intervals = {f"{m:g}": iv.to_dict() for m, iv in ivs.items()}
        check.lr_interval, check.lr_interval_open = lr_interval(self.wl.base_lr, chosen, ivs, self.metric, tried,
                                                                factor, fraction)
        if check.lr_interval_open and ivs:  # (nothing scored: the text already says so)
            text += (f"; the LRs tied with the best reach the {' and the '.join(check.open_ends)} of those tried, so "
                     f"the LR interval reaches one x{LR_INTERVAL_EDGE_STEP:g} step beyond")
        check.decision = text
        return check


def _lr_decision_text(base_lr: float, chosen: float, best: float | None, decided: bool, ivs: Mapping[float, Any],
                      name: str, gain: Any = None, no_base: str = "x1 gave no score") -> str:
    """The check's decision in words; ``gain``: ``(contender, its paired difference from x1 or None)``
    (:func:`_paired_gain`) when more seeds went to a contender; ``no_base``: why x1 has no score here."""
    if best is None:
        return f"kept the base LR {base_lr:.3g}: no LR-check run gave a score"
    paired = ""
    if gain is not None:
        m, g = gain
        if g is not None and g.known:
            paired = (f" (paired over {g.n} seeds, x{m:g} better than x1 by {g.estimate:+.3g} [{g.low:+.3g}, "
                      f"{g.high:+.3g}])")
        if chosen == 1.0 and m in ivs:
            best = m  # a kept base: name the multiplier that was tested against it (the one with the seeds)
    if chosen != 1.0:
        base = f" vs x1 {ivs[1.0]}{paired}" if 1.0 in ivs else f" ({no_base})"
        peak = "" if chosen == best else (f"; x{chosen:.3g} is the peak of the LR-response curve through x{best:g} "
                                          "and its neighbours")
        return (f"base LR {base_lr:.3g} -> {base_lr * chosen:.3g}: x{best:g} scored {name} {ivs[best]}{base}, "
                f"better beyond the noise{peak}")
    if best == 1.0:
        return f"kept the base LR {base_lr:.3g}: x1 scored the best {name} {ivs[1.0]}"
    seeds = ivs[best].n if ivs[best].known else 1
    return (f"kept the base LR {base_lr:.3g}: x{best:g} scored {name} {ivs[best]} vs x1 {ivs[1.0]}{paired}, inside "
            f"the noise over {seeds} seed(s), so the base LR stays")


def _step_time(workload: Workload, run: _Run, micro: Mapping[int, int],
               max_samples: int | None = None) -> dict[str, Any] | None:
    """Every candidate batch size's step, at the micro-batch the recommendation would give it, timed in
    interleaved rounds (:func:`batchfit.steptime.calibrate_step_time`) before the sweep, so that racing and the
    recommendation decide on the same time per step."""
    from batchfit.runtime import resolve_device
    from batchfit.steptime import calibrate_step_time

    if len(micro) < 2:
        return None
    from batchfit import distributed

    if distributed.world_size() > 1:  # each rank's clock differs: the sweep's own trials (slowest rank) time them
        run.emit("step_time", "end", "not run under torchrun: the sweep's trials time every candidate (the slowest "
                                     "rank's samples/s, gradient communication included)")
        return None
    key = run.key(micro_batches={str(b): m for b, m in sorted(micro.items())},
                  **({} if max_samples is None else {"max_samples": max_samples}))
    cached = _cached(run.out, "step_time", key)
    if cached is not None:
        run.emit("step_time", "end", "resumed", resumed=True)
        return cached
    run.emit("step_time", "start", f"seconds per step at {len(micro)} batch sizes, interleaved rounds")
    with measure() as spent:
        cal = calibrate_step_time(workload, micro, device=resolve_device(run.device), precision=run.precision,
                                  seed=run.seed, max_samples=max_samples)
    data = cal.to_dict()
    data["cost"] = spent.to_dict()
    _store(run.out, "step_time", key, data)
    ivs = cal.intervals()
    ends = sorted({min(ivs), max(ivs)}) if ivs else []
    run.emit("step_time", "end", f"{cal.rounds} rounds ({cal.clock})" + "".join(
        f"; batch {b}: {ivs[b].estimate * 1e3:.3g} ms" for b in ends))
    return data


def _precision_round(workload: Workload, run: _Run, rec: Recommendation, precision: str, steps: int,
                     dev: Any) -> PrecisionRun:
    from batchfit import distributed
    from batchfit.decide import PrecisionRun
    from batchfit.study.trial import train_everywhere

    try:  # the recommended warm-up (shared_warmup), though this check's run is shorter
        r = train_everywhere(workload, batch_size=rec.batch_size, micro_batch_size=rec.micro_batch_size, lr=rec.lr,
                             warmup=rec.warmup_steps, steps=steps, precision=precision, device=dev, seed=run.seed,
                             drop_last=True, eval_every=steps, parallel=run.parallel, shared_warmup=True)
    except BatchfitError as exc:
        if distributed.leading():  # under torchrun the other ranks may be inside the failed run: the job ends
            raise
        return PrecisionRun("failed", error=str(exc))
    last = r.history[-1] if r.history else {}
    return PrecisionRun("diverged" if r.diverged else "ok", samples_per_s=r.samples_per_s,
                        step_seconds=rec.batch_size / r.samples_per_s if r.samples_per_s else None,
                        peak_memory_bytes=r.peak_memory_bytes, train_loss=last.get("train_loss"),
                        val_loss=last.get("val_loss"), seconds=r.seconds)


def _precision_check(workload: Workload, run: _Run, rec: Recommendation, *, steps: int,
                     rounds: int = PRECISION_ROUNDS, max_samples: int | None = None) -> PrecisionCheck:
    """The recommended configuration in fp32 and bf16, timed in ``rounds`` interleaved rounds (fp32, bf16, fp32,
    bf16, ...) of ``steps // rounds`` steps each, so a load change on the machine hits both alike; each round gives
    one step time per precision, and :func:`batchfit.decide.advise_precision` decides from the two samples (a
    speed-up must exceed the measured noise, memory counts only where it binds)."""
    import statistics

    from batchfit.decide import PrecisionCheck, PrecisionRun
    from batchfit.runtime import resolve_device
    from batchfit.step import check_precision

    dev = resolve_device(run.device)
    if run.precision == "fp16":
        return PrecisionCheck(note="the sweep ran in fp16; bf16 vs fp32 was not compared")
    try:
        check_precision("bf16", dev)
    except ConfigError as exc:
        return PrecisionCheck(note=f"bf16 is not available here ({exc})")
    per_round = max(PRECISION_MIN_ROUND_STEPS, steps // rounds)
    if max_samples is not None:  # the cost cap's share: fewer steps a round, then fewer rounds (at least 2)
        afford = max_samples // (2 * rec.batch_size)  # steps per precision
        rounds = max(2, min(rounds, afford // PRECISION_MIN_ROUND_STEPS))
        per_round = min(per_round, afford // rounds)
        if per_round < PRECISION_MIN_ROUND_STEPS:
            need = 2 * 2 * PRECISION_MIN_ROUND_STEPS * rec.batch_size
            return PrecisionCheck(note=f"not run: the cost cap leaves {max_samples:,} samples for it and it needs "
                                       f"{need:,} (2 precisions x 2 rounds x {PRECISION_MIN_ROUND_STEPS} steps at "
                                       f"batch {rec.batch_size}); raise --max-cost to compare bf16 with fp32",
                                  cost={"samples": 0, "seconds": 0.0})
        steps = per_round * rounds
    key = run.key(steps=steps, rounds=rounds, batch_size=rec.batch_size, micro_batch_size=rec.micro_batch_size,
                  lr=rec.lr, warmup_steps=rec.warmup_steps)
    cached = _cached(run.out, "precision", key)
    if cached is not None:
        run.emit("precision", "end", "resumed", resumed=True)
        return PrecisionCheck.from_dict(cached)
    run.emit("precision", "start", f"fp32 vs bf16 at batch {rec.batch_size}: {rounds} interleaved rounds of "
                                   f"{per_round} steps", total=2 * rounds)
    runs: dict[str, list[PrecisionRun]] = {"fp32": [], "bf16": []}
    with measure() as spent:
        for i in range(rounds):
            for p in ("fp32", "bf16"):
                runs[p].append(_precision_round(workload, run, rec, p, per_round, dev))
                run.emit("precision", "update", f"round {i + 1}: {p}", completed=2 * i + (p == "bf16") + 1,
                         total=2 * rounds)
            if not (runs["fp32"][-1].ok and runs["bf16"][-1].ok):
                break  # a failed or diverged run: the comparison stops there
    sides: dict[str, PrecisionRun] = {}
    for p, rs in runs.items():
        ok = [r for r in rs if r.ok]
        bad = next((r for r in rs if not r.ok), None)
        if bad is not None or not ok:
            sides[p] = bad or PrecisionRun("failed", error="no run finished")
            continue
        times = [float(r.step_seconds) for r in ok if isinstance(r.step_seconds, (int, float)) and r.step_seconds]
        losses = [r.train_loss for r in ok if r.train_loss is not None]
        sides[p] = PrecisionRun("ok", step_seconds=tuple(times),
                                samples_per_s=rec.batch_size / statistics.median(times) if times else None,
                                peak_memory_bytes=ok[0].peak_memory_bytes,
                                train_loss=statistics.median(losses) if losses else None,
                                val_loss=ok[-1].val_loss, seconds=sum(r.seconds or 0.0 for r in ok))
    check = PrecisionCheck(steps=per_round * rounds, rounds=rounds, steps_per_round=per_round,
                           batch_size=rec.batch_size, micro_batch_size=rec.micro_batch_size, cost=spent.to_dict(),
                           fp32=sides["fp32"], bf16=sides["bf16"])
    _store(run.out, "precision", key, check.to_dict())
    sp = [side.samples_per_s if side is not None else None for side in (check.fp32, check.bf16)]
    run.emit("precision", "end", "median samples/s fp32 {} vs bf16 {}".format(
        *(f"{x:.0f}" if x else "-" for x in sp)))
    return check


class _SweepProgress:
    """Forwards the sweep's events as tune's ``sweep`` stage (``update`` counts finished trials; a running trial's
    start and steps become ``record`` events), and rewrites results.json and the report (without plots, which are
    slow) after every finished trial, so a partial study is always readable. ``results_of(swept)``: the sweep's
    results with tune's stages (:meth:`TuneResult.results`)."""

    def __init__(self, run: _Run, tolerance: float, results_of: Callable[[Any], dict[str, Any]]) -> None:
        self.run, self.tolerance, self.results_of = run, tolerance, results_of
        self.started = False

    def __call__(self, event: ProgressEvent) -> None:
        name = event.data.get("event")
        results = event.data.get("results")
        if name == "trial_end" and results is not None:
            from batchfit.report import write_report

            write_report(self.results_of(results), self.run.out, tolerance=self.tolerance, plots=False,
                         interim=True)
        kind = "record" if name in ("trial_start", "step") else event.kind
        # racing runs the sweep again for the added seeds: the stage starts once, and tune announces its end
        if kind == "start":
            kind, self.started = ("update" if self.started else "start"), True
        elif kind == "end":
            kind = "update"
        if self.run.progress is not None:
            data = {k: v for k, v in event.data.items() if k != "results"}
            self.run.progress(dataclasses.replace(event, stage="sweep", kind=kind, data=data))


# ---------------------------------------------------------------------------------------------------------------
# The recipe


def framework_of(workload: Workload) -> str:
    """``keras``, ``lightning`` or ``hf`` when the workload was made by that integration, else ``pytorch``."""
    module = getattr(workload.optimizer_fn, "__module__", "") or ""
    for name in ("keras", "lightning", "hf"):
        if module.startswith(f"batchfit.integrations.{name}"):
            return name
    return "pytorch"


def batch_form_of(workload: Workload) -> dict[str, Any]:
    """How the project feeds its model, for a recipe in its own form (issue 23.4): a collate function, batches
    that are mappings passed as keywords, a loss the model's output carries."""
    fwd = workload.forward
    mapping = workload.loss_fn == "output" or isinstance(fwd, (list, tuple)) or isinstance(workload.targets, str)
    return {"collate_fn": getattr(workload.collate_fn, "__name__", None) or (
                type(workload.collate_fn).__name__ if workload.collate_fn is not None else None),
            "mapping": bool(mapping), "loss_from_output": workload.loss_fn == "output",
            "targets_key": workload.targets if isinstance(workload.targets, str) else None,
            "schedule_warmup": _schedule_warmup(workload)}


def _schedule_warmup(workload: Workload, total: int = 1000) -> float | None:
    """The share of a run the user's own ``lr_schedule`` spends ramping up to its peak (OneCycleLR's
    ``pct_start``, a linear warm-up), read from the schedule built for ``total`` steps on a throwaway optimizer;
    ``None`` without a schedule or a ramp (or when the probe cannot run)."""
    from batchfit.step import schedule_lrs

    if getattr(workload, "lr_schedule", None) is None:
        return None
    try:
        lrs = schedule_lrs(workload.lr_schedule, total, total - 1)
    except Exception:  # noqa: BLE001 - a description only: nothing is claimed when the probe cannot run
        return None
    peak = max(range(len(lrs)), key=lambda i: lrs[i])
    return peak / total if peak > 0 and lrs[0] < 0.99 * lrs[peak] else None


def seeds_per_batch(results: Mapping[str, Any], *, finished: bool = True) -> dict[int, int]:
    """How many seeds each batch size has finished (its best-covered LR multiplier); ``finished=False``: how many
    it has in the store at all (started, failed, interrupted or queued too)."""
    seen: dict[tuple[int, float], set[Any]] = {}
    for t in results.get("trials") or []:
        if not finished or t.get("status") in ("ok", "diverged"):
            seen.setdefault((int(t["batch_size"]), float(t.get("lr_multiplier") or 1.0)), set()).add(t.get("seed"))
    out: dict[int, int] = {}
    for (b, _), s in seen.items():
        out[b] = max(out.get(b, 0), len(s))
    return out


def race_round(results: Mapping[str, Any], *, tolerance: float, cap: int) -> tuple[dict[int, int], str]:
    """One racing step (Maron & Moore 1997; Birattari et al. 2002) for the non-inferiority rule
    (:func:`batchfit.decide.decide`): ``({batch: seeds wanted}, why)``, one more seed for

    - the finalists — the reference (best estimate) and the chosen batch size — until they have
      :data:`batchfit.decide.FINALIST_SEEDS` (a choice is never final on fewer), and
    - every batch size the data cannot yet place whose time to target is below the chosen one's
      (:meth:`batchfit.decide.Decision.faster_undecided`: only these can still change the choice),

    each up to ``cap`` seeds. The decision splits its level over the racing rounds (its ``looks``), so stopping
    on the data does not inflate its error rates. An empty dict: the choice is settled (or the cap reached)."""
    from batchfit.decide import FINALIST_SEEDS
    from batchfit.recommend import decide_results, metric_of

    decision = decide_results(results, tolerance, metric_of(results))
    if decision is None:
        return {}, "no finished trial"
    have = seeds_per_batch(results)
    want: dict[int, int] = {}
    for b in sorted({decision.reference, decision.batch_size}):
        if have.get(b, 1) < min(FINALIST_SEEDS, cap):
            want[b] = have.get(b, 1) + 1
    open_ = decision.faster_undecided()
    for b in open_:
        if have.get(b, 1) < cap:
            want[b] = have.get(b, 1) + 1
    if want:
        parts = []
        fin = [b for b in want if b in (decision.reference, decision.batch_size)]
        if fin:
            parts.append(f"finalist(s) {', '.join(map(str, fin))} need {min(FINALIST_SEEDS, cap)} seeds")
        und = [b for b in want if b in open_ and b not in fin]
        if und:
            parts.append(f"undecided and faster: {', '.join(map(str, und))}")
        return want, "; ".join(parts) + " -> another seed"
    if open_:
        return {}, f"seed cap {cap} reached for the undecided batch sizes {', '.join(map(str, open_))}"
    return {}, (f"settled: batch {decision.batch_size} is the fastest batch size non-inferior to batch "
                f"{decision.reference}, and no faster one is undecided")


def unfinished_replicates(results: Mapping[str, Any]) -> dict[int, int]:
    """``{batch: seeds}`` covering every seed the store holds for a batch size, for the batch sizes where one of
    those seeds beyond the first has not finished (interrupted, running, queued or failed): the replicates an
    earlier run (racing, ``seeds``) started. Racing's verdict is read again from the trials on a rerun and may no
    longer ask for such a seed (the other trials of its round finished meanwhile), so ``tune`` runs them first:
    an interrupted trial is re-run, never left counted as failed. Empty when every started seed finished."""
    done = seeds_per_batch(results)
    return {b: n for b, n in seeds_per_batch(results, finished=False).items() if n > 1 and n > done.get(b, 0)}


def _race(swept: Any, run_sweep: Any, results_of: Callable[[Any], dict[str, Any]], run: _Run, *, tolerance: float,
          cap: int, cost_cap: float | None = None, per_trial: int | None = None) -> Any:
    """Add seeds where they can change the decision (:func:`race_round`) until nothing is left to decide, every
    candidate that could still win has ``cap`` seeds, the next seeds would pass the cost cap (``cost_cap``
    samples in all, ``per_trial`` samples a trial: then the finalists come first, then the faster undecided, as
    many as fit), or a round finished none of the seeds it asked for (they failed: asking again would loop).
    Read from the trials alone, so an interrupted or resumed ``tune`` reaches the same verdict. ``results_of(swept)``:
    the sweep's results with tune's stages (:meth:`TuneResult.results`)."""
    from batchfit.cost import cost_of

    replicates = {b: n for b, n in seeds_per_batch(results_of(swept), finished=False).items() if n > 1}
    while True:
        data = results_of(swept)
        want, why = race_round(data, tolerance=tolerance, cap=cap)
        if want and cost_cap is not None and per_trial:
            room = int((cost_cap - cost_of(data).samples) // per_trial)
            if room < len(want):
                keep = dict(list(want.items())[:max(0, room)])
                why = (f"cost cap: room for {max(0, room)} of {len(want)} more trial(s)"
                       + (f" ({', '.join(map(str, keep))})" if keep else "; racing stops"))
                want = keep
        run.emit("sweep", "update", f"racing: {why}", racing=dict(want))
        if not want:
            return swept
        for b, n in want.items():
            replicates[b] = max(replicates.get(b, 1), n)
        before = seeds_per_batch(data)
        swept = run_sweep(dict(replicates))
        after = seeds_per_batch(results_of(swept))
        if all(after.get(b, 0) <= before.get(b, 0) for b in want):  # every seed asked for failed: stop, recorded
            failed = ", ".join(map(str, sorted(want)))
            run.emit("sweep", "update", f"racing stops: the next seed of batch {failed} failed (the report's table of "
                     "trials says why)", racing={})
            return swept


MIN_PLANNED_STEPS = 8  # a capped sweep leaves out a candidate batch size that would train fewer optimizer steps


def _train_budget(wl: Workload, train_budget: str | None, explicit: Any) -> Any:
    """What the user will train: ``train_budget``, else the workload's own, else the measurement budget the caller
    set, else :data:`DEFAULT_BUDGET`."""
    from batchfit.cost import parse_train_budget

    given = train_budget if train_budget is not None else getattr(wl, "train_budget", None)
    if given is None:
        given = str(explicit) if explicit is not None else DEFAULT_BUDGET
    return parse_train_budget(given)


def _useful_cap(total: int, max_cost: float | None, cap: int | None, bud: Any) -> int | None:
    """The finder's search cap under a cost cap: the largest batch any planned trial could train for
    :data:`MIN_PLANNED_STEPS` steps (the horizon one lone candidate would get), so the finder does not probe batch
    sizes the sweep cannot use (on a small train budget its probes of the whole training set cost more than a run).
    Uncapped, or with a per-trial budget set by hand, the caller's cap."""
    if max_cost is None or bud is not None:
        return cap
    from batchfit.cost import plan_horizon

    useful = max(1, plan_horizon(total, max_cost, 1)[0] // MIN_PLANNED_STEPS)
    return useful if cap is None else min(cap, useful)


def _first_round(wl: Workload, sizes: Sequence[int], lr_rule: str, lr_search: int) -> int:
    """The sweep's trials before racing: ``lr_search`` per batch size, more where the LR rule is outside its range
    (:func:`batchfit.study.lr_multipliers_by_batch`)."""
    from batchfit.study import lr_multipliers_by_batch
    from batchfit.study.identity import workload_fingerprint

    fp = workload_fingerprint(wl)
    rule = lr_rule if lr_rule != "auto" else ("adam-sqrt" if fp.adam_family else "linear")
    betas = fp.optimizer.get("defaults", {}).get("betas") if fp.adam_family else None
    wide = lr_multipliers_by_batch(list(sizes), lr_search, rule=rule, base_batch_size=wl.base_batch_size,
                                   betas=None if betas is None else (float(betas[0]), float(betas[1])))
    return sum(len(wide.get(int(b), ())) or lr_search for b in sizes)


def _measurement_plan(wl: Workload, train: Any, explicit: Any, max_cost: float | None,
                      sizes: list[int], *, spent: int = 0,
                      first_round: Any = None) -> tuple[Any, list[int], dict[str, Any]]:
    """``(per-trial budget, candidates, plan)``: the budget every sweep trial trains and the plan tune stores.

    An explicit ``budget`` is used as given; uncapped, every trial trains the train budget (an equal-samples budget
    for ``steps``/``tokens`` train budgets: equal steps would give the large batches more data); capped, an equal
    number of samples from :func:`batchfit.cost.plan_horizon`, and candidates that would get fewer than
    :data:`MIN_PLANNED_STEPS` optimizer steps are left out."""
    from batchfit.cost import plan_horizon, train_budget_samples
    from batchfit.study import Budget

    total = train_budget_samples(train, num_train=wl.num_train, base_batch_size=wl.base_batch_size,
                                 tokens_per_sample=getattr(wl, "tokens_per_sample", None))
    note, dropped = "", []
    if explicit is not None:
        bud = explicit
    elif max_cost is None:
        bud = Budget("epochs", train.value) if train.kind == "epochs" else Budget("samples", float(total))
    else:
        from batchfit.noise import HALVES_EVERY

        overhead = 1.0 / HALVES_EVERY  # every trial measures B_simple with an extra pass every HALVES_EVERY steps
        keep = list(sizes)
        while True:  # leaving a candidate out gives the others more samples: drop until none is too short
            first = first_round(keep) if first_round is not None else len(keep)
            h, runs = plan_horizon(total, max_cost, len(keep), spent=spent, first_round=first, overhead=overhead)
            now = [b for b in keep if h // b >= MIN_PLANNED_STEPS] or [min(keep)]
            if now == keep:
                break
            keep = now
        for b in sorted(set(sizes) - set(keep)):  # the horizon grew as sizes left: take back those it now fits
            first = first_round(keep + [b]) if first_round is not None else len(keep) + 1
            h2, runs2 = plan_horizon(total, max_cost, len(keep) + 1, spent=spent, first_round=first,
                                     overhead=overhead)
            if h2 // b >= MIN_PLANNED_STEPS:
                keep, h, runs = sorted(keep + [b]), h2, runs2
        floor = MIN_PLANNED_STEPS * min(sizes)  # the least horizon that measures anything at the smallest batch
        short = h < floor
        h = max(h, floor)
        bud = Budget("samples", float(h))
        dropped = [b for b in sizes if b not in keep]
        sizes = keep
        note = (f"cost cap {max_cost:g} run(s) of {train} ({total:,} samples): each trial trains {h:,} samples "
                f"({h / total:.0%} of the train budget; about {runs:.0f} trials expected)"
                + (f"; left out {', '.join(map(str, dropped))}: fewer than {MIN_PLANNED_STEPS} steps at that "
                   "horizon" if dropped else "")
                + (f"; the cap cannot be met on this workload: the finder and the noise probe already spent "
                   f"{spent / total:.2f} run(s), so each trial trains the least useful horizon" if short else ""))
    per_trial = int(bud.value * wl.num_train) if bud.kind == "epochs" else (
        int(bud.value) if bud.kind == "samples" else None)
    from batchfit.noise import HALVES_EVERY

    trial_cost = None if per_trial is None else int(per_trial * (1 + 1 / HALVES_EVERY)) + max(sizes)
    plan = {"budget": str(train), "samples": total, "max_cost": max_cost, "measurement": str(bud),
            "measurement_samples": per_trial, "trial_cost_samples": trial_cost, "dropped": dropped, "note": note,
            "cap_samples": None if max_cost is None else max_cost * total}
    return bud, sizes, plan


def _check_warmup(wl: Workload, warmup: Any, bud: Any, train: Any) -> None:
    """The warm-up, before any work: a step count or a fraction below 1, in steps no longer than the longest trial
    the sweep can run (batch 1 at the measurement budget; without one, the train budget or the least horizon a
    capped plan gives)."""
    from batchfit.cost import train_budget_samples
    from batchfit.engine import check_warmup, resolve_warmup

    resolve_warmup(warmup, 1)  # the value's own rules
    if bud is not None:
        longest = bud.steps_for(1, wl.num_train)
    else:
        total = train_budget_samples(train, num_train=wl.num_train, base_batch_size=wl.base_batch_size,
                                     tokens_per_sample=getattr(wl, "tokens_per_sample", None))
        longest = max(total, MIN_PLANNED_STEPS * wl.num_train)
    check_warmup(warmup, longest, "the longest trial this budget gives")


def _candidates(wl: Workload, fits: int | None, cap: int | None) -> list[int]:
    """The default candidates (:func:`default_batch_sizes`) up to ``cap``."""
    sizes = default_batch_sizes(wl.num_train, fits, wl.base_batch_size)
    if cap is not None:
        sizes = [b for b in sizes if b <= cap] or [min(cap, wl.num_train)]
    return sorted({_per_world(b) for b in sizes})  # under torchrun: global batches every rank gets a share of


def _per_world(batch: int) -> int:
    """``batch`` rounded down to a multiple of the torchrun world size (at least the world size); unchanged in one
    process."""
    from batchfit import distributed

    world = distributed.world_size()
    return max(world, batch - batch % world)


def _check_inputs(wl: Workload, *, batch_sizes: Any, budget: str, target: Any, tolerance: float, lr_search: int,
                  noise_steps: int, eval_every: Any, device: str, precision: str, seed: int, find: bool,
                  memory_budget: Any, batch_size_cap: int | None, seeds: int | None = None,
                  max_seeds: int = 3) -> tuple[Any, list[int] | None, int | None]:
    """Every argument checked before any work: ``(budget, batch sizes or None, memory budget in bytes)``."""
    from batchfit import checks
    from batchfit.memory import parse_bytes
    from batchfit.runtime import resolve_device
    from batchfit.step import check_precision
    from batchfit.study import parse_batch_sizes, parse_budget, parse_target

    bud = parse_budget(budget) if budget is not None else None
    parse_target(target)
    sizes = None if batch_sizes is None else parse_batch_sizes(batch_sizes)
    if sizes is not None and max(sizes) > wl.num_train:
        raise ConfigError(f"batch size {max(sizes)} exceeds the training set ({wl.num_train} samples); use batch "
                          f"sizes <= {wl.num_train}")
    checks.fraction("tolerance", tolerance, low_open=False, hint="write e.g. 0.01 for 1 %")
    from batchfit.study import MAX_LR_SEARCH

    checks.positive_int("lr_search", lr_search, maximum=MAX_LR_SEARCH)  # the sweep's bound, before the first stage
    checks.positive_int("noise_steps", noise_steps)
    checks.positive_int("batch_size_cap", batch_size_cap, allow_none=True)
    checks.seed(seed)
    checks.positive_int("seeds", seeds, allow_none=True, maximum=MAX_SEEDS)
    checks.positive_int("max_seeds", max_seeds, maximum=MAX_SEEDS)
    checks.seed_range(seed, max(seeds or max_seeds, LR_CHECK_SEEDS), "the replicate seeds (seeds, racing, LR check)")
    if not (isinstance(eval_every, str) and eval_every == "auto"):
        checks.positive_int("eval_every", eval_every, allow_none=True, hint="or give 'auto' or None")
    check_precision(precision, resolve_device(device))
    budget_bytes = parse_bytes(memory_budget) if memory_budget is not None else None
    if budget_bytes is not None and not find:
        raise ConfigError("memory_budget is only applied by the finder, and find=False skips it; drop memory_budget "
                          "or let the finder run")
    return bud, sizes, budget_bytes


SCHEDULE_CHECK_REFERENCE_STEPS = 1000  # a total every sane schedule takes: tells a total's failure from the probe's
SCHEDULE_CHECK_MAX_STEPS = 50_000  # a longer total is built and stepped this far (the check stays within seconds)


def _schedule_totals(wl: Workload, *, bud: Any, sizes: Sequence[int] | None, cap: int | None, train: Any,
                     max_cost: float | None, lr_check: bool, precision_check: bool, lr_rule: str,
                     lr_search: int) -> dict[int, str]:
    """``{total_steps: the stage that first trains that many steps}``: every total the plan gives the user's
    ``lr_schedule`` (the LR check's runs, each candidate's sweep trials, the precision check's rounds), computed as
    :func:`tune` computes them, before the finder. The finder's limit and what the finder and the noise probe spend
    are not known yet: the candidates are those without a memory limit (a superset) and a capped plan's horizon is
    the one with nothing spent yet. The noise probe measures at initialisation (no optimizer step, no schedule)."""
    from batchfit.cost import allowance, train_budget_samples

    total = train_budget_samples(train, num_train=wl.num_train, base_batch_size=wl.base_batch_size,
                                 tokens_per_sample=getattr(wl, "tokens_per_sample", None))
    cands = list(sizes) if sizes else _candidates(wl, None, cap)
    pbud, psizes, _ = _measurement_plan(wl, train, bud, max_cost, cands, spent=0,
                                        first_round=lambda bs: _first_round(wl, bs, lr_rule, lr_search))
    totals: dict[int, str] = {}
    if lr_check:  # as _calibrate_lr
        batch = min(wl.base_batch_size, wl.num_train)
        for steps in _lr_check_steps(batch, pbud.steps_for(batch, wl.num_train), allowance("lr_check", total, max_cost),
                                     len(LR_CALIBRATION_MULTIPLIERS)):
            if steps:
                totals.setdefault(steps, f"the LR check's runs (batch {batch}) have {steps} steps")
    for b in sorted(psizes):
        steps = pbud.steps_for(b, wl.num_train)
        totals.setdefault(steps, f"the sweep's trials at batch {b} have {steps} steps")
    if precision_check:  # as _precision_check, for each candidate the recommendation may be
        for b in sorted(psizes):
            rounds = PRECISION_ROUNDS
            per_round = max(PRECISION_MIN_ROUND_STEPS, PRECISION_CHECK_STEPS // rounds)
            most = allowance("precision", total, max_cost)
            if most is not None:
                afford = most // (2 * b)
                rounds = max(2, min(rounds, afford // PRECISION_MIN_ROUND_STEPS))
                per_round = min(per_round, afford // rounds)
                if per_round < PRECISION_MIN_ROUND_STEPS:
                    continue  # not run at this batch
            totals.setdefault(per_round, f"the precision check's rounds (batch {b}) have {per_round} steps")
    return totals


def _schedule_error(wl: Workload, total_steps: int) -> BaseException | None:
    """What the workload's ``lr_schedule`` raises when built for ``total_steps`` on a throwaway optimizer (the
    workload's own over one dummy parameter, else SGD with momentum) and stepped as training steps it (once after
    every optimizer step, up to :data:`SCHEDULE_CHECK_MAX_STEPS`); ``None`` when it runs."""
    import torch

    param = torch.nn.Parameter(torch.zeros(1))
    try:
        optimizer = wl.optimizer_fn([param], wl.base_lr)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError
    except Exception:  # noqa: BLE001 - a factory that needs the real model: a stand-in with momentum and betas
        optimizer = torch.optim.SGD([param], lr=wl.base_lr, momentum=0.9)
    from batchfit.step import schedule_lrs

    try:
        schedule_lrs(wl.lr_schedule, total_steps, min(total_steps, SCHEDULE_CHECK_MAX_STEPS), optimizer=optimizer)
    except Exception as exc:  # noqa: BLE001 - reported by the caller
        return exc
    return None


def _check_lr_schedule(wl: Workload, **plan: Any) -> None:
    """Issue 23.2: the user's ``lr_schedule`` at every total number of steps the plan will give it
    (:func:`_schedule_totals`), before the first expensive stage: a schedule that fails at one of them (OneCycleLR
    with ``pct_start=0.1`` divides by zero at ``total_steps=10``) stops tune with one line naming the stage and the
    total, instead of a crash after the finder and the noise probe. A schedule that also fails at
    :data:`SCHEDULE_CHECK_REFERENCE_STEPS` is left to the run itself (the throwaway optimizer may be what it
    rejects; the first stage reports it)."""
    if getattr(wl, "lr_schedule", None) is None:
        return
    totals = _schedule_totals(wl, **plan)
    failures = {n: exc for n in sorted(totals) if (exc := _schedule_error(wl, n)) is not None}
    if not failures or _schedule_error(wl, SCHEDULE_CHECK_REFERENCE_STEPS) is not None:
        return
    n = next(n for n in totals if n in failures)  # the plan's first stage that would fail
    exc = failures[n]
    msg = " ".join(str(exc).split())[:200]
    others = sorted(set(failures) - {n})
    also = f" (also at total_steps={', '.join(map(str, others[:5]))})" if others else ""
    raise WorkloadError(f"{totals[n]}: your lr_schedule failed at total_steps={n}: {type(exc).__name__}: {msg}"
                        f"{also}; make lr_schedule work for any total_steps >= 1 (OneCycleLR, e.g., divides by zero "
                        f"when pct_start x total_steps is 1), or change the budget so that no run has {n} steps")


def tune(
    workload: Workload | str = "demo:digits-mlp",
    *,
    out_dir: str | Path = "batchfit-out",
    batch_sizes: Sequence[int] | None = None,
    budget: str | None = None,
    lr_rule: str = "auto",
    lr_search: int = 1,
    warmup: int | float = 0,
    target: Any = 0.97,
    storage: str | None = None,
    study_name: str | None = None,
    device: str = "cpu",
    precision: str = "fp32",
    seed: int = 0,
    memory_budget: int | str | None = None,
    batch_size_cap: int | None = None,
    margin: float = 0.05,
    noise_steps: int = DEFAULT_NOISE_STEPS,
    eval_every: int | str | None = "auto",
    tolerance: float = 0.01,
    find: bool = True,
    noise: bool = True,
    precision_check: bool = True,
    lr_calibration: bool = True,
    sharpness: bool = False,
    retry_failed: bool = False,
    workload_options: Mapping[str, Any] | None = None,
    progress: ProgressFn | None = None,
    max_batch_size: int | None = None,
    seeds: int | None = None,
    max_seeds: int = RACE_MAX_SEEDS,
    batch_schedule_check: bool = False,
    weight_decay_rule: str = "keep",
    train_budget: str | None = None,
    max_cost: float | str | None = "auto",
    parallel: str = "ddp",
) -> TuneResult:
    """Measure and recommend the batch size for a workload: find, noise, lr_check, step_time, sweep, precision,
    report (:data:`STAGES`).

    Args:
        out_dir: where every result is written as it completes (also the default Optuna store,
            ``sqlite:///<out_dir>/batchfit.db``); re-running with the same ``out_dir`` resumes. One tune at a time
            writes there (:func:`out_dir_lock`): a second one on the same folder is a ``ConfigError`` at once.
        batch_sizes: effective batch sizes to compare (default :func:`default_batch_sizes`: powers of two from 16
            up to 64 x the largest micro-batch that fits, the base batch, and the full batch on small sets).
        train_budget: what the user will train, ``samples:N``, ``steps:S`` (at the base batch), ``epochs:E`` or
            ``tokens:T`` (default: the workload's ``train_budget``, else :data:`DEFAULT_BUDGET`). The answer is for
            this budget, and every result states its cost in runs of it (``results.json["cost"]``).
        max_cost: what batchfit may spend, in runs of the train budget. ``"auto"`` (default):
            :data:`batchfit.cost.DEFAULT_MAX_COST` (1.0) when tune plans its own measurement (no ``budget``),
            uncapped when ``budget`` sets it; ``None``: uncapped, every candidate trains the whole train budget.
            Capped, each stage after the finder gets its share (:data:`batchfit.cost.STAGE_SHARES`: the noise
            probe's steps, the LR check's steps, step timing's rounds and chunks, the precision check's rounds),
            the finder skips its throughput curve (step timing times the candidates), each sweep trial trains an
            equal number of samples chosen so the whole tune fits (:func:`batchfit.cost.plan_horizon`),
            candidates that would get fewer than :data:`MIN_PLANNED_STEPS` steps are left out (and named), and
            racing stops at the cap.
        budget: the per-trial measurement budget, ``epochs:E``, ``steps:S`` or ``samples:N``, when you want to set
            it yourself (default: planned from ``train_budget`` and ``max_cost``).
        lr_search: learning rates tried per batch size around the rule's (1 = the rule's only).
        target: the fraction of the best validation metric that counts as "converged" (time-to-target).
        memory_budget: the finder's memory budget (bytes or ``"512MiB"``); it needs the finder (``find=True``).
        batch_size_cap: the largest batch size to consider (``max_batch_size`` is its old name).
        eval_every: evaluate every N optimizer steps; ``"auto"`` = 4 evaluations per epoch at the smallest batch
            with an epoch budget (every batch also evaluates at each epoch end), the sweep's default otherwise.
        tolerance: recommend among batch sizes within this relative tolerance of the best validation metric.
        find / noise / precision_check: run those stages (the sweep and report always run).
        lr_calibration: first check the workload's base LR at its base batch (x1/4 ... x8, a quarter of the budget
            each, extended by up to 3 x2 steps while the best is at an edge) and move it when another is better by
            more than ``tolerance``; every batch's LR is scaled from it.
        retry_failed: run the sweep's failed trials again, each once per tune (interrupted ones always are); a
            failure that persists is recorded and racing stops at a seed that keeps failing.
        seeds: train every configuration with this many seeds (``seed``, ``seed + 1``, ...). ``None`` (default):
            race — one seed per configuration first, then one more seed at a time only for the batch sizes whose
            quality interval still overlaps the best one's, until the decision is stable (nothing undecided, or
            another seed left the chosen batch unchanged) or ``max_seeds``.
        progress: called with a :class:`~batchfit.progress.ProgressEvent` per stage start / update / record / end
            (stages :data:`STAGES`); a consumer may handle only the kinds it wants. The CLI's live display is one.
        weight_decay_rule: ``keep`` (default) or ``timescale``: every sweep trial's weight decay keeps the base
            batch's AdamW timescale ``B / (lr x weight_decay)`` (:func:`batchfit.scaling.scale_lr`).
        batch_schedule_check: also compare a batch-size warm-up derived from the measured local critical batch
            with the best fixed batch (:func:`batchfit.schedule_check.compare`; off by default: it trains every
            arm with >= 3 seeds), before the report.
        parallel: under torchrun (``torchrun --nproc-per-node N ...``), ``ddp`` (every rank holds the model) or
            ``fsdp`` (FSDP2 shards parameters, gradients and optimizer state). Rank 0 decides everything and writes
            every file; every rank trains each stage's runs with it (:func:`batchfit.distributed.run_led`). Batch
            sizes are global (effective) batches, multiples of the world size; the recommendation names the
            micro-batch per rank, the accumulation and the world size. Step timing is left to the sweep's trials
            (the slowest rank's clock); sharpness and the batch-schedule check do not run under torchrun.

    Returns a :class:`TuneResult` (``to_dict()`` is results.json). A workload without validation data is ranked on
    its training loss, and the recommendation says so.

    >>> res = tune("demo:digits-mlp", out_dir="/tmp/bf")  # doctest: +SKIP
    >>> res.recommendation.batch_size  # doctest: +SKIP
    """
    kwargs = {k: v for k, v in locals().items() if k != "workload"}  # first: exactly the parameters
    from batchfit import distributed
    from batchfit.loading import load_workload

    options = dict(workload_options or {}) if isinstance(workload_options, Mapping) else {}
    return distributed.run_led(_tune, workload, kwargs,  # type: ignore[no-any-return]
                               lambda spec: load_workload(spec, **options))


def _tune(workload: Any, **kwargs: Any) -> TuneResult:
    args = _TuneArgs(workload=workload, **kwargs)
    t_start = time.perf_counter()
    prep = _prepare(args)
    with out_dir_lock(prep.out):  # the whole tune: one writer per out_dir (a second tune stops at once)
        from batchfit.study.integrity import check_store

        check_store(prep.storage)  # a damaged store is found now, not after find, noise and the LR check
        stages = _measure(args, prep)
        swept = _sweep_and_race(args, prep, stages)
        return _conclude(args, prep, stages, swept, t_start)


@dataclass
class _TuneArgs:
    """:func:`tune`'s parameters, as given."""

    workload: Any
    out_dir: Any
    batch_sizes: Any
    budget: Any
    lr_rule: str
    lr_search: int
    warmup: Any
    target: Any
    storage: Any
    study_name: Any
    device: str
    precision: str
    seed: int
    memory_budget: Any
    batch_size_cap: Any
    margin: float
    noise_steps: int
    eval_every: Any
    tolerance: float
    find: bool
    noise: bool
    precision_check: bool
    lr_calibration: bool
    sharpness: bool
    retry_failed: bool
    workload_options: Any
    progress: Any
    max_batch_size: Any
    seeds: Any
    max_seeds: int
    batch_schedule_check: bool
    weight_decay_rule: str
    train_budget: Any
    max_cost: Any
    parallel: str = "ddp"


@dataclass
class _Prepared:
    """What :func:`tune` settles before any work (validated inputs) and refines as the stages report: the
    workload (its base LR after the LR check), the candidates, the per-trial budget and the micro-batch limit."""

    wl: Workload
    run: _Run
    out: Path
    storage: str
    bud: Any
    sizes: list[int] | None
    budget_bytes: int | None
    cap: int | None
    train: Any
    max_cost: float | None
    total: int
    eval_every: Any = None
    fits: int | None = None
    plan: dict[str, Any] = field(default_factory=dict)


def _check_parallel(a: _TuneArgs, wl: Workload) -> None:
    """``parallel`` and what does not run under torchrun, before any work."""
    from batchfit import distributed, sharding

    sharding.check_parallel(a.parallel, a.precision)
    world = distributed.world_size()
    if world == 1:
        return
    if a.sharpness or a.batch_schedule_check:
        raise ConfigError(f"{'sharpness' if a.sharpness else 'the batch-schedule check'} does not run under torchrun "
                          "yet; tune without it, or in one process")
    from batchfit.study import parse_batch_sizes

    uneven = [b for b in parse_batch_sizes(a.batch_sizes) if b % world] if a.batch_sizes is not None else []
    if uneven:
        raise ConfigError(f"batch size(s) {', '.join(map(str, uneven))} do not split evenly over {world} ranks; "
                          f"give multiples of {world}")
    if wl.num_train < world:
        raise ConfigError(f"the training set has {wl.num_train} samples, fewer than the {world} ranks")


def _prepare(a: _TuneArgs) -> _Prepared:
    """Validate everything before any work; a problem is one ``ConfigError`` line and nothing is written."""
    from batchfit import checks, distributed
    from batchfit.cost import DEFAULT_MAX_COST, train_budget_samples
    from batchfit.loading import load_workload
    from batchfit.scaling import RULE_CHOICES, WEIGHT_DECAY_RULES

    options = dict(a.workload_options or {})
    wl = load_workload(a.workload, **options)
    distributed.lead_workload(wl)  # under torchrun: the workload every rank's jobs refer to
    _check_parallel(a, wl)
    checks.positive_int("max_batch_size", a.max_batch_size, allow_none=True)
    cap = a.batch_size_cap if a.batch_size_cap is not None else a.max_batch_size
    bud, sizes, budget_bytes = _check_inputs(
        wl, batch_sizes=a.batch_sizes, budget=a.budget, target=a.target, tolerance=a.tolerance, lr_search=a.lr_search,
        noise_steps=a.noise_steps, eval_every=a.eval_every, device=a.device, precision=a.precision, seed=a.seed,
        find=a.find, memory_budget=a.memory_budget, batch_size_cap=cap, seeds=a.seeds, max_seeds=a.max_seeds)
    checks.one_of("lr_rule", a.lr_rule, RULE_CHOICES)
    checks.one_of("weight_decay_rule", a.weight_decay_rule, WEIGHT_DECAY_RULES)
    train = _train_budget(wl, a.train_budget, bud)
    max_cost = a.max_cost
    if max_cost == "auto":
        max_cost = DEFAULT_MAX_COST if bud is None else None
    checks.positive_number("max_cost", max_cost, allow_none=True,
                           hint="give runs of the train budget (e.g. 1.0), \"auto\" or None (uncapped)")
    total = train_budget_samples(train, num_train=wl.num_train, base_batch_size=wl.base_batch_size,
                                 tokens_per_sample=getattr(wl, "tokens_per_sample", None))
    _check_warmup(wl, a.warmup, bud, train)
    out = Path(a.out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out_dir {str(out)!r} is a file; give a directory")
    run = _Run(out, a.progress, _identity(wl, options, device=a.device, precision=a.precision, seed=a.seed,
                                          parallel=a.parallel), a.device, a.precision, a.seed, a.parallel,
               a.lr_rule, a.weight_decay_rule)
    out.mkdir(parents=True, exist_ok=True)
    storage = a.storage or f"sqlite:///{(out / 'batchfit.db').resolve()}"
    return _Prepared(wl=wl, run=run, out=out, storage=storage, bud=bud, sizes=sizes, budget_bytes=budget_bytes,
                     cap=cap, train=train, max_cost=max_cost, total=total, eval_every=a.eval_every)


def _measure(a: _TuneArgs, p: _Prepared) -> dict[str, Any]:
    """Stages 1-3 and step timing: find, noise, the plan, the LR check, step time (each under its share of the
    cost cap); returns the stage results the sweep stores beside its trials."""
    from batchfit.cost import allowance, cost_of
    from batchfit.recommend import micro_batch_for

    wl, run = p.wl, p.run
    _check_lr_schedule(wl, bud=p.bud, sizes=p.sizes, cap=p.cap, train=p.train, max_cost=p.max_cost,
                       lr_check=a.lr_calibration, precision_check=a.precision_check and a.precision != "fp16",
                       lr_rule=a.lr_rule, lr_search=a.lr_search)  # issue 23.2: every total the plan gives, before find
    useful = _useful_cap(p.total, p.max_cost, p.cap, p.bud)
    why = None if useful is None or useful == p.cap else (
        f"searched up to batch {useful}: the largest batch a trial can train for {MIN_PLANNED_STEPS} steps under "
        f"the cost cap ({p.max_cost:g} run(s) of {p.train}); larger sizes could not be compared")
    find_result = _find(wl, run, memory_budget=p.budget_bytes, batch_size_cap=useful, margin=a.margin,
                        throughput=p.max_cost is None, why_cap=why) if a.find else None
    p.fits = int(find_result["recommended_batch_size"]) if find_result and find_result.get(
        "recommended_batch_size") else None
    noise_result = _noise_stage(a, p) if a.noise else None
    sizes = p.sizes or _candidates(wl, p.fits, p.cap)
    spent = cost_of({"find": find_result, "noise": noise_result}).samples
    p.bud, p.sizes, p.plan = _measurement_plan(wl, p.train, p.bud, p.max_cost, sizes, spent=spent,
                                               first_round=lambda bs: _first_round(wl, bs, a.lr_rule, a.lr_search))
    if p.plan["note"]:
        run.emit("sweep", "update", p.plan["note"])
    if p.eval_every == "auto":
        p.eval_every = _auto_eval_every(wl.num_train, min(p.sizes), p.bud.kind)
    if p.fits is None and not a.find:
        p.fits = max(p.sizes)  # no finder: no memory limit (the sweep would otherwise run its own finder)
    lr_check = None
    if a.lr_calibration:
        lr_check = _calibrate_lr(wl, run, budget=p.bud, multipliers=LR_CALIBRATION_MULTIPLIERS, tolerance=a.tolerance,
                                 max_samples=allowance("lr_check", p.total, p.max_cost), train_samples=p.total,
                                 smallest=min(p.sizes))
        if lr_check.best_multiplier != 1.0:
            p.wl = dataclasses.replace(wl, base_lr=lr_check.lr)
    # the time per step of every candidate, in interleaved rounds: what racing and the recommendation decide on
    step_time = _step_time(p.wl, run, {b: micro_batch_for(b, find_result, p.fits) for b in p.sizes},
                           max_samples=allowance("step_time", p.total, p.max_cost))
    return {"find": find_result, "noise": noise_result, "lr_check": lr_check, "step_time": step_time}


def _noise_stage(a: _TuneArgs, p: _Prepared) -> dict[str, Any] | None:
    """The noise probe at initialisation, its steps sized by the cap's share (skipped, and said, below
    :data:`NOISE_MIN_STEPS`)."""
    from batchfit.cost import allowance

    probe = _per_world(noise_probe_batch(p.wl.base_batch_size, p.wl.num_train, p.fits))  # a global batch
    allowed = allowance("noise", p.total, p.max_cost)
    n_steps = a.noise_steps if allowed is None else min(a.noise_steps, allowed // probe)
    if allowed is None or n_steps >= NOISE_MIN_STEPS:
        return _noise(p.wl, p.run, steps=n_steps, batch_size=probe)
    p.run.emit("noise", "end", f"not run: the cost cap leaves {allowed:,} samples for it, fewer than "
                               f"{NOISE_MIN_STEPS} steps at batch {probe}")
    return None


def _stage_attrs(p: _Prepared, stages: Mapping[str, Any]) -> dict[str, Any]:
    lr_check = stages["lr_check"]
    out = {"find": stages["find"], "noise": stages["noise"],
           "lr_calibration": lr_check.to_dict() if lr_check is not None else None, "step_time": stages["step_time"]}
    out.update(num_val=p.wl.num_val, framework=framework_of(p.wl), batch_form=batch_form_of(p.wl),
               train_budget=p.plan)
    return out


def _sweep_and_race(a: _TuneArgs, p: _Prepared, stages: Mapping[str, Any]) -> SweepResult:
    """Stage 4: every candidate at its rule-scaled LR in the Optuna store, interrupted seeds re-run, then racing
    (more seeds only where they can change the decision) within the cap less the precision check's share."""
    from batchfit.cost import allowance
    from batchfit.study import sweep
    from batchfit.study.store import new_run_id

    attrs = _stage_attrs(p, stages)
    _write_stages(p.out, a.tolerance, attrs)  # before the first trial: a partial study is readable with its stages
    run_id = new_run_id()  # one for the whole tune: retry_failed retries each failed trial once, not per sweep call
    measured = _tune_result(a, p, stages, None)

    def results_of(swept: Any) -> dict[str, Any]:  # the interim reports' and racing's results: tune's, so far
        return dataclasses.replace(measured, sweep=swept).results()

    def run_sweep(replicates: Mapping[int, int] | None) -> SweepResult:
        return sweep(  # trials only: tune's stage results are in stages.json (_write_stages)
            p.wl, batch_sizes=p.sizes, budget=p.bud, lr_rule=a.lr_rule, lr_search=a.lr_search, warmup=a.warmup,
            target=a.target, storage=p.storage, study_name=a.study_name, micro_batch_limit=p.fits, device=a.device,
            precision=a.precision, seed=a.seed, measure_noise=True, sharpness=a.sharpness, eval_every=p.eval_every,
            retry_failed=a.retry_failed,
            progress=_SweepProgress(p.run, a.tolerance, results_of), seeds=a.seeds or 1, replicates=replicates,
            weight_decay_rule=a.weight_decay_rule, run_id=run_id, parallel=a.parallel,
        )

    swept = run_sweep(None)
    unfinished = unfinished_replicates(swept.to_dict())
    if unfinished:  # seeds an earlier run started (racing) and did not finish: re-run them before racing reads on
        swept = run_sweep(unfinished)
    if a.seeds is None:  # racing: more seeds only where they can change the decision
        reserved = allowance("precision", p.total, p.max_cost) if a.precision_check else 0
        cap_samples = p.plan.get("cap_samples")
        swept = _race(swept, run_sweep, results_of, p.run, tolerance=a.tolerance, cap=a.max_seeds,
                      cost_cap=None if cap_samples is None else cap_samples - (reserved or 0),
                      per_trial=p.plan["trial_cost_samples"])
    counts = ", ".join(f"{v} {k}" for k, v in (swept.counts or {}).items() if v)
    p.run.emit("sweep", "end", f"{swept.status}: {counts or 'no trials'}"
               + f" (up to {max(seeds_per_batch(swept.to_dict()).values(), default=1)} seed(s) per batch size)")
    return swept


def _tune_result(a: _TuneArgs, p: _Prepared, stages: Mapping[str, Any], swept: Any) -> TuneResult:
    """The sweep's result ``swept`` with the stages measured before it, as a :class:`TuneResult` (whose
    :meth:`~TuneResult.results` is the one place they are put together)."""
    return TuneResult(sweep=swept, find=stages["find"], noise=stages["noise"], lr_check=stages["lr_check"],
                      step_time=stages["step_time"], train_budget=p.plan, tolerance=a.tolerance,
                      framework=framework_of(p.wl), batch_form=batch_form_of(p.wl))


def _conclude(a: _TuneArgs, p: _Prepared, stages: Mapping[str, Any], swept: Any, t_start: float) -> TuneResult:
    """Stages 5-6: the recommendation with a measured precision check of it (and the batch-schedule check when
    asked), then the report."""
    from batchfit.cost import allowance
    from batchfit.recommend import recommend, with_precision_check
    from batchfit.report import write_report

    result = _tune_result(a, p, stages, swept)
    try:
        result.recommendation = recommend(result.results(), tolerance=a.tolerance)
    except ConfigError:  # no trial finished: the report still shows what happened, without a recommendation
        result.recommendation = None
    if a.precision_check and result.recommendation is not None:
        result.precision_check = _precision_check(p.wl, p.run, result.recommendation, steps=PRECISION_CHECK_STEPS,
                                                  max_samples=allowance("precision", p.total, p.max_cost))
        result.recommendation = with_precision_check(result.recommendation, result.results())
        _write_stages(p.out, a.tolerance, {**_stage_attrs(p, stages),
                                           "precision_check": result.precision_check.to_dict()})
    if a.batch_schedule_check:  # issue 14.3: the derived batch-size schedule vs the best fixed batch
        from batchfit.schedule_check import tune_stage

        result.batch_schedule_check = tune_stage(p.wl, p.run, budget=p.bud, micro_batch_limit=p.fits, seeds=a.seeds,
                                                 seed=a.seed, device=a.device)
    p.run.emit("report", "start", f"writing {p.out}/report.html")
    result.seconds = time.perf_counter() - t_start
    paths = write_report(result.results(), p.out, recommendation=result.recommendation, tolerance=a.tolerance)
    p.run.emit("report", "end", f"{p.out}/report.html, report.md, results.json, {len(paths['plots'])} plots",
               recommendation=result.recommendation.to_dict() if result.recommendation else None)
    result.report = {k: (str(v) if isinstance(v, Path) else {n: str(q) for n, q in v.items()})
                     for k, v in paths.items() if k in ("results", "markdown", "html", "plots")}
    return result
