"""The store: one Optuna study per sweep, shared by any number of worker processes.

Opening (any SQLAlchemy URL Optuna accepts; concurrent schema creation retried), the enqueue-and-claim lock for
SQLite, the worker heartbeat, recovery of trials whose worker died, claiming the next configuration, and the
tune-level namespace of study attributes (:func:`write_namespace` / :func:`read_namespace`).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import random
import re
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from batchfit._io import to_jsonable
from batchfit.errors import ConfigError
from batchfit.study import keys as K
from batchfit.study.inputs import GridPoint

__all__ = [
    "HEARTBEAT_GRACE_S",
    "HEARTBEAT_INTERVAL_S",
    "Heartbeat",
    "claim",
    "count_failed_kept",
    "default_storage",
    "enqueue_missing",
    "is_schema_race",
    "mask_url",
    "new_run_id",
    "normalize_url",
    "open_storage",
    "open_study",
    "optuna_module",
    "read_namespace",
    "recover_stale",
    "store_lock",
    "trial_done",
    "worker_identity",
    "write_namespace",
]

HEARTBEAT_INTERVAL_S = 15
HEARTBEAT_GRACE_S = 60
OPEN_ATTEMPTS = 8


def optuna_module() -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def mask_url(url: Any) -> str:
    """A storage URL with any password replaced by ``***`` (safe to print and to store in results)."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", str(url))


def default_storage(out_dir: str | Path | None = None) -> str:
    return f"sqlite:///{(Path(out_dir or '.') / 'batchfit.db').resolve()}"


def normalize_url(storage: str) -> str:
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


# ---------------------------------------------------------------------------------------------------------------
# Opening: workers starting together race to create the schema


def _duplicate_object_types() -> tuple[type[BaseException], ...]:
    """The PostgreSQL driver errors for "that type/table/row already exists" (psycopg 3 and psycopg2)."""
    found: list[type[BaseException]] = []
    for name in ("psycopg.errors", "psycopg2.errors"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        found += [getattr(module, cls) for cls in ("DuplicateObject", "DuplicateTable", "UniqueViolation")
                  if isinstance(getattr(module, cls, None), type)]
    return tuple(found)


def is_schema_race(exc: BaseException) -> bool:
    """True for the errors a worker meets while another creates the same schema at the same moment.

    Optuna creates its tables and PostgreSQL enum types with ``CREATE`` statements that are not atomic across
    connections: the loser of the race gets ``IntegrityError`` (``UniqueViolation`` on ``pg_type``) or
    ``ProgrammingError`` wrapping ``DuplicateObject`` ("type ... already exists"); SQLite answers
    ``OperationalError`` ("database is locked"). Matched by exception type, never by name.
    """
    try:
        from sqlalchemy import exc as sa_exc
    except ImportError:  # pragma: no cover - optuna depends on sqlalchemy
        return False
    if isinstance(exc, (sa_exc.IntegrityError, sa_exc.OperationalError)):
        return True
    if isinstance(exc, sa_exc.ProgrammingError):
        return isinstance(exc.orig, _duplicate_object_types())
    return isinstance(exc, _duplicate_object_types())


def open_storage(storage: str | Any, *, heartbeat: bool = True, must_exist: bool = False) -> Any:
    """An Optuna storage for a URL (any SQLAlchemy URL Optuna accepts) or an Optuna storage object (passed through).

    RDB storages get a heartbeat, so a RUNNING trial of a dead worker on another machine goes stale and is retried.
    """
    if not isinstance(storage, str):
        return storage
    url = normalize_url(storage)
    optuna = optuna_module()
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
        for attempt in range(OPEN_ATTEMPTS):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # Optuna marks the heartbeat experimental
                    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
            except Exception as exc:
                if attempt == OPEN_ATTEMPTS - 1 or not is_schema_race(exc):
                    raise
                time.sleep((0.1 + random.random() * 0.2) * (attempt + 1))  # jitter: racers do not retry in step
        raise AssertionError("unreachable")  # pragma: no cover
    except ImportError as exc:
        scheme = str(url).split(":", 1)[0].split("+", 1)[0].lower()
        fix = ("install it with pip install 'batchfit[postgres]'" if scheme.startswith("postgres") else
               f"install the SQLAlchemy driver for {scheme}, or use a sqlite:///path.db store")
        raise ConfigError(
            f"store {mask_url(url)!r} needs a database driver that is not installed ({exc}); {fix}"
        ) from exc
    except Exception as exc:
        raise ConfigError(
            f"cannot open the store {mask_url(url)!r} ({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); "
            "use sqlite:///path.db or postgresql://user:pass@host/db"
        ) from exc


def open_study(storage: str | Any, study_name: str | None = None) -> Any:
    """The Optuna study ``study_name`` in an existing store (``None``: the store's only study)."""
    store = open_storage(storage, heartbeat=False, must_exist=True)
    optuna = optuna_module()
    names = optuna.get_all_study_names(storage=store)
    if study_name is None:
        if len(names) != 1:
            raise ConfigError(
                f"the store holds {len(names)} studies ({', '.join(names) or 'none'}); name one with study_name"
                if names else "the store holds no study yet; run batchfit sweep first"
            )
        study_name = names[0]
    elif study_name not in names:
        raise ConfigError(f"no study {study_name!r} in the store; it holds: {', '.join(names) or 'none'}")
    return optuna.load_study(study_name=study_name, storage=store)


# ---------------------------------------------------------------------------------------------------------------
# Tune-level results: one namespace of study attributes


def write_namespace(study: Any, key: str, value: Any) -> None:
    """Store one tune-level result (``find``, ``noise``, ``lr_calibration``, ``precision_check``...) in the study,
    as the user attribute ``batchfit.tune.<key>`` (:data:`~batchfit.study.keys.TUNE_NAMESPACE`)."""
    if not isinstance(key, str) or not key:
        raise ConfigError(f"the namespace key must be a non-empty string, got {key!r}")
    study.set_user_attr(K.TUNE_NAMESPACE + key, to_jsonable(value))


def read_namespace(study: Any) -> dict[str, Any]:
    """Every tune-level result stored in the study, by key (without the prefix).

    Stores written before the namespace existed kept ``find``, ``noise``, ``lr_calibration`` and
    ``precision_check`` as plain study attributes; they are read too (the namespaced value wins).
    """
    attrs = study.user_attrs
    found = {k[len(K.TUNE_NAMESPACE):]: v for k, v in attrs.items() if k.startswith(K.TUNE_NAMESPACE)}
    for legacy in K.LEGACY_TUNE_ATTRS:
        if found.get(legacy) is None and attrs.get(legacy) is not None:
            found[legacy] = attrs[legacy]
    return found


# ---------------------------------------------------------------------------------------------------------------
# Workers: who runs a trial, and whether it is still alive


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux ``/proc``), to tell a live process from a reused pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def worker_identity() -> dict[str, Any]:
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


