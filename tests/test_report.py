from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Callable
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
    # html parses, is self-contained, embeds every plot; the recommendation comes first, then the trade-off table
    page = (out / "report.html").read_text()
    parser = parse_page(page)
    assert len(parser.imgs) == len(PLOTS)
    for src in parser.imgs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC)
    assert not re.search(r'(src|href)="(?!data:)', page), "the page must not load anything from outside"
    assert parser.headings[1:3] == ["Recommendation", "The trade-off, per batch size"]
    assert parser.headings[-1] == "Details"
    tradeoff, per_batch, trials = parser.tables  # the trade-off table first; the two details tables last
    assert tradeoff[0][0] == "batch" and tradeoff[0][-1] == "verdict" and len(tradeoff[0]) == 8
    assert [row[0] for row in tradeoff[1:]] == ["16", "32", "64", "128"]
    assert per_batch[0][:2] == ["batch", "micro x accum"] and "best val accuracy" in per_batch[0]
    assert len(trials) == 1 + len(make_results()["trials"])
    rec = paths["recommendation"]
    # the box: the headline, every reason, the sentence saying what the answer holds for, the flags
    assert parser.rec_text[0] == rec.headline() and rec.headline().startswith("batch 64 = micro-batch 64 x 1")
    assert parser.rec_text[-1].startswith("Flag: B_crit") and len(rec.flags) == 1
    assert len(parser.rec_text) == 1 + len(rec.reasons) + 1 + 1
    assert parser.rec_text[-2] == rec.holds_for["text"]
    assert page.index('<div class="rec">') < page.index('<table class="tradeoff">')
    assert page.count('class="pick"') == 1 and '<tr class="pick"><td>64</td>' in page
    # markdown: the recommendation, then the trade-off table with one row per batch size, plots, details
    md = (out / "report.md").read_text()
    assert "| batch | peak memory (micro x accum) | samples/s | B / B_simple |" in md
    for b in (16, 32, 64, 128):
        assert len(re.findall(rf"^\| {b} \| ", md, re.M)) == 2 + 3 + (b == 64)  # trade-off, per batch, trials
    assert md.index("## Recommendation") < md.index("## The trade-off") < md.index("## Plots") < md.index(
        "## Details")
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
    assert paths["recommendation"] is None and paths["interim"]
    md = (tmp_path / "report.md").read_text()
    assert "## Interim report\n\nInterim report: 0 of 13 trials finished; no recommendation yet." in md
    tradeoff_md = md[md.index("## The trade-off"):md.index("## Study")]
    assert len(re.findall(r"^\| \d+ \| [^|]+ KiB \(\d+ x 1\) \|.*\| running \|$", tradeoff_md, re.M)) == 4
    assert json.loads((tmp_path / "results.json").read_text())["recommendation"] is None
    # plots without data are skipped, not drawn empty
    assert "val_curves" not in paths["plots"] and "steps_to_target" not in paths["plots"]
    page = parse_page((tmp_path / "report.html").read_text())
    assert not page.rec_text and page.headings[1:3] == ["Interim report", "The trade-off, per batch size"]
    assert [row[-1] for row in page.tables[0][1:]] == ["running"] * 4  # the verdict column says why none
    assert [row[3] for row in page.tables[1][1:]] == ["running"] * 4  # the details' status column
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
        t["best_train_loss"] = {16: 0.2, 32: 0.201, 64: 0.2015, 128: 0.4}[t["batch_size"]]
        for i, h in enumerate(t["history"]):  # a loss that fell (a flat one would say nothing trained)
            h.pop("val_metrics"), h.pop("val_loss")
            h["train_loss"] = t["best_train_loss"] * (2.0 if i == 0 else 1.0)
    paths = write_report(res, tmp_path, plots=True)
    assert paths["recommendation"].batch_size == 64  # within 1 % of 16's loss on every seed, and the fastest
    md = (tmp_path / "report.md").read_text()
    assert "| best train loss |" in md and "ranked on the training loss" in md
    assert "(ranked on training loss: no validation data)" in md
    page = parse_page((tmp_path / "report.html").read_text())
    tradeoff, per_batch = page.tables[:2]
    assert tradeoff[0][4] == "train loss vs batch 16, paired (+ = better)"
    # a loss: the difference is oriented so that positive is better (16's loss minus this one's)
    assert [row[4] for row in tradeoff[1:]] == ["reference", "-0.001 [-0.001, -0.001]",
                                                "-0.0015 [-0.0015, -0.0015]", "-0.2 [-0.2, -0.2]"]
    assert [row[-1] for row in tradeoff[1:]] == ["reference", "non-inferior", "chosen (non-inferior)", "inferior"]
    assert "best train loss" in per_batch[0]
    assert [row[4] for row in per_batch[1:]] == ["0.2", "0.201", "0.2015", "0.4"]
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


def _one_seed() -> dict:
    """The fixture with seed 0's trials only (one seed per configuration, the diverged trial kept)."""
    res = make_results()
    res["trials"] = [t for t in res["trials"] if t["seed"] == 0]
    return res


def _per_seed(seeds: int, edit: Callable[[dict, dict, int], None]) -> dict:
    """The fixture's finished seed-0 trials, each repeated for ``seeds`` seeds; ``edit(original, copy, seed)`` makes
    the copy that seed's result. No best_per_batch: it is derived from the trials."""
    import copy

    res = make_results()
    trials = []
    for t in res["trials"]:
        if t["status"] != "ok" or t["seed"] != 0:
            continue
        for seed in range(seeds):
            r = copy.deepcopy(t)
            r["seed"] = seed
            edit(t, r, seed)
            trials.append(r)
    res["trials"], res["best_per_batch"] = trials, []
    return res


