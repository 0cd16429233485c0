"""`batchfit plan` against a real GPU (issue 22): per workload and batch size, the planned peak of
``max_memory_allocated`` and samples/s next to what this GPU measures, with the ground truth's protocol (two full
training steps after ``reset_peak_memory_stats`` for the peak; samples/s over 5 steps after 2 warm-up steps).

The host's seconds per operator are measured too, as the plan's calibration needs them: the small MLP of the shared
ground truth at batch 1-256 (host-bound), then :func:`batchfit.planner.calibrate_host`; every workload is planned
with the generic host constant and with the measured one.

    PYTHONPATH=src python bench/plan_vs_measured.py --json plan_vs_measured.json \
        [--workload demo:gpt-synthetic:size=gpt2-small --precision bf16 -b 1,2,4,8 ...]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from batchfit.data import to_device, train_source
from batchfit.demos import SyntheticDataset
from batchfit.errors import BatchfitError
from batchfit.loading import load_workload
from batchfit.planner import DEVICES, calibrate_host, lookup, plan
from batchfit.step import autocast, build_model, build_optimizer, make_scaler, run_batch
from batchfit.workload import Workload

DEFAULT_JOBS = [
    ("demo:gpt-synthetic", {"size": "gpt2-small", "seq_len": 1024, "num_samples": 64}, "bf16", [1, 2, 4, 8]),
    ("demo:resnet-synthetic", {"size": "resnet50", "image_size": 224, "num_samples": 512}, "bf16",
     [1, 8, 32, 128, 256]),
]


def mlp_workload() -> Workload:
    """The ground truth's MLP (784-10-10, Adam, fp32): its small batches are host-bound."""
    def pool(g: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(n, 784, generator=g), torch.randint(0, 10, (n,), generator=g)

    return Workload(name="mlp", loss_fn=F.cross_entropy,
                    model_fn=lambda: nn.Sequential(nn.Linear(784, 10), nn.ReLU(), nn.Linear(10, 10)),
                    optimizer_fn=lambda p, lr: torch.optim.Adam(p, lr=lr),
                    train_data=SyntheticDataset(2**16, pool, pool=2))


def measure(wl: Workload, precision: str, sizes: list[int], dev: torch.device) -> dict[int, dict[str, Any]]:
    """Peak allocated bytes over two steps and samples/s over 5 timed steps, per batch size (None: OOM)."""
    model = build_model(wl).to(dev).train()
    optimizer = build_optimizer(wl, model)
    scaler = make_scaler(precision)
    source = train_source(wl)
    out: dict[int, dict[str, Any]] = {}

    def step(batch: Any) -> None:
        with autocast(precision, dev):
            loss, _, _ = run_batch(wl, model, batch)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for b in sizes:
        try:
            batch = to_device(source.sample(b), dev)
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            for _ in range(2):
                step(batch)
            torch.cuda.synchronize(dev)
            peak = torch.cuda.max_memory_allocated(dev)
            t0 = time.perf_counter()
            for _ in range(5):
                step(batch)
            torch.cuda.synchronize(dev)
            out[b] = {"peak_alloc": peak, "samples_per_s": 5 * b / (time.perf_counter() - t0)}
        except torch.cuda.OutOfMemoryError:
            out[b] = {"peak_alloc": None, "samples_per_s": None}
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
    return out  # the model and optimizer go with this frame


def spec_here(dev: torch.device) -> Any:
    name = torch.cuda.get_device_name(dev)
    total = torch.cuda.get_device_properties(dev).total_memory
    try:
        return lookup(name, total)
    except BatchfitError:
        major = torch.cuda.get_device_capability(dev)[0]
        row = next((d for d in DEVICES.values() if d.compute_capability[0] == major), DEVICES["H100-80GB"])
        return lookup(row.name, total)


def compare(wl: Workload, spec: Any, precision: str, measured: dict[int, dict[str, Any]],
            host: float | None) -> list[dict[str, Any]]:
    sizes = sorted(b for b, m in measured.items() if m["peak_alloc"] is not None)
    if not sizes:
        return []
    r = plan(wl, gpu=spec, precision=precision, batch_sizes=sizes, host_op_seconds=host)
    rows = []
    for p in r.points:
        m = measured[p["batch_size"]]
        rows.append({"batch_size": p["batch_size"], "planned_peak": p["peak_bytes"], "measured_peak": m["peak_alloc"],
                     "peak_error": p["peak_bytes"] / m["peak_alloc"] - 1,
                     "planned_samples_per_s": p["samples_per_s"],
                     "planned_interval": p["samples_per_s_interval"], "measured_samples_per_s": m["samples_per_s"],
                     "samples_per_s_error": p["samples_per_s"] / m["samples_per_s"] - 1, "bound": p["bound"]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--workload", action="append", default=[], help="SPEC (demo options after ':k=v,k=v')")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("-b", "--batch-sizes", default="1,2,4,8")
    a = ap.parse_args()
    jobs = DEFAULT_JOBS
    if a.workload:
        sizes = [int(x) for x in a.batch_sizes.split(",")]
        jobs = [(w, {}, a.precision, sizes) for w in a.workload]
    dev = torch.device("cuda")
    spec = spec_here(dev)
    mlp = mlp_workload()
    mlp_measured = measure(mlp, "fp32", [1, 4, 16, 64, 256], dev)
    host = calibrate_host(mlp, {b: b / m["samples_per_s"] for b, m in mlp_measured.items() if m["samples_per_s"]},
                          gpu=spec)
    out: dict[str, Any] = {"gpu": torch.cuda.get_device_name(dev), "spec": spec.name, "torch": torch.__version__,
                           "host_op_seconds_measured": host, "mlp": mlp_measured, "workloads": []}
    for spec_str, options, precision, sizes in jobs:
        wl = load_workload(spec_str, **options)
        measured = measure(wl, precision, sizes, dev)
        entry = {"workload": spec_str, "options": options, "precision": precision,
                 "generic_host": compare(wl, spec, precision, measured, None),
                 "measured_host": compare(wl, spec, precision, measured, host)}
        out["workloads"].append(entry)
        for row in entry["measured_host"]:
            print(f"{spec_str} {precision} b={row['batch_size']}: peak {row['peak_error']:+.1%}, samples/s "
                  f"{row['planned_samples_per_s']:.1f} vs {row['measured_samples_per_s']:.1f} "
                  f"({row['samples_per_s_error']:+.1%})", flush=True)
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    print(f"host seconds per operator measured here: {host * 1e6:.1f} us")


if __name__ == "__main__":
    main()
