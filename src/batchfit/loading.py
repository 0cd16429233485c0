"""Loading a workload from its spec: ``demo:NAME`` (the built-in :mod:`batchfit.demos`), ``path/to/file.py:factory``
or ``package.module:factory``, with the factory's keyword options (the CLI's ``--workload-option key=value``,
parsed by :func:`parse_options`).

It sits above both :mod:`batchfit.workload` (what a workload is) and :mod:`batchfit.demos` (the built-in ones), so
neither imports the other's layer above it. ``batchfit.load_workload`` is this module's.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from batchfit import demos
from batchfit.errors import ConfigError, WorkloadError
from batchfit.workload import Workload

__all__ = ["load_workload", "parse_options"]


def _call_factory(factory: Callable[..., Any], kwargs: Mapping[str, Any], spec: str) -> Workload:
    try:
        sig = inspect.signature(factory)
        accepted = {
            k: v
            for k, v in kwargs.items()
            if k in sig.parameters or any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
        }
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise ConfigError(
                f"workload {spec!r} does not take option(s) {', '.join(unknown)}; "
                f"it accepts: {', '.join(sig.parameters) or 'none'}"
            )
    except (TypeError, ValueError) as exc:  # builtins without signatures
        if isinstance(exc, ConfigError):
            raise
        accepted = dict(kwargs)
    try:
        workload = factory(**accepted)
    except ConfigError:
        raise
    except Exception as exc:
        raise WorkloadError(
            f"workload factory {spec!r} raised {type(exc).__name__}: {exc}; fix the factory"
        ) from exc
    if not isinstance(workload, Workload):
        raise WorkloadError(
            f"workload factory {spec!r} returned {type(workload).__name__}, not a batchfit.Workload"
        )
    workload.validate()
    return workload


def load_workload(spec: str | Workload, **options: Any) -> Workload:
    """Load a workload from ``demo:NAME``, ``path/to/file.py:factory`` or ``package.module:factory``.

    Keyword options are passed to the factory (e.g. ``num_samples=4000`` for ``demo:mnist1d``).

    >>> wl = load_workload("demo:digits-mlp")
    >>> wl.base_batch_size
    32
    """
    if isinstance(spec, Workload):
        spec.validate()
        return spec
    if not isinstance(spec, str):
        raise ConfigError(f"the workload spec must be a string (demo:NAME, path/to/file.py:factory or "
                          f"package.module:factory) or a Workload, got {type(spec).__name__} {spec!r}")
    if not spec.strip():
        raise ConfigError("workload spec is empty; use demo:NAME, path/to/file.py:factory or package.module:factory")
    spec = spec.strip()
    if spec.startswith("demo:"):
        name = spec[len("demo:") :]
        factory = demos.DEMOS.get(name)
        if factory is None:
            raise ConfigError(f"unknown demo {name!r}; choose one of: {', '.join(sorted(demos.DEMOS))}")
        return _call_factory(factory, options, spec)
    if ":" not in spec:
        raise ConfigError(
            f"workload spec {spec!r} has no ':factory' part; use path/to/file.py:factory or package.module:factory"
        )
    target, _, attr = spec.rpartition(":")
    if not attr.isidentifier():
        raise ConfigError(f"workload spec {spec!r}: {attr!r} is not a valid factory name")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target)
        if not path.is_file():
            raise ConfigError(f"workload file {str(path)!r} does not exist; check the path in {spec!r}")
        mod_name = f"batchfit_user_{abs(hash(str(path.resolve())))}"
        folder = str(path.resolve().parent)  # as the CLI and ``python file.py`` do: the file's siblings import
        if folder not in sys.path:
            sys.path.insert(0, folder)
        try:
            module_spec = importlib.util.spec_from_file_location(mod_name, path)
            if module_spec is None or module_spec.loader is None:
                raise ImportError(f"cannot import {path}")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[mod_name] = module
            module_spec.loader.exec_module(module)
        except Exception as exc:
            raise WorkloadError(
                f"importing workload file {str(path)!r} failed with {type(exc).__name__}: {exc}"
            ) from exc
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            raise ConfigError(
                f"workload module {target!r} was not found ({exc}); check the spelling or your PYTHONPATH"
            ) from exc
        except Exception as exc:
            raise WorkloadError(
                f"importing workload module {target!r} failed with {type(exc).__name__}: {exc}"
            ) from exc
    factory = getattr(module, attr, None)
    if factory is None:
        raise ConfigError(f"workload {target!r} has no attribute {attr!r}; name a function that returns a Workload")
    if isinstance(factory, Workload):
        factory.validate()
        return factory
    if not callable(factory):
        raise WorkloadError(f"workload {spec!r}: {attr!r} is not callable")
    return _call_factory(factory, options, spec)


def parse_options(items: Iterable[str]) -> dict[str, Any]:
    """Parse ``key=value`` strings from the CLI (``--workload-option num_samples=4000``) into typed values."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ConfigError(f"workload option {item!r} is not key=value; write e.g. num_samples=4000")
        value: Any = raw
        for cast in (int, float):
            try:
                value = cast(raw)
                break
            except ValueError:
                continue
        if raw.lower() in ("true", "false"):
            value = raw.lower() == "true"
        out[key.strip()] = value
    return out
