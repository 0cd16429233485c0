"""Where batches come from: one small interface over the ways users hold data.

A :class:`BatchSource` yields *collated* batches of any structure (tensors, tuples, dicts, nested) for one epoch at
a given batch size; the training step slices them into micro-batches along the leading dimension
(:func:`slice_batch`), moves them to the device (:func:`to_device`) and reads their size from the leading dimension
(:func:`batch_size_of`). The engine, the finder, the noise probe and evaluation only ever see this interface.

- :class:`IndexSource`: a map-style dataset (``__getitem__`` + ``__len__``); a vectorised ``get_batch(indices)``
  is used when the dataset has one, ``TensorDataset`` is indexed directly, anything else goes through the collate
  function. Under data parallelism every rank draws the same permutation and takes its shard of each global batch.
- :class:`LoaderSource`: a ``torch.utils.data.DataLoader``. It is re-created at each batch size keeping the user's
  ``collate_fn``, ``num_workers``, ``pin_memory``, ``persistent_workers``, ``prefetch_factor``, ``worker_init_fn``,
  ``timeout``, ``multiprocessing_context`` and ``drop_last``, so item loading (decoding, augmentation) runs in the
  user's worker processes as in their own training. The sampler's kind is kept: a ``RandomSampler`` becomes a
  permutation drawn from batchfit's seeded generator (reproducible), a ``SequentialSampler`` keeps the dataset order,
  a ``DistributedSampler`` counts by its ``shuffle`` flag (batchfit shards the global batch itself), and any other
  sampler (weighted, subset, a user class) is asked for one epoch of indices each epoch (its ``generator`` attribute,
  when it has one, seeded from batchfit's), which batchfit then cuts into batches of the size under test.
- :class:`IterableSource`: an ``IterableDataset`` (bare, or inside a DataLoader) with a declared number of samples
  (its ``num_samples`` attribute, its ``len()``, or the workload's ``train_samples`` / ``val_samples``). The stream's
  own order is kept (it cannot be shuffled from outside); an epoch ends after the declared number of samples.

The worst-case batch for memory probes (:meth:`BatchSource.sample`) is the workload's ``sample_batch`` when given;
otherwise it is derived from the longest items: a bounded scan (:data:`SCAN_ITEMS` items, evenly spaced over a
map-style dataset, the first ones of a stream) measures each item's size as its total element count (tensor
``numel``, array ``size``, sequence length), and the ``b`` largest items are collated (repeated when ``b`` exceeds
the scan). Its cost is reading and collating up to :data:`SCAN_ITEMS` items once per source (in the main process);
the sizes are cached, so later probes only collate. Fixed-size data (``TensorDataset``, ``get_batch``) skips the scan.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import torch

from batchfit.errors import DataError

__all__ = [
    "SCAN_ITEMS",
    "BatchSource",
    "IndexSource",
    "IterableSource",
    "LoaderSource",
    "batch_size_of",
    "declared_samples",
    "item_size",
    "loader_failure",
    "not_a_dataset",
    "shard",
    "slice_batch",
    "source_for",
    "to_device",
    "train_source",
    "val_source",
]

SCAN_ITEMS = 1024
"""Items read (once per source) to find the longest ones for the worst-case batch."""

Collate = Callable[[list[Any]], Any]


# ---------------------------------------------------------------------------------------------------------------
# DataLoader worker failures

# torch re-raises a worker's exception in the main process as "Caught E in DataLoader worker process N.\nOriginal
# Traceback (most recent call last): ... \nE: message"; a worker that dies (os._exit, a signal, the OOM killer) is a
# RuntimeError "DataLoader worker (pid N) exited unexpectedly ..." / "... is killed by signal: Killed.", raised
# wherever the main process is at that moment (torch's SIGCHLD handler): often inside the model's forward or backward.
_WORKER_RAISED = re.compile(r"Caught (\w+) in DataLoader worker process (\d+)")
_WORKER_DIED = re.compile(r"DataLoader worker \(pid(?:\(s\))? ([^)]*)\) (exited unexpectedly(?: with exit code -?\d+)?"
                          r"|is killed by signal: [^.]*)")
_WORKER_TIMEOUT = re.compile(r"DataLoader timed out after (\S+) seconds")


def _from_loader(exc: BaseException) -> bool:
    """Whether ``exc`` was raised inside torch's DataLoader iterator (e.g. receiving a batch from a worker)."""
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.replace("\\", "/").endswith("torch/utils/data/dataloader.py"):
            return True
        tb = tb.tb_next
    return False