class Heartbeat:
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

    def __enter__(self) -> Heartbeat:
        if self.thread is not None:
            with contextlib.suppress(Exception):
                self.storage.record_heartbeat(self.trial_id)
            self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=5)


def recover_stale(study: Any) -> list[int]:
    """Fail RUNNING trials whose worker is dead (this machine: pid gone; elsewhere: heartbeat stale)."""
    optuna = optuna_module()
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
        if K.TRIAL_CONFIG not in t.user_attrs or not _worker_dead(t.user_attrs.get(K.TRIAL_WORKER)):
            continue
        with contextlib.suppress(Exception):
            storage.set_trial_user_attr(t._trial_id, K.TRIAL_STATUS, K.STATUS_INTERRUPTED)
            storage.set_trial_user_attr(t._trial_id, K.TRIAL_ERROR,
                                        "the worker process died before the trial finished")
            if storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                failed.append(t.number)
    return failed


# ---------------------------------------------------------------------------------------------------------------
# The grid: what is done, what to enqueue, claiming a trial


def new_run_id() -> str:
    """A fresh id for one invocation (a ``sweep()`` call, or a whole ``tune``): see :func:`trial_done`."""
    return uuid.uuid4().hex


def trial_done(t: Any, retry_failed: bool, run_id: str | None = None) -> bool | None:
    """True: this trial settles its configuration; None: it is queued or running; False: retry it.

    An interrupted trial is always retried. A failed one is kept, unless ``retry_failed``: then it is retried once
    per invocation — a failure recorded by this same invocation (its ``run_id``, :data:`~batchfit.study.keys.
    TRIAL_RUN`) settles the configuration, so a failure that persists ends the run instead of looping forever.
    """
    TrialState = optuna_module().trial.TrialState
    if t.state == TrialState.COMPLETE:
        return True
    if t.state in (TrialState.WAITING, TrialState.RUNNING):
        return None
    if t.state == TrialState.FAIL:
        if t.user_attrs.get(K.TRIAL_STATUS) != K.STATUS_FAILED:
            return False  # interrupted (Ctrl-C, a dead worker): re-run
        return not retry_failed or (run_id is not None and t.user_attrs.get(K.TRIAL_RUN) == run_id)
    return False  # PRUNED: a duplicate or a spare trial; says nothing about the configuration


