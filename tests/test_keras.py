"""The Keras 3 adapter: a compiled Keras model + arrays trains in batchfit exactly as ``model.fit`` would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import batchfit.integrations.keras as bk  # sets KERAS_BACKEND=torch before keras is imported

keras = pytest.importorskip("keras")
if keras.backend.backend() != "torch":  # pragma: no cover - another backend was forced in the environment
    pytest.skip("Keras is not on its torch backend in this environment", allow_module_level=True)

from batchfit.engine import evaluate, seed_everything, train  # noqa: E402
from batchfit.errors import ConfigError, DataError, WorkloadError  # noqa: E402

# Keras' own NumPy-2 deprecation noise (np.array(variable)), not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _data(n: int = 100, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype("float32")
    return x, (x @ rng.normal(size=(8, 3))).argmax(1)


def _builder(optimizer: str = "sgd", **compile_kwargs: object):
    def build():  # noqa: ANN202
        model = keras.Sequential([
            keras.Input((8,)),
            keras.layers.Dense(16, activation="tanh", kernel_regularizer=keras.regularizers.L2(1e-3)),
            keras.layers.Dense(3, activation="softmax"),
        ])
        opt = {
            "sgd": lambda: keras.optimizers.SGD(0.1, momentum=0.9),
            "nesterov": lambda: keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True),
            "adam": lambda: keras.optimizers.Adam(0.01),
            "adamw": lambda: keras.optimizers.AdamW(0.01, weight_decay=0.1),
            "adagrad": lambda: keras.optimizers.Adagrad(0.05),
            "rmsprop": lambda: keras.optimizers.RMSprop(0.01),
            "clip": lambda: keras.optimizers.SGD(0.1, clipnorm=1.0),
            "schedule": lambda: keras.optimizers.SGD(keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.9)),
        }[optimizer]()
        model.compile(optimizer=opt, loss="sparse_categorical_crossentropy", metrics=["accuracy"], **compile_kwargs)
        return model

    return build


class _Keep:
    def on_train_end(self, state, result):  # noqa: ANN001, ANN201
        self.model = state.model


@pytest.mark.parametrize(("optimizer", "atol"), [("sgd", 1e-6), ("nesterov", 1e-6), ("adam", 2e-4),
                                                  ("adamw", 2e-4), ("adagrad", 1e-6)])
def test_training_matches_keras_fit(optimizer: str, atol: float) -> None:
    # Full batch (order-free), same seed: batchfit's loop must land on the weights model.fit reaches, and its
    # validation loss (with the L2 regularization term) and accuracy must equal model.evaluate's.
    x, y = _data()
    build = _builder(optimizer)
    wl = bk.keras_workload(build, x, y, batch_size=80, validation_split=0.2)
    assert (len(wl.train_data), len(wl.val_data)) == (80, 20)
    keras.utils.set_random_seed(3)
    km = build()
    km.fit(x, y, batch_size=80, epochs=5, validation_split=0.2, shuffle=False, verbose=0)
    keep = _Keep()
    result = train(wl, batch_size=80, steps=5, seed=3, callbacks=[keep])
    assert result.lr == pytest.approx(km.optimizer.get_config()["learning_rate"], rel=1e-6)
    for a, b in zip(km.get_weights(), keep.model.keras_model.get_weights()):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol)
    ref = km.evaluate(x[80:], y[80:], verbose=0, return_dict=True)
    last = result.history[-1]
    assert last["val_loss"] == pytest.approx(ref["loss"], abs=10 * atol)
    assert last["val_metrics"]["accuracy"] == pytest.approx(ref["accuracy"])


def test_same_seed_same_initial_weights_and_training_flag() -> None:
    x, y = _data()

    def build():  # noqa: ANN202
        m = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4), keras.layers.Dropout(0.5),
                              keras.layers.Dense(3)])
        m.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return m

    wl = bk.keras_workload(build, x, y)
    seed_everything(7)
    a = wl.model_fn()
    seed_everything(7)
    b = wl.model_fn()
    seed_everything(8)
    c = wl.model_fn()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))
    xb = torch.as_tensor(x[:16])
    a.eval()
    assert torch.equal(a(xb), a(xb))  # dropout off in eval mode
    a.train()
    assert not torch.equal(a(xb), a(xb))  # and on in train mode, as in fit
    assert wl.metrics == {} and wl.primary_metric == "val_loss"


def test_subclassed_model_and_compiled_instance() -> None:
    x, y = _data()

    class Net(keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.d1, self.d2 = keras.layers.Dense(8, activation="relu"), keras.layers.Dense(3)

        def call(self, inputs, training=None):  # noqa: ANN001, ANN201
            return self.d2(self.d1(inputs))

    def build():  # noqa: ANN202
        m = Net()
        m.compile(optimizer=keras.optimizers.SGD(0.05), metrics=["accuracy"],
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return m

    wl = bk.keras_workload(build, x, y, batch_size=20, validation_data=(x[:30], y[:30]))
    model = wl.model_fn()
    assert sum(p.numel() for p in model.parameters()) == 8 * 8 + 8 + 8 * 3 + 3
    keep = _Keep()
    r = train(wl, batch_size=20, epochs=2, callbacks=[keep])
    # the reported accuracy is the trained subclassed model's own, on the 30 validation samples (logits: argmax)
    with torch.no_grad():
        logits = keep.model(torch.as_tensor(x[:30]))
    own = float((logits.argmax(1).cpu().numpy() == y[:30]).mean())
    assert not r.diverged and r.history[-1]["val_metrics"]["accuracy"] == pytest.approx(own, abs=1e-6)
    # A compiled instance is cloned (fresh weights) per trial.
    proto = _builder("sgd")()
    wl2 = bk.keras_workload(proto, x, y, batch_size=50)
    m2 = wl2.model_fn()
    assert m2.keras_model is not proto
    loss, metrics, _ = evaluate(wl2, m2, wl2.train_data, batch_size=64, device=torch.device("cpu"))
    assert np.isfinite(loss) and set(metrics) == {"accuracy"}


@pytest.mark.parametrize(("optimizer", "error", "words"), [
    ("rmsprop", ConfigError, "RMSprop"),
    ("clip", ConfigError, "clipnorm"),
    ("schedule", ConfigError, "schedule"),
])
def test_refused_optimizers(optimizer: str, error: type, words: str) -> None:
    x, y = _data()
    with pytest.raises(error, match=words):
        bk.keras_workload(_builder(optimizer), x, y)


def test_bad_inputs() -> None:
    x, y = _data()

    def uncompiled():  # noqa: ANN202
        return keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)])

    with pytest.raises(WorkloadError, match="not compiled"):
        bk.keras_workload(uncompiled, x, y)
    with pytest.raises(DataError, match="must match"):
        bk.keras_workload(_builder(), x, y[:-1])
    with pytest.raises(ConfigError, match="validation_split"):
        bk.keras_workload(_builder(), x, y, validation_split=1.5)
    with pytest.raises(ConfigError, match="not both"):
        bk.keras_workload(_builder(), x, y, validation_split=0.2, validation_data=(x, y))
    with pytest.raises(WorkloadError, match="compiled keras.Model or a function"):
        bk.keras_workload(42, x, y)


_WORKLOAD_FILE = """
from batchfit.integrations.keras import keras_workload
import keras
import numpy as np

