"""Finder vs peers: the same workload and memory limit under batchfit, Lightning and Accelerate.

For each method: the batch size found, how close it is to the exact largest batch (found by plain doubling +
bisection, 3 real optimizer steps per trial), the real trials it ran and its wall time. Then 100 further training
steps at batchfit's recommended size, inside the same limit, must not OOM.

- ``--device cpu`` (default): every method runs inside the same deterministic budget (batchfit's live-bytes counter;
  for the peers its OOM reads like the CPU allocator's, ``DefaultCPUAllocator: can't allocate memory``, which is
  what both peers recognise).
- ``--device cuda``: real GPU memory, no budget unless ``--memory-budget`` is given.

Peers (bench-only dependencies, ``pip install lightning accelerate``): Lightning's ``Tuner.scale_batch_size`` in
``power`` and ``binsearch`` mode (init 2, 3 steps per trial) and Accelerate's ``find_executable_batch_size``
(starting at ``--accelerate-start``, x0.9 per OOM).

    python bench/finder_vs_peers.py --memory-budget 64MiB --json bench/results/finder_vs_peers_cpu.json
    python bench/finder_vs_peers.py --device cuda -O size=resnet50 -O image_size=224 --json finder_cuda.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from batchfit import data, memory
from batchfit.engine import resolve_device, train
from batchfit.finder import STEPS_PER_TRIAL, MemoryTrials, find_batch_size
from batchfit.loading import load_workload, parse_options
from batchfit.step import autocast, run_batch
from batchfit.workload import Workload

DEFAULT_OPTIONS = ["size=tiny", "image_size=32", "width=8", "num_classes=10", "num_samples=16384"]


# ---------------------------------------------------------------------------------------------------------------
# The budget the peers run in: batchfit's counter, with the CPU allocator's OOM message they recognise


class PeerBudget(memory.LiveBytesTracker):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        try:
            return super().__torch_dispatch__(func, types, args, kwargs)
        except memory.OutOfMemoryError as exc:
            msg = str(exc)
        raise memory.OutOfMemoryError(f"DefaultCPUAllocator: can't allocate memory ({msg})")


def peer_budget(device: torch.device, budget: int | None, track: Any = ()) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return memory.enforce_budget(budget, device)  # real allocator; capped only when a budget is given
    tracker = PeerBudget(budget, device_type="cpu")
    tracker.track(track)
    return tracker


# ---------------------------------------------------------------------------------------------------------------
# Methods. Each returns {"found", "trials", "sizes", "seconds"}.


def run_batchfit(wl: Workload, dev: torch.device, precision: str, budget: int | None) -> dict[str, Any]:
    t0 = time.perf_counter()
    r = find_batch_size(wl, device=dev, precision=precision, memory_budget=budget, throughput=False)
    seconds = time.perf_counter() - t0
    sizes = [(p["batch_size"], p["ok"]) for p in r.probes if p["phase"] != "eval"]
    return {"found": r.max_batch_size, "recommended": r.recommended_batch_size, "eval_batch_size": r.eval_batch_size,
            "trials": r.real_trials, "eval_trials": r.eval_trials, "sizes": sizes, "seconds": seconds,
            "memory_limit_bytes": r.memory_limit_bytes}


def run_exact(wl: Workload, dev: torch.device, precision: str, limit: int, enforce: int | None) -> dict[str, Any]:
    """Plain doubling from 2, then bisection to the exact largest size (same trial as batchfit's)."""
    trials = MemoryTrials(wl, dev, precision, 0, limit, enforce)
    sizes: list[tuple[int, bool]] = []

    def ok(b: int) -> bool:
        res = trials.run(b, "exact")["ok"]
        sizes.append((b, res))
        return res

    t0 = time.perf_counter()
    cap = wl.num_train
    lo, b = 0, 2
    while b <= cap and ok(b):
        lo, b = b, 2 * b
    hi = min(b, cap + 1)
    if hi == cap + 1 and lo < cap:
        if ok(cap):
            lo = cap
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    seconds = time.perf_counter() - t0
    trials.close()
    return {"found": lo, "trials": len(sizes), "sizes": sizes, "seconds": seconds}


def _steps(wl: Workload, model: torch.nn.Module, opt: torch.optim.Optimizer, b: int, dev: torch.device,
           precision: str, make_batch: Callable[[int], Any]) -> None:
    for _ in range(STEPS_PER_TRIAL):
        batch = data.to_device(make_batch(b), dev)
        with autocast(precision, dev):
            loss, _, _ = run_batch(wl, model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def run_accelerate(wl: Workload, dev: torch.device, precision: str, budget: int | None, start: int) -> dict[str, Any]:
    from accelerate.utils import find_executable_batch_size

    sizes: list[tuple[int, bool]] = []
    make_batch = data.train_source(wl).sample  # the same worst-case batches the finder's trials use

    @find_executable_batch_size(starting_batch_size=start)
    def inner(batch_size: int) -> int:  # Accelerate's documented pattern: build everything inside
        sizes.append((batch_size, False))
        torch.manual_seed(0)
        model = wl.model_fn().to(dev).train()
        opt = wl.optimizer_fn(model.parameters(), wl.base_lr)
        _steps(wl, model, opt, batch_size, dev, precision, make_batch)
        sizes[-1] = (batch_size, True)
        return batch_size

    t0 = time.perf_counter()
    with peer_budget(dev, budget):
        found = inner()
    return {"found": found, "trials": len(sizes), "sizes": sizes, "seconds": time.perf_counter() - t0}


def run_lightning(wl: Workload, dev: torch.device, precision: str, budget: int | None, mode: str,
                  workdir: Path) -> dict[str, Any]:
    import lightning as L
    from lightning.pytorch.tuner import Tuner
    from torch.utils.data import DataLoader, Dataset

    class Batches(Dataset):
        """The workload's vectorised batch fetch, so data loading costs what it costs batchfit."""

        def __init__(self, ds: Any) -> None:
            self.ds = ds

        def __len__(self) -> int:
            return len(self.ds)

        def __getitem__(self, i: int) -> Any:
            return self.ds[i]

        def __getitems__(self, idx: list[int]) -> Any:
            return self.ds.get_batch(torch.tensor(idx))

    sizes: list[tuple[int, bool]] = []

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.model = wl.model_fn()
            self.batch_size = 2

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            b = len(batch[0])
            if batch_idx == 0:
                sizes.append((b, False))
            loss, _, _ = run_batch(wl, self.model, batch)
            return loss

        def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
            sizes[-1] = (sizes[-1][0], True)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return wl.optimizer_fn(self.model.parameters(), wl.base_lr)

        def train_dataloader(self) -> DataLoader:
            return DataLoader(Batches(wl.train_data), batch_size=self.batch_size, shuffle=False,
                              collate_fn=lambda b: b)

    precision_flag = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}[precision]
    trainer = L.Trainer(accelerator="gpu" if dev.type == "cuda" else "cpu", devices=1, precision=precision_flag,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(workdir), max_epochs=1)
    module = Module()
    t0 = time.perf_counter()
    with peer_budget(dev, budget, track=[list(module.parameters()), list(module.buffers())]):
        found = Tuner(trainer).scale_batch_size(module, mode=mode, steps_per_trial=STEPS_PER_TRIAL, init_val=2,
                                                max_trials=25)
    return {"found": found, "trials": len(sizes), "sizes": sizes, "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in ("lightning", "lightning.pytorch", "pytorch_lightning", "lightning.fabric"):
            logging.getLogger(name).setLevel(logging.ERROR)
        yield


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", default="demo:resnet-synthetic")
    p.add_argument("-O", "--workload-option", action="append", default=None, metavar="KEY=VALUE",
                   help=f"workload options (default for the demo: {' '.join(DEFAULT_OPTIONS)})")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--memory-budget", default=None, help="CPU default 64MiB; CUDA default: none (real memory)")
    p.add_argument("--methods", default="batchfit,exact,lightning-power,lightning-binsearch,accelerate")
    p.add_argument("--accelerate-start", type=int, default=4096)
    p.add_argument("--train-steps", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3, help="timing repeats (median wall time is reported)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    dev = resolve_device(args.device)
    opts = args.workload_option if args.workload_option is not None else (
        DEFAULT_OPTIONS if args.workload == "demo:resnet-synthetic" else [])
    wl = load_workload(args.workload, **parse_options(opts))
    budget = memory.parse_bytes(args.memory_budget or ("64MiB" if dev.type == "cpu" else None))
    limit = budget if budget is not None else memory.available_bytes(dev)
    assert limit is not None
    enforce = limit if dev.type == "cpu" else budget
    methods = args.methods.split(",")
    out: dict[str, Any] = {
        "workload": wl.name, "workload_options": opts, "device": str(dev), "precision": args.precision,
        "memory_budget_bytes": budget, "torch": torch.__version__, "results": {},
    }
    if dev.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(dev)

    def save() -> None:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(out, indent=2) + "\n")

    workdir = Path(args.json.parent if args.json else ".") / ".finder_bench_tmp"
    # one untimed trial first: the process's one-time start-up (kernel libraries, dispatch caches, cuDNN) would
    # otherwise be charged to whichever method runs first
    warm = MemoryTrials(wl, dev, args.precision, 0, limit, None)
    warm.run(2, "warm-up")
    warm.close()
    with quiet():
        for rep in range(args.repeats):  # methods interleaved per repeat: load changes hit every method alike
            for method in methods:
                print(f"-- {method} (repeat {rep + 1}/{args.repeats}) ...", flush=True)
                peer_module = {"accelerate": "accelerate"}.get(method, "lightning" if "lightning" in method else None)
                if peer_module is not None and importlib.util.find_spec(peer_module) is None:
                    print(f"   skipped: {peer_module} is not installed (pip install lightning accelerate)", flush=True)
                    if rep == 0:
                        out.setdefault("skipped", []).append(method)
                    continue
                if method == "batchfit":
                    res = run_batchfit(wl, dev, args.precision, budget)
                elif method == "exact":
                    res = run_exact(wl, dev, args.precision, limit, enforce)
                elif method == "accelerate":
                    res = run_accelerate(wl, dev, args.precision, enforce, args.accelerate_start)
                elif method.startswith("lightning-"):
                    res = run_lightning(wl, dev, args.precision, enforce, method.split("-", 1)[1], workdir)
                else:
                    raise SystemExit(f"unknown method {method!r}")
                print(f"   found {res['found']} in {res['trials']} trials, {res['seconds']:.1f} s: {res['sizes']}",
                      flush=True)
                runs = out["results"].setdefault(method, {"repeats": []})["repeats"]
                runs.append(res)
                first = runs[0]
                out["results"][method].update({k: v for k, v in first.items() if k != "seconds"})
                out["results"][method]["seconds"] = statistics.median(r["seconds"] for r in runs)
                out["results"][method]["seconds_all"] = [round(r["seconds"], 3) for r in runs]
                out["results"][method]["found_all"] = [r["found"] for r in runs]
                save()

        bf = out["results"].get("batchfit")
        if bf is not None and args.train_steps > 0:
            print(f"-- {args.train_steps} training steps at the recommended batch {bf['recommended']} ...", flush=True)
            follow: dict[str, Any] = {"batch_size": bf["recommended"], "steps": args.train_steps}
            t0 = time.perf_counter()
            try:
                r = train(wl, batch_size=bf["recommended"], steps=args.train_steps, device=dev,
                          precision=args.precision, eval_batch_size=bf["eval_batch_size"] or 256,
                          memory_budget=budget, drop_last=True)
                follow.update(ok=True, completed_steps=r.steps, peak_memory_bytes=r.peak_memory_bytes)
            except Exception as exc:  # report, don't hide: an OOM here fails the target
                if not memory.is_oom(exc):
                    raise
                follow.update(ok=False, error=" ".join(str(exc).split())[:200])
            follow["seconds"] = time.perf_counter() - t0
            out["follow_up_training"] = follow
            print(f"   {follow}", flush=True)

    exact = out["results"].get("exact", {}).get("found")
    if exact:
        for res in out["results"].values():
            res["fraction_of_exact"] = min(res["found_all"]) / exact  # the worst repeat
    save()
    print()
    print("| method | found | of exact max | real trials | wall time (s), median | all repeats (s) |")
    print("|---|---:|---:|---:|---:|---|")
    for name, res in out["results"].items():
        frac = f"{100 * res['fraction_of_exact']:.1f} %" if "fraction_of_exact" in res else "-"
        times = ", ".join(f"{t:.1f}" for t in res["seconds_all"])
        print(f"| {name} | {res['found']} | {frac} | {res['trials']} | {res['seconds']:.1f} | {times} |")
    if "batchfit" in out["results"] and "lightning-binsearch" in out["results"]:
        ratio = out["results"]["batchfit"]["seconds"] / out["results"]["lightning-binsearch"]["seconds"]
        print(f"\nbatchfit / Lightning binsearch wall time: {ratio:.2f}")
        out["time_vs_lightning_binsearch"] = ratio
        save()


if __name__ == "__main__":
    main()
