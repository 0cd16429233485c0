"""The four reference projects in examples/: each runs `batchfit find` (in-process) and a small-budget `batchfit tune`
(the installed script, a fresh process) through the CLI, from a working directory that is not the example's folder
(the workload file's folder must be importable).

The tunes are independent of the finds (--no-find) and start in the background when the first example test runs,
two at a time, each in its own folder: while one test's find runs here, the tunes use the machine's other core
(one after the other they took most of this file's minute on two cores).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# (example, workload options keeping it small, tune batch sizes, importable module it needs)
CASES = [
    ("text_dict", ["num_samples=256"], "8,32", None),
    ("image_folder", ["num_images=128", "workers=2"], "8,32", None),
    ("lightning_module", ["hidden=32"], "16,64", "lightning"),
    ("hf_transformers", ["num_samples=256"], "8,32", "transformers"),
]


def _batchfit(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("batchfit")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "batchfit"]
    env = dict(os.environ, BATCHFIT_EXAMPLE_DATA=str(cwd / "data"), PYTHONPATH="")
    return subprocess.run([*cmd, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _tune(name: str, options: list[str], sizes: str, cwd: Path) -> tuple[subprocess.CompletedProcess, Path]:
    """tune runs noise -> sweep -> report -> recommendation on a small budget (the `batchfit` script, in ``cwd``)."""
    opts = [x for o in options for x in ("-O", o)]
    return _batchfit("tune", "-w", f"{EXAMPLES / name / 'workload.py'}:make", *opts, "-b", sizes, "--budget",
                     "steps:4", "--seeds", "1", "--no-find", "--noise-steps", "2", "--no-precision-check",
                     "--no-lr-calibration", "--eval-every", "2", "--out", "out", "--json", "tune.json", "-q",
                     cwd=cwd), cwd


@pytest.fixture(scope="module")
def tunes(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Future]]:
    """Every selected example's tune, started in the background (two at a time, in the order of the tests):
    ``{name: future of its CompletedProcess and folder}``; an example whose framework is missing is not started."""
    selected = {item.callspec.params["name"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_example_find_and_tune"}
    pool = ThreadPoolExecutor(max_workers=2)
    started = {}
    for name, options, sizes, needs in CASES:
        if name in selected and (needs is None or importlib.util.find_spec(needs) is not None):
            cwd = tmp_path_factory.mktemp(f"tune-{name}")
            started[name] = pool.submit(_tune, name, options, sizes, cwd)
    yield started
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.parametrize(("name", "options", "sizes", "needs"), CASES, ids=[c[0] for c in CASES])
def test_example_find_and_tune(name: str, options: list[str], sizes: str, needs: str | None,
                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str], tunes: dict[str, Future]) -> None:
    from batchfit.cli import main

    if needs is not None:
        pytest.importorskip(needs, reason=f"examples/{name} needs {needs} (pip install 'batchfit[test]')")
    glue = EXAMPLES / name / "workload.py"
    body = glue.read_text().split("\ndef make(", 1)[1].splitlines()
    assert len(body) <= 8, f"{name}: the glue must stay within 8 lines"
    spec = f"{glue}:make"
    opts = [x for o in options for x in ("-O", o)]

    # find runs in this process (one interpreter start less per example); tune runs the `batchfit` script, started
    # by the fixture
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BATCHFIT_EXAMPLE_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(sys, "path", list(sys.path))  # the loader puts the example's folder first: undone after
    capsys.readouterr()
    rc = main(["find", "-w", spec, *opts, "--max-batch-size", "64", "--no-throughput", "--json", "find.json", "-q"])
    assert rc == 0, capsys.readouterr().err[-2000:]
    fit = json.loads((tmp_path / "find.json").read_text())
    assert 1 <= fit["recommended_batch_size"] <= fit["max_batch_size"] <= 64

    tuned, folder = tunes[name].result()  # noise -> sweep -> report -> recommendation on a small budget
    assert tuned.returncode == 0, tuned.stderr[-2000:]
    result = json.loads((folder / "tune.json").read_text())
    assert result["recommendation"], "tune ended without a recommendation"
    assert (folder / "out" / "report.html").is_file()


def _sections(text: str) -> dict[str, str]:
    """``{"## heading": its text up to the next heading of level 2 or 1}`` of a Markdown file (code blocks included:
    their "# comment" lines are not headings, as they sit between fences)."""
    out: dict[str, str] = {}
    current, fenced = "", False
    for line in text.splitlines():
        fenced ^= line.startswith("```")
        if not fenced and line.startswith("## "):
            current = line.strip()
            out[current] = ""
        elif current:
            out[current] += line + "\n"
    return out


def test_integrations_doc_puts_each_framework_under_its_heading() -> None:
    """Issue 23.9: the Keras text sat under the Lightning callback heading and "## Keras 3" was empty."""
    docs = _sections((EXAMPLES.parent / "docs" / "integrations.md").read_text())
    keras = docs["## Keras 3"]
    assert "keras_workload(" in keras and "KERAS_BACKEND" in keras and "global_clipnorm" in keras
    lightning = docs["## Lightning: a workload from your LightningModule and DataModule"]
    assert "keras" not in lightning.lower() and "BatchfitBatchSize(" in lightning
    assert "lightning" not in keras.lower()


def test_readme_says_what_a_real_project_costs_and_how_to_bound_it() -> None:
    """Issue 23.9: the README's minutes hold for the demo only; the set-up section says what one's own project costs
    (the cost cap: about one run of the train budget) and how to bound it."""
    readme = (EXAMPLES.parent / "README.md").read_text()
    setup = readme[readme.index("## Set up and run"):readme.index("## Usage")]
    assert "On your own project" in setup and "one run of the training you will do" in setup
    assert "--max-cost" in setup and "--train-budget" in setup
