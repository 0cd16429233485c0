from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser
from pathlib import Path

from _study_fixture import make_results
from batchfit.report import PLOTS, summary_rows, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[str] = []
        self.tags: list[str] = []
        self.headings: list[str] = []
        self._in_h = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(dict(attrs)["src"] or "")
        self._in_h = tag in ("h1", "h2")

    def handle_data(self, data: str) -> None:
        if self._in_h and data.strip():
            self.headings.append(data.strip())
            self._in_h = False


def test_report_renders_everything(tmp_path: Path) -> None:
    paths = write_report(make_results(), tmp_path / "out")
    out = tmp_path / "out"
    # results.json: the results dict plus the recommendation, with the fields the issue names
    data = json.loads((out / "results.json").read_text())
    assert data["recommendation"]["batch_size"] == 64
    assert {"batch_size", "micro_batch_size", "accumulation_steps", "lr", "warmup_steps", "precision",
            "reasons"} <= set(data["recommendation"])
    assert {"trials", "critical_batch_size", "b_simple"} <= set(data)
    for t in data["trials"]:
        assert {"batch_size", "micro_batch_size", "accumulation_steps", "lr", "status", "best_val_metrics",
                "final_val_metrics", "generalization_gap", "samples_per_s", "peak_memory_bytes", "steps_to_target",
                "epochs_to_target", "seconds_to_target", "b_simple"} <= set(t)
    # every plot was written and is a PNG
    assert set(paths["plots"]) == set(PLOTS)
    for name in PLOTS:
        assert (out / f"{name}.png").read_bytes().startswith(PNG_MAGIC)
    # html parses, is self-contained, embeds every plot, and the summary table comes first, then the recommendation
    page = (out / "report.html").read_text()
    parser = _Collect()
    parser.feed(page)
    parser.close()
    assert len(parser.imgs) == len(PLOTS)
    for src in parser.imgs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC)
    assert not re.search(r'(src|href)="(?!data:)', page), "the page must not load anything from outside"
    assert parser.headings[1].startswith("Summary") and parser.headings[2] == "Recommendation"
    assert page.index("<table>") < page.index("Recommendation")
    assert 'class="pick"' in page
    # markdown: the summary table with one row per batch size, then the recommendation with its reasons
    md = (out / "report.md").read_text()
    assert "| batch | micro x accum |" in md and "B / B_simple" in md and "epochs to target" in md
    for b in (16, 32, 64, 128):
        assert re.search(rf"^\| {b} \| ", md, re.M)
    assert md.index("## Summary") < md.index("## Recommendation") < md.index("## Plots")
    assert "**batch 64 = micro-batch 64 x 1" in md
    assert "![" in md and "(steps_to_target.png)" in md
    # no temp files left behind
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_summary_rows_measure_the_trade_off() -> None:
    rows = summary_rows(make_results())
    assert [r["batch_size"] for r in rows] == [16, 32, 64, 128]
    r64 = rows[2]
    assert r64["status"] == "ok" and r64["best_metric"] == 0.945  # the best-LR trial, not the diverged one
    assert r64["noise_ratio"] == 64 / 50.0
    assert r64["peak_memory_bytes"] == 100_000 + 2_000 * 64
    assert r64["epochs_to_target"] == 2.0


def test_report_of_an_unfinished_study_still_renders(tmp_path: Path) -> None:
    res = make_results()
    res["best_per_batch"] = []
    for t in res["trials"]:
        t["status"], t["best_val_metrics"], t["history"], t["b_simple_history"] = "running", {}, [], []
        t["steps_to_target"] = None
    res["critical_batch_size"], res["b_simple"] = None, None
    paths = write_report(res, tmp_path)
    assert paths["recommendation"] is None
    md = (tmp_path / "report.md").read_text()
    assert "No recommendation yet: no finished trial" in md
    assert "| running |" in md or "running" in md
    assert json.loads((tmp_path / "results.json").read_text())["recommendation"] is None
    # plots without data are skipped, not drawn empty
    assert "val_curves" not in paths["plots"] and "steps_to_target" not in paths["plots"]
    HTMLParser().feed((tmp_path / "report.html").read_text())


def test_report_escapes_html(tmp_path: Path) -> None:
    res = make_results()
    res["workload"] = "<script>alert(1)</script>"
    res["trials"][3]["error"] = "bad <b>thing</b>"
    write_report(res, tmp_path, plots=False)
    page = (tmp_path / "report.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "bad &lt;b&gt;thing&lt;/b&gt;" in page
