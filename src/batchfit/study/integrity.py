"""A store's content checked before it is used: damage is one clear error, never a crash deep inside the report.

A store can be a valid SQLite database and still be damaged: a table dropped, an attribute that is no longer JSON
(``{broken``), or one that is JSON of the wrong kind (a study config ``"oops"``, a trial's result ``5``). Optuna
itself reads such a store without complaint until some code indexes into the value, so the failure would surface as
a ``TypeError`` far from its cause. These checks name the store, the trial and the attribute, and say what to do:

- :func:`check_sqlite_schema` reads a SQLite file's table list through a read-only connection (opening it with
  Optuna would re-create a missing table: ``batchfit report`` must never write to a store);
- :func:`check_study` checks every batchfit attribute of a study and its trials (``report``, ``sweep``);
- :func:`check_store` opens an existing store and checks all of it (``tune``, before its first stage, so a damaged
  store in ``--out`` is found before hours of find, noise and LR checks rather than after).
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

from batchfit.errors import ConfigError
from batchfit.study import keys as K

__all__ = ["check_sqlite_schema", "check_store", "check_study", "not_json", "sqlite_file"]

SQLITE_HEADER = b"SQLite format 3\x00"
_ADVICE = "restore it from a copy, or use another store"


def _damaged(label: str, what: str) -> ConfigError:
    return ConfigError(f"the store {label} is damaged: {what}; {_ADVICE}")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def sqlite_file(url: Any) -> Path | None:
    """The file of a ``sqlite:///`` URL (also ``sqlite:///file:PATH?mode=ro&uri=true``); None for other stores
    and in-memory databases."""
    if not isinstance(url, str) or not url.startswith("sqlite:///"):
        return None
    path = url[len("sqlite:///"):]
    if not path or path.startswith(":memory:") or "mode=memory" in path:
        return None
    path = path.split("?")[0]
    if path.startswith("file:"):
        path = path[len("file:"):]
    return Path(path) if path else None


def _expected_tables() -> set[str]:
    from batchfit.study.store import optuna_module

    optuna_module()
    from optuna.storages._rdb import models

    return set(models.BaseModel.metadata.tables)


def check_sqlite_schema(path: str | Path, label: str | None = None, *, allow_empty: bool = False) -> None:
    """The SQLite file at ``path`` is a regular file holding every table of Optuna's schema, read through a
    read-only connection (nothing is written, not even a missing table). A database without any table passes
    when ``allow_empty`` (a store about to be made); a file that is not SQLite raises SQLite's own error, which
    the CLI reports as "not a valid SQLite database"."""
    path = Path(path)
    label = label or repr(str(path))
    if not path.is_file():
        what = "does not exist" if not path.exists() else "is not a regular file (a FIFO, a device or a folder)"
        raise ConfigError(f"the store {label} {what}; give the sweep's .db file")
    con = sqlite3.connect(f"file:{quote(str(path.resolve()))}?mode=ro", uri=True, timeout=60)
    try:
        tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        con.close()
    if not tables and allow_empty:
        return
    missing = sorted(_expected_tables() - tables)
    if missing:
        if not tables & {"studies", "trials"}:
            raise ConfigError(f"the store {label} holds no study: it is a SQLite database without batchfit's "
                              "(Optuna's) tables; give the .db file a sweep or tune wrote")
        raise _damaged(label, f"missing table(s) {', '.join(missing)}")


def _kind(value: Any, kind: str) -> bool:
    if kind == "mapping":
        return isinstance(value, Mapping)
    if kind == "str":
        return isinstance(value, str)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "positive_int":
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1
    if kind == "positive_number":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "records":
        return isinstance(value, list) and all(isinstance(r, Mapping) for r in value)
    if kind == "list":
        return isinstance(value, list)
    raise AssertionError(kind)  # pragma: no cover


_WORDS = {"mapping": "an object", "str": "a string", "int": "an integer", "positive_int": "a positive integer",
          "positive_number": "a positive number", "bool": "true or false", "records": "a list of objects",
          "list": "a list"}

# the study's config: what the report and the sweep read from it (None: may be absent)
_STUDY_CONFIG = {"primary_metric": "str", "higher_is_better": "bool", "workload": "str", "device": "str",
                 "precision": "str", "lr_rule": "str"}
_STUDY_CONFIG_OPTIONAL = {"batch_sizes": "list", "lr_multipliers": "list", "seed": "int",
                          "micro_batch_size": "positive_int", "lr_multipliers_by_batch": "mapping"}
# a trial's attributes
_TRIAL_ATTRS = {K.TRIAL_CONFIG: "mapping", K.TRIAL_PLAN: "mapping", K.TRIAL_RESULT: "mapping",
                K.TRIAL_WORKER: "mapping", K.TRIAL_STATUS: "str", K.TRIAL_ERROR: "str", K.TRIAL_ERROR_KIND: "str",
                K.TRIAL_DUPLICATE_OF: "int"}
_TRIAL_CONFIG = {"key": "str", "batch_size": "positive_int", "lr_multiplier": "positive_number"}
_RECORD_OPTIONAL = {"val_metrics": "mapping"}
_RESULT_OPTIONAL = {"b_simple_history": "records"}


def not_json(label: str, exc: BaseException, where: str = "") -> ConfigError:
    """The error for a stored attribute that is not JSON (Optuna raises a bare ``JSONDecodeError`` when it decodes
    the stored text, wherever that happens)."""
    return _damaged(label, f"{where or 'it'} holds an attribute that is not valid JSON ({' '.join(str(exc).split())})")


def _attrs(study: Any, label: str) -> tuple[dict[str, Any], list[Any]]:
    """The study's attributes and trials; an attribute that is not JSON is damage."""
    try:
        return dict(study.user_attrs), list(study.get_trials(deepcopy=False))
    except json.JSONDecodeError as exc:
        raise not_json(label, exc, f"study {study.study_name!r}") from None


