"""Plain-JSON conversion and safe file writes, shared by the library and the CLI.

Where an output goes decides how it is written:

- a regular file (or a name that does not exist yet): written to a temporary file beside it, then renamed over it,
  so a reader or a crash never sees half a file (``os.replace`` is atomic on POSIX);
- a symbolic link: the link is followed and its *target* is written as above (the link stays a link);
- anything else that exists — a FIFO, ``/dev/stdout``, a character device such as ``/dev/null``, a socket — is
  opened and written in place, once the content is complete; it is never replaced by a regular file;
- ``-`` is standard output.

The same rules hold for every output batchfit writes: JSON (:func:`write_json`), text (:func:`write_text`) and
``torch.save`` checkpoints (:func:`write_torch`). :func:`check_output_path` checks a location before any work.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["NAME_MAX", "PATH_MAX", "STDOUT", "atomic_write", "check_output_path", "is_stream", "resolve_output",
           "split_fields", "to_jsonable", "write_json", "write_text", "write_torch"]

STDOUT = "-"
NAME_MAX = 255  # bytes in one path component on every common Linux/macOS file system
PATH_MAX = 4096
# names that mean one of this process's own open descriptors: write to the descriptor, never reopen the file
_FD_PATHS = {"/dev/stdout": 1, "/dev/stderr": 2, "/proc/self/fd/1": 1, "/proc/self/fd/2": 2,
             "/dev/fd/1": 1, "/dev/fd/2": 2}


def split_fields(cls: type, data: Mapping[str, Any], *, rest: str = "extras", derived: tuple[str, ...] = (),
                 deep: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """A result's JSON form read back into its dataclass's pieces: ``(known, other)``, the keys that are fields of
    ``cls`` (all but ``rest``, the field that keeps the others) and every other key except ``derived`` ones (values
    the JSON form computes from the fields). ``deep``: copies of the values, so the result shares nothing with
    ``data``. Every typed result reads its dict this one way, so a key a newer batchfit writes is kept, not lost."""
    from dataclasses import fields

    names = {f.name for f in fields(cls)} - {rest}
    take = copy.deepcopy if deep else (lambda v: v)
    known = {k: take(v) for k, v in data.items() if k in names}
    other = {k: take(v) for k, v in data.items() if k not in names and k not in derived}
    return known, other


def to_jsonable(obj: Any) -> Any:
    """Plain JSON: NaN/Inf become null, tuples lists, paths strings, numpy/torch scalars numbers."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):
        return to_jsonable(obj.item())
    return obj


def _fd_of(path: str | Path) -> int | None:
    text = str(path)
    if text == STDOUT:
        return 1
    return _FD_PATHS.get(text)


def is_stream(path: str | Path) -> bool:
    """True for ``-``, this process's stdout/stderr, and existing outputs that are not regular files (FIFOs,
    character devices, sockets): they are written once, in place, and never replaced."""
    if _fd_of(path) is not None:
        return True
    try:
        mode = os.stat(path).st_mode  # follows symbolic links
    except OSError:
        return False
    return not stat.S_ISREG(mode) and not stat.S_ISDIR(mode)


def resolve_output(path: str | Path) -> Path:
    """Where a write to ``path`` lands: a symbolic link's final target (also when that target does not exist yet),
    otherwise ``path`` itself."""
    path = Path(path)
    if path.is_symlink():
        return Path(os.path.realpath(path))
    return path