def _seeded_results() -> dict:
    """Three seeds per batch size, accuracy flat from 16 to 64 (a tie), 128 clearly worse."""
    import numpy as np

    rng = np.random.default_rng(0)

    def edit(t: dict, r: dict, seed: int) -> None:
        acc = {16: 0.95, 32: 0.95, 64: 0.95, 128: 0.85}[t["batch_size"]] + 0.003 * rng.standard_normal()
        for i, h in enumerate(r["history"]):
            h["val_metrics"] = {"accuracy": acc * (0.8, 0.9, 1.0, 1.0)[i]}
        r["steps_to_target"] = {16: 420, 32: 230, 64: 140, 128: 100}[t["batch_size"]] * rng.lognormal(0, 0.05)

    return _per_seed(3, edit)


def test_the_report_says_what_the_data_can_and_cannot_tell_apart(tmp_path: Path) -> None:
    """Three seeds, accuracy flat from 16 to 64 and 128 clearly worse: 32 is shown non-inferior to the reference
    16, 64 is undecided at 3 seeds (its lower bound reaches below the margin), 128 inferior. The report says each
    verdict, in the trade-off table and in words, the flag about the undecided faster batch, and no old-rule
    wording ("tied", "cannot be told apart", "apart")."""
    paths = write_report(_seeded_results(), tmp_path, plots=False)
    rec = paths["recommendation"]
    sel = rec.selection
    assert rec.reference_batch_size == 16 and sel["inferior"] == [128]
    assert rec.non_inferior == [16, 32] and sel["undecided"] == [64] and rec.batch_size == 32
    md = (tmp_path / "report.md").read_text()
    assert "## What the data can and cannot tell apart" in md and "Decision rule:" in md
    assert "are non-inferior to batch 16" in md and "chosen on time to target" in md
    assert ("Non-inferior to batch 16: 32; inferior (worse beyond the margin): 128; undecided (more seeds could "
            "place them): 64.") in md
    assert "- Flag: undecided: batch size 64 is faster than batch 32" in md
    assert "```python\nimport torch\noptimizer = " in md  # the recipe snippet
    for old in ("tied", "cannot be told apart", "apart on", "| apart |"):
        assert old not in md.lower().replace("tied with it on time", ""), old
    page = parse_page((tmp_path / "report.html").read_text())
    tradeoff, per_batch = page.tables[:2]
    assert {row[0]: row[-1] for row in tradeoff[1:]} == {
        "16": "reference", "32": "chosen (non-inferior)", "64": "undecided", "128": "inferior"}
    # the difference column is the decision's paired difference with its bounds (positive = better): 64's reaches
    # below the margin (undecided), 128's lies wholly below it (inferior), 32's lower bound lies above it
    margin = sel["tolerance"]
    diff = {row[0]: row[4] for row in tradeoff[1:]}
    assert diff["16"] == "reference"
    ends = {b: [float(x) for x in re.fullmatch(r"\S+ \[(\S+), (\S+)\]", diff[b]).groups()] for b in ("32", "64", "128")}
    assert ends["32"][0] > -margin and ends["64"][0] < -margin < ends["64"][1] and ends["128"][1] < -margin
    col = per_batch[0].index("decision")
    assert {row[0]: row[col] for row in per_batch[1:]} == {
        "16": "reference", "32": "chosen", "64": "undecided", "128": "inferior"}
    q = per_batch[0].index("val accuracy (95 % interval)")
    assert all(re.fullmatch(r"0\.\d+ \[0\.\d+, 0\.\d+\]", row[q]) for row in per_batch[1:])


