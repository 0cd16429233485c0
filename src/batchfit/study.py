"""The batch-size sweep: train every candidate batch size (and a few learning rates each), persisted on Optuna.

One sweep is one Optuna study. Each configuration ``(batch size, LR multiplier)`` is enqueued as a trial with fixed
parameters (a grid, not a sampler), so every configuration runs once even when several worker processes share the
study. Each trial trains with :func:`batchfit.engine.train` at the LR the scaling rule gives for its batch size
(times the multiplier), evaluates ~16 times, and writes every evaluation record into the store as it happens
(trial user attributes plus Optuna intermediate values).

Resume: re-running the same call opens the same study; completed trials are not re-run. A trial left RUNNING by a
process that died (``kill -9``) is failed and re-run from the start: at once when the dead process was on this
machine (its pid is gone), otherwise when its Optuna heartbeat goes stale. A trial whose training diverged is
complete with status ``diverged``; a trial that raised is failed with its error; the sweep goes on in both cases.

Steps-to-target is computed from the stored curves after the sweep (the target depends on the best trial), which is
what makes a resumed sweep's numbers the same as an uninterrupted one's.

References: Shallue et al. 2019 (retune the LR at every batch size for a fair comparison; steps to a validation
goal), McCandlish et al. 2018 (the critical batch and the noise scale), Goyal et al. 2017 (linear scaling and
warm-up).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import socket
import statistics
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from batchfit import __version__
from batchfit._io import to_jsonable as _jsonable
from batchfit.critical import fit_critical_batch
from batchfit.engine import check_positive_int, check_precision, resolve_device, resolve_warmup
from batchfit.errors import BatchfitError, ConfigError
from batchfit.scaling import RULE_CHOICES, is_adam_family
from batchfit.workload import Workload, load_workload

__all__ = [
    "Budget",
    "default_batch_sizes",
    "load_results",
    "lr_multipliers",
    "parse_batch_sizes",
    "parse_budget",
    "parse_target",
    "sweep",
]

BUDGET_KINDS = ("epochs", "steps", "samples")
DEFAULT_BUDGET = "epochs:5"
EVALS_PER_TRIAL = 16  # steps-to-target resolution: ~1/16 of a trial
SMALL_BATCH_MAX_N = 2048  # B = 1 joins the default candidates only on training sets this small
FULL_BATCH_MAX_N = 8192  # full-batch (B = N) joins the default candidates only on training sets this small
MAX_ACCUMULATION = 64  # default candidates stop at 64 x the largest micro-batch that fits
HEARTBEAT_INTERVAL_S = 15
HEARTBEAT_GRACE_S = 60
_OPEN_ATTEMPTS = 6
_EVAL_PREFIX = "eval_"
_RUNNING_STATUSES = ("running",)

ProgressFn = Callable[[str, dict[str, Any]], None]


# ---------------------------------------------------------------------------------------------------------------
# Inputs: budget, target, batch sizes, LR multipliers


@dataclasses.dataclass(frozen=True)
class Budget:
    """The equal budget every trial gets: ``epochs`` (the guides' comparison), ``steps`` or ``samples``."""

    kind: str
    value: float

    def steps_for(self, batch_size: int, num_train: int) -> int:
        """Optimizer steps at ``batch_size`` (drop_last: ``num_train // batch_size`` steps per epoch)."""
        if self.kind == "steps":
            return int(self.value)
        if self.kind == "samples":
            return max(1, math.ceil(self.value / batch_size))
        return max(1, round(self.value * (num_train // batch_size)))

    def to_dict(self) -> dict[str, Any]:
        value: float | int = int(self.value) if float(self.value).is_integer() else self.value
        return {"kind": self.kind, "value": value}

    def __str__(self) -> str:
        return f"{self.kind}:{self.to_dict()['value']}"


def parse_budget(text: str | Budget) -> Budget:
    """``epochs:E`` (E may be fractional), ``steps:S`` or ``samples:N``.

    >>> parse_budget("epochs:5"), parse_budget("steps:200").steps_for(64, 1000)
    (Budget(kind='epochs', value=5.0), 200)
    """
    if isinstance(text, Budget):
        return text
    if not isinstance(text, str):
        raise ConfigError(f"budget must be a string like epochs:5, steps:500 or samples:100000, got {text!r}")
    kind, sep, raw = text.strip().partition(":")
    kind = kind.strip().lower()
    if not sep or kind not in BUDGET_KINDS:
        raise ConfigError(f"budget {text!r} is not understood; write epochs:5, steps:500 or samples:100000")
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"budget {text!r}: {raw!r} is not a number; write e.g. {kind}:5") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"budget {text!r} must be positive; write e.g. {kind}:5")
    if kind in ("steps", "samples") and not value.is_integer():
        raise ConfigError(f"budget {text!r}: {kind} must be a whole number")
    return Budget(kind, value)


def parse_target(target: float | str | Mapping[str, Any]) -> dict[str, Any]:
    """A fraction of the best validation metric any trial reached (``0.97``), or an absolute value (``abs:0.9``).

    For a metric where lower is better (a loss), the fractional target is ``best / fraction`` (within the same ratio).

    >>> parse_target(0.97), parse_target("abs:0.9")
    ({'kind': 'fraction', 'value': 0.97}, {'kind': 'absolute', 'value': 0.9})
    """
    if isinstance(target, Mapping):
        kind, value = target.get("kind"), target.get("value")
        if kind not in ("fraction", "absolute"):
            raise ConfigError(f"target kind must be 'fraction' or 'absolute', got {kind!r}")
        return parse_target(value if kind == "fraction" else f"abs:{value}")
    kind = "fraction"
    raw: Any = target
    if isinstance(target, str):
        text = target.strip().lower()
        for prefix in ("abs:", "absolute:", "="):
            if text.startswith(prefix):
                kind, text = "absolute", text[len(prefix):]
                break
        try:
            raw = float(text)
        except ValueError:
            raise ConfigError(
                f"target {target!r} is not understood; give a fraction of the best metric (0.97) or an absolute "
                "value (abs:0.9)"
            ) from None
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw):
        raise ConfigError(f"target must be a number (0.97) or abs:VALUE, got {target!r}")
    if kind == "fraction" and not (0 < raw <= 1):
        raise ConfigError(
            f"target fraction {raw} must be in (0, 1]; for an absolute metric value write abs:{raw}"
        )
    return {"kind": kind, "value": float(raw)}


def parse_batch_sizes(text: str | Sequence[int]) -> list[int]:
    """``"16,32,64"`` (or a sequence of ints) -> a sorted list of distinct positive batch sizes.

    >>> parse_batch_sizes("64, 16,32,16")
    [16, 32, 64]
    """
    if isinstance(text, str):
        parts = [p.strip() for p in text.split(",")]
        if not text.strip() or any(not p for p in parts):
            raise ConfigError(f"batch sizes {text!r} are not a comma-separated list; write e.g. 16,32,64")
        values: list[Any] = []
        for p in parts:
            try:
                values.append(int(p))
            except ValueError:
                raise ConfigError(f"batch size {p!r} in {text!r} is not a whole number; write e.g. 16,32,64") \
                    from None
    else:
        values = list(text)
        if not values:
            raise ConfigError("the batch-size list is empty; give at least one batch size, e.g. [16, 32, 64]")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"batch size {v!r} is not a positive integer; write e.g. 16,32,64")
    return sorted(set(values))