rng = np.random.default_rng(0)
x = rng.normal(size=(200, 8)).astype("float32")
y = (x @ rng.normal(size=(8, 3))).argmax(1)

def build(clip=False):
    m = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                          keras.layers.Dense(3, activation="softmax")])
    opt = keras.optimizers.Adam(1e-2, clipnorm=1.0) if clip else keras.optimizers.Adam(1e-2)
    m.compile(optimizer=opt, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return m

def workload():
    return keras_workload(build, x, y, batch_size=64, validation_split=0.2)

def clipped():
    return keras_workload(lambda: build(clip=True), x, y, batch_size=64, validation_split=0.2)
"""


def _start_cli(args: list[str], tmp_path: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}  # the adapter must select torch itself
    return subprocess.Popen([sys.executable, "-m", "batchfit", *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_cli_train_and_sweep_on_keras_workload_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "kw.py").write_text(textwrap.dedent(_WORKLOAD_FILE))
    # a fresh process without KERAS_BACKEND: the adapter selects torch itself (the other commands run in this one,
    # meanwhile: the fresh process spends seconds importing Keras on the other core)
    proc = _start_cli(["train", "-w", "kw.py:workload", "-b", "32", "--epochs", "2", "-q", "--json", "r.json"],
                      tmp_path)
    try:
        _sweep_and_clipnorm_in_this_process(tmp_path, monkeypatch, capsys)
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["status"] == "ok" and data["batch_size"] == 32 and data["lr_rule"] == "adam-sqrt"
    assert data["steps"] == 2 * (160 // 32) and "accuracy" in data["history"][-1]["val_metrics"]


def _sweep_and_clipnorm_in_this_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from batchfit.cli import main

    monkeypatch.chdir(tmp_path)
    # batchfit sweep on the Keras workload: every batch size trained with its scaled LR, B_simple measured
    capsys.readouterr()
    rc = main(["sweep", "-w", "kw.py:workload", "-b", "32,64", "--budget", "epochs:4", "--no-extremes", "-q",
               "--out", "sweep", "--json", "sweep.json"])
    assert rc == 0, capsys.readouterr().err
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    trials = sorted(sweep["trials"], key=lambda t: t["batch_size"])
    assert [(t["batch_size"], t["status"]) for t in trials] == [(32, "ok"), (64, "ok")]
    assert trials[1]["lr"] == pytest.approx(0.01) and trials[0]["lr"] == pytest.approx(0.01 / 2**0.5)
    # one micro-batch each: B_simple from the extra half-batch passes every 8th step (the layout is not split)
    assert all(t["noise_method"] == "extra-halves" and t["noise_samples"] for t in trials)
    assert any(t["b_simple"] and t["b_simple"] > 0 for t in trials)
    assert (tmp_path / "sweep" / "report.html").is_file()
    capsys.readouterr()
    assert main(["train", "-w", "kw.py:clipped", "--steps", "1", "-q"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "clipnorm" in lines[0] and "grad-clip" in lines[0]


def test_global_clipnorm_and_accumulation_become_the_workloads() -> None:
    def build():  # noqa: ANN202
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3, activation="softmax")])
        model.compile(optimizer=keras.optimizers.SGD(0.1, global_clipnorm=0.5, gradient_accumulation_steps=2),
                      loss="sparse_categorical_crossentropy")
        return model

    x, y = _data()
    wl = bk.keras_workload(build, x, y, batch_size=16)
    assert wl.grad_clip == 0.5 and wl.base_batch_size == 32 and wl.micro_batch_size == 16
    res = train(wl, steps=2)
    assert res.batch_size == 32 and res.micro_batch_size == 16 and res.accumulation_steps == 2
