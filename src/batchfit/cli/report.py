"""``batchfit report STORE --out DIR``: rebuild a study's report from its Optuna store (or a results.json)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from batchfit.cli import _common as c

EXTRA_ATTRS = ("lr_calibration", "precision_check")  # stored in the study by `tune`


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
    p.add_argument("--tolerance", type=c.fraction, default=0.01,
                   help="recommend among batch sizes within this fraction of the best metric (default 0.01)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write results + recommendation as JSON to PATH")
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    p.set_defaults(handler=run)


def load_any(store: str, study_name: str | None = None) -> dict[str, Any]:
    """A results dict from a results.json, a SQLite file path or an Optuna storage URL."""
    from batchfit.errors import ConfigError

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
        if path.suffix == ".json":
            try:
                data = json.loads(path.read_text())
            except ValueError as exc:
                raise ConfigError(f"{store!r} is not valid JSON ({exc}); give a results.json written by batchfit")\
                    from None
            if not isinstance(data, dict) or not isinstance(data.get("trials"), list):
                raise ConfigError(f"{store!r} has no 'trials' list; give a results.json written by batchfit")
            data.pop("recommendation", None)
            return data
        with path.open("rb") as f:
            if f.read(16) != b"SQLite format 3\x00":
                raise ConfigError(f"{store!r} is not a SQLite database; give the sweep's .db file or a storage URL")
        store = f"sqlite:///{path.resolve()}"
    from batchfit.study import load_results, open_storage

    results = load_results(store, study_name=study_name)
    # what tune stored beside the sweep's own attributes
    import optuna

    study = optuna.load_study(study_name=results["study_name"],
                              storage=open_storage(store, heartbeat=False, must_exist=True))
    for key in EXTRA_ATTRS:
        if results.get(key) is None and study.user_attrs.get(key) is not None:
            results[key] = study.user_attrs[key]
    return results


def print_summary(con: Any, results: dict[str, Any]) -> None:
    from rich import box
    from rich.table import Table

    from batchfit.report import summary_table

    _, full = summary_table(results)
    # the report's main columns, with short headers so the table fits a terminal (report.md has them all)
    keep = (0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 3)
    header = ["batch", "micro×acc", "LR", "best val", "memory", "samples/s", "B/B_simple", "gap", "epochs→tgt",
              "s→tgt", "status"]
    body = [[row[i] for i in keep] for row in full]
    rec = results.get("recommendation")
    table = Table(title=f"batchfit: {results.get('workload')} — the batch-size trade-off, measured "
                        f"(best val = {results.get('primary_metric')})",
                  title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False)
    for h in header:
        table.add_column(h, justify="right", no_wrap=True)
    for row in body:
        style = "bold green" if rec and row[0] == str(rec["batch_size"]) else None
        table.add_row(*row, style=style)
    con.print(table)
    if rec:
        con.print(
            f"[bold]Recommendation:[/] batch {rec['batch_size']} = micro-batch {rec['micro_batch_size']} x "
            f"{rec['accumulation_steps']}, LR {rec['lr']:.4g}, warm-up {rec['warmup_steps']}, {rec['precision']}"
        )
        for r in rec.get("reasons") or []:
            con.print(f"  - {r}", highlight=False)
    else:
        con.print("[yellow]No recommendation: no trial has finished with a validation result yet.[/]")
    report = results.get("report") or {}
    if report.get("html"):
        con.print(f"Report: {report['html']} (also {report.get('markdown')}, {report.get('results')})")


def run(args: argparse.Namespace) -> int:
    from batchfit.errors import ConfigError
    from batchfit.report import write_report

    if args.out.exists() and not args.out.is_dir():
        raise ConfigError(f"--out {str(args.out)!r} is a file; give a directory")
    c.check_writable([args.out / "results.json"] + ([args.json] if args.json else []))
    results = load_any(args.store, args.study_name)
    paths = write_report(results, args.out, tolerance=args.tolerance)
    results = dict(results, recommendation=paths["recommendation"])
    results["report"] = {"html": str(paths["html"]), "markdown": str(paths["markdown"]),
                         "results": str(paths["results"])}
    if args.json:
        c.write_json(args.json, results)
    print_summary(c.console(args), results)
    return c.EXIT_OK