def _write_stream(path: str | Path, write: Callable[[str], None]) -> None:
    """Render into a private temporary file, then copy the complete bytes into the stream in one pass."""
    with tempfile.TemporaryDirectory(prefix="batchfit-") as tmpdir:
        tmp = os.path.join(tmpdir, "out" + Path(str(path)).suffix)
        write(tmp)
        fd = _fd_of(path)
        if fd is not None:
            stream = sys.stdout if fd == 1 else sys.stderr
            with contextlib.suppress(AttributeError, ValueError):
                stream.flush()
            with open(tmp, "rb") as src:
                data = src.read()
            buffer = getattr(stream, "buffer", None)
            if buffer is not None:  # a real text stream: write its bytes
                buffer.write(data)
                buffer.flush()
            else:  # a replaced stream (a test's capture): text
                stream.write(data.decode("utf-8", errors="replace"))
                stream.flush()
            return
        with open(tmp, "rb") as src, open(path, "wb") as dst:
            shutil.copyfileobj(src, dst)


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Write through ``write(tmp_path)``: atomically (temp file + rename) for regular files, through symbolic links
    to their target, and in place for streams and devices (see the module docstring). Returns the path written."""
    if is_stream(path):
        _write_stream(path, write)
        return Path(path)
    target = resolve_output(path)
    if target.is_dir():
        raise IsADirectoryError(f"output path {str(path)!r} is a directory; give a file name")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)  # keep the permissions of the file we replace
    except OSError:
        mode = 0o644  # mkstemp makes 0600; results are meant to be shared
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name[:200]}.", suffix=target.suffix, dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return Path(path)


def write_json(path: str | Path, data: Any) -> Path:
    """``data`` as indented plain JSON (see :func:`to_jsonable`), written by :func:`atomic_write`."""

    def dump(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(to_jsonable(data), f, indent=2)
            f.write("\n")

    return atomic_write(path, dump)


def write_text(path: str | Path, text: str) -> Path:
    """UTF-8 text, written by :func:`atomic_write`."""

    def dump(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, dump)


def write_torch(path: str | Path, obj: Any) -> Path:
    """``torch.save(obj)``, written by :func:`atomic_write` (a checkpoint: atomic for regular files, through symbolic
    links to their target, in place for FIFOs and devices)."""
    import torch

    def dump(tmp: str) -> None:
        torch.save(obj, tmp)

    return atomic_write(path, dump)


def check_output_path(label: str, path: Any, *, directory: bool = False, store: bool = False) -> None:
    """Check one output location before any work; a :class:`~batchfit.errors.ConfigError` naming ``label`` (a flag
    such as ``--json``, or a keyword such as ``checkpoint``) for every rule that would otherwise fail after the work:
    an empty name, a component over :data:`NAME_MAX` bytes, a path over :data:`PATH_MAX`, a directory given as a
    file (or a file as a directory), a parent that is a regular file or a broken link, a folder where no file can be
    created (probed, so it holds for root and read-only mounts), a read-only store. ``-``, FIFOs and devices pass:
    they are written in place (a store must be a regular file)."""
    from batchfit.errors import ConfigError

    text = str(path)
    if text == STDOUT and not directory and not store:
        return
    if not text or "\x00" in text:
        raise ConfigError(f"{label} {text!r} is not a usable path; give a file name")
    for part in Path(text).parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise ConfigError(f"{label}: the path component {part[:24]!r}... is {len(os.fsencode(part))} bytes long; "
                              f"file systems allow at most {NAME_MAX}; choose a shorter name")
    if len(os.fsencode(os.path.abspath(text))) >= PATH_MAX:
        raise ConfigError(f"{label}: the path is longer than {PATH_MAX} bytes; choose a shorter one")
    p = Path(text)
    if not directory and is_stream(p):
        if store:
            raise ConfigError(f"{label} {text!r} is not a regular file; give a path for the SQLite store")
        return  # a FIFO, a device, /dev/stdout: written in place
    target = p if directory else resolve_output(p)
    if target.exists():
        if directory and not target.is_dir():
            raise ConfigError(f"{label} {text!r} is a file, not a directory; give a directory")
        if not directory and target.is_dir():
            raise ConfigError(f"{label} {text!r} is a directory; give a file name")
        if store and not os.access(target, os.W_OK):
            raise ConfigError(f"the store {text!r} is read-only; make it writable or give another --store")
    folder = Path(os.path.abspath(target if directory else target.parent))
    while not folder.exists():  # the nearest existing folder must be a folder we can create files in
        if folder.is_symlink():
            raise ConfigError(f"{label} {text!r}: {str(folder)!r} is a broken symbolic link; fix it or choose "
                              "another path")
        folder = folder.parent
    if not folder.is_dir():
        raise ConfigError(f"{label} {text!r}: {str(folder)!r} is a file, not a directory; choose another path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".batchfit-probe-", dir=folder)
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise ConfigError(f"{label} {text!r}: cannot write in {str(folder)!r} ({why}); choose another path") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)
