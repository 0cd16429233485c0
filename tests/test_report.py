from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from _study_fixture import make_results
from batchfit.errors import ConfigError
from batchfit.report import PLOTS, summary_rows, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class _Collect(HTMLParser):
    """The page's structure: headings, tables (rows of cell texts), images, the recommendation box, and whether
    every opened element was closed in order (HTMLParser itself accepts anything)."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[str] = []
        self.headings: list[str] = []
        self.tables: list[list[list[str]]] = []
        self.rec_text: list[str] = []
        self.stack: list[str] = []
        self.errors: list[str] = []
        self._cell: list[str] | None = None
        self._in_rec = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag not in self.VOID:
            self.stack.append(tag)
        if tag == "img":
            self.imgs.append(a.get("src") or "")
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "div" and a.get("class") == "rec":
            self._in_rec = len(self.stack)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
            return
        if self._in_rec == len(self.stack) and tag == "div":
            self._in_rec = 0
        self.stack.pop()
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        if self._in_rec and data.strip():
            self.rec_text.append(data.strip())
        if self.stack and self.stack[-1] in ("h1", "h2") and data.strip():
            self.headings.append(data.strip())


def parse_page(page: str) -> _Collect:
    parser = _Collect()
    parser.feed(page)
    parser.close()
    assert not parser.errors and not parser.stack, (parser.errors, parser.stack)
    return parser


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
    parser = parse_page(page)
    assert len(parser.imgs) == len(PLOTS)
    for src in parser.imgs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC)
    assert not re.search(r'(src|href)="(?!data:)', page), "the page must not load anything from outside"
    assert parser.headings[1].startswith("Summary") and parser.headings[2] == "Recommendation"
    assert parser.headings[-1] == "All trials"
    summary, trials = parser.tables  # the summary table first, the table of every trial last
    assert summary[0][:2] == ["batch", "micro x accum"] and "best val accuracy" in summary[0]
    assert [row[0] for row in summary[1:]] == ["16", "32", "64", "128"]
    assert len(trials) == 1 + len(make_results()["trials"])
    assert parser.rec_text[0].startswith("batch 64 = micro-batch 64 x 1") and len(parser.rec_text) == 7
    assert page.index("<table>") < page.index("Recommendation")
    assert page.count('class="pick"') == 1 and '<tr class="pick"><td>64</td>' in page
    # markdown: the summary table with one row per batch size, then the recommendation with its reasons
    md = (out / "report.md").read_text()
    assert "| batch | micro x accum |" in md and "B / B_simple" in md and "epochs to target" in md
    for b in (16, 32, 64, 128):
        assert re.search(rf"^\| {b} \| ", md, re.M)
    assert md.index("## Summary") < md.index("## Recommendation") < md.index("## Plots")
    assert "**batch 64 = micro-batch 64 x 1" in md
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(linked) == sorted(f"{name}.png" for name in PLOTS)
    assert all((out / name).is_file() for name in linked)
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
    summary_md = md[md.index("## Summary"):md.index("## Recommendation")]
    assert len(re.findall(r"^\| \d+ \| \d+ x 1 \| [^|]+ \| running \|", summary_md, re.M)) == 4  # every batch
    assert json.loads((tmp_path / "results.json").read_text())["recommendation"] is None
    # plots without data are skipped, not drawn empty
    assert "val_curves" not in paths["plots"] and "steps_to_target" not in paths["plots"]
    page = parse_page((tmp_path / "report.html").read_text())
    assert not page.rec_text and page.headings[2] == "Recommendation"
    assert [row[3] for row in page.tables[0][1:]] == ["running"] * 4
    assert len(page.imgs) == len(paths["plots"])


def test_report_escapes_html(tmp_path: Path) -> None:
    res = make_results()
    res["workload"] = "<script>alert(1)</script>"
    res["trials"][3]["error"] = "bad <b>thing</b>"
    write_report(res, tmp_path, plots=False)
    page = (tmp_path / "report.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "bad &lt;b&gt;thing&lt;/b&gt;" in page


def test_report_without_validation_data_says_it_ranked_on_training_loss(tmp_path: Path) -> None:
    """13.5: the report states that the ranking used the training loss, in the table and the study facts."""
    res = make_results()
    res["primary_metric"], res["higher_is_better"] = "train_loss", False
    for t in res["trials"] + res["best_per_batch"]:
        t["best_val_metrics"], t["final_val_metrics"] = {}, {}
        t["best_train_loss"] = {16: 0.2, 32: 0.201, 64: 0.202, 128: 0.4}[t["batch_size"]]
        for h in t["history"]:
            h.pop("val_metrics"), h.pop("val_loss")
    paths = write_report(res, tmp_path, plots=True)
    assert paths["recommendation"].batch_size == 64
    md = (tmp_path / "report.md").read_text()
    assert "| best train loss |" in md and "ranked on the training loss" in md
    assert "(ranked on training loss: no validation data)" in md
    page = parse_page((tmp_path / "report.html").read_text())
    assert "best train loss" in page.tables[0][0]
    assert [row[4] for row in page.tables[0][1:]] == ["0.2", "0.201", "0.202", "0.4"]
    assert {"metric_vs_batch", "val_curves"} <= set(paths["plots"])


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [(lambda r: r["trials"][1].pop("batch_size"), "trial 1 has batch_size None"),
     (lambda r: r["trials"][2].update(lr="fast"), "trial 2 (batch 64) has lr 'fast'"),
     (lambda r: r["trials"].__setitem__(0, 7), "trial 0 is int"),
     (lambda r: r["trials"][0].update(best_val_metrics=[0.9]), "best_val_metrics"),
     (lambda r: r["trials"][0].update(history="x"), "history of type str"),
     (lambda r: r["best_per_batch"][0].update(samples_per_s="1e3"), "best_per_batch[0] (batch 16) has samples_per_s"),
     (lambda r: r.update(find=[1]), "find must be an object")],
)
def test_malformed_results_are_one_clear_error(edit: object, fragment: str, tmp_path: Path) -> None:
    """13.19: a hand-edited results.json names the bad trial and key instead of a KeyError inside the report."""
    res = make_results()
    edit(res)  # type: ignore[operator]
    with pytest.raises(ConfigError) as info:
        write_report(res, tmp_path)
    assert fragment in str(info.value)
    assert not (tmp_path / "report.html").exists()