def _by_config(study: Any) -> dict[str, list[Any]]:
    groups: dict[str, list[Any]] = {}
    for t in study.get_trials(deepcopy=False):
        cfg = t.user_attrs.get(K.TRIAL_CONFIG)
        if cfg and t.user_attrs.get(K.TRIAL_DUPLICATE_OF) is None:
            groups.setdefault(cfg["key"], []).append(t)
    return groups


def enqueue_missing(study: Any, grid: Sequence[GridPoint], retry_failed: bool, run_id: str | None = None) -> int:
    """Queue every grid point that has no trial settling it (done, queued or running); returns how many."""
    groups = _by_config(study)
    added = 0
    for point in grid:
        states = [trial_done(t, retry_failed, run_id) for t in groups.get(point.key, [])]
        if any(s is True or s is None for s in states):
            continue
        study.enqueue_trial(
            {K.PARAM_BATCH_SIZE: point.batch_size, K.PARAM_LR_MULTIPLIER: point.lr_multiplier},
            user_attrs={K.TRIAL_CONFIG: point.to_attr(), K.TRIAL_STATUS: K.STATUS_WAITING},
        )
        added += 1
    return added


def count_failed_kept(study: Any, grid: Sequence[GridPoint]) -> int:
    """Grid points whose outcome is a recorded failure (kept, not re-run, unless ``retry_failed``)."""
    groups = _by_config(study)
    count = 0
    for point in grid:
        trials = groups.get(point.key, [])
        if any(t.state.name in ("COMPLETE", "WAITING", "RUNNING") for t in trials):
            continue
        if any(t.state.name == "FAIL" and t.user_attrs.get(K.TRIAL_STATUS) == K.STATUS_FAILED for t in trials):
            count += 1
    return count


@contextlib.contextmanager
def store_lock(url: Any) -> Iterator[None]:
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
    d = optuna_module().distributions
    return {K.PARAM_BATCH_SIZE: d.IntDistribution(1, 2**40),
            K.PARAM_LR_MULTIPLIER: d.FloatDistribution(1e-6, 1e6, log=True)}


def claim(study: Any, retry_failed: bool, run_id: str | None = None) -> Any | None:
    """Pop the next enqueued configuration (atomically, in the store); None when the queue is empty.

    Several workers may have enqueued the same configuration at once: a trial whose configuration already has a
    completed trial, or an earlier-numbered queued/running one, steps aside (PRUNED, ``duplicate_of``).
    """
    optuna = optuna_module()
    TrialState = optuna.trial.TrialState
    while True:
        if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "heartbeat is supposed to be used with Study.optimize"
            trial = study.ask(_distributions())
        cfg = trial.user_attrs.get(K.TRIAL_CONFIG)
        if cfg is not None:
            trial.set_user_attr(K.TRIAL_WORKER, worker_identity())  # at once: a dead owner is then detectable
        if cfg is None:  # another worker took the last queued trial between our check and ask(): a spare trial
            trial.set_user_attr(K.TRIAL_DUPLICATE_OF, -1)
            study.tell(trial, state=TrialState.PRUNED)
            return None
        for other in study.get_trials(deepcopy=False):
            ocfg = other.user_attrs.get(K.TRIAL_CONFIG)
            if other.number == trial.number or not ocfg or ocfg["key"] != cfg["key"]:
                continue
            if other.user_attrs.get(K.TRIAL_DUPLICATE_OF) is not None:
                continue
            done = trial_done(other, retry_failed, run_id)
            if done is True or (done is None and other.number < trial.number):
                trial.set_user_attr(K.TRIAL_DUPLICATE_OF, other.number)
                study.tell(trial, state=TrialState.PRUNED)
                break
        else:
            return trial
