from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import pytest

from _study_fixture import make_results
from batchfit.cli import main


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("batchfit report: error:"), err
    return lines[0]


def test_report_from_results_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "in.json"
    src.write_text(json.dumps(dict(make_results(), recommendation={"stale": True})))
    out = tmp_path / "rep"
    assert main(["report", str(src), "--out", str(out), "--json", str(tmp_path / "r.json")]) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["recommendation"]["batch_size"] == 64  # recomputed, not the stale one
    assert json.loads((tmp_path / "r.json").read_text())["recommendation"]["batch_size"] == 64
    assert (out / "report.html").exists() and (out / "report.md").exists()
    err = capsys.readouterr().err
    assert "Recommendation:" in err and "batch 64" in err
    # the trade-off table first: one row per batch size, each with its verdict against the reference (16)
    table = err[:err.index("Recommendation:")]
    assert "verdict" in table and "val vs 16 (+ better)" in table
    verdicts = {m.group(1): m.group(2) for m in re.finditer(r"^\s*(16|32|64|128)\s.*?\s(reference|chosen "
                                                               r"\(non-inferior\)|non-inferior|inferior)\s*$",
                                                               table, re.M)}
    assert verdicts == {"16": "reference", "32": "non-inferior", "64": "chosen (non-inferior)", "128": "inferior"}
    assert "tied" not in err and "apart" not in err


def test_report_tolerance_option(tmp_path: Path) -> None:
    src = tmp_path / "in.json"
    src.write_text(json.dumps(make_results()))
    # 128 is 0.05 below the reference 16 on every seed: inferior at the default 1 % margin, non-inferior at 6 %
    assert main(["report", str(src), "--out", str(tmp_path / "rep"), "--tolerance", "0.06", "--quiet"]) == 0
    rec = json.loads((tmp_path / "rep" / "results.json").read_text())["recommendation"]
    assert rec["batch_size"] == 128 and rec["non_inferior"] == [16, 32, 64, 128] and rec["tolerance"] == 0.06
    assert rec["tied"] == rec["non_inferior"] and rec["reference_batch_size"] == 16
    assert "chosen (non-inferior)" in (tmp_path / "rep" / "report.md").read_text()


def test_report_from_a_directory(tmp_path: Path) -> None:
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "results.json").write_text(json.dumps(make_results()))
    assert main(["report", str(tmp_path / "study"), "--out", str(tmp_path / "rep"), "--quiet"]) == 0
    assert (tmp_path / "rep" / "report.html").exists()


def _bad_json(tmp_path: Path) -> str:
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    return str(p)


def _no_trials(tmp_path: Path) -> str:
    p = tmp_path / "other.json"
    p.write_text(json.dumps({"hello": 1}))
    return str(p)


def _not_sqlite(tmp_path: Path) -> str:
    p = tmp_path / "x.db"
    p.write_text("plain text")
    return str(p)


def _empty_store(tmp_path: Path) -> str:
    p = tmp_path / "empty.db"
    sqlite3.connect(p).close()  # a valid, empty SQLite file: no study in it
    p.write_bytes(p.read_bytes() or b"")
    con = sqlite3.connect(p)
    con.execute("create table t (x)")
    con.commit()
    con.close()
    return str(p)


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda tmp: str(tmp / "missing.db"), "does not exist"),
        (_bad_json, "not valid JSON"),
        (_no_trials, "no 'trials' list"),
        (_not_sqlite, "not a SQLite database"),
        (lambda tmp: str(tmp), "without results.json or batchfit.db"),
        (_empty_store, "no study"),
    ],
)
def test_bad_store_is_one_line_and_exit_2(make: object, fragment: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    store = make(tmp_path)  # type: ignore[operator]
    assert main(["report", store, "--out", str(tmp_path / "rep")]) == 2
    assert fragment in _one_line_error(capsys)


def test_out_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "in.json"
    src.write_text(json.dumps(make_results()))
    f = tmp_path / "file"
    f.write_text("")
    assert main(["report", str(src), "--out", str(f)]) == 2
    assert "is a file" in _one_line_error(capsys)


def test_malformed_trial_in_a_hand_edited_results_json(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """13.19: one line naming the bad trial and key, exit 2, instead of an internal KeyError."""
    res = make_results()
    del res["trials"][2]["batch_size"]
    src = tmp_path / "edited.json"
    src.write_text(json.dumps(res))
    assert main(["report", str(src), "--out", str(tmp_path / "rep")]) == 2
    line = _one_line_error(capsys)
    assert "trial 2" in line and "batch_size" in line and "Traceback" not in line
    res = make_results()
    res["trials"][1]["samples_per_s"] = "fast"
    src.write_text(json.dumps(res))
    assert main(["report", str(src), "--out", str(tmp_path / "rep")]) == 2
    line = _one_line_error(capsys)
    assert "trial 1 (batch 32) has samples_per_s 'fast'" in line
    assert not (tmp_path / "rep" / "report.html").exists()


def test_quiet_prints_the_one_line_result(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """12.6: `report -q` prints the one-line recommendation and nothing else."""
    src = tmp_path / "in.json"
    src.write_text(json.dumps(make_results()))
    assert main(["report", str(src), "--out", str(tmp_path / "rep"), "-q"]) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        "Recommendation: batch 64 = micro-batch 64 x 1 accumulation step(s), LR 0.0014, warm-up 0 step(s), fp32"]


def test_report_of_a_running_study_claims_no_win(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A results.json written mid-sweep (trials still queued): the terminal, like report.md, says how many trials
    finished and that there is no recommendation yet; the table shows the verdicts so far, none chosen."""
    res = make_results()
    res["counts"], res["status"] = {"ok": 12, "diverged": 1, "waiting": 3}, "running"
    src = tmp_path / "in.json"
    src.write_text(json.dumps(res))
    assert main(["report", str(src), "--out", str(tmp_path / "rep")]) == 0
    err = capsys.readouterr().err
    assert "Interim report: 13 of 16 trials finished; no recommendation yet." in err
    assert "Recommendation:" not in err and "chosen" not in err and "non-inferior" in err
    assert "Interim report: 13 of 16 trials finished" in (tmp_path / "rep" / "report.md").read_text()
    assert main(["report", str(src), "--out", str(tmp_path / "rep"), "-q"]) == 0
    assert capsys.readouterr().err.splitlines() == [
        "Interim report: 13 of 16 trials finished; no recommendation yet."]
