"""Engine overhead: batchfit's training loop vs a hand-written plain PyTorch loop on the same workload.

Both loops see the same model initialisation, the same data order (one seeded permutation per epoch) and the same
batches; both exclude evaluation from the timing. The ratio is engine samples/s / plain samples/s, the median of
``--repeats`` interleaved runs (interleaving spreads machine noise over both).

    python bench/engine_overhead.py --workload demo:mnist1d --batch-size 64 --epochs 2 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from batchfit.data import IndexSource, to_device
from batchfit.engine import resolve_device, seed_everything, train
from batchfit.loading import load_workload, parse_options


def plain_loop(workload, batch_size: int, epochs: int, device: torch.device, seed: int) -> float:  # noqa: ANN001
    """The loop a user writes by hand: shuffle, forward, loss, backward, step, zero_grad. Returns samples/s."""
    seed_everything(seed)
    model = workload.model_fn().to(device).train()
    opt = workload.optimizer_fn(model.parameters(), workload.base_lr)
    gen = torch.Generator().manual_seed(seed)
    fetch = IndexSource(workload.train_data, workload.collate_fn).fetch
    n = len(workload.train_data)
    samples, seconds = 0, 0.0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for start in range(0, (n // batch_size) * batch_size, batch_size):
            x, y = to_device(fetch(perm[start : start + batch_size]), device)
            loss = workload.loss_fn(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            samples += batch_size
            _ = loss.item() if device.type == "cpu" else None  # a hand loop logs the loss too
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - t0
    return samples / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="demo:mnist1d")
    p.add_argument("-O", "--workload-option", action="append", default=[])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    p.add_argument("--json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    wl = load_workload(args.workload, **parse_options(args.workload_option))
    dev = resolve_device(args.device)
    # warm-up of both paths (allocator, kernels, caches)
    plain_loop(wl, args.batch_size, 1, dev, 0)
    train(wl, batch_size=args.batch_size, epochs=1, device=dev, lr_rule="none")
    engine, plain = [], []
    for r in range(args.repeats):
        plain.append(plain_loop(wl, args.batch_size, args.epochs, dev, r))
        res = train(wl, batch_size=args.batch_size, epochs=args.epochs, device=dev, seed=r, lr_rule="none")
        engine.append(res.samples_per_s)
    ratios = [e / p for e, p in zip(engine, plain)]
    out = {
        "workload": wl.name, "device": str(dev), "batch_size": args.batch_size, "epochs": args.epochs,
        "repeats": args.repeats, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "engine_samples_per_s_median": statistics.median(engine),
        "plain_samples_per_s_median": statistics.median(plain),
        "ratio_median": statistics.median(ratios), "ratios": ratios,
    }
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