def loader_failure(exc: BaseException | None) -> str | None:
    """What a DataLoader worker failure was and what to do, in one line, when ``exc`` (or an exception it came from)
    is one: the worker's own exception as the last line of its traceback (``ValueError: corrupt image #123``), or how
    the worker died; ``None`` otherwise."""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        text = str(exc)
        raised = _WORKER_RAISED.search(text)
        if raised is not None and "Original Traceback" in text:
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            name = raised.group(1)
            start = max((i for i, line in enumerate(lines) if line == name or line.startswith(f"{name}:")),
                        default=len(lines) - 1)  # the exception's own line (its message may span several)
            last = " ".join(lines[start:]) if lines else name
            return (f"DataLoader worker process {raised.group(2)} raised {last[:300]}; fix the dataset's "
                    "__getitem__ or the loader's collate_fn")
        died = _WORKER_DIED.search(text)
        if died is not None:
            return (f"a DataLoader worker process (pid {died.group(1).strip()}) {died.group(2).rstrip()} (the "
                    "dataset's code in it ended the process: os._exit, a crash in native code, or the out-of-memory "
                    "killer); rerun with num_workers=0 to see the error in the dataset, or give the workers more "
                    "memory")
        if isinstance(exc, (ConnectionError, EOFError)) and _from_loader(exc):
            return (f"a DataLoader worker process stopped while handing over a batch ({type(exc).__name__}: "
                    f"{' '.join(text.split())[:200]}); it probably died (os._exit, a crash in native code, or the "
                    "out-of-memory killer): rerun with num_workers=0 to see the error in the dataset, or give the "
                    "workers more memory")
        timeout = _WORKER_TIMEOUT.search(text)
        if timeout is not None:
            return (f"the DataLoader timed out after {timeout.group(1)} seconds waiting for a worker; raise its "
                    "timeout or find what blocks the dataset's __getitem__")
        exc = exc.__cause__ or exc.__context__
    return None


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
# Item sizes and the worst-case batch


def item_size(item: Any) -> int:
    """An item's size for the worst-case search: its total element count (tensors, arrays, sequences, mappings).

    >>> item_size({"input_ids": [1, 2, 3], "label": 0})
    4
    """
    if isinstance(item, torch.Tensor):
        return int(item.numel())
    size = getattr(item, "size", None)
    if isinstance(size, int) and hasattr(item, "shape"):  # numpy arrays
        return size
    if isinstance(item, (str, bytes)):
        return len(item)
    if isinstance(item, Mapping):
        return sum(item_size(v) for v in item.values())
    if isinstance(item, (list, tuple)):
        if item and all(isinstance(v, (int, float, bool)) for v in item):
            return len(item)
        return sum(item_size(v) for v in item)
    if isinstance(size, tuple) and all(isinstance(v, int) for v in size):  # PIL images: (width, height)
        bands = getattr(item, "getbands", None)
        return size[0] * size[1] * (len(bands()) if callable(bands) else 1) if len(size) == 2 else 1
    return 1


def _longest(items: Sequence[Any], batch_size: int, collate: Collate) -> Any:
    """Collate the ``batch_size`` largest of ``items`` (repeated in order of size when there are too few)."""
    if not items:
        raise DataError("the data set yielded no item to build a memory probe from; check train_data")
    order = sorted(range(len(items)), key=lambda i: item_size(items[i]), reverse=True)
    picked = [items[i] for i in itertools.islice(itertools.cycle(order), batch_size)]
    return collate(picked)


def _scan_indices(n: int, limit: int) -> list[int]:
    """Up to ``limit`` indices spread evenly over ``range(n)`` (all of them when ``n <= limit``)."""
    if n <= limit:
        return list(range(n))
    return sorted({int(i) for i in torch.linspace(0, n - 1, limit).round().long()})


