"""Data sources: DataLoaders re-created at each batch size, iterable datasets, the worst-case batch, sharding."""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from batchfit.data import (
    IndexSource,
    IterableSource,
    LoaderSource,
    declared_samples,
    item_size,
    source_for,
)
from batchfit.errors import DataError


class Tokens(Dataset):
    """Variable-length token sequences; each item records the process that loaded it."""

    def __init__(self, n: int = 40) -> None:
        self.lengths = [3 + (7 * i) % 17 for i in range(n)]

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": [i] * self.lengths[i], "label": i, "pid": os.getpid()}


def pad(items: list[dict]) -> dict:
    width = max(len(it["input_ids"]) for it in items)
    ids = torch.zeros(len(items), width, dtype=torch.long)
    mask = torch.zeros(len(items), width, dtype=torch.long)
    for r, it in enumerate(items):
        ids[r, : len(it["input_ids"])] = torch.tensor(it["input_ids"])
        mask[r, : len(it["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([it["label"] for it in items]),
            "pid": torch.tensor([it["pid"] for it in items])}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _labels(src, batch_size, seed=0, **kw) -> list[list[int]]:
    return [b["labels"].tolist() for b, _ in src.epoch(batch_size, generator=_gen(seed), drop_last=False, **kw)]


def test_loader_with_two_workers_round_trip_keeps_collate_workers_and_order_is_seeded() -> None:
    loader = DataLoader(Tokens(), batch_size=4, shuffle=True, collate_fn=pad, num_workers=2)
    src = source_for(loader)
    assert isinstance(src, LoaderSource) and src.num_samples == 40 and src.kind == "random"
    batches = list(src.epoch(6, generator=_gen(1), drop_last=False))
    assert [b["input_ids"].shape[0] for b, _ in batches] == [6] * 6 + [4]  # re-created at batch size 6, not 4
    assert [c for _, c in batches] == [6] * 6 + [4]
    seen = [x for b, _ in batches for x in b["labels"].tolist()]
    assert sorted(seen) == list(range(40)) and seen != list(range(40))  # every sample once, shuffled
    assert set(torch.cat([b["pid"] for b, _ in batches]).tolist()).isdisjoint({os.getpid()})  # loaded in workers
    assert "attention_mask" in batches[0][0]  # the user's collate_fn
    # the same seed gives the same order, another does not; the workers are kept across epochs and batch sizes
    workers = src._shared[0]._iterator._workers
    assert _labels(src, 6, seed=1) == [b["labels"].tolist() for b, _ in batches]
    assert [len(x) for x in _labels(src, 16, seed=1)] == [16, 16, 8]
    assert src._shared[0]._iterator._workers is workers and all(w.is_alive() for w in workers)
    assert _labels(src, 6, seed=2) != _labels(src, 6, seed=1)
    # two epochs read at once (e.g. a probe inside a training epoch) do not disturb each other
    outer = src.epoch(10, generator=_gen(4), drop_last=False)
    first = next(outer)[0]["labels"].tolist()
    inner = _labels(src, 10, seed=4)
    assert [first] + [b["labels"].tolist() for b, _ in outer] == inner
    src.close()


def test_loader_sizes_drop_last_and_sequential_sampler() -> None:
    ds = TensorDataset(torch.arange(50), torch.arange(50))
    seq = source_for(DataLoader(ds, batch_size=8))  # shuffle=False: a SequentialSampler
    assert seq.kind == "sequential"
    out = list(seq.epoch(7, generator=_gen(), drop_last=False))
    assert [len(b[0]) for b, _ in out] == [7] * 7 + [1]
    assert torch.cat([b[0] for b, _ in out]).tolist() == list(range(50))  # the dataset order, even when shuffling
    assert [len(b[0]) for b, _ in seq.epoch(7, generator=_gen(), drop_last=True)] == [7] * 7
    user_drops = source_for(DataLoader(ds, batch_size=8, shuffle=True, drop_last=True))  # the user's drop_last
    assert [c for _, c in user_drops.epoch(7, generator=_gen(), drop_last=False)] == [7] * 7
    rnd = source_for(DataLoader(ds, batch_size=8, shuffle=True))
    assert torch.cat([b[0] for b, _ in rnd.epoch(50, generator=_gen(), drop_last=False, shuffle=False)]).tolist() \
        == list(range(50))  # shuffle=False (evaluation) reads a random sampler's data in order


def test_loader_rank_shards_partition_each_global_batch() -> None:
    ds = TensorDataset(torch.arange(30))
    src = source_for(DataLoader(ds, batch_size=4, shuffle=True))
    per_rank = [list(src.epoch(8, generator=_gen(5), drop_last=False, rank=r, world_size=3)) for r in range(3)]
    single = list(src.epoch(8, generator=_gen(5), drop_last=False))
    assert len(per_rank[0]) == len(single) == 4
    for step, (whole, count) in enumerate(single):
        parts = [per_rank[r][step][0][0] for r in range(3)]
        assert torch.cat(parts).tolist() == whole[0].tolist()  # the shards are the global batch, in order
        assert [per_rank[r][step][1] for r in range(3)] == [count] * 3  # each rank knows the global count
        assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1


def test_custom_sampler_is_asked_for_each_epoch_and_seeded() -> None:
    ds = TensorDataset(torch.arange(20))
    weights = torch.zeros(20)
    weights[:5] = 1.0  # only the first five items can be drawn
    sampler = torch.utils.data.WeightedRandomSampler(weights, num_samples=12, replacement=True)
    src = source_for(DataLoader(ds, batch_size=4, sampler=sampler))
    assert src.kind == "custom" and src.num_samples == 12
    draw = [b[0].tolist() for b, _ in src.epoch(5, generator=_gen(3), drop_last=False)]
    assert [len(d) for d in draw] == [5, 5, 2] and {x for d in draw for x in d} <= set(range(5))
    assert draw == [b[0].tolist() for b, _ in src.epoch(5, generator=_gen(3), drop_last=False)]
    assert sampler.generator is None  # the user's sampler is left as it was


def test_a_custom_batch_sampler_is_refused_with_the_way_out() -> None:
    ds = TensorDataset(torch.arange(20))
    loader = DataLoader(ds, batch_sampler=[[0, 1], [2, 3, 4]])
    with pytest.raises(DataError, match="custom batch_sampler"):
        source_for(loader)


def test_dataloader_where_a_dataset_is_needed_gets_one_clear_line() -> None:
    loader = DataLoader(TensorDataset(torch.arange(10)), batch_size=2)
    with pytest.raises(DataError, match="got a DataLoader where a map-style dataset") as err:
        IndexSource(loader)
    assert "subscriptable" not in str(err.value) and "\n" not in str(err.value)
    assert declared_samples(loader) == 10  # samples, not the loader's 5 batches


class Stream(IterableDataset):
    def __init__(self, n: int, num_samples: int | None = None) -> None:
        self.n = n
        if num_samples is not None:
            self.num_samples = num_samples

    def __iter__(self):  # noqa: ANN204
        for i in range(self.n):
            yield torch.full((1 + i % 5,), float(i)).sum().reshape(1), torch.tensor(i)


class Ragged(IterableDataset):
    num_samples = 12

    def __iter__(self):  # noqa: ANN204
        return (torch.full((1 + i % 5,), float(i)) for i in range(12))


def test_iterable_dataset_with_declared_samples() -> None:
    src = source_for(Stream(100, num_samples=23))
    assert isinstance(src, IterableSource) and src.num_samples == 23
    out = list(src.epoch(10, generator=_gen(), drop_last=False))
    assert [c for _, c in out] == [10, 10, 3]  # the epoch ends at the declared count, inside a batch
    assert torch.cat([b[1] for b, _ in out]).tolist() == list(range(23))
    assert [c for _, c in src.epoch(10, generator=_gen(), drop_last=True)] == [10, 10]
    shards = [list(src.epoch(10, generator=_gen(), drop_last=False, rank=r, world_size=2)) for r in range(2)]
    assert torch.cat([shards[r][0][0][1] for r in range(2)]).tolist() == list(range(10))
    # declared by the workload instead; through a DataLoader with the user's settings
    assert source_for(Stream(30), num_samples=30).num_samples == 30
    wrapped = source_for(DataLoader(Stream(30, num_samples=30), batch_size=4, num_workers=0))
    assert isinstance(wrapped, IterableSource) and [c for _, c in wrapped.epoch(16, generator=_gen(),
                                                                                drop_last=False)] == [16, 14]


def test_iterable_dataset_errors() -> None:
    with pytest.raises(DataError, match="declared number of samples"):
        source_for(Stream(10))
    short = source_for(Stream(10, num_samples=25))
    with pytest.raises(DataError, match="declared 25 samples per epoch but one pass yielded 10"):
        list(short.epoch(4, generator=_gen(), drop_last=False))


def test_worst_case_batch_is_the_longest_items() -> None:
    ds = Tokens(40)
    longest = max(ds.lengths)
    src = source_for(ds, collate_fn=pad)
    batch = src.sample(3)
    assert batch["input_ids"].shape == (3, longest)
    assert batch["attention_mask"].sum(1).tolist() == sorted(ds.lengths, reverse=True)[:3]
    big = src.sample(100)  # more than the data set: the longest repeated
    assert big["input_ids"].shape == (100, longest)
    loader_batch = source_for(DataLoader(ds, batch_size=4, collate_fn=pad)).sample(2)
    assert loader_batch["input_ids"].shape == (2, longest)
    ragged = source_for(Ragged(), collate_fn=lambda items: torch.nn.utils.rnn.pad_sequence(items, batch_first=True))
    assert ragged.sample(2).tolist() == [[4.0] * 5, [9.0] * 5]  # the longest items of the stream (ties: first seen)
    fixed = source_for(TensorDataset(torch.randn(9, 3), torch.arange(9)))
    assert fixed.sample(4)[0].shape == (4, 3)
    given = source_for(ds, collate_fn=pad, sample_batch=lambda b: {"input_ids": torch.zeros(b, 99)})
    assert given.sample(2)["input_ids"].shape == (2, 99)  # the workload's own worst case wins


def test_item_size() -> None:
    assert item_size(torch.zeros(3, 4)) == 12
    assert item_size((torch.zeros(5), 1)) == 6
    assert item_size({"a": [1, 2, 3], "b": "xy"}) == 5


# ---------------------------------------------------------------------------------------------------------------
# Through the workload and the engine


def _workload(train_data, val_data=None, **kw):  # noqa: ANN001, ANN202
    from batchfit.workload import Workload, accuracy

    torch.manual_seed(0)
    return Workload(name="loader", model_fn=lambda: torch.nn.Linear(4, 3),
                    optimizer_fn=lambda p, lr: torch.optim.SGD(p, lr=lr), loss_fn=torch.nn.functional.cross_entropy,
                    train_data=train_data, val_data=val_data, metrics={"accuracy": accuracy}, base_batch_size=8,
                    base_lr=0.1, **kw)


def _pairs(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, x[:, :3].argmax(1))


def test_a_workload_of_dataloaders_trains_like_its_dataset() -> None:
    from batchfit.engine import train

    loaders = _workload(DataLoader(_pairs(96, 0), batch_size=8, shuffle=True, num_workers=2),
                        DataLoader(_pairs(40, 1), batch_size=8, num_workers=2))
    plain = _workload(_pairs(96, 0), _pairs(40, 1))
    assert loaders.num_train == 96 and loaders.num_val == 40  # samples, not the loaders' 12 and 5 batches
    a = train(loaders, batch_size=16, steps=12, eval_every=6, seed=3)
    b = train(plain, batch_size=16, steps=12, eval_every=6, seed=3)
    # the same seeded order and the same batches: the same losses (the loader only moves the reading to workers)
    assert [h["train_loss"] for h in a.history] == pytest.approx([h["train_loss"] for h in b.history], rel=1e-6)
    assert a.history[-1]["val_metrics"]["accuracy"] == pytest.approx(b.history[-1]["val_metrics"]["accuracy"])


def test_a_workload_of_an_iterable_dataset_with_declared_size() -> None:
    from batchfit.engine import train

    class Pairs(IterableDataset):
        def __iter__(self):  # noqa: ANN204
            ds = _pairs(64, 0)
            return (ds[i] for i in range(len(ds)))

    wl = _workload(Pairs(), train_samples=64)
    assert wl.num_train == 64
    res = train(wl, batch_size=16, steps=8, eval_every=4)
    assert res.steps == 8 and res.history[-1]["train_loss"] < res.history[0]["train_loss"] + 1.0
    with pytest.raises(DataError, match="declared number of samples"):
        _workload(Pairs()).validate()
