"""Many ``batchfit sweep`` workers sharing one study on a real PostgreSQL server (started by the test itself)."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

optuna = pytest.importorskip("optuna")

# the package that implements batchfit.sweep(), and its store module (heartbeat settings)
sweep_mod = importlib.import_module("batchfit.study")
store_mod = importlib.import_module("batchfit.study.store")

TrialState = optuna.trial.TrialState
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _worker(url: str, study: str, out: Path, *args: str, workload: str = "demo:digits-mlp",
            env: dict[str, str] | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "batchfit", "sweep", "-w", workload, "--store", url, "--study", study,
           "--no-noise", "--no-extremes", "-q", "--out", str(out), *args]
    return subprocess.Popen(cmd, env=env or ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# The digits demo whose training data, with BATCHFIT_TEST_HANG=N in the environment, stops serving (it sleeps) after
# N training batches of 8 (other reads, such as probes of 256 samples, do not count): a worker run with it stays
# mid-trial until it is killed, whatever the machine's speed.
_HANGING = '''
import os
import time

from batchfit import load_workload


class Hang:
    def __init__(self, data, after):
        self.data, self.after, self.batches = data, after, 0

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i]

    def get_batch(self, indices):
        self.batches += len(indices) == 8
        while self.after and self.batches > self.after:
            time.sleep(60)
        return self.data.get_batch(indices)


def make():
    wl = load_workload("demo:digits-mlp")
    wl.train_data = Hang(wl.train_data, int(os.environ.get("BATCHFIT_TEST_HANG", "0")))
    return wl
'''


def _configs(trials: list) -> Counter:
    return Counter(t.params["batch_size"] for t in trials if t.state == TrialState.COMPLETE)


def _text(log: Any) -> str:
    log.seek(0)
    return log.read()


_OPEN_TOGETHER = """
import sys
import optuna, psycopg2, sqlalchemy  # noqa: F401  (imported before the first round, so it is a race too)
from batchfit.study import open_storage
failed = []
for i, url in enumerate(sys.argv[1:]):  # one fresh database per round; every worker opens it when released
    print("ready", flush=True)  # a barrier through pipes: the test releases the workers once all are ready
    if sys.stdin.readline() != "go\\n":
        sys.exit(f"round {i}: the test stopped the rounds")
    try:
        storage = open_storage(url)
        storage.get_all_studies()
        storage.engine.dispose()  # close this round's connections (the server allows 50 clients)
    except Exception as exc:
        failed.append(f"round {i}: {type(exc).__name__}: {exc}"[:300])
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