def check_study(study: Any, label: str) -> None:
    """Every attribute batchfit reads from ``study`` and its trials has the kind batchfit wrote (the study's
    config an object with its metric, workload, device...; each trial's config an object with its key, batch size
    and LR multiplier; its plan, result and worker objects; its evaluation records objects...). A
    :class:`ConfigError` names the store (``label``), the study or trial, the attribute and what it holds."""
    attrs, trials = _attrs(study, label)
    where = f"study {study.study_name!r}"
    cfg = attrs.get(K.STUDY_CONFIG)
    if cfg is not None:
        if not isinstance(cfg, Mapping):
            raise _damaged(label, f"the attribute {K.STUDY_CONFIG!r} of {where} is {_shown(cfg)}, not the sweep's "
                                  "settings (an object)")
        for key, kind in _STUDY_CONFIG.items():
            if not _kind(cfg.get(key), kind):
                raise _damaged(label, f"the config of {where} has {key} {_shown(cfg.get(key))}; it must be "
                                      f"{_WORDS[kind]}")
        for key, kind in _STUDY_CONFIG_OPTIONAL.items():
            if cfg.get(key) is not None and not _kind(cfg[key], kind):
                raise _damaged(label, f"the config of {where} has {key} {_shown(cfg[key])}; it must be "
                                      f"{_WORDS[kind]}")
    for t in trials:
        _check_trial(t, label)


def _check_trial(t: Any, label: str) -> None:
    where = f"trial {t.number}"
    attrs = t.user_attrs
    for key, kind in _TRIAL_ATTRS.items():
        value = attrs.get(key)
        if value is not None and not _kind(value, kind):
            raise _damaged(label, f"{where}'s attribute {key!r} is {_shown(value)}; it must be {_WORDS[kind]}")
    cfg = attrs.get(K.TRIAL_CONFIG)
    if cfg is not None:
        for key, kind in _TRIAL_CONFIG.items():
            if not _kind(cfg.get(key), kind):
                raise _damaged(label, f"{where}'s config has {key} {_shown(cfg.get(key))}; it must be "
                                      f"{_WORDS[kind]}")
        if cfg.get("seed") is not None and not _kind(cfg["seed"], "int"):
            raise _damaged(label, f"{where}'s config has seed {_shown(cfg['seed'])}; it must be an integer")
    result = attrs.get(K.TRIAL_RESULT) or {}
    for key, kind in _RESULT_OPTIONAL.items():
        if result.get(key) is not None and not _kind(result[key], kind):
            raise _damaged(label, f"{where}'s result has {key} {_shown(result[key])}; it must be {_WORDS[kind]}")
    for key in sorted(k for k in attrs if k.startswith(K.EVAL_PREFIX)):
        record = attrs[key]
        if not isinstance(record, Mapping):
            raise _damaged(label, f"{where}'s evaluation record {key!r} is {_shown(record)}; it must be an object")
        for name, kind in _RECORD_OPTIONAL.items():
            if record.get(name) is not None and not _kind(record[name], kind):
                raise _damaged(label, f"{where}'s evaluation record {key!r} has {name} {_shown(record[name])}; "
                                      f"it must be {_WORDS[kind]}")


def check_store(storage: Any) -> None:
    """An existing store, checked before any work (``tune`` calls it before its first stage): a SQLite file is a
    regular file, a SQLite database (or empty), with every table of the schema; the store opens; every study in it
    is intact (:func:`check_study`). A store that does not exist yet passes (it is made by the sweep)."""
    from batchfit.study.store import mask_url, normalize_url, open_storage, optuna_module

    if isinstance(storage, str):
        storage = normalize_url(storage)
        label = repr(mask_url(storage))
        file = sqlite_file(storage)
        if file is not None:
            if not file.exists():
                return
            if not file.is_file():
                raise ConfigError(f"the store {label} is not a regular file (a FIFO, a device or a folder); give "
                                  "a .db file")
            with file.open("rb") as f:
                head = f.read(len(SQLITE_HEADER))
            if head and head != SQLITE_HEADER:
                raise ConfigError(f"the store {label} is not a valid SQLite database (file is not a database); "
                                  f"{_ADVICE}")
            check_sqlite_schema(file, label, allow_empty=True)
    else:
        label = repr(type(storage).__name__)
    optuna = optuna_module()
    opened = open_storage(storage, heartbeat=False)
    try:
        studies = [optuna.load_study(study_name=name, storage=opened)
                   for name in optuna.get_all_study_names(storage=opened)]
    except json.JSONDecodeError as exc:
        raise not_json(label, exc) from None
    for study in studies:
        check_study(study, label)