def default_batch_sizes(num_train: int, max_micro_batch: int | None = None, base_batch_size: int | None = None,
                        *, extremes: bool = True) -> list[int]:
    """The default candidates: powers of two from 16 up to what fits, extended past it by gradient accumulation.

    - powers of two ``16 <= B <= min(N, M x 64)`` (``M``: the largest micro-batch that fits, unknown = no limit),
      so the largest batches run as up to 64 accumulated micro-batches;
    - the workload's own base batch size;
    - the extremes on small data sets: B = 1 when N <= 2048 (it costs N steps per epoch) and full batch B = N when
      N <= 8192 and N fits within the accumulation limit.

    >>> default_batch_sizes(1437)
    [1, 16, 32, 64, 128, 256, 512, 1024, 1437]
    >>> default_batch_sizes(100_000, max_micro_batch=64)
    [16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
    """
    n = num_train
    upper = n if max_micro_batch is None else min(n, max_micro_batch * MAX_ACCUMULATION)
    sizes = {2**k for k in range(4, 63) if 2**k <= upper}
    if not sizes:  # fewer than 16 samples: powers of two up to N
        sizes = {2**k for k in range(0, 5) if 2**k <= upper}
    if base_batch_size is not None and base_batch_size <= upper:
        sizes.add(base_batch_size)
    if extremes:
        if n <= SMALL_BATCH_MAX_N:
            sizes.add(1)
        if n <= FULL_BATCH_MAX_N and n <= upper:
            sizes.add(n)
    return sorted(sizes)


def lr_multipliers(n: int) -> list[float]:
    """``n`` LR multipliers around the scaled LR, in powers of two: 1 -> [1]; 2 -> [1/2, 1]; 3 -> [1/2, 1, 2]...

    Smaller first at even ``n`` (the scaled LR tends to be too high at large batches, not too low).

    >>> lr_multipliers(3), lr_multipliers(4)
    ([0.5, 1.0, 2.0], [0.25, 0.5, 1.0, 2.0])
    """
    check_positive_int("lr_search", n)
    exps: list[int] = [0]
    k = 1
    while len(exps) < n:
        exps.append(-k)
        if len(exps) < n:
            exps.append(k)
        k += 1
    return [2.0**e for e in sorted(exps)]


# ---------------------------------------------------------------------------------------------------------------
# Storage (Optuna)


