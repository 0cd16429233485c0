"""Where the finder's time goes: each trial's phase, size, outcome and seconds, plus the cost of one model build.

    python bench/finder_profile.py --device cuda -O size=resnet50 -O image_size=224 -O num_samples=50000
    python bench/finder_profile.py --device cpu --memory-budget 1GiB -O size=resnet50 -O image_size=32 \
        -O num_classes=100 -O num_samples=8192
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from batchfit import finder
from batchfit.finder import find_batch_size
from batchfit.loading import load_workload, parse_options


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="demo:resnet-synthetic")
    p.add_argument("-O", "--workload-option", action="append", default=[])
    p.add_argument("--device", default="cuda")
    p.add_argument("--memory-budget", default=None)
    p.add_argument("--third-probe-share", type=float, default=None,
                   help="override finder.THIRD_PROBE_SHARE (to compare where the third probe aims)")
    p.add_argument("--json")
    args = p.parse_args()
    if args.third_probe_share is not None:
        finder.THIRD_PROBE_SHARE = args.third_probe_share
    wl = load_workload(args.workload, **parse_options(args.workload_option))
    t0 = time.perf_counter()
    model = wl.model_fn().to(args.device)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    build = time.perf_counter() - t0
    del model
    records = []
    t0 = time.perf_counter()
    r = find_batch_size(wl, device=args.device, memory_budget=args.memory_budget, throughput=False,
                        progress=lambda event: records.append(event.data) if event.kind == "record" else None)
    total = time.perf_counter() - t0
    rows = [{k: rec.get(k) for k in ("phase", "batch_size", "ok", "seconds", "peak_bytes")} for rec in records]
    for row in rows:
        print(row)
    out = {"model_build_seconds": build, "find_seconds": total, "result_seconds": r.seconds,
           "max": r.max_batch_size, "recommended": r.recommended_batch_size, "trials": rows}
    print(json.dumps({k: v for k, v in out.items() if k != "trials"}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
