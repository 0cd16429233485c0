"""batchfit._io: where an output goes decides how it is written (issue 13, item 1)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time

import pytest

from batchfit._io import atomic_write, is_stream, write_json, write_text
from batchfit.cli import main
from conftest import private_null_device


def _read_fifo(path, box: dict) -> threading.Thread:  # noqa: ANN001
    def read() -> None:
        with open(path) as f:
            box["text"] = f.read()

    t = threading.Thread(target=read, daemon=True)
    t.start()
    return t


def test_regular_file_is_replaced_atomically_and_keeps_its_mode(tmp_path) -> None:
    out = tmp_path / "r.json"
    out.write_text("old")
    os.chmod(out, 0o640)
    inode = out.stat().st_ino
    write_json(out, {"a": float("nan"), "b": (1, 2)})
    assert json.loads(out.read_text()) == {"a": None, "b": [1, 2]}
    assert out.stat().st_ino != inode  # a new file renamed over the old one
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temp file left


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path) -> None:
    out = tmp_path / "r.json"
    out.write_text("old")

    def boom(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_write(out, boom)
    assert out.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_symlink_target_is_updated_and_link_kept(tmp_path) -> None:
    target = tmp_path / "real" / "r.json"
    target.parent.mkdir()
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    write_text(link, "new")
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text() == "new"


def test_dangling_symlink_creates_its_target(tmp_path) -> None:
    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "made.json")
    write_json(link, {"x": 1})
    assert link.is_symlink() and json.loads((tmp_path / "made.json").read_text()) == {"x": 1}


def test_fifo_is_written_in_place_not_replaced(tmp_path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    box: dict = {}
    t = _read_fifo(fifo, box)
    write_json(fifo, {"ok": True})
    t.join(10)
    assert json.loads(box["text"]) == {"ok": True}
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_dev_null_stays_a_character_device(tmp_path) -> None:
    null = private_null_device(tmp_path)  # a private /dev/null: a regression must not break the machine's
    before = os.stat(null)
    assert is_stream(null)
    write_json(null, {"x": 1})
    after = os.stat(null)
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev and after.st_ino == before.st_ino


def test_dash_is_stdout(capsys) -> None:
    write_json("-", {"x": [1, 2]})
    assert json.loads(capsys.readouterr().out) == {"x": [1, 2]}


def test_cli_json_to_fifo_read_by_a_thread(tmp_path, capsys) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    box: dict = {}
    t = _read_fifo(fifo, box)
    rc = main(["train", "--steps", "2", "--eval-every", "1", "-q", "--json", str(fifo)])
    t.join(10)
    assert rc == 0
    data = json.loads(box["text"])  # one document: the final result, not every partial one
    assert data["status"] == "ok" and data["steps"] == 2
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_cli_json_symlink_updates_target(tmp_path) -> None:
    target = tmp_path / "t.json"
    target.write_text("{}")
    link = tmp_path / "l.json"
    link.symlink_to(target)
    assert main(["train", "--steps", "1", "-q", "--json", str(link)]) == 0
    assert link.is_symlink() and json.loads(target.read_text())["status"] == "ok"


def test_cli_json_dash_gives_parseable_stdout_progress_on_stderr() -> None:
    p = subprocess.run([sys.executable, "-m", "batchfit", "train", "--steps", "2", "--eval-every", "1",
                        "--json", "-"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    data = json.loads(p.stdout)  # stdout is exactly one JSON document
    assert data["status"] == "ok" and len(data["history"]) >= 2
    assert "batch" in p.stderr  # the progress and summary went to stderr


def test_cli_failure_releases_a_fifo_reader(tmp_path, capsys) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    box: dict = {}
    t = _read_fifo(fifo, box)
    time.sleep(0.2)  # the reader is waiting in open()
    rc = main(["train", "-w", "demo:nope", "--steps", "1", "-q", "--json", str(fifo)])
    t.join(10)
    assert rc == 2 and not t.is_alive() and box["text"] == ""  # the reader saw the end, not a hang


def test_split_fields_keeps_every_unknown_key_and_copies_only_when_asked() -> None:
    """Every typed result reads its JSON form through split_fields: fields apart, the rest kept (so a key a newer
    batchfit writes survives a round trip), derived keys dropped, and ``deep`` values shared with nothing."""
    from dataclasses import dataclass, field

    from batchfit._io import split_fields

    @dataclass
    class R:
        a: int
        b: list[int]
        extras: dict = field(default_factory=dict)

    data = {"a": 1, "b": [2], "newer": {"x": [3]}, "mode": "derived", "extras": "not a field to fill"}
    known, other = split_fields(R, data, derived=("mode",))
    assert known == {"a": 1, "b": [2]} and other == {"newer": {"x": [3]}, "extras": "not a field to fill"}
    assert known["b"] is data["b"] and other["newer"] is data["newer"]
    deep, rest = split_fields(R, data, deep=True)
    assert deep["b"] == [2] and deep["b"] is not data["b"] and rest["newer"] is not data["newer"]
    assert "mode" in rest
    known, other = split_fields(R, {"a": 1, "b": [], "extras": 5}, rest="b")
    assert known == {"a": 1, "extras": 5} and other == {"b": []}