@pytest.mark.slow
def test_workers_starting_together_create_the_schema_once(postgres_server, tmp_path: Path) -> None:  # noqa: ANN001
    """Six worker processes open a fresh database together, five times: each gets a usable store.

    Optuna's schema creation is not atomic across connections: the losers of the race get ``UniqueViolation``
    (wrapped in ``IntegrityError``) or ``DuplicateObject`` (wrapped in ``ProgrammingError``) and must retry. Before
    the retry went by exception type, ``DuplicateObject`` was not retried (the two-worker test failed ~1 run in 4).
    Each round the workers wait at a barrier (a line on each one's stdin once all six said "ready"), so no worker
    misses a round however slowly it starts, and every worker must get a usable store in whatever order they run.
    """
    urls = [postgres_server.create_database() for _ in range(5)]
    logs = [(tmp_path / f"worker{i}.err").open("w+") for i in range(6)]
    procs = [subprocess.Popen([sys.executable, "-c", _OPEN_TOGETHER, *urls], env=ENV, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=log, text=True) for log in logs]
    try:
        for i in range(len(urls)):
            for p, log in zip(procs, logs):
                line = p.stdout.readline()
                assert line == "ready\n", f"round {i}: worker {p.pid} said {line!r}: {_text(log)[-2000:]}"
            for p in procs:
                p.stdin.write("go\n")
                p.stdin.flush()
        for p, log in zip(procs, logs):
            out, _ = p.communicate(timeout=120)
            assert p.returncode == 0, (out + _text(log))[-2000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()


@pytest.mark.slow
def test_two_concurrent_workers_share_one_study(postgres_url: str, tmp_path: Path) -> None:
    sizes = [64, 256]  # four trials, one epoch each: more trials than workers, little training
    args = ("-b", ",".join(map(str, sizes)), "--budget", "epochs:1", "-m", "256")
    workers = [_worker(postgres_url, "shared", tmp_path / f"w{i}", *args) for i in range(2)]
    for w in workers:
        _, err = w.communicate(timeout=300)
        assert w.returncode == 0, err[-2000:]
    trials = optuna.load_study(study_name="shared", storage=postgres_url).get_trials()
    # every configuration ran to completion exactly once: 256 is outside the adam-sqrt rule's range (k = 8 at the
    # digits demo's base batch 32, k (1 - beta1) = 0.8 > 0.5), so its LR is searched at x1/2, x1, x2
    assert _configs(trials) == Counter({**{b: 1 for b in sizes}, 256: 3})
    # Which worker trains which trial is up to the scheduler (one may even take them all); what holds in any
    # interleaving: nothing left queued, running or failed, every other trial a queue duplicate that stepped aside
    # for a numbered trial of its configuration, and each completed trial trained by one of the two workers.
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    rest = [t for t in trials if t.state != TrialState.COMPLETE]
    assert all(t.state == TrialState.PRUNED and t.user_attrs.get("duplicate_of") is not None for t in rest), \
        [(t.number, t.state, t.user_attrs) for t in rest]
    assert {t.user_attrs["worker"]["pid"] for t in done} <= {w.pid for w in workers}
    merged = sweep_mod.load_results(postgres_url, "shared")  # the results merge into one study
    assert sorted(t.batch_size for t in merged.trials if t.status == "ok") == sorted([*sizes, 256, 256])


@pytest.mark.slow
def test_dead_workers_trial_is_retried_after_its_heartbeat_goes_stale(
    postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "hang.py").write_text(_HANGING)
    spec = f"{tmp_path / 'hang.py'}:make"
    args = ("-b", "8", "--budget", "steps:100", "-m", "8", "--eval-every", "50")
    # the victim's data stops after 75 training batches: it stores its step-50 evaluation, then waits mid-trial
    victim = _worker(postgres_url, "kill", tmp_path / "victim", *args, workload=spec,
                     env={**ENV, "BATCHFIT_TEST_HANG": "75"})
    storage = sweep_mod.open_storage(postgres_url, heartbeat=False)
    deadline = time.monotonic() + 240
    running = None
    try:
        while running is None:  # wait until the victim is mid-trial (claimed, some evaluations stored)
            if victim.poll() is not None:
                pytest.fail(f"the worker ended (exit {victim.returncode}) before it could be killed: "
                            f"{victim.communicate()[1][-2000:]}")
            assert time.monotonic() < deadline, "the worker never stored an evaluation of its trial"
            time.sleep(0.2)
            with _quiet():
                names = optuna.get_all_study_names(storage)
            if "kill" not in names:
                continue
            study = optuna.load_study(study_name="kill", storage=storage)
            for t in study.get_trials(states=(TrialState.RUNNING,)):
                if t.intermediate_values:
                    running = t
    finally:
        victim.send_signal(signal.SIGKILL)  # kill -9 mid-trial (a no-op if it already ended)
        victim.communicate(timeout=30)
    assert victim.returncode == -signal.SIGKILL and running.intermediate_values  # killed while it was training
    # pretend the dead worker ran on another machine: only its heartbeat can tell that it is gone
    storage.set_trial_user_attr(running._trial_id, "worker", {**running.user_attrs["worker"], "host": "elsewhere"})
    monkeypatch.setattr(store_mod, "HEARTBEAT_INTERVAL_S", 1)
    monkeypatch.setattr(store_mod, "HEARTBEAT_GRACE_S", 2)
    time.sleep(3)  # longer than the grace period since the victim's last beat
    assert "BATCHFIT_TEST_HANG" not in os.environ  # the rescuer's data is served in full
    result = sweep_mod.sweep(spec, batch_sizes=[8], budget="steps:100", storage=postgres_url,
                             study_name="kill", micro_batch_limit=8, measure_noise=False, extremes=False,
                             eval_every=50, out_dir=tmp_path / "rescuer")
    trials = optuna.load_study(study_name="kill", storage=postgres_url).get_trials()
    killed = next(t for t in trials if t.number == running.number)
    assert killed.state == TrialState.FAIL  # the stale trial was failed ...
    assert _configs(trials) == Counter({8: 1})  # ... and its configuration re-run from the start, once
    (ok,) = [t for t in result.trials if t.status == "ok"]
    assert ok.batch_size == 8 and ok.steps == 100


class _quiet:
    def __enter__(self) -> None:
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc: object) -> None:
        self._cm.__exit__(*exc)