def _optuna() -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def mask_url(url: Any) -> str:
    """A storage URL with any password replaced by ``***`` (safe to print and to store in results)."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", str(url))


def default_storage(out_dir: str | Path | None = None) -> str:
    return f"sqlite:///{(Path(out_dir or '.') / 'batchfit.db').resolve()}"


def _normalize_url(storage: str) -> str:
    if not isinstance(storage, str) or not storage.strip():
        raise ConfigError("the store URL is empty; use sqlite:///path.db or postgresql://user:pass@host/db")
    url = storage.strip()
    if "://" not in url:
        if url.endswith((".db", ".sqlite", ".sqlite3")):
            return f"sqlite:///{Path(url).resolve()}"
        raise ConfigError(
            f"store {url!r} is not a database URL; use sqlite:///path.db (or a path ending in .db) or "
            "postgresql://user:pass@host/db"
        )
    return url


def open_storage(storage: str | Any, *, heartbeat: bool = True, must_exist: bool = False) -> Any:
    """An Optuna storage for a URL (any SQLAlchemy URL Optuna accepts) or an Optuna storage object (passed through).

    RDB storages get a heartbeat, so a RUNNING trial of a dead worker on another machine goes stale and is retried.
    """
    if not isinstance(storage, str):
        return storage
    url = _normalize_url(storage)
    optuna = _optuna()
    engine_kwargs: dict[str, Any] | None = None
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        if path and not path.startswith(":memory:") and "mode=memory" not in path:
            file = Path(path.split("?")[0])
            if must_exist and not file.is_file():
                raise ConfigError(f"no batchfit store at {str(file)!r}; check the path (it is made by batchfit sweep)")
            try:
                file.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"cannot create the store's folder {str(file.parent)!r}: {exc}") from exc
        engine_kwargs = {"connect_args": {"timeout": 60}}  # several processes may write one SQLite file
    kwargs: dict[str, Any] = {}
    if heartbeat:
        kwargs = {"heartbeat_interval": HEARTBEAT_INTERVAL_S, "grace_period": HEARTBEAT_GRACE_S}
    try:
        for attempt in range(_OPEN_ATTEMPTS):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # Optuna marks the heartbeat experimental
                    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
            except ImportError:
                raise
            except Exception as exc:  # a worker starting at the same moment may be creating the schema
                if attempt == _OPEN_ATTEMPTS - 1 or type(exc).__name__ not in ("IntegrityError", "OperationalError"):
                    raise
                time.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")  # pragma: no cover
    except ImportError as exc:
        raise ConfigError(
            f"store {mask_url(url)!r} needs a database driver that is not installed ({exc}); for PostgreSQL "
            "install it with pip install 'batchfit[postgres]'"
        ) from exc
    except Exception as exc:
        raise ConfigError(
            f"cannot open the store {mask_url(url)!r} ({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); "
            "use sqlite:///path.db or postgresql://user:pass@host/db"
        ) from exc




def _config_key(batch_size: int, lr_multiplier: float) -> str:
    return f"b{int(batch_size)}_m{float(lr_multiplier):.6g}"


# ---------------------------------------------------------------------------------------------------------------
# Workers: who runs a trial, and whether it is still alive


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux ``/proc``), to tell a live process from a reused pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _worker_identity() -> dict[str, Any]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": _process_start(pid)}


def _worker_dead(worker: Mapping[str, Any] | None) -> bool:
    """True only when the worker ran on this machine and its process is gone (or the pid was reused)."""
    if not worker or worker.get("host") != socket.gethostname():
        return False
    pid = worker.get("pid")
    if not isinstance(pid, int):
        return False
    if pid == os.getpid():
        return worker.get("start") != _process_start(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    start = worker.get("start")
    return start is not None and _process_start(pid) not in (None, start)


class _Heartbeat:
    """Record an Optuna heartbeat for one trial every few seconds while it trains (RDB storages only)."""

    def __init__(self, storage: Any, trial_id: int) -> None:
        self.storage, self.trial_id = storage, trial_id
        self.stop = threading.Event()
        interval = getattr(storage, "get_heartbeat_interval", lambda: None)()
        self.interval = interval
        self.thread = threading.Thread(target=self._run, daemon=True) if interval else None

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            with contextlib.suppress(Exception):  # a missed beat is not an error; a stale one is handled later
                self.storage.record_heartbeat(self.trial_id)

    def __enter__(self) -> _Heartbeat:
        if self.thread is not None:
            with contextlib.suppress(Exception):
                self.storage.record_heartbeat(self.trial_id)
            self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=5)


def _recover_stale(study: Any) -> list[int]:
    """Fail RUNNING trials whose worker is dead (this machine: pid gone; elsewhere: heartbeat stale)."""
    optuna = _optuna()
    TrialState = optuna.trial.TrialState
    failed: list[int] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.suppress(Exception):
            before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
            optuna.storages.fail_stale_trials(study)
            after = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
            failed.extend(sorted(before - after))
    storage = study._storage  # the study's storage object (public accessor missing in Optuna)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if "batchfit_config" not in t.user_attrs or not _worker_dead(t.user_attrs.get("worker")):
            continue
        with contextlib.suppress(Exception):
            storage.set_trial_user_attr(t._trial_id, "status", "interrupted")
            storage.set_trial_user_attr(t._trial_id, "error", "the worker process died before the trial finished")
            if storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                failed.append(t.number)
    return failed


# ---------------------------------------------------------------------------------------------------------------
# The grid: what is done, what to enqueue, claiming a trial


def _trial_done(t: Any, retry_failed: bool) -> bool | None:
    """True: this trial settles its configuration; None: it is queued or running; False: retry it."""
    TrialState = _optuna().trial.TrialState
    if t.state == TrialState.COMPLETE:
        return True
    if t.state in (TrialState.WAITING, TrialState.RUNNING):
        return None
    if t.state == TrialState.FAIL:
        return t.user_attrs.get("status") == "failed" and not retry_failed
    return False  # PRUNED: a duplicate or a spare trial; says nothing about the configuration


def _by_config(study: Any) -> dict[str, list[Any]]:
    groups: dict[str, list[Any]] = {}
    for t in study.get_trials(deepcopy=False):
        cfg = t.user_attrs.get("batchfit_config")
        if cfg and t.user_attrs.get("duplicate_of") is None:
            groups.setdefault(cfg["key"], []).append(t)
    return groups


def _enqueue_missing(study: Any, grid: Sequence[dict[str, Any]], retry_failed: bool) -> int:
    groups = _by_config(study)
    added = 0
    for cfg in grid:
        states = [_trial_done(t, retry_failed) for t in groups.get(cfg["key"], [])]
        if any(s is True or s is None for s in states):
            continue
        study.enqueue_trial(
            {"batch_size": cfg["batch_size"], "lr_multiplier": cfg["lr_multiplier"]},
            user_attrs={"batchfit_config": dict(cfg), "status": "waiting"},
        )
        added += 1
    return added


@contextlib.contextmanager
def _store_lock(url: Any) -> Any:
    """Serialise enqueue-and-claim between processes sharing one SQLite file.

    Optuna pops a queued trial with a read then an update; PostgreSQL and MySQL lock the row (SELECT ... FOR
    UPDATE), but SQLite reads outside a transaction, so two processes could pop the same trial. A file lock next
    to the database closes that gap on one machine (SQLite files are local anyway); other storages need none.
    """
    path = None
    if isinstance(url, str) and url.startswith("sqlite:///"):
        db = url[len("sqlite:///"):].split("?")[0]
        if db and not db.startswith(":memory:"):
            path = f"{db}.lock"
    try:
        import fcntl
    except ImportError:  # Windows: no flock; SQLite with several workers is then best-effort
        fcntl = None  # type: ignore[assignment]
    if path is None or fcntl is None:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _distributions() -> dict[str, Any]:
    d = _optuna().distributions
    return {"batch_size": d.IntDistribution(1, 2**40), "lr_multiplier": d.FloatDistribution(1e-6, 1e6, log=True)}


def _claim(study: Any, retry_failed: bool) -> Any | None:
    """Pop the next enqueued configuration (atomically, in the store); None when the queue is empty.

    Several workers may have enqueued the same configuration at once: a trial whose configuration already has a
    completed trial, or an earlier-numbered queued/running one, steps aside (PRUNED, ``duplicate_of``).
    """
    optuna = _optuna()
    TrialState = optuna.trial.TrialState
    while True:
        if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "heartbeat is supposed to be used with Study.optimize"
            trial = study.ask(_distributions())
        cfg = trial.user_attrs.get("batchfit_config")
        if cfg is not None:
            trial.set_user_attr("worker", _worker_identity())  # at once: a dead owner is then detectable
        if cfg is None:  # another worker took the last queued trial between our check and ask(): a spare trial
            trial.set_user_attr("duplicate_of", -1)
            study.tell(trial, state=TrialState.PRUNED)
            return None
        for other in study.get_trials(deepcopy=False):
            ocfg = other.user_attrs.get("batchfit_config")
            if other.number == trial.number or not ocfg or ocfg["key"] != cfg["key"]:
                continue
            if other.user_attrs.get("duplicate_of") is not None:
                continue
            done = _trial_done(other, retry_failed)
            if done is True or (done is None and other.number < trial.number):
                trial.set_user_attr("duplicate_of", other.number)
                study.tell(trial, state=TrialState.PRUNED)
                break
        else:
            return trial


# ---------------------------------------------------------------------------------------------------------------
# One trial


def _metric_value(record: Mapping[str, Any], primary: str) -> float | None:
    if primary in ("val_loss", "train_loss"):
        v = record.get(primary)
    else:
        v = (record.get("val_metrics") or {}).get(primary)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


class _Recorder:
    """Engine callback: every evaluation record goes into the store (user attr + intermediate value) at once."""

    def __init__(self, trial: Any, primary: str, progress: ProgressFn | None, info: dict[str, Any]) -> None:
        self.trial, self.primary, self.progress, self.info = trial, primary, progress, info
        self.count = 0

    def on_train_start(self, state: Any) -> None:
        self.info.update(lr=state.optimizer.param_groups[0]["lr"], micro_batch_size=state.micro_batch_size,
                         accumulation_steps=state.accumulation_steps, total_steps=state.total_steps)
        self.trial.set_user_attr("plan", _jsonable(dict(self.info)))
        if self.progress:
            self.progress("trial_start", dict(self.info))

    def on_step_end(self, state: Any) -> None:
        if self.progress:
            self.progress("step", {"index": self.info["index"], "step": state.step, "total_steps": state.total_steps})

    def on_evaluate(self, state: Any, record: dict[str, Any]) -> None:
        rec = _jsonable(record)
        self.trial.set_user_attr(f"{_EVAL_PREFIX}{self.count:05d}", rec)
        value = _metric_value(rec, self.primary)
        if value is not None:
            with contextlib.suppress(Exception):
                self.trial.report(value, int(record.get("step", self.count)))
        self.count += 1
        if self.progress:
            self.progress("eval", {"index": self.info["index"], "record": rec, "metric": value})


def _with_lr_multiplier(workload: Workload, multiplier: float) -> Workload:
    """The same workload whose optimizer starts at ``base_lr x multiplier``; the rule then scales both alike."""
    if multiplier == 1.0:
        return workload
    make = workload.optimizer_fn

    def optimizer_fn(params: Any, lr: float) -> Any:
        return make(params, lr * multiplier)

    return dataclasses.replace(workload, optimizer_fn=optimizer_fn)


def _noise_callback() -> Any | None:
    try:
        from batchfit.noise import NoiseCallback
    except ImportError:  # the noise module is optional for the sweep
        return None
    return NoiseCallback()


def _run_trial(study: Any, trial: Any, ctx: dict[str, Any], index: int) -> dict[str, Any]:
    """Train one configuration; the outcome (ok / diverged / failed) is told to the study. Returns the plan info.

    If the store says the trial was finished meanwhile (a heartbeat check on another machine failed it while
    this worker was slow, or SQLite let two workers pop it), this worker abandons it and goes on.
    """
    try:
        return _train_trial(study, trial, ctx, index)
    except _optuna().exceptions.UpdateFinishedTrialError as exc:
        cfg = trial.user_attrs["batchfit_config"]
        return {"index": index, "total": ctx["total"], "trial_number": trial.number,
                "batch_size": cfg["batch_size"], "lr_multiplier": cfg["lr_multiplier"], "status": "abandoned",
                "error": f"the store finished this trial meanwhile ({exc}); its result there stands"}


def _train_trial(study: Any, trial: Any, ctx: dict[str, Any], index: int) -> dict[str, Any]:
    from batchfit import memory
    from batchfit.engine import train

    optuna = _optuna()
    TrialState = optuna.trial.TrialState
    cfg = trial.user_attrs["batchfit_config"]
    batch, mult = int(cfg["batch_size"]), float(cfg["lr_multiplier"])
    workload: Workload = ctx["workload"]
    limit = ctx["micro_batch_size"]
    micro = batch if limit is None else min(batch, limit)
    callbacks: list[Any] = []
    noise_split = False
    if ctx["measure_noise"] and batch >= 2:
        noise_cb = _noise_callback()
        if noise_cb is not None:
            if micro == batch:  # B_simple needs >= 2 micro-batches per step
                micro, noise_split = math.ceil(batch / 2), True
            callbacks.append(noise_cb)
    steps = ctx["budget"].steps_for(batch, workload.num_train)
    eval_every = ctx["eval_every"] or max(1, steps // EVALS_PER_TRIAL)
    info = {"index": index, "total": ctx["total"], "trial_number": trial.number, "batch_size": batch,
            "lr_multiplier": mult, "micro_batch_size": micro, "accumulation_steps": math.ceil(batch / micro),
            "steps": steps, "eval_every": eval_every, "noise_split": noise_split,
            "warmup_steps": resolve_warmup(ctx["warmup"], steps)}
    recorder = _Recorder(trial, ctx["primary"], ctx["progress"], info)
    callbacks.append(recorder)
    if ctx["sharpness"]:
        from batchfit.sharpness import SharpnessCallback

        callbacks.append(SharpnessCallback(chunk_size=min(limit or 256, 256), seed=ctx["seed"]))
    callbacks.extend(ctx["callbacks"])
    trial.set_user_attr("worker", _worker_identity())
    trial.set_user_attr("status", "running")
    outcome: dict[str, Any] = dict(info)
    failure: BaseException | None = None
    with _Heartbeat(study._storage, trial._trial_id):
        try:
            result = train(
                _with_lr_multiplier(workload, mult), batch_size=batch, micro_batch_size=micro,
                lr_rule=ctx["lr_rule"], warmup=ctx["warmup"], steps=steps, precision=ctx["precision"],
                device=ctx["device"], seed=ctx["seed"], eval_every=eval_every, callbacks=callbacks,
            )
        except KeyboardInterrupt:
            trial.set_user_attr("status", "interrupted")
            trial.set_user_attr("error", "interrupted by the user (Ctrl-C); re-run the same command to retry")
            study.tell(trial, state=TrialState.FAIL)
            raise
        except Exception as exc:  # recorded; the sweep goes on
            failure = exc
    if failure is not None:
        oom = memory.is_oom(failure)
        if oom:
            memory.release_memory()
        message = " ".join(str(failure).split())[:500] or type(failure).__name__
        error = (f"out of memory at micro-batch {micro}: {message}; give a smaller --micro-batch-size" if oom
                 else f"{type(failure).__name__}: {message}")
        trial.set_user_attr("status", "failed")
        trial.set_user_attr("error", error)
        study.tell(trial, state=TrialState.FAIL)
        outcome.update(status="failed", error=error)
        return outcome
    data = result.to_dict()
    summary = {k: data.get(k) for k in (
        "lr", "lr_rule", "warmup_steps", "micro_batch_size", "accumulation_steps", "steps", "epochs", "samples",
        "seconds", "train_seconds", "samples_per_s", "peak_memory_bytes", "diverged", "diverged_at_step",
        "device", "precision", "b_simple_history", "b_simple_skipped_steps", "sharpness")}
    trial.set_user_attr("result", _jsonable(summary))
    status = "diverged" if result.diverged else "ok"
    trial.set_user_attr("status", status)
    if result.diverged:
        trial.set_user_attr("error", f"diverged (non-finite loss) at step {result.diverged_at_step}")
    values = [v for v in (_metric_value(r, ctx["primary"]) for r in data["history"]) if v is not None]
    higher = ctx["higher_is_better"]
    value = (max(values) if higher else min(values)) if values else (-math.inf if higher else math.inf)
    study.tell(trial, value)
    outcome.update(status=status, best=value if values else None, lr=summary["lr"])
    return outcome


# ---------------------------------------------------------------------------------------------------------------
# The sweep


def _identity(workload: Workload, device: str, precision: str, budget: Budget, lr_rule: str, warmup: Any,
              seed: int, primary: str, higher: bool) -> dict[str, Any]:
    return {
        "workload": workload.name, "workload_description": workload.description, "num_train": workload.num_train,
        "base_batch_size": workload.base_batch_size, "base_lr": workload.base_lr, "device": device,
        "precision": precision, "budget": budget.to_dict(), "lr_rule": lr_rule, "warmup": warmup, "seed": seed,
        "primary_metric": primary, "higher_is_better": higher,
    }


def default_study_name(identity: Mapping[str, Any]) -> str:
    digest = hashlib.sha1(json.dumps(_jsonable(identity), sort_keys=True).encode()).hexdigest()[:10]
    return f"sweep-{identity['workload']}-{digest}"


def _find_memory_limit(workload: Workload, device: str, precision: str, seed: int) -> tuple[int | None, str]:
    """The largest micro-batch that fits, from the finder when it is installed; ``(None, why)`` otherwise."""
    try:
        from batchfit.finder import find_batch_size
    except ImportError:
        return None, "no finder available: every candidate runs without accumulation"
    try:
        found = find_batch_size(workload, device=device, precision=precision, seed=seed, throughput=False)
    except BatchfitError as exc:
        return None, f"the finder failed ({exc}); every candidate runs without accumulation"
    data = found.to_dict() if hasattr(found, "to_dict") else dict(found)
    limit = data.get("max_batch_size")
    return (int(limit), "finder") if isinstance(limit, int) and limit > 0 else (None, "finder found no limit")


def sweep(
    workload: Workload | str,
    *,
    batch_sizes: Sequence[int] | str | None = None,
    budget: str | Budget = DEFAULT_BUDGET,
    lr_rule: str = "auto",
    lr_search: int = 1,
    warmup: int | float = 0,
    target: float | str = 0.97,
    storage: str | None = None,
    study_name: str | None = None,
    micro_batch_size: int | None = None,
    device: str = "cpu",
    precision: str = "fp32",
    seed: int = 0,
    measure_noise: bool = True,
    sharpness: bool = False,
    eval_every: int | None = None,
    callbacks: Sequence[Any] = (),
    progress: ProgressFn | None = None,
    extra_attrs: Mapping[str, Any] | None = None,
    out_dir: str | Path | None = None,
    retry_failed: bool = False,
    extremes: bool = True,
) -> dict[str, Any]:
    """Train each candidate batch size (x ``lr_search`` learning rates) on an equal budget; persist and resume.

    Args:
        batch_sizes: effective batch sizes (default: :func:`default_batch_sizes`; on resume, the study's own).
        budget: ``epochs:E``, ``steps:S`` or ``samples:N``, the same for every trial.
        lr_rule: how the workload's base LR scales with the batch (``auto`` by optimizer family).
        lr_search: LRs tried per batch size around the scaled one (:func:`lr_multipliers`); the best is kept.
        warmup: linear warm-up steps (>= 1) or fraction of each trial (< 1).
        target: fraction of the best validation metric any trial reached (``0.97``) or ``"abs:VALUE"``.
        storage: any Optuna storage URL (default ``sqlite:///<out_dir>/batchfit.db``).
        study_name: default ``sweep-<workload>-<hash of the settings that change results>``, so the same call
            resumes the same study.
        micro_batch_size: the largest micro-batch that fits (the memory limit); bigger batches accumulate. Default:
            from the finder when available, else no limit.
        measure_noise: B_simple over training (:class:`batchfit.noise.NoiseCallback`); a batch that would run as
            one micro-batch is split in two for it (which costs some throughput; ``False`` to measure clean speed).
        sharpness: top Hessian eigenvalue of each final model (:mod:`batchfit.sharpness`).
        eval_every: evaluation interval in steps (default ~16 evaluations per trial).
        callbacks: extra engine callbacks for every trial.
        progress: ``progress(event, info)`` with events ``start``, ``trial_start``, ``step``, ``eval``,
            ``trial_end`` (``info["results"]`` is the results dict so far) and ``done``.
        extra_attrs: study-level attributes to store (``tune`` stores ``find`` and ``noise`` results here).
        retry_failed: also re-run trials that failed with an error (interrupted ones are always re-run).
        extremes: add B = 1 and full batch to the default candidates on small data sets.

    Returns the results dict (:func:`load_results` rebuilds it from the store alone).
    """
    wl = load_workload(workload)
    dev = resolve_device(device)
    check_precision(precision, dev)
    bud = parse_budget(budget)
    tgt = parse_target(target)
    mults = lr_multipliers(lr_search)
    if lr_rule not in RULE_CHOICES:
        raise ConfigError(f"unknown LR rule {lr_rule!r}; choose one of: {', '.join(RULE_CHOICES)}")
    resolve_warmup(warmup, 1000)  # validates the value
    check_positive_int("micro_batch_size", micro_batch_size, allow_none=True)
    check_positive_int("eval_every", eval_every, allow_none=True)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {seed!r}")
    if bud.kind == "epochs" and bud.value * wl.num_train < 1:
        raise ConfigError(f"budget {bud} is less than one sample; give more epochs")
    if lr_rule == "adam-sqrt":
        _check_adam(wl)
    asked_sizes = None if batch_sizes is None else parse_batch_sizes(batch_sizes)
    if asked_sizes is not None:
        too_big = [b for b in asked_sizes if b > wl.num_train]
        if too_big:
            raise ConfigError(
                f"batch size(s) {', '.join(map(str, too_big))} exceed the training set ({wl.num_train} samples); "
                f"use batch sizes <= {wl.num_train}"
            )
    primary = wl.primary_metric if wl.val_data is not None else "train_loss"
    higher = wl.metric_higher_is_better if wl.val_data is not None else False
    identity = _identity(wl, dev.type, precision, bud, lr_rule, warmup, seed, primary, higher)
    url = storage if storage is not None else default_storage(out_dir)
    if isinstance(url, str):
        url = _normalize_url(url)
    store = open_storage(url)
    name = study_name or default_study_name(identity)
    optuna = _optuna()
    try:
        study = optuna.create_study(
            storage=store, study_name=name, direction="maximize" if higher else "minimize", load_if_exists=True,
            sampler=optuna.samplers.RandomSampler(seed=seed),
        )
    except Exception as exc:
        raise ConfigError(f"cannot open study {name!r} in {mask_url(url)!r}: {type(exc).__name__}: {exc}") from exc
    stored = study.user_attrs.get("config")
    if stored is not None:
        diff = [k for k, v in identity.items() if _jsonable(stored.get(k)) != _jsonable(v)]
        if diff:
            raise ConfigError(
                f"study {name!r} was made with different settings ({', '.join(f'{k}={stored.get(k)!r}' for k in diff)}"
                "); give another --study name, or the same settings to resume it"
            )
    # -- the grid ----------------------------------------------------------------------------------------------
    limit, limit_source = micro_batch_size, "given"
    if limit is None and stored is not None:  # resume with the memory limit the study started with
        limit, limit_source = stored.get("micro_batch_size"), stored.get("micro_batch_source", "stored")
    elif limit is None:
        limit, limit_source = _find_memory_limit(wl, str(dev), precision, seed)
    if asked_sizes is not None:
        sizes = asked_sizes
    elif stored is not None and stored.get("batch_sizes"):
        sizes = list(stored["batch_sizes"])
    else:
        sizes = default_batch_sizes(wl.num_train, limit, wl.base_batch_size, extremes=extremes)
    exps = sorted(mults, key=lambda m: (abs(math.log2(m)), m))  # the scaled LR first, then its neighbours
    grid = [{"key": _config_key(b, m), "batch_size": b, "lr_multiplier": m} for m in exps for b in sizes]
    config = dict(identity, batch_sizes=sizes, lr_multipliers=mults, micro_batch_size=limit,
                  micro_batch_source=limit_source, measure_noise=bool(measure_noise), sharpness=bool(sharpness),
                  eval_every=eval_every, batchfit_version=__version__)
    study.set_user_attr("config", _jsonable(config))
    study.set_user_attr("target", tgt)
    for key, value in (extra_attrs or {}).items():
        study.set_user_attr(str(key), _jsonable(value))
    ctx = {"workload": wl, "micro_batch_size": limit, "measure_noise": measure_noise, "budget": bud,
           "eval_every": eval_every, "primary": primary, "higher_is_better": higher, "progress": progress,
           "sharpness": sharpness, "seed": seed, "callbacks": list(callbacks), "lr_rule": lr_rule,
           "warmup": warmup, "precision": precision, "device": str(dev), "total": len(grid)}
    # -- the worker loop: recover dead workers' trials, enqueue what is missing, claim, train, repeat ----------
    with _store_lock(url):
        _recover_stale(study)
        _enqueue_missing(study, grid, retry_failed)
    pending = sum(1 for t in study.get_trials(deepcopy=False) if t.state.name == "WAITING")
    if progress:
        progress("start", {"total": len(grid), "pending": pending, "study_name": name, "storage": mask_url(url),
                           "batch_sizes": sizes, "lr_multipliers": mults, "micro_batch_size": limit,
                           "budget": bud.to_dict()})
    index = len(grid) - pending
    while True:
        with _store_lock(url):
            _recover_stale(study)
            _enqueue_missing(study, grid, retry_failed)
            trial = _claim(study, retry_failed)
        if trial is None:
            break
        index += 1
        outcome = _run_trial(study, trial, ctx, index)
        if progress:
            outcome["results"] = _build_results(study, mask_url(url))
            progress("trial_end", outcome)
    results = _build_results(study, mask_url(url))
    if progress:
        progress("done", {"results": results})
    return results


def _check_adam(workload: Workload) -> None:
    model = workload.model_fn()
    opt = workload.optimizer_fn(model.parameters(), workload.base_lr)
    if not is_adam_family(opt):
        raise ConfigError(
            f"LR rule 'adam-sqrt' needs an Adam-family optimizer; the workload uses {type(opt).__name__}. "
            "Use --lr-rule linear or sqrt"
        )


# ---------------------------------------------------------------------------------------------------------------
# Results: rebuilt from the store alone


def _trial_dict(t: Any, primary: str, higher: bool) -> dict[str, Any]:
    TrialState = _optuna().trial.TrialState
    attrs = t.user_attrs
    cfg, plan, res = attrs["batchfit_config"], attrs.get("plan") or {}, attrs.get("result") or {}
    history = [attrs[k] for k in sorted(k for k in attrs if k.startswith(_EVAL_PREFIX))]
    if t.state == TrialState.COMPLETE:
        status = attrs.get("status") if attrs.get("status") in ("ok", "diverged") else "ok"
    elif t.state == TrialState.RUNNING:
        status = "running"
    else:
        status = "failed"
    error = attrs.get("error")
    if status == "failed" and not error:
        error = "interrupted: the worker stopped before the trial finished; re-run to retry"
    scored = [(v, r) for r in history if (v := _metric_value(r, primary)) is not None]
    best_rec = (max if higher else min)(scored, key=lambda p: p[0])[1] if scored else None
    val_losses = [r["val_loss"] for r in history if isinstance(r.get("val_loss"), (int, float))]
    final = history[-1] if history else None
    bs_hist = res.get("b_simple_history") or [
        {"step": r.get("step"), "epoch": r.get("epoch"), "b_simple": r.get("b_simple")}
        for r in history if "b_simple" in r
    ]
    bs_hist = [{"step": h.get("step"), "epoch": h.get("epoch"), "b_simple": h.get("b_simple")} for h in bs_hist]
    bs_vals = [h["b_simple"] for h in bs_hist if isinstance(h["b_simple"], (int, float))]
    sharp = res.get("sharpness")
    batch = int(cfg["batch_size"])
    micro = res.get("micro_batch_size") or plan.get("micro_batch_size")
    last = final or {}
    return {
        "trial_number": t.number,
        "batch_size": batch,
        "micro_batch_size": micro,
        "accumulation_steps": res.get("accumulation_steps") or plan.get("accumulation_steps"),
        "lr": res.get("lr") if res.get("lr") is not None else plan.get("lr"),
        "lr_multiplier": float(cfg["lr_multiplier"]),
        "lr_rule": res.get("lr_rule"),
        "warmup_steps": res.get("warmup_steps", plan.get("warmup_steps")),
        "status": status,
        "error": error,
        "best_val_metrics": dict(best_rec.get("val_metrics") or {}) if best_rec else {},
        "final_val_metrics": dict(final.get("val_metrics") or {}) if final else {},
        "best_val_loss": min(val_losses) if val_losses else None,
        "final_val_loss": final.get("val_loss") if final else None,
        "best_metric": _metric_value(best_rec, primary) if best_rec else None,
        "generalization_gap": final.get("generalization_gap") if final else None,
        "samples_per_s": res.get("samples_per_s"),
        "peak_memory_bytes": res.get("peak_memory_bytes"),
        "steps_to_target": None,
        "epochs_to_target": None,
        "seconds_to_target": None,
        "samples_to_target": None,
        "b_simple": statistics.median(bs_vals) if bs_vals else None,
        "b_simple_history": bs_hist,
        "noise_split": plan.get("noise_split"),
        "sharpness": sharp.get("top_eigenvalue") if isinstance(sharp, Mapping) else sharp,
        "history": history,
        "steps": res.get("steps", last.get("step")),
        "planned_steps": plan.get("steps"),
        "epochs": res.get("epochs", last.get("epoch")),
        "samples": res.get("samples", last.get("samples")),
        "seconds": res.get("seconds", last.get("seconds")),
        "diverged_at_step": res.get("diverged_at_step"),
    }


def _reaches(value: float | None, target: float, higher: bool) -> bool:
    if value is None:
        return False
    return value >= target - 1e-12 if higher else value <= target + 1e-12


def _rank(t: Mapping[str, Any], higher: bool) -> tuple[int, float]:
    order = {"ok": 0, "diverged": 1, "running": 2, "failed": 3}
    q = t.get("best_metric")
    score = -math.inf if q is None else (q if higher else -q)
    return (-order.get(t["status"], 4), score)


def _build_results(study: Any, storage_url: str, target: Any = None) -> dict[str, Any]:
    TrialState = _optuna().trial.TrialState
    attrs = study.user_attrs
    cfg = attrs.get("config")
    if not cfg:
        raise ConfigError(f"study {study.study_name!r} is not a batchfit sweep (it has no batchfit config)")
    primary, higher = cfg["primary_metric"], bool(cfg["higher_is_better"])
    chosen: dict[str, Any] = {}
    rank = {TrialState.COMPLETE: 3, TrialState.RUNNING: 2, TrialState.FAIL: 1}
    for t in study.get_trials(deepcopy=False):
        tc = t.user_attrs.get("batchfit_config")
        if not tc or t.state not in rank or t.user_attrs.get("duplicate_of") is not None:
            continue
        cur = chosen.get(tc["key"])
        if cur is None or (rank[t.state], t.number) > (rank[cur.state], cur.number):
            chosen[tc["key"]] = t
    trials = sorted((_trial_dict(t, primary, higher) for t in chosen.values()),
                    key=lambda d: (d["batch_size"], d["lr_multiplier"]))
    # -- the target: from the best validation metric any finished trial reached --------------------------------
    spec = parse_target(target if target is not None else (attrs.get("target") or 0.97))
    finished = [t["best_metric"] for t in trials if t["status"] in ("ok", "diverged") and t["best_metric"] is not None]
    best = (max(finished) if higher else min(finished)) if finished else None
    metric_label = primary if primary in ("val_loss", "train_loss") else f"validation {primary}"
    if spec["kind"] == "absolute":
        value: float | None = spec["value"]
        definition = f"{metric_label} {'>=' if higher else '<='} {spec['value']:g} (absolute)"
    elif best is None:
        value, definition = None, f"{spec['value']:.0%} of the best {metric_label}: no finished trial yet"
    else:
        value = best * spec["value"] if higher else best / spec["value"]
        definition = (f"{metric_label} {'>=' if higher else '<='} {value:.4g} = {spec['value']:.0%} of the best "
                      f"({best:.4g})" if higher else
                      f"{metric_label} <= {value:.4g} = the best ({best:.4g}) / {spec['value']:g}")
    for t in trials:
        if value is None:
            continue
        for rec in t["history"]:
            if _reaches(_metric_value(rec, primary), value, higher):
                t["steps_to_target"] = rec.get("step")
                t["epochs_to_target"] = rec.get("epoch")
                t["seconds_to_target"] = rec.get("train_seconds")
                t["samples_to_target"] = rec.get("samples")
                break
    # -- best LR per batch size, the critical batch, the noise scale ----------------------------------------------
    best_per_batch = []
    for b in sorted({t["batch_size"] for t in trials}):
        cands = [t for t in trials if t["batch_size"] == b]
        best_per_batch.append(max(cands, key=lambda t: _rank(t, higher)))
    points = []
    for b in sorted({t["batch_size"] for t in trials}):
        steps = [t["steps_to_target"] for t in trials if t["batch_size"] == b and t["status"] in ("ok", "diverged")
                 and t["steps_to_target"] is not None]
        if steps:
            points.append([b, min(steps)])  # the best LR's steps (Shallue et al. 2019)
    if value is None:
        crit, reason = None, "no target yet: no trial has finished"
    else:
        crit, reason = fit_critical_batch(points)
    bs_values = [t["b_simple"] for t in best_per_batch if t["status"] == "ok" and t["b_simple"] is not None]
    counts: dict[str, int] = {}
    for t in trials:
        counts[t["status"]] = counts.get(t["status"], 0) + 1
    waiting = sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
                  if t.user_attrs.get("batchfit_config"))
    return {
        "workload": cfg["workload"],
        "device": cfg["device"],
        "precision": cfg["precision"],
        "budget": cfg["budget"],
        "lr_rule": cfg["lr_rule"],
        "warmup": cfg.get("warmup"),
        "seed": cfg.get("seed"),
        "target": {"kind": spec["kind"], "fraction": spec["value"] if spec["kind"] == "fraction" else None,
                   "value": value, "best": best, "metric": primary, "higher_is_better": higher,
                   "definition": definition},
        "primary_metric": primary,
        "higher_is_better": higher,
        "study_name": study.study_name,
        "storage": storage_url,
        "batch_sizes": cfg.get("batch_sizes"),
        "lr_multipliers": cfg.get("lr_multipliers"),
        "micro_batch_size": cfg.get("micro_batch_size"),
        "micro_batch_source": cfg.get("micro_batch_source"),
        "num_train": cfg.get("num_train"),
        "counts": dict(counts, waiting=waiting),
        "trials": trials,
        "best_per_batch": best_per_batch,
        "critical_batch_size": crit,
        "critical_batch_size_reason": reason,
        "b_simple": statistics.median(bs_values) if bs_values else None,
        "find": attrs.get("find"),
        "noise": attrs.get("noise"),
    }


def load_results(storage: str | Any, study_name: str | None = None, *, target: float | str | None = None
                 ) -> dict[str, Any]:
    """Rebuild the results dict of a sweep from its store alone (``batchfit report STORE``).

    ``study_name`` may be left out when the store holds one study. ``target`` recomputes steps-to-target for
    another target than the one stored.
    """
    store = open_storage(storage, heartbeat=False, must_exist=True)
    optuna = _optuna()
    names = optuna.get_all_study_names(storage=store)
    if study_name is None:
        if len(names) != 1:
            raise ConfigError(
                f"the store holds {len(names)} studies ({', '.join(names) or 'none'}); name one with --study"
                if names else "the store holds no study yet; run batchfit sweep first"
            )
        study_name = names[0]
    elif study_name not in names:
        raise ConfigError(
            f"no study {study_name!r} in the store; it holds: {', '.join(names) or 'none'}"
        )
    study = optuna.load_study(study_name=study_name, storage=store)
    url = mask_url(storage if isinstance(storage, str) else type(storage).__name__)
    return _build_results(study, url, target)
