from __future__ import annotations

import textwrap
from collections import Counter

import pytest
import torch

from batchfit.errors import ConfigError, WorkloadError
from batchfit.loading import load_workload, parse_options
from batchfit.workload import Workload


def test_digits_demo_is_stratified_and_real() -> None:
    wl = load_workload("demo:digits-mlp")
    assert isinstance(wl, Workload)
    assert len(wl.train_data) + len(wl.val_data) == 1797
    _, y_tr = wl.train_data.tensors
    _, y_va = wl.val_data.tensors
    tr, va = Counter(y_tr.tolist()), Counter(y_va.tolist())
    for c in range(10):  # every class in the same proportion (+-1 sample) in both splits
        assert abs(tr[c] / len(y_tr) - va[c] / len(y_va)) < 0.02
    model = wl.model_fn()
    assert [m.__class__.__name__ for m in model] == ["Linear", "ReLU", "Linear"]
    assert model[0].out_features == 10


def test_mnist1d_demo_generated_locally() -> None:
    wl = load_workload("demo:mnist1d", num_samples=400)
    x, y = wl.train_data.tensors
    assert len(x) == 320 and x.shape[1] == 40 and set(y.tolist()) <= set(range(10))
    assert wl.model_fn()(x[:4]).shape == (4, 10)


def test_synthetic_demos_small_sizes_run_forward() -> None:
    r = load_workload("demo:resnet-synthetic", size="tiny", image_size=32, width=8, num_classes=10, num_samples=16)
    x, y = r.sample_batch(2)
    assert r.model_fn()(x).shape == (2, 10)
    g = load_workload("demo:gpt-synthetic", size="tiny", seq_len=16, vocab=50, num_samples=8)
    x, y = g.sample_batch(2)
    out = g.model_fn()(x)
    assert out.shape == (2, 16, 50) and float(g.loss_fn(out, y).detach()) > 0


def test_load_from_file_and_module(tmp_path, monkeypatch) -> None:
    f = tmp_path / "my_wl.py"
    f.write_text(textwrap.dedent("""
        from batchfit.demos import digits_mlp
        def make(hidden=10):
            return digits_mlp(hidden=hidden)
        def broken():
            raise RuntimeError("no data here")
        def wrong():
            return 42
        not_callable = 3
    """))
    assert load_workload(f"{f}:make", hidden=12).model_fn()[0].out_features == 12
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_workload("my_wl:make").name == "digits-mlp"
    with pytest.raises(WorkloadError, match="raised RuntimeError: no data here"):
        load_workload(f"{f}:broken")
    with pytest.raises(WorkloadError, match="not a batchfit.Workload"):
        load_workload(f"{f}:wrong")
    with pytest.raises(WorkloadError, match="not callable"):
        load_workload(f"{f}:not_callable")
    with pytest.raises(ConfigError, match="has no attribute 'missing'"):
        load_workload(f"{f}:missing")
    with pytest.raises(ConfigError, match="does not take option"):
        load_workload(f"{f}:make", depth=3)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("demo:nope", "unknown demo"),
        ("", "empty"),
        ("just_a_module", "no ':factory' part"),
        ("/does/not/exist.py:f", "does not exist"),
        ("no_such_module_xyz:f", "was not found"),
        ("os:1bad", "not a valid factory name"),
    ],
)
def test_bad_specs(spec: str, match: str) -> None:
    with pytest.raises((ConfigError, WorkloadError), match=match):
        load_workload(spec)


def test_bad_demo_options() -> None:
    with pytest.raises(ConfigError, match="hidden"):
        load_workload("demo:digits-mlp", hidden=0)
    with pytest.raises(ConfigError, match="size"):
        load_workload("demo:gpt-synthetic", size="huge")


def test_parse_options() -> None:
    assert parse_options(["a=1", "b=0.5", "c=x", "d=true"]) == {"a": 1, "b": 0.5, "c": "x", "d": True}
    with pytest.raises(ConfigError, match="key=value"):
        parse_options(["oops"])


def test_validate_catches_bad_fields(tiny_workload) -> None:
    tiny_workload.base_batch_size = 0
    with pytest.raises(WorkloadError, match="base_batch_size"):
        tiny_workload.validate()


def test_data_as_users_hold_it_validates() -> None:
    from batchfit.errors import DataError
    from conftest import make_tiny_workload

    wl = make_tiny_workload()
    wl.train_data = torch.utils.data.DataLoader(wl.train_data, batch_size=7, shuffle=True)
    assert load_workload(wl).num_train == 96  # samples, not the loader's number of batches

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):  # noqa: ANN204
            for i in range(10):
                yield torch.randn(8), i % 3

    wl.train_data = Stream()
    with pytest.raises(DataError, match="train_data: an IterableDataset .* needs a declared number of samples"):
        load_workload(wl)
    wl.train_samples = 10
    assert load_workload(wl).num_train == 10


def test_spec_must_be_a_string() -> None:
    for spec in (123, None, ["demo:digits-mlp"]):
        with pytest.raises(ConfigError, match="must be a string"):
            load_workload(spec)  # type: ignore[arg-type]