def test_every_measured_plot_has_error_bars(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Quality, throughput and steps / time to target are drawn with 95 % error bars (matplotlib errorbar
    containers on the axes), and every plot is still a PNG embedded in the page."""
    from matplotlib.container import ErrorbarContainer

    import batchfit.report as report

    figures: dict[str, list] = {}
    made = report._figure

    def spy(ncols: int = 1):  # type: ignore[no-untyped-def]
        fig, axes = made(ncols)
        figures.setdefault("all", []).append(axes if ncols > 1 else [axes])
        return fig, axes

    monkeypatch.setattr(report, "_figure", spy)
    paths = write_report(_seeded_results(), tmp_path, plots=True)
    assert set(paths["plots"]) == set(PLOTS)
    bars = {}
    for name, axes in zip(PLOTS, figures["all"]):
        bars[name] = [sum(isinstance(c, ErrorbarContainer) for c in ax.containers) for ax in axes]
    assert bars["metric_vs_batch"] == [1, 1]  # quality, and the paired difference from the reference
    assert bars["throughput_memory"][0] == 1  # throughput; memory is a single measurement per batch size
    assert bars["steps_to_target"] == [1, 1]  # steps and time to target
    for axes in figures["all"]:
        _labels_inside(axes[0].figure)
    page = parse_page((tmp_path / "report.html").read_text())
    assert len(page.imgs) == len(PLOTS)


def _labels_inside(fig) -> None:  # noqa: ANN001
    """The plots' fixed layout loses nothing: every axes with its tick labels, axis labels, title, legend and
    annotations lies inside the figure, and left of the next axes."""
    renderer = fig.canvas.get_renderer()
    boxes = [ax.get_tightbbox(renderer) for ax in fig.axes]
    frame = fig.bbox
    for box in boxes:
        assert frame.x0 - 1 <= box.x0 and box.x1 <= frame.x1 + 1, (box.extents, frame.extents)
        assert frame.y0 - 1 <= box.y0 and box.y1 <= frame.y1 + 1, (box.extents, frame.extents)
    assert all(left.x1 <= right.x0 for left, right in zip(boxes, boxes[1:])), [b.extents for b in boxes]


def test_results_json_intervals_round_trip(tmp_path: Path) -> None:
    from batchfit.recommend import Recommendation
    from batchfit.stats import Interval

    res = _seeded_results()
    res["critical_batch_size"] = {"b_crit": 60.0, "s_min": 70.0, "r2": 0.98, "points": []}
    write_report(res, tmp_path, plots=False)
    data = json.loads((tmp_path / "results.json").read_text())
    crit = data["critical_batch_size"]
    assert crit["b_crit"] == 60.0 and crit["support"] == [16, 128]  # the old keys kept, new ones added
    assert Interval.from_dict(crit["interval"]).known and isinstance(crit["extrapolated"], bool)
    rec = Recommendation.from_dict(data["recommendation"])
    assert rec.to_dict() == data["recommendation"]
    ivs = {e["batch_size"]: Interval.from_dict(e["quality"]) for e in rec.intervals}
    assert all(iv.known and iv.n == 3 for iv in ivs.values())
    assert ivs[128].high < ivs[16].low  # 128 is apart
    # the report rebuilt from its own results.json gives the same recommendation
    again = write_report(data, tmp_path / "again", plots=False)["recommendation"]
    assert again.to_dict() == rec.to_dict()


def _two_seed_results() -> dict:
    """Two seeds per batch size, with every per-seed number (steps to target, generalization gap, B_simple, samples/s)
    different between the seeds, and epochs per step recorded consistently (epoch e at step e x steps / 4)."""

    def edit(t: dict, r: dict, seed: int) -> None:
        r["steps_to_target"] = t["steps_to_target"] + 10 * seed
        r["epochs_to_target"] = r["steps_to_target"] * 4 / t["steps"]
        r["generalization_gap"] = t["generalization_gap"] + 0.01 * seed
        r["b_simple"] = 50.0 + 4.0 * seed
        r["samples_per_s"] = t["samples_per_s"] * (1 + 0.05 * seed)
        for h in r["history"]:
            h["samples_per_s"] *= 1 + 0.05 * seed

    return _per_seed(2, edit)


def _column(header: list[str], name: str) -> int:
    return next(i for i, h in enumerate(header) if h == name or h.startswith(name + " ("))


_INTERVAL_TEXT = r"[+-]?[\d.]+ \[[+-]?[\d.]+, [+-]?[\d.]+\]"


def test_summary_table_gives_every_trade_off_number_an_interval_over_two_seeds() -> None:
    """Issue 11: samples/s, B_simple, B / B_simple, gen. gap, epochs and steps to target carry a 95 % interval."""
    from batchfit.recommend import recommend
    from batchfit.report import summary_table
    from batchfit.stats import mean_interval, positive_mean_interval

    res = _two_seed_results()
    rec = recommend(res)
    header, body = summary_table(res, rec)
    names = ["samples/s", "B_simple", "B / B_simple", "val - train(eval) loss", "epochs to target", "steps to target"]
    for name in names:
        col = _column(header, name)
        assert header[col] == f"{name} (95 % interval)"
        assert all(re.fullmatch(_INTERVAL_TEXT, row[col]) for row in body), (name, [row[col] for row in body])
    rows = {r["batch_size"]: r for r in summary_rows(res, rec)}
    evidence = {e["batch_size"]: e for e in rec.intervals}
    for b, r in rows.items():
        sec = evidence[b]["seconds_per_step"]  # samples/s = B / seconds per step: the ends swap
        sps = r["samples_per_s_interval"]
        assert sps["estimate"] == pytest.approx(b / sec["estimate"])
        assert sps["low"] == pytest.approx(b / sec["high"]) and sps["high"] == pytest.approx(b / sec["low"])
        assert r["steps_to_target_interval"] == evidence[b]["steps_to_target"]
        per_step = 4 / {16: 400, 32: 200, 64: 100, 128: 50}[b]  # epochs = steps / steps per epoch
        for key in ("estimate", "low", "high"):
            assert r["epochs_to_target_interval"][key] == pytest.approx(r["steps_to_target_interval"][key] * per_step)
        gap = mean_interval([t["generalization_gap"] for t in res["trials"] if t["batch_size"] == b])
        assert (r["generalization_gap_interval"]["low"], r["generalization_gap_interval"]["high"]) == pytest.approx(
            (gap.low, gap.high))
        bs = positive_mean_interval([50.0, 54.0])  # B_simple is positive: a t interval of the logs
        assert r["b_simple_interval"]["estimate"] == pytest.approx(math.sqrt(50.0 * 54.0))
        assert r["b_simple_interval"]["n"] == 2 and 0 < r["b_simple_interval"]["low"]
        assert r["noise_ratio_interval"]["estimate"] == pytest.approx(b / bs.estimate)
        assert r["noise_ratio_interval"]["low"] == pytest.approx(b / bs.high)
        assert r["noise_ratio_interval"]["high"] == pytest.approx(b / bs.low)
        # the raw keys are kept as they were: the row's one trial (seed 0, the first of its batch size)
        first = next(t for t in res["trials"] if t["batch_size"] == b)
        assert (r["steps_to_target"], r["generalization_gap"], r["b_simple"]) == (
            first["steps_to_target"], first["generalization_gap"], first["b_simple"])
        assert {"samples_per_s", "b_simple", "noise_ratio", "generalization_gap", "epochs_to_target",
                "steps_to_target", "seconds_to_target"} <= set(r)


def test_summary_table_says_no_interval_with_one_seed() -> None:
    """One seed per batch size: the numbers the data give no interval for say so instead of looking exact. B_simple,
    B / B_simple and the gap vary only over seeds; steps / epochs to target and samples/s take the decision's
    interval where it has one (a pooled fit over the batch sizes can give one with a single seed), and without a
    decision they are the single trial's, with no interval."""
    from batchfit.recommend import recommend
    from batchfit.report import _iv_text, summary_table

    res = _one_seed()
    rec = recommend(res)
    header, body = summary_table(res, rec)
    for name in ("B_simple", "B / B_simple", "val - train(eval) loss"):
        col = _column(header, name)
        assert all(row[col].endswith(" (no interval)") for row in body), (name, [row[col] for row in body])
    assert [row[_column(header, "val - train(eval) loss")] for row in body] == [
        f"{0.02 * b ** 0.25:+.3f} (no interval)" for b in (16, 32, 64, 128)]
    evidence = {e["batch_size"]: e for e in rec.intervals}
    steps = _column(header, "steps to target")
    assert [row[steps] for row in body] == [_iv_text(evidence[b]["steps_to_target"], ".0f") for b in (16, 32, 64, 128)]
    sps = _column(header, "samples/s")
    assert all(re.fullmatch(_INTERVAL_TEXT, row[sps]) for row in body)  # the pooled step-time fit's interval
    _, bare = summary_table(res)  # no decision: one trial per batch size, nothing to take an interval from
    assert [row[sps] for row in bare] == ["4000 (no interval)", "5657 (no interval)", "8000 (no interval)",
                                          "11314 (no interval)"]
    assert [row[steps] for row in bare] == ["200 (no interval)", "100 (no interval)", "50 (no interval)",
                                            "25 (no interval)"]
    assert [row[_column(header, "epochs to target")] for row in bare] == ["2 (no interval)"] * 4


def test_the_raw_seconds_to_target_is_labelled_the_one_trials_wall_clock(tmp_path: Path) -> None:
    """The single trial's measured seconds to target keeps its place (the CLI reads columns by position) but is
    labelled as that, beside the decision's time to target with its interval; the column order is unchanged."""
    from batchfit.report import summary_table

    res = _two_seed_results()
    write_report(res, tmp_path, plots=False)
    header, _ = summary_table(json.loads((tmp_path / "results.json").read_text()))
    assert header[12] == "s to target (one trial's wall clock)"
    assert header.index("time to target, s (95 % interval)") == 15
    assert [h.split(" (")[0] for h in header[:13]] == [
        "batch", "micro x accum", "LR", "status", "best val accuracy", "peak memory", "samples/s", "B_simple",
        "B / B_simple", "val - train(eval) loss", "epochs to target", "steps to target", "s to target"]
    md = (tmp_path / "report.md").read_text()
    assert "| s to target (one trial's wall clock) |" in md and "| samples/s (95 % interval) |" in md
    page = parse_page((tmp_path / "report.html").read_text())
    per_batch = page.tables[1]  # the details' table per batch size (the trade-off table is the first)
    gap = per_batch[0].index("val - train(eval) loss (95 % interval)")
    assert all(re.fullmatch(_INTERVAL_TEXT, row[gap]) for row in per_batch[1:])


def test_b_simple_over_seeds_is_positive_and_its_quotient_never_inf() -> None:
    """Issue 19.4: B_simple from two seeds far apart (10 and 200). A t interval of the raw values reaches below zero
    (``-1.1e3``) and B / B_simple's upper end became ``inf``; B_simple is positive, so its interval is taken on the
    log scale (both ends positive) and B / B_simple is ``B / [high, low]`` of it: finite at both ends."""
    from batchfit.report import summary_rows, summary_table

    res = _two_seed_results()
    for t in res["trials"]:
        t["b_simple"] = 10.0 if t["seed"] == 0 else 200.0
    header, body = summary_table(res)
    ratio, bs = _column(header, "B / B_simple"), _column(header, "B_simple")
    positive = r"\d[\d.e+-]* \[\d[\d.e+-]*, \d[\d.e+-]*\]"  # no minus sign before a number, no inf
    assert all(re.fullmatch(positive, row[ratio]) for row in body), [row[ratio] for row in body]
    assert all(re.fullmatch(positive, row[bs]) for row in body), [row[bs] for row in body]
    for r in summary_rows(res):
        iv, q = r["b_simple_interval"], r["noise_ratio_interval"]
        assert iv["estimate"] == pytest.approx(math.sqrt(10.0 * 200.0))  # the geometric mean
        assert 0 < iv["low"] < iv["estimate"] < iv["high"] < math.inf
        assert 0 < q["low"] <= q["estimate"] <= q["high"] < math.inf
        assert q["low"] == pytest.approx(r["batch_size"] / iv["high"])
        assert q["high"] == pytest.approx(r["batch_size"] / iv["low"])


# ---------------------------------------------------------------------------------------------------------------
# Issue 19.5: generalization read from paired between-batch differences; the gap of one definition only


def _paired_results() -> dict:
    """Three seeds per batch size; a seed effect shared by every batch size (seed s adds 0.02 s to every final
    accuracy) and a batch effect per batch size: the paired differences remove the seed effect."""
    effect = {16: 0.004, 32: 0.0, 64: -0.002, 128: -0.05}
    jitter = {0: 0.0, 1: 0.001, 2: -0.001}

    def edit(t: dict, r: dict, seed: int) -> None:
        acc = 0.9 + 0.02 * seed + effect[t["batch_size"]] + jitter[seed] * (t["batch_size"] % 3)
        for h in r["history"]:
            h["val_metrics"] = {"accuracy": acc}
        r["best_val_metrics"] = r["final_val_metrics"] = {"accuracy": acc}

    return _per_seed(3, edit)


def test_the_generalization_column_is_the_paired_difference_from_the_reference_batch(tmp_path: Path) -> None:
    """Each batch size's quality minus the decision's reference batch's (the best fitted quality, not the chosen
    one), per seed, with a t interval over the paired differences: the seed effect (much larger than the batch
    effect) cancels, so 128 is clearly worse and the interval is narrow. The reference row says so; with one seed the
    difference has no interval. The trade-off table shows the decision's own difference, the one its verdict was
    read from."""
    from batchfit.decide import quality_of_trial
    from batchfit.metric import Metric
    from batchfit.recommend import recommend
    from batchfit.report import summary_table
    from batchfit.stats import mean_interval

    res = _paired_results()
    rec = recommend(res)
    ref = rec.reference_batch_size
    assert ref == 16 and rec.batch_size != ref  # 16 is the best; a faster non-inferior one is chosen
    rows = {r["batch_size"]: r for r in summary_rows(res, rec)}
    evidence = {e["batch_size"]: e for e in rec.intervals}
    metric = Metric("accuracy", True)
    q = {(t["batch_size"], t["seed"]): quality_of_trial(t, metric) for t in res["trials"]}
    for b, r in rows.items():
        assert r["paired_reference_batch_size"] == ref
        if b == ref:
            assert r["paired_difference_interval"] is None
            continue
        want = mean_interval([q[(b, s)] - q[(ref, s)] for s in range(3)])
        iv = r["paired_difference_interval"]
        assert (iv["estimate"], iv["low"], iv["high"]) == pytest.approx((want.estimate, want.low, want.high))
        assert iv["n"] == 3 and iv["method"] == "paired t over seeds"
        assert r["difference_interval"] == evidence[b]["difference"] and r["verdict"] == evidence[b]["verdict"]
    assert rows[128]["paired_difference_interval"]["high"] < 0  # apart, despite the seeds' spread of 0.04
    unpaired = mean_interval([q[(128, s)] for s in range(3)])
    assert unpaired.high - unpaired.low > 10 * (rows[128]["paired_difference_interval"]["high"]
                                                - rows[128]["paired_difference_interval"]["low"])
    header, body = summary_table(res, rec)
    col = header.index(f"val accuracy minus batch {ref}'s, paired by seed (95 % interval)")
    assert col == 17 and header[12] == "s to target (one trial's wall clock)"  # appended: the old columns stay
    cells = {int(row[0]): row[col] for row in body}
    assert cells[ref] == "reference"
    assert all(re.fullmatch(_INTERVAL_TEXT, c) for b, c in cells.items() if b != ref), cells
    write_report(res, tmp_path, plots=False)
    data = json.loads((tmp_path / "results.json").read_text())
    assert summary_table(data)[0][col] == header[col]  # rebuilt from results.json: the same reference
    md = (tmp_path / "report.md").read_text()
    assert f"| val accuracy minus batch {ref}'s, paired by seed (95 % interval) |" in md
    one = _one_seed()  # one seed: a difference, with no interval
    _, body1 = summary_table(one, recommend(one))
    assert all(row[17] == "reference" or row[17].endswith(" (no interval)") for row in body1)


def test_the_gap_column_shows_only_val_minus_the_eval_mode_training_loss() -> None:
    """The gap is val_loss - train_eval_loss (the engine's records carry train_eval_loss); a trial recorded with the
    old definition (minus the running training loss) shows none rather than a number of another meaning."""
    from batchfit.report import summary_table

    res = _one_seed()
    old = _one_seed()
    for t in old["trials"] + old["best_per_batch"]:
        for h in t["history"]:
            del h["train_eval_loss"]
    header, body = summary_table(res)
    col = _column(header, "val - train(eval) loss")
    assert header[col] == "val - train(eval) loss (95 % interval)"
    assert all(row[col].endswith(" (no interval)") for row in body)
    _, body_old = summary_table(old)
    assert [row[col] for row in body_old] == ["-"] * 4
    assert all(r["generalization_gap"] is None for r in summary_rows(old))


# ---------------------------------------------------------------------------------------------------------------
# Issue 19.3: the report's B_simple is the pooled one against the training loss; the probe's is at initialisation


def test_the_report_divides_by_b_simple_at_the_target_loss_and_labels_the_initialisation_value(
        tmp_path: Path) -> None:
    from _study_fixture import with_noise_windows
    from batchfit.report import summary_table

    res = with_noise_windows(make_results())  # true B_simple 100 / (4 L^2): 100 at the target's loss 0.5
    res["b_simple"] = 266.0  # the old median over the runs
    paths = write_report(res, tmp_path, plots=True)
    rec = paths["recommendation"]
    at = rec.noise_scale["at_loss"]["b_simple"]
    assert 0 < at["low"] < at["estimate"] < at["high"] and at["estimate"] == pytest.approx(100.0, rel=0.15)
    header, body = summary_table(json.loads((tmp_path / "results.json").read_text()), rec)
    col = _column(header, "B / B_simple")
    for row in body:
        b = int(row[0])
        assert row[col] == f"{b / at['estimate']:.2f} [{b / at['high']:.2f}, {b / at['low']:.2f}]"
    md = (tmp_path / "report.md").read_text()
    assert "B_simple at initialisation (the noise probe): 55" in md and "not the critical batch" in md
    assert "B_simple at training loss 0.5, the training loss where the chosen configuration" in md
    assert "B_simple against the training loss, pooled over" in md
    assert "266" not in md and "B_simple during training (median" not in md
    assert "b_simple" in paths["plots"]


def test_the_study_facts_read_the_finder_and_the_noise_probe_typed() -> None:
    """Issue 20.1: the finder's row and the probe's line read the typed results (tune's extra keys kept); an older
    file's missing keys still read as they did (None), an unbounded probe (JSON null) shows no value."""
    from batchfit.report import _study_lines

    res = make_results()
    res["find"]["plan_vs_measured"] = "peak 1.0 MiB planned, 1.1 MiB measured"
    res["noise"] = {"b_simple": 52.8, "b_simple_ci": [41.8, None], "batch_size": 32, "train_steps": 0,
                    "cost": {"samples": 10, "seconds": 0.5}}
    lines = _study_lines(res)
    assert "finder: largest batch that fits with margin 512, throughput knee 128, 3 real trials" in lines
    assert "plan vs measured: peak 1.0 MiB planned, 1.1 MiB measured" in lines
    assert any(line.startswith("gradient noise scale B_simple at initialisation (the noise probe at batch 32): 52.8 "
                               "(95% CI 41.8 - -); measured before the loss fell") for line in lines), lines
    old = _study_lines({**make_results(), "find": {"recommended_batch_size": 24}, "noise": {"b_simple": None}})
    assert "finder: largest batch that fits with margin 24, throughput knee None, None real trials" in old
    assert not any("noise probe" in line for line in old)


# ---------------------------------------------------------------------------------------------------------------
# Issue 19.8: the recommendation first, a narrow trade-off table, the details kept, interim reports claim no win


def _sections(md: str) -> list[str]:
    return re.findall(r"^## (.+)$", md, re.M)


def test_the_report_opens_with_the_recommendation_then_the_trade_off(tmp_path: Path) -> None:
    """report.md's first section is the recommendation: the headline, its reasons, the sentence saying which budget
    and target it holds for (once, not also inside the first reason), the flags; then the trade-off table."""
    paths = write_report(make_results(), tmp_path, plots=False)
    rec = paths["recommendation"]
    md = (tmp_path / "report.md").read_text()
    assert _sections(md)[:3] == ["Recommendation", "The trade-off, per batch size",
                                 "What the data can and cannot tell apart"]
    first = md[md.index("## Recommendation"):md.index("## The trade-off")]
    lines = [line for line in first.splitlines()[1:] if line.strip()]
    holds = rec.holds_for["text"]
    assert lines[0] == f"**{rec.headline()}**"
    assert lines[1].startswith("- Effective batch 64: batch sizes 16\u201364 are non-inferior to batch 16")
    assert len(lines) == 1 + len(rec.reasons) + 1 + len(rec.flags)
    assert lines[1 + len(rec.reasons)] == holds and first.count(holds) == 1
    assert lines[-1] == f"- Flag: {rec.flags[0]}"
    assert md.index("**batch 64") < md.index("| batch | peak memory")  # the answer before any table


def _big_numbers() -> dict:
    """The fixture on a large machine: 1000x the throughput, 10^4x the memory (cells must stay short)."""
    res = make_results()
    for t in res["trials"] + res["best_per_batch"]:
        t["samples_per_s"] *= 1000
        t["peak_memory_bytes"] *= 10_000
        for h in t["history"]:
            h["samples_per_s"] *= 1000
    return res


def _with_noise() -> dict:
    from _study_fixture import with_noise_windows

    return with_noise_windows(make_results())


@pytest.mark.parametrize("make", [make_results, _one_seed, _seeded_results, _two_seed_results, _paired_results,
                                  _big_numbers, _with_noise])
def test_the_trade_off_table_is_narrow_one_row_per_batch_size(make: Callable[[], dict], tmp_path: Path) -> None:
    """At most 8 columns (batch, memory at its micro x accum, samples/s, B / B_simple, the paired difference from
    the reference, steps and time to target, verdict), one row per batch size however many trials and seeds, and
    every cell at most 28 characters, so the table fits a 1280-px window (the fixture's table measured 1004 px wide
    in headless chromium at 1280 px; docs/report.md)."""
    from batchfit.report import TRADEOFF_CELL_CHARS, TRADEOFF_COLUMNS, tradeoff_table

    res = make()
    write_report(res, tmp_path, plots=False)
    header, body = tradeoff_table(json.loads((tmp_path / "results.json").read_text()))
    assert TRADEOFF_COLUMNS == 8 and TRADEOFF_CELL_CHARS == 28
    assert len(header) <= 8 and all(len(row) == len(header) for row in body)
    sizes = sorted({t["batch_size"] for t in res["trials"]})
    assert [int(row[0]) for row in body] == sizes and len(res["trials"]) > len(sizes)
    assert all(len(c) <= 28 for row in body for c in row), max((c for row in body for c in row), key=len)
    interval = r"-|[+-]?[\d.]+[kMG]? (\[[+-]?[\d.]+[kMG]?, [+-]?([\d.]+[kMG]?|inf)\]|\(no interval\))"
    for row in body:  # every measured number is an estimate with its interval (or says it has none)
        assert all(re.fullmatch(interval, c) for c in (row[2], row[3], row[5], row[6])), row
        assert row[4] == "reference" or re.fullmatch(interval, row[4]), row
    page = parse_page((tmp_path / "report.html").read_text())
    tradeoff = page.tables[0]  # the page's first table, as the browser shows it (estimate over its interval)
    assert tradeoff == [header] + body
    md = (tmp_path / "report.md").read_text()
    table_md = md[md.index("## The trade-off"):].split("\n\n")[1].splitlines()
    assert len(table_md) == 2 + len(sizes) and table_md[0].count(" | ") == len(header) - 1


def test_the_details_keep_every_trial_and_every_interval(tmp_path: Path) -> None:
    """Nothing measured is lost: the details hold the per-batch table with all its 18 columns and intervals, and one
    row per trial (every seed, the diverged one included) with its own measurements; in the HTML both are folded in
    <details> elements, after the plots."""
    from batchfit.report import summary_table

    res = make_results()
    write_report(res, tmp_path, plots=True)
    page_text = (tmp_path / "report.html").read_text()
    page = parse_page(page_text)
    _, per_batch, trials = page.tables
    data = json.loads((tmp_path / "results.json").read_text())
    header, body = summary_table(data, data["recommendation"])
    assert per_batch == [header] + body and len(header) == 18
    assert trials[0][:6] == ["batch", "micro x accum", "LR", "LR x", "seed", "status"]
    assert {"peak memory", "samples/s", "B_simple", "val - train(eval) loss", "steps to target", "s to target",
            "final val accuracy", "error"} <= set(trials[0])
    assert len(trials) - 1 == len(res["trials"]) == 13
    rows = {(r[0], r[3], r[4]): r for r in trials[1:]}  # batch, LR multiplier, seed
    assert {seed for (b, m, seed) in rows if b == "64" and m == "1"} == {"0", "1", "2"}
    diverged = rows[("64", "2", "0")]
    assert diverged[5] == "diverged" and diverged[-1] == "loss became NaN"
    # seed 1: the fixture's last evaluation, 1.1 x (0.948 + 0.002), the only one in the last 3/16 of its samples
    assert rows[("32", "1", "1")][trials[0].index("final val accuracy")] == "1.045"
    details = page_text[page_text.index("<h2>Details</h2>"):]
    assert page_text.index("<h2>Plots</h2>") < page_text.index("<h2>Details</h2>")
    assert details.count("<details") == 2 and details.index("<details") < details.index("<table>")
    md = (tmp_path / "report.md").read_text()
    assert _sections(md)[-1] == "Details" and "### Every trial" in md


def _after_one_trial() -> dict:
    """The sweep after its first trial: batch 16, seed 0 finished; 12 trials still queued."""
    import copy

    res = make_results()
    first = res["trials"][0]
    res["trials"], res["best_per_batch"] = [first], [copy.deepcopy(first)]
    res["counts"], res["status"] = {"ok": 1, "waiting": 12}, "running"
    res["critical_batch_size"] = None
    return res


def _no_win_claim(text: str) -> None:
    low = text.lower().replace("no recommendation yet", "")
    for word in ("recommend", "chosen", "choose", "winner", "wins"):
        assert word not in low, (word, low[max(0, low.find(word) - 200):low.find(word) + 100])


def test_the_interim_report_after_one_trial_claims_no_win(tmp_path: Path) -> None:
    """Written after every finished trial (tune's _SweepProgress, plots=False): it says how many trials finished and
    that there is no recommendation yet, and no chosen / recommended wording anywhere, although the one trial gives a
    recommendation (kept in results.json for tools)."""
    paths = write_report(_after_one_trial(), tmp_path, plots=False)
    assert paths["interim"] and paths["recommendation"] is not None
    assert json.loads((tmp_path / "results.json").read_text())["recommendation"]["batch_size"] == 16
    md = (tmp_path / "report.md").read_text()
    assert _sections(md)[:2] == ["Interim report", "The trade-off, per batch size"]
    assert "Interim report: 1 of 13 trials finished; no recommendation yet." in md
    _no_win_claim(md)
    page_text = (tmp_path / "report.html").read_text()
    page = parse_page(page_text)
    assert page.headings[1:3] == ["Interim report", "The trade-off, per batch size"] and not page.rec_text
    assert 'class="pick"' not in page_text and 'class="rec"' not in page_text
    assert [row[0] for row in page.tables[0][1:]] == ["16"] and page.tables[0][1][-1] == "reference"
    _no_win_claim(html_text(page_text))


def html_text(page: str) -> str:
    """The page's text, without tags."""
    import html as html_mod

    return html_mod.unescape(re.sub(r"<[^>]+>", " ", page))


def test_a_running_study_claims_no_win_even_with_every_trial_in(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Every trial has finished but the study is still running (racing queued more seeds), or the caller says the
    report is interim: the verdicts so far are shown, no batch size is chosen, in the text, the tables or the plot's
    legend. The same results once complete name the chosen batch size."""
    import batchfit.report as report

    legends: list[str] = []
    made = report._figure

    def spy(ncols: int = 1):  # type: ignore[no-untyped-def]
        fig, axes = made(ncols)
        legends.append(fig)
        return fig, axes

    monkeypatch.setattr(report, "_figure", spy)

    def labels() -> list[str]:
        out = [t.get_text() for fig in legends for ax in fig.axes if ax.get_legend() is not None
               for t in ax.get_legend().get_texts()]
        for fig in legends:  # B_crit's interval here runs to 2^61: the batch-size axes' labels still fit
            _labels_inside(fig)
        legends.clear()
        return out

    res = make_results()
    res["counts"], res["status"] = {"ok": 12, "diverged": 1, "waiting": 2}, "running"
    paths = write_report(res, tmp_path / "running", plots=True)
    assert paths["interim"] and paths["recommendation"].batch_size == 64
    md = (tmp_path / "running" / "report.md").read_text()
    assert "Interim report: 13 of 15 trials finished; no recommendation yet." in md
    _no_win_claim(md)
    _no_win_claim(html_text((tmp_path / "running" / "report.html").read_text()))
    page = parse_page((tmp_path / "running" / "report.html").read_text())
    assert [row[-1] for row in page.tables[0][1:]] == ["reference", "non-inferior", "non-inferior", "inferior"]
    assert not any("chosen" in label for label in labels())
    forced = write_report(make_results(), tmp_path / "forced", plots=False, interim=True)
    assert forced["interim"]
    _no_win_claim((tmp_path / "forced" / "report.md").read_text())
    done = write_report(make_results(), tmp_path / "done", plots=True)
    assert not done["interim"]
    assert "chosen: 64" in labels()
    assert "| 64 | 222.7 KiB (64 x 1) |" in (tmp_path / "done" / "report.md").read_text()


def test_a_negative_running_b_simple_does_not_break_the_plots(tmp_path) -> None:  # noqa: ANN001
    """The running B_simple is a ratio of two noisy unbiased estimates and can dip below zero early in a short run
    (the hf_transformers example at 4 steps): the plot leaves those points out and keeps a linear axis if needed,
    instead of matplotlib's 'Data cannot be log-scaled' ending tune with an internal error."""
    from _study_fixture import make_results
    from batchfit.report import write_report

    res = make_results()
    for t in res["trials"]:
        t["b_simple_history"] = [{"step": 1, "epoch": 0.5, "b_simple": -3.0},
                                 {"step": 2, "epoch": 1.0, "b_simple": 0.0}]
    res["noise"] = {"b_simple": -1.0}
    paths = write_report(res, tmp_path)
    assert (tmp_path / "report.html").is_file() and isinstance(paths["plots"], dict)


def test_write_report_with_a_given_recommendation_or_tolerance(tmp_path: Path) -> None:
    """The calling forms ``write_report(results, out, recommendation=...)`` (the given one is reported and stored,
    not recomputed) and ``write_report(results, out, tolerance=...)`` (the recommendation at that margin)."""
    from batchfit.recommend import Recommendation, recommend

    res = make_results()
    given = recommend(res, find={"recommended_batch_size": 24})  # another split than the stored finder's
    paths = write_report(res, tmp_path / "given", recommendation=given, plots=False)
    assert paths["recommendation"] == given and not paths["interim"] and paths["plots"] == {}
    stored = json.loads((tmp_path / "given" / "results.json").read_text())["recommendation"]
    assert Recommendation.from_dict(stored) == given
    assert "batch 64 = micro-batch 22 x 3 accumulation step(s)" in (tmp_path / "given" / "report.md").read_text()
    chosen = {}
    for tolerance in (0.0, 0.05):  # no margin: the best batch (16) alone; 5 %: up to 64
        paths = write_report(res, tmp_path / f"t{tolerance}", tolerance=tolerance, plots=False)
        assert paths["recommendation"] == recommend(res, tolerance=tolerance)
        chosen[tolerance] = paths["recommendation"].batch_size
        on_disk = json.loads((tmp_path / f"t{tolerance}" / "results.json").read_text())["recommendation"]
        assert on_disk["batch_size"] == chosen[tolerance]
    assert chosen == {0.0: 16, 0.05: 64}


def test_the_report_takes_b_crit_s_interval_from_the_decision_without_a_second_bootstrap(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from batchfit import recommend as rec_module
    from batchfit.recommend import critical_interval, recommend

    res = make_results()
    boot = critical_interval(res)
    assert boot is not None
    rec = recommend(res)
    calls = []
    monkeypatch.setattr(rec_module, "critical_interval", lambda *a, **k: calls.append(1))
    write_report(res, tmp_path, recommendation=rec, plots=False)
    assert calls == []  # the report reused the decision's interval
    crit = json.loads((tmp_path / "results.json").read_text())["critical_batch_size"]
    assert crit["interval"] == pytest.approx(boot.b_crit.to_dict())  # and it is the bootstrap's interval
    assert crit["support"] == list(boot.support)