class _Longest:
    """The largest items of a map-style dataset, found by one bounded scan (cached)."""

    def __init__(self, dataset: Any, limit: int = SCAN_ITEMS) -> None:
        self.dataset = dataset
        self.limit = limit
        self.ranked: list[int] | None = None

    def indices(self, batch_size: int) -> list[int]:
        if self.ranked is None:
            scanned = _scan_indices(len(self.dataset), self.limit)
            sizes = {i: item_size(self.dataset[i]) for i in scanned}
            self.ranked = sorted(scanned, key=lambda i: sizes[i], reverse=True)
        return list(itertools.islice(itertools.cycle(self.ranked), batch_size))


# ---------------------------------------------------------------------------------------------------------------
# Map-style datasets


def not_a_dataset(obj: Any, where: str) -> DataError:
    """The one-line error for a DataLoader (or other iterable) given where a map-style dataset is needed."""
    kind = type(obj).__name__
    if isinstance(obj, torch.utils.data.DataLoader):
        return DataError(
            f"{where} got a DataLoader where a map-style dataset (__getitem__ and __len__) is needed; pass the "
            "DataLoader as the workload's train_data / val_data (batchfit re-creates it at each batch size), or "
            "pass its .dataset here"
        )
    return DataError(
        f"{where} needs a map-style dataset (__getitem__ and __len__) and got {kind}; for an IterableDataset set "
        "its num_samples attribute (or the workload's train_samples / val_samples) and pass it as train_data"
    )


