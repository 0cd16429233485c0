"""``batchfit report STORE --out DIR``: rebuild a study's report from its Optuna store (or a results.json)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from batchfit.cli import _common as c

__all__ = ["add_parser", "load_any", "print_summary", "run"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "report", help="write the report of a sweep or tune from its store",
        description="Rebuild results.json, the plots, report.md and report.html (self-contained) from a sweep's "
                    "Optuna store (a SQLite file or any Optuna storage URL) or from a results.json.")
    p.add_argument("store", metavar="STORE",
                   help="path to the .db file, an Optuna storage URL (sqlite:///x.db, postgresql://...) "
                        "or a results.json")
    p.add_argument("--study", "--study-name", dest="study_name", metavar="NAME",
                   help="the study in the store (default: the only one)")
    p.add_argument("--out", type=Path, default=Path("batchfit-out"), metavar="DIR",
                   help="directory for the report (default ./batchfit-out)")
    p.add_argument("--tolerance", type=c.fraction, default=None,
                   help="the non-inferiority margin: a batch size is non-inferior to the reference (the best) when "
                        "its lower bound on the paired difference lies within this fraction of the reference's "
                        "metric (default: the one tune decided with, stored with the results, else 0.01)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write results + recommendation as JSON to PATH")
    p.add_argument("--quiet", "-q", action="store_true", help="no table: only the one-line recommendation")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    p.set_defaults(handler=run)


def load_any(store: str, study_name: str | None = None) -> dict[str, Any]:
    """A results dict from a results.json, a SQLite file path or an Optuna storage URL (with what ``tune`` stored
    in the study's namespace: the finder's, noise, LR-check and precision results)."""
    from batchfit.errors import ConfigError
    from batchfit.report import check_results

    if "://" not in store:
        path = Path(store)
        if not path.exists():
            raise ConfigError(f"store {store!r} does not exist; give the sweep's .db file, a storage URL or a "
                              "results.json")
        if path.is_dir():
            for name in ("results.json", "batchfit.db"):
                if (path / name).exists():
                    return load_any(str(path / name), study_name)
            raise ConfigError(f"{store!r} is a directory without results.json or batchfit.db; give the store file")
        if not path.is_file():  # a FIFO or a device: reading it would wait for a writer, maybe forever
            raise ConfigError(f"store {store!r} is not a regular file (a FIFO, a device or a socket); give the "
                              "sweep's .db file, a storage URL or a results.json")
        if path.suffix == ".json":
            try:
                data = json.loads(path.read_text())
            except ValueError as exc:
                raise ConfigError(f"{store!r} is not valid JSON ({exc}); give a results.json written by batchfit")\
                    from None
            if not isinstance(data, dict) or not isinstance(data.get("trials"), list):
                raise ConfigError(f"{store!r} has no 'trials' list; give a results.json written by batchfit")
            data.pop("recommendation", None)
            check_results(data, source=str(path))
            return data
        with path.open("rb") as f:
            if f.read(16) != b"SQLite format 3\x00":
                raise ConfigError(f"{store!r} is not a SQLite database; give the sweep's .db file or a storage URL")
        store = f"sqlite:///{path.resolve()}"
    from batchfit.recommend import Measurements
    from batchfit.study import load_results

    return Measurements.of(load_results(store, study_name=study_name)).to_dict()  # the typed result's JSON form


def print_summary(args: argparse.Namespace, results: Any, rec: Any) -> None:
    """The trade-off table (one row per batch size, each number with its 95 % interval, and the verdict against
    the reference), then the recommendation with its reasons and flags; with ``-q`` only the one-line
    recommendation."""
    from rich import box
    from rich.table import Table

    from batchfit.recommend import Measurements
    from batchfit.report import cost_text, interim_line, still_running, tradeoff_table

    measured = Measurements.of(results)  # read typed once; the report's functions take it as it is
    sweep = measured.sweep
    # a study still running (a store read mid-sweep) gets the interim report's words: no recommendation yet
    interim = rec is None or still_running(measured)
    cost = cost_text(measured)
    if getattr(args, "quiet", False):
        line = (f"Recommendation: {rec.headline()}" if not interim else
                interim_line(measured).split(". ")[0] + "." if rec is not None else
                "No recommendation: no trial finished.")
        sys.stderr.write(line + (f" [{cost}]" if cost else "") + "\n")
        return
    con = c.console(args)
    full_header, body = tradeoff_table(measured, rec, interim=interim)
    # the report's trade-off table (one row per batch size, each number with its 95 % interval), with short headers
    # so it fits a terminal; report.md has every number of every trial
    ref = next((row[0] for row in body if row[4] == "reference"), None)
    quality = "train loss" if sweep.primary_metric == "train_loss" else "val"
    header = ["batch", "memory (micro×acc)", "samples/s", "B/B_simple",
              f"{quality} vs {ref} (+ better)" if ref else full_header[4], "steps→tgt", "s→tgt", "verdict"]
    table = Table(title=f"batchfit: {sweep.workload} — the batch-size trade-off, measured "
                        f"(ranked on {sweep.primary_metric}; 95 % intervals in brackets)",
                  title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False)
    for h in header:
        table.add_column(h, justify="right", no_wrap=True)
    for row in body:
        style = "bold green" if rec is not None and not interim and row[0] == str(rec.batch_size) else None
        table.add_row(*row, style=style)
    con.print(table)
    if rec is not None and interim:
        con.print(f"[yellow]{interim_line(measured)}[/]", highlight=False)
    elif rec is not None:
        con.print(f"[bold]Recommendation:[/] {rec.headline()}", highlight=False)
        if cost:
            con.print(f"  [dim]{cost}[/]", highlight=False)
        for r in rec.reasons:
            con.print(f"  - {r}", highlight=False)
        for f in rec.flags:
            con.print(f"  [yellow]Flag:[/] {f}", highlight=False)
    else:
        what = "training-loss" if sweep.primary_metric == "train_loss" else "validation"
        con.print(f"[yellow]No recommendation: no trial has finished with a {what} result yet.[/]")
    report = measured.source.get("report") or {}  # where the report was written, stored beside the results
    if report.get("html"):
        con.print(f"Report: {report['html']} (also {report.get('markdown')}, {report.get('results')})")


def run(args: argparse.Namespace) -> int:
    from batchfit.report import write_report

    c.check_outputs(args)
    results = load_any(args.store, args.study_name)
    paths = write_report(results, args.out, tolerance=args.tolerance)
    rec = paths["recommendation"]
    results = dict(results, recommendation=rec.to_dict() if rec is not None else None)
    results["report"] = {"html": str(paths["html"]), "markdown": str(paths["markdown"]),
                         "results": str(paths["results"])}
    if args.json:
        c.write_json(args.json, results)
    print_summary(args, results, rec)
    return c.EXIT_OK
