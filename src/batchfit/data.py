"""Where batches come from: one small interface over the ways users hold data.

A :class:`BatchSource` yields *collated* batches of any structure (tensors, tuples, dicts, nested) for one epoch at
a given batch size; the training step slices them into micro-batches along the leading dimension
(:func:`slice_batch`), moves them to the device (:func:`to_device`) and reads their size from the leading dimension
(:func:`batch_size_of`). The engine, the finder, the noise probe and evaluation only ever see this interface.

- :class:`IndexSource`: a map-style dataset (``__getitem__`` + ``__len__``); a vectorised ``get_batch(indices)``
  is used when the dataset has one, ``TensorDataset`` is indexed directly, anything else goes through the collate
  function. Under data parallelism every rank draws the same permutation and takes its shard of each global batch.
- Data loaders and iterable datasets get sources of their own (see :func:`source_for`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import torch

from batchfit.errors import DataError

__all__ = [
    "BatchSource",
    "IndexSource",
    "batch_size_of",
    "slice_batch",
    "source_for",
    "to_device",
]


class BatchSource(Protocol):
    """What the engine, the finder and the noise probe read batches from."""

    @property
    def num_samples(self) -> int:
        """Samples in one epoch."""
        ...

    def epoch(self, batch_size: int, *, generator: torch.Generator, drop_last: bool, rank: int = 0,
              world_size: int = 1, shuffle: bool = True) -> Iterator[tuple[Any, int]]:
        """Yield ``(this rank's batch, samples in the global batch)`` for each global batch of ``batch_size`` samples.

        ``batch_size`` is the *global* batch (all ranks together); each rank receives its shard. A last global batch
        smaller than ``world_size`` is skipped (it would leave a rank without samples).
        """
        ...

    def sample(self, batch_size: int) -> Any:
        """One collated batch of ``batch_size`` samples, the worst case for memory when the source knows it."""
        ...


# ---------------------------------------------------------------------------------------------------------------
# Batch structure: any nesting of tensors, sequences and mappings


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor in ``batch`` (nested tuples, lists, namedtuples, mappings, objects with ``.to``)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(to_device(b, device) for b in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, Mapping):
        moved = {k: to_device(v, device) for k, v in batch.items()}
        try:
            return type(batch)(moved)
        except Exception:  # noqa: BLE001 - a mapping type that cannot be rebuilt from a dict
            return moved
    to = getattr(batch, "to", None)
    if callable(to):  # e.g. transformers' BatchEncoding
        try:
            return to(device)
        except Exception:  # noqa: BLE001 - not a device move after all
            return batch
    return batch


def _first_tensor(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        return batch if batch.dim() > 0 else None
    if isinstance(batch, Mapping):
        items = list(batch.values())
    elif isinstance(batch, (list, tuple)):
        items = list(batch)
    else:
        data = getattr(batch, "data", None)  # BatchEncoding-like
        items = list(data.values()) if isinstance(data, Mapping) else []
    for item in items:
        t = _first_tensor(item)
        if t is not None:
            return t
    return None


def batch_size_of(batch: Any) -> int:
    """Samples in a batch: the leading dimension of its first tensor (a batch with no tensor is a data error)."""
    t = _first_tensor(batch)
    if t is None:
        raise DataError(
            f"a batch of type {type(batch).__name__} holds no tensor with a batch dimension; the dataset or its "
            "collate function must produce tensors whose first dimension is the batch"
        )
    return int(t.shape[0])


def slice_batch(batch: Any, start: int, stop: int, size: int | None = None) -> Any:
    """Rows ``start:stop`` of every tensor whose leading dimension is the batch's (``size``); others kept as is."""
    if size is None:
        size = batch_size_of(batch)
    if isinstance(batch, torch.Tensor):
        return batch[start:stop] if batch.dim() > 0 and batch.shape[0] == size else batch
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(slice_batch(b, start, stop, size) for b in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(slice_batch(b, start, stop, size) for b in batch)
    if isinstance(batch, Mapping):
        sliced = {k: slice_batch(v, start, stop, size) for k, v in batch.items()}
        try:
            return type(batch)(sliced)
        except Exception:  # noqa: BLE001
            return sliced
    data = getattr(batch, "data", None)
    if isinstance(data, Mapping):  # BatchEncoding-like: rebuild from its dict
        try:
            return type(batch)({k: slice_batch(v, start, stop, size) for k, v in data.items()})
        except Exception:  # noqa: BLE001
            return {k: slice_batch(v, start, stop, size) for k, v in data.items()}
    return batch


# ---------------------------------------------------------------------------------------------------------------
# Map-style datasets


def shard(global_indices: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's contiguous share of a global batch's indices (sizes differ by at most one)."""
    n = len(global_indices)
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return global_indices[start : start + base + (1 if rank < extra else 0)]


class IndexSource:
    """A map-style dataset read by index: ``get_batch`` when present, ``TensorDataset`` directly, else collate."""

    def __init__(self, dataset: Any, collate_fn: Callable[[list[Any]], Any] | None = None,
                 sample_batch: Callable[[int], Any] | None = None) -> None:
        self.dataset = dataset
        self.fast = callable(getattr(dataset, "get_batch", None))
        self.tensors = dataset.tensors if (not self.fast and isinstance(dataset, torch.utils.data.TensorDataset)) \
            else None
        self.collate = collate_fn or torch.utils.data.default_collate
        self.sample_batch = sample_batch

    @property
    def num_samples(self) -> int:
        return len(self.dataset)

    def fetch(self, indices: torch.Tensor) -> Any:
        """The collated batch of these items."""
        if self.fast:
            return self.dataset.get_batch(indices)
        if self.tensors is not None:
            return tuple(t[indices] for t in self.tensors)
        return self.collate([self.dataset[int(i)] for i in indices])

    def epoch(self, batch_size: int, *, generator: torch.Generator, drop_last: bool, rank: int = 0,
              world_size: int = 1, shuffle: bool = True) -> Iterator[tuple[Any, int]]:
        n = self.num_samples
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        end = (n // batch_size) * batch_size if drop_last else n
        for start in range(0, end, batch_size):
            idx = order[start : start + batch_size]
            count = len(idx)
            if world_size > 1:
                if count < world_size:
                    continue
                idx = shard(idx, rank, world_size)
            yield self.fetch(idx), count

    def sample(self, batch_size: int) -> Any:
        if self.sample_batch is not None:  # the workload's worst case (largest / longest) batch
            return self.sample_batch(batch_size)
        n = self.num_samples
        return self.fetch(torch.arange(batch_size) % n)


def source_for(dataset: Any, *, collate_fn: Callable[[list[Any]], Any] | None = None,
               sample_batch: Callable[[int], Any] | None = None) -> BatchSource:
    """The source for whatever the workload holds (a map-style dataset today; loaders and iterables extend this)."""
    return IndexSource(dataset, collate_fn=collate_fn, sample_batch=sample_batch)