def shard(global_indices: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's contiguous share of a global batch's indices (sizes differ by at most one)."""
    n = len(global_indices)
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return global_indices[start : start + base + (1 if rank < extra else 0)]


def _rows(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(start, stop)`` of this rank's rows in a global batch of ``n`` (the same split as :func:`shard`)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _global_batches(order: torch.Tensor, batch_size: int, drop_last: bool, rank: int,
                    world_size: int) -> list[tuple[torch.Tensor, int]]:
    """``(this rank's indices, global count)`` for each global batch of ``order``."""
    n = len(order)
    end = (n // batch_size) * batch_size if drop_last else n
    out = []
    for start in range(0, end, batch_size):
        idx = order[start : start + batch_size]
        count = len(idx)
        if world_size > 1:
            if count < world_size:
                continue
            idx = shard(idx, rank, world_size)
        out.append((idx, count))
    return out


class IndexSource:
    """A map-style dataset read by index: ``get_batch`` when present, ``TensorDataset`` directly, else collate."""

    def __init__(self, dataset: Any, collate_fn: Collate | None = None,
                 sample_batch: Callable[[int], Any] | None = None) -> None:
        if isinstance(dataset, torch.utils.data.DataLoader) or not (
            hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")
        ):
            raise not_a_dataset(dataset, "batchfit's index reader")
        self.dataset = dataset
        self.fast = callable(getattr(dataset, "get_batch", None))
        self.tensors = dataset.tensors if (not self.fast and isinstance(dataset, torch.utils.data.TensorDataset)) \
            else None
        self.collate = collate_fn or torch.utils.data.default_collate
        self.sample_batch = sample_batch
        self.longest = _Longest(dataset)

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
        for idx, count in _global_batches(order, batch_size, drop_last, rank, world_size):
            yield self.fetch(idx), count

    def sample(self, batch_size: int) -> Any:
        if self.sample_batch is not None:  # the workload's worst case (largest / longest) batch
            return self.sample_batch(batch_size)
        if self.fast or self.tensors is not None:  # fixed-size items: any b of them are the worst case
            return self.fetch(torch.arange(batch_size) % self.num_samples)
        return self.fetch(torch.tensor(self.longest.indices(batch_size)))


# ---------------------------------------------------------------------------------------------------------------
# DataLoaders


def _loader_settings(loader: torch.utils.data.DataLoader) -> dict[str, Any]:
    """The DataLoader arguments batchfit keeps when it re-creates the loader at another batch size."""
    settings: dict[str, Any] = {
        "num_workers": loader.num_workers,
        "collate_fn": loader.collate_fn,
        "pin_memory": loader.pin_memory,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn,
        "multiprocessing_context": loader.multiprocessing_context,
        "prefetch_factor": loader.prefetch_factor,
        "persistent_workers": loader.persistent_workers,
    }
    for optional in ("pin_memory_device", "in_order"):  # newer torch only
        if hasattr(loader, optional):
            settings[optional] = getattr(loader, optional)
    return settings


class _Batches(torch.utils.data.Sampler):
    """The batch sampler of a re-created loader: the index lists batchfit planned for the current epoch."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class LoaderSource:
    """A user's DataLoader over a map-style dataset, re-created with the user's settings (see the module docstring).

    batchfit plans every batch itself (order, size, rank shard) and hands the index lists to the re-created
    loader as its batch sampler, so one loader serves every batch size. With workers it is kept alive across
    batch sizes and epochs (``persistent_workers``) so batchfit's many short runs do not each pay the workers'
    start-up, which the user's training pays once per epoch at most; worker seeds follow batchfit's seed. An epoch
    started while another is still being read gets a loader of its own.
    """

    def __init__(self, loader: torch.utils.data.DataLoader, *,
                 sample_batch: Callable[[int], Any] | None = None) -> None:
        dataset = loader.dataset
        if isinstance(dataset, torch.utils.data.IterableDataset):
            raise DataError("internal: an IterableDataset loader goes to IterableSource")
        if loader.batch_size is None and not isinstance(loader.batch_sampler, torch.utils.data.BatchSampler):
            raise DataError(
                "the DataLoader has a custom batch_sampler (or batch_size=None), so batchfit cannot re-create it at "
                "other batch sizes; pass a sampler and batch_size instead, or the dataset with a collate_fn"
            )
        batch_sampler = loader.batch_sampler
        sampler = batch_sampler.sampler if batch_sampler is not None else loader.sampler
        self.loader = loader
        self.dataset = dataset
        self.settings = _loader_settings(loader)
        if self.settings["num_workers"] > 0:
            self.settings["persistent_workers"] = True
        self.collate = loader.collate_fn or torch.utils.data.default_collate
        self.drop_last = bool(getattr(batch_sampler, "drop_last", loader.drop_last))
        self.sampler = sampler
        self.kind = self._kind(sampler, dataset)
        self.sample_batch = sample_batch
        self.longest = _Longest(dataset)
        self._shared: tuple[torch.utils.data.DataLoader, _Batches, torch.Generator] | None = None
        self._busy = False

    @staticmethod
    def _kind(sampler: Any, dataset: Any) -> str:
        if isinstance(sampler, torch.utils.data.SequentialSampler):
            return "sequential"
        if isinstance(sampler, torch.utils.data.RandomSampler):
            default = not sampler.replacement and getattr(sampler, "_num_samples", None) in (None, len(dataset))
            return "random" if default else "custom"
        if isinstance(sampler, torch.utils.data.distributed.DistributedSampler):
            return "random" if sampler.shuffle else "sequential"
        return "custom"

    @property
    def num_samples(self) -> int:
        if self.kind == "custom":
            try:
                return len(self.sampler)
            except TypeError as exc:
                raise DataError(
                    f"the DataLoader's sampler ({type(self.sampler).__name__}) has no len(); give it __len__ so "
                    "batchfit knows the samples in one epoch"
                ) from exc
        return len(self.dataset)

    def _order(self, generator: torch.Generator, shuffle: bool) -> torch.Tensor:
        n = len(self.dataset)
        if self.kind == "random":
            return torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        if self.kind == "sequential":
            return torch.arange(n)
        # a custom sampler draws the epoch's indices; its own generator is seeded from batchfit's for reproducibility
        own = getattr(self.sampler, "generator", None)
        seeded = hasattr(self.sampler, "generator")
        if seeded:
            self.sampler.generator = torch.Generator().manual_seed(_draw_seed(generator))
        try:
            return torch.as_tensor([int(i) for i in self.sampler], dtype=torch.long)
        finally:
            if seeded:
                self.sampler.generator = own

    def _new_loader(self, persistent: bool) -> tuple[torch.utils.data.DataLoader, _Batches, torch.Generator]:
        batches, gen = _Batches(), torch.Generator()
        settings = dict(self.settings, persistent_workers=persistent and self.settings["persistent_workers"])
        return torch.utils.data.DataLoader(self.dataset, batch_sampler=batches, generator=gen, **settings), \
            batches, gen

    def epoch(self, batch_size: int, *, generator: torch.Generator, drop_last: bool, rank: int = 0,
              world_size: int = 1, shuffle: bool = True) -> Iterator[tuple[Any, int]]:
        order = self._order(generator, shuffle)
        planned = _global_batches(order, batch_size, drop_last or self.drop_last, rank, world_size)
        if not planned:
            return
        shared = not self._busy
        if shared:
            if self._shared is None:
                self._shared = self._new_loader(persistent=True)
            loader, batches, gen = self._shared
            self._busy = True
        else:  # another epoch of this source is being read: its own loader
            loader, batches, gen = self._new_loader(persistent=False)
        try:
            batches.batches = [idx.tolist() for idx, _ in planned]
            gen.manual_seed(_peek_seed(generator))  # seeds the workers when they start
            for batch, (_, count) in zip(loader, planned, strict=True):
                yield batch, count
        finally:
            if shared:
                self._busy = False

    def sample(self, batch_size: int) -> Any:
        if self.sample_batch is not None:
            return self.sample_batch(batch_size)
        return self.collate([self.dataset[i] for i in self.longest.indices(batch_size)])

    def close(self) -> None:
        """Shut down the kept worker processes."""
        if self._shared is not None:
            _shutdown(self._shared[0])
            self._shared = None

    def __del__(self) -> None:  # pragma: no cover - garbage collection timing
        try:
            self.close()
        except Exception:  # noqa: BLE001, S110 - interpreter shutdown
            pass


def _draw_seed(generator: torch.Generator) -> int:
    """A new seed drawn from batchfit's generator (it advances the generator)."""
    return int(torch.randint(0, 2**62, (1,), generator=generator))


def _peek_seed(generator: torch.Generator) -> int:
    """A seed derived from the generator's state *without drawing from it*, so a loader's epochs keep the order of
    the dataset's (:class:`IndexSource` draws only the permutation) while worker seeds still follow batchfit's."""
    digest = hashlib.blake2b(generator.get_state().numpy().tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 2**62


def _shutdown(loader: torch.utils.data.DataLoader) -> None:
    """End a loader's worker processes. After a worker died, torch's shutdown may raise its error once more: the
    workers are ending anyway, and the dead one's pid is unregistered so that it is not reported again later."""
    iterator = getattr(loader, "_iterator", None)
    stop = getattr(iterator, "_shutdown_workers", None)
    if callable(stop):
        try:
            stop()
        except Exception:  # noqa: BLE001 - the failure was reported where it happened
            if getattr(iterator, "_worker_pids_set", False):
                with contextlib.suppress(Exception):
                    torch.utils.data._utils.signal_handling._remove_worker_pids(id(iterator))
                    iterator._worker_pids_set = False
    loader._iterator = None


# ---------------------------------------------------------------------------------------------------------------
# Iterable datasets


def declared_samples(dataset: Any, declared: int | None = None) -> int | None:
    """Samples in one epoch of ``dataset``: ``declared`` when given, else its ``num_samples`` attribute, else its
    ``len()`` (for a DataLoader: of its sampler's samples, never its number of batches); ``None`` when unknown."""
    if declared is not None:
        return int(declared)
    if isinstance(dataset, torch.utils.data.DataLoader):
        inner = dataset.dataset
        if isinstance(inner, torch.utils.data.IterableDataset):
            return declared_samples(inner)
        return source_for(dataset).num_samples
    n = getattr(dataset, "num_samples", None)
    if isinstance(n, int) and not isinstance(n, bool):
        return n
    try:
        return len(dataset)
    except TypeError:
        return None


class IterableSource:
    """An IterableDataset with a declared number of samples per epoch; batches come from a DataLoader with the
    user's settings (or plain settings for a bare dataset). Under data parallelism every rank reads the same stream
    and keeps its rows of each global batch (the stream is read ``world_size`` times; shard the stream yourself in
    a map-style dataset when that matters)."""

    def __init__(self, dataset: Any, num_samples: int | None = None, *, settings: Mapping[str, Any] | None = None,
                 collate_fn: Collate | None = None, sample_batch: Callable[[int], Any] | None = None,
                 drop_last: bool = False) -> None:
        n = declared_samples(dataset, num_samples)
        if n is None:
            raise DataError(
                f"an IterableDataset ({type(dataset).__name__}) needs a declared number of samples per epoch: set "
                "its num_samples attribute (or __len__), or the workload's train_samples / val_samples"
            )
        if n < 1:
            raise DataError(f"the IterableDataset declares {n} samples; it needs at least one")
        self.dataset = dataset
        self.n = n
        self.settings = dict(settings or {})
        if collate_fn is not None or "collate_fn" not in self.settings:
            self.settings["collate_fn"] = collate_fn
        self.collate = self.settings["collate_fn"] or torch.utils.data.default_collate
        self.drop_last = drop_last
        self.sample_batch = sample_batch
        self._scanned: list[Any] | None = None

    @property
    def num_samples(self) -> int:
        return self.n

    def epoch(self, batch_size: int, *, generator: torch.Generator, drop_last: bool, rank: int = 0,
              world_size: int = 1, shuffle: bool = True) -> Iterator[tuple[Any, int]]:
        gen = torch.Generator().manual_seed(_peek_seed(generator))
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=batch_size, generator=gen, **self.settings)
        drop = drop_last or self.drop_last
        seen = 0
        for batch in loader:
            b = batch_size_of(batch)
            if b > self.n - seen:  # the declared epoch ends inside this batch
                batch, b = slice_batch(batch, 0, self.n - seen, b), self.n - seen
            seen += b
            if not (drop and b < batch_size) and not (world_size > 1 and b < world_size):
                yield (slice_batch(batch, *_rows(b, rank, world_size), b) if world_size > 1 else batch), b
            if seen >= self.n:
                return
        raise DataError(
            f"the IterableDataset ({type(self.dataset).__name__}) declared {self.n} samples per epoch but one pass "
            f"yielded {seen}; set num_samples to what one pass yields"
        )

    def sample(self, batch_size: int) -> Any:
        if self.sample_batch is not None:
            return self.sample_batch(batch_size)
        if self._scanned is None:  # one bounded read of the stream's first items (main process)
            self._scanned = list(itertools.islice(iter(self.dataset), min(SCAN_ITEMS, self.n)))
        return _longest(self._scanned, batch_size, self.collate)


# ---------------------------------------------------------------------------------------------------------------
# Dispatch


def source_for(dataset: Any, *, collate_fn: Collate | None = None, sample_batch: Callable[[int], Any] | None = None,
               num_samples: int | None = None) -> BatchSource:
    """The source for whatever the workload holds: a DataLoader (:class:`LoaderSource`, or :class:`IterableSource`
    over its iterable dataset), an IterableDataset (:class:`IterableSource`, ``num_samples`` declared), a map-style
    dataset (:class:`IndexSource`), or an object that already is a source (``epoch`` and ``sample``)."""
    if isinstance(dataset, torch.utils.data.DataLoader):
        if isinstance(dataset.dataset, torch.utils.data.IterableDataset):
            settings = _loader_settings(dataset)
            return IterableSource(dataset.dataset, num_samples, settings=settings, collate_fn=collate_fn,
                                  sample_batch=sample_batch, drop_last=dataset.drop_last)
        return LoaderSource(dataset, sample_batch=sample_batch)
    if isinstance(dataset, torch.utils.data.IterableDataset):
        return IterableSource(dataset, num_samples, collate_fn=collate_fn, sample_batch=sample_batch)
    if callable(getattr(dataset, "epoch", None)) and callable(getattr(dataset, "sample", None)) \
            and hasattr(dataset, "num_samples"):
        return dataset  # already a BatchSource
    if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        raise not_a_dataset(dataset, "train_data / val_data")
    return IndexSource(dataset, collate_fn=collate_fn, sample_batch=sample_batch)


def train_source(workload: Any) -> BatchSource:
    """The training data of a workload as a source (its collate_fn, sample_batch and declared train_samples)."""
    return source_for(workload.train_data, collate_fn=getattr(workload, "collate_fn", None),
                      sample_batch=getattr(workload, "sample_batch", None),
                      num_samples=getattr(workload, "train_samples", None))


def val_source(workload: Any) -> BatchSource | None:
    """The validation data of a workload as a source, or ``None`` when it has none."""
    if getattr(workload, "val_data", None) is None:
        return None
    return source_for(workload.val_data, collate_fn=getattr(workload, "collate_fn", None),
                      num_samples=getattr(workload, "val_samples", None))
