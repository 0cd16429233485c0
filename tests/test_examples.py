"""The four reference projects in examples/: each runs `batchfit find` (in-process) and a small-budget `batchfit tune`
(the installed script, a fresh process) through the CLI, from a working directory that is not the example's folder
(the workload file's folder must be importable)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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


@pytest.mark.parametrize(("name", "options", "sizes", "needs"), CASES, ids=[c[0] for c in CASES])
def test_example_find_and_tune(name: str, options: list[str], sizes: str, needs: str | None,
                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    from batchfit.cli import main

    if needs is not None:
        pytest.importorskip(needs, reason=f"examples/{name} needs {needs} (pip install 'batchfit[test]')")
    glue = EXAMPLES / name / "workload.py"
    body = glue.read_text().split("\ndef make(", 1)[1].splitlines()
    assert len(body) <= 8, f"{name}: the glue must stay within 8 lines"
    spec = f"{glue}:make"
    opts = [x for o in options for x in ("-O", o)]

    # find runs in this process (one interpreter start less per example); tune below runs the `batchfit` script
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BATCHFIT_EXAMPLE_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(sys, "path", list(sys.path))  # the loader puts the example's folder first: undone after
    capsys.readouterr()
    rc = main(["find", "-w", spec, *opts, "--max-batch-size", "64", "--no-throughput", "--json", "find.json", "-q"])
    assert rc == 0, capsys.readouterr().err[-2000:]
    fit = json.loads((tmp_path / "find.json").read_text())
    assert 1 <= fit["recommended_batch_size"] <= fit["max_batch_size"] <= 64

    # the finder ran just above: tune runs noise -> sweep -> report -> recommendation on a small budget
    tuned = _batchfit("tune", "-w", spec, *opts, "-b", sizes, "--budget", "steps:4", "--seeds", "1", "--no-find",
                      "--noise-steps", "2", "--no-precision-check", "--no-lr-calibration", "--eval-every", "2",
                      "--out", "out", "--json", "tune.json", "-q", cwd=tmp_path)
    assert tuned.returncode == 0, tuned.stderr[-2000:]
    result = json.loads((tmp_path / "tune.json").read_text())
    assert result["recommendation"], "tune ended without a recommendation"
    assert (tmp_path / "out" / "report.html").is_file()


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
