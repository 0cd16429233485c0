#!/usr/bin/env bash
# The prepared GPU check (issue 10.9): every CUDA test, the finder against its peers on ResNet-50 (224x224, fp32,
# real GPU memory), the engine's overhead and the noise measurement's overhead, every result as JSON under one
# folder, in under 8 minutes on one H100/H200. Each part is time-boxed; a part that runs out of time is stopped
# with SIGINT (the benchmarks save what they finished) and the rest still run while the overall budget lasts.
#
#   PYTHONPATH=src bash bench/gpu_checks.sh [OUT_DIR]
#
# OUT_DIR defaults to $OUT when set, else bench/results/gpu. Needs python3 with torch (CUDA), batchfit's
# dependencies, and lightning for the Lightning comparison (missing peers are reported as skipped). Override the
# interpreter with PYTHON=..., the overall budget (seconds, default 470) with GPU_CHECKS_BUDGET_S=...
#
# Files written: env.json (machine, versions), gpu_tests.xml + gpu_tests.json (pytest -m gpu), the benchmarks'
# JSON (finder_vs_peers_cuda_resnet50.json, engine_overhead_cuda_resnet.json, noise_overhead_cuda_resnet.json,
# noise_overhead_cuda_gpt.json, step_time_cuda_resnet50.json, fsdp_finder_cuda_tiny_lm.json,
# plan_vs_measured_cuda.json), one log per part
# (<part>.log) and gpu_checks.json (each part: exit code, seconds, time box, whether it timed out). The script exits non-zero when any part failed or timed out.
set -u -o pipefail

cd "$(dirname "$0")/.."
DIR="${1:-${OUT:-bench/results/gpu}}"
mkdir -p "$DIR"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECKS_BUDGET_S:-470}"
START=$SECONDS
PARTS="$DIR/.parts.tsv"
: >"$PARTS"

# run_part NAME TIME_BOX_S COMMAND...: run inside min(TIME_BOX_S, what is left of the budget); log; record.
run_part() {
    local name=$1 box=$2
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    if ((box > left)); then box=$left; fi
    if ((box < 10)); then
        echo "== $name: skipped (the ${BUDGET} s budget is spent)"
        printf '%s\t%s\t%s\t%s\t%s\n' "$name" "skipped" 0 "$box" 0 >>"$PARTS"
        return
    fi
    echo "== $name (time box ${box} s) ..."
    local t0=$SECONDS rc
    timeout --signal=INT --kill-after=15 "$box" "$@" >"$DIR/$name.log" 2>&1
    rc=$?
    local took=$((SECONDS - t0)) timed_out=0
    if ((rc == 124 || rc == 137)); then timed_out=1; fi
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$took" "$box" "$timed_out" >>"$PARTS"
    echo "   exit $rc after ${took} s$( ((timed_out)) && echo ' (timed out)')"
    tail -n 3 "$DIR/$name.log" | sed 's/^/   | /'
}

# 1. The machine: versions, GPU, which optional peers are installed. No CUDA: stop here.
run_part env 30 "$PY" - "$DIR/env.json" <<'EOF'
import importlib.util, json, platform, sys
import torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, gpu_memory_bytes=p.total_memory, gpu_count=torch.cuda.device_count(),
                bf16=torch.cuda.is_bf16_supported())
info["packages"] = {m: importlib.util.find_spec(m) is not None
                    for m in ("batchfit", "optuna", "rich", "sklearn", "mnist1d", "lightning", "accelerate",
                              "transformers", "hypothesis", "pytest")}
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(json.dumps(info))
sys.exit(0 if info["cuda_available"] else 3)
EOF
if ! grep -q '"cuda_available": true' "$DIR/env.json" 2>/dev/null; then
    echo "no CUDA device here: nothing else to check (see $DIR/env.json)"
    exit 3
fi

# 2. Every CUDA test (pytest -m gpu); a test module that cannot be imported here does not stop the others.
run_part gpu_tests 110 "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs --continue-on-collection-errors \
    --junitxml "$DIR/gpu_tests.xml" tests

# 3. The finder against its peers: ResNet-50, 224x224, fp32, real memory. Targets (issue 10.9): >= 97 % of the
#    exact max, <= 5 real trials, <= 1/3 of Lightning binsearch's wall time, 100 further steps without OOM.
run_part finder_vs_peers 220 "$PY" bench/finder_vs_peers.py --device cuda -O size=resnet50 -O image_size=224 \
    -O num_samples=50000 --methods batchfit,exact,lightning-binsearch --repeats 1 --train-steps 100 \
    --json "$DIR/finder_vs_peers_cuda_resnet50.json"

# 4. Engine overhead: batchfit's loop vs a plain PyTorch loop (target >= 0.97).
run_part engine_overhead 45 "$PY" bench/engine_overhead.py --device cuda --workload demo:resnet-synthetic \
    -O num_samples=2048 --batch-size 128 --epochs 2 --repeats 2 --json "$DIR/engine_overhead_cuda_resnet.json"

# 5. Noise-measurement overhead: training with the noise meter on vs off (target <= 1.03).
run_part noise_overhead_resnet 45 "$PY" bench/noise_overhead.py --device cuda --workload demo:resnet-synthetic \
    -O num_samples=2048 --batch-size 128 --micro-batch-size 64 --steps 30 --repeats 3 \
    --json "$DIR/noise_overhead_cuda_resnet.json"
run_part noise_overhead_gpt 35 "$PY" bench/noise_overhead.py --device cuda --workload demo:gpt-synthetic \
    -O num_samples=512 --batch-size 16 --micro-batch-size 8 --steps 20 --repeats 3 \
    --json "$DIR/noise_overhead_cuda_gpt.json"

# 6. Step-time calibration on CUDA (issue 11): ResNet-50 at 4 batch sizes in 6 interleaved rounds, the
#    synchronised wall clock; the relative width of each median's interval (target: a few per cent).
run_part step_time 30 "$PY" - "$DIR/step_time_cuda_resnet50.json" <<'EOF'
import json, sys
from batchfit.steptime import calibrate_step_time
from batchfit.loading import load_workload
wl = load_workload("demo:resnet-synthetic", size="resnet50", image_size=224, num_samples=1024)
cal = calibrate_step_time(wl, {32: 32, 64: 64, 128: 128, 256: 128}, device="cuda", rounds=6, max_seconds=15)
ivs = cal.intervals()
out = {"calibration": cal.to_dict(), "relative_width": {str(b): iv.width / iv.estimate for b, iv in ivs.items()}}
json.dump(out, open(sys.argv[1], "w"), indent=1)
print({b: f"{iv.estimate * 1e3:.1f} ms [{iv.low * 1e3:.1f}, {iv.high * 1e3:.1f}]" for b, iv in ivs.items()})
EOF

# 7. FSDP2 (issue 21): the finder under torchrun with NCCL on 1 rank (one GPU lent: NCCL allows one process per
#    device), sharded vs DDP on a tiny-lm wide enough to matter, and the sharded finder's maximum against an exact
#    doubling + bisection of the same sharded trials (3 real steps each). A torch without FSDP2 skips (exit 0).
cat >"$DIR/fsdp_check.py" <<'EOF'
import json, sys, time
import torch
try:
    from batchfit import sharding
    sharding.fsdp_api()
except Exception as exc:  # noqa: BLE001 - no FSDP2 here: skip, do not fail the script
    print(f"skipped: {exc}")
    sys.exit(0)
from batchfit import distributed
from batchfit.finder import STEPS_PER_TRIAL, MemoryTrials, find_batch_size
from batchfit.loading import load_workload
dev = distributed.init_from_env("cuda")
opts = dict(width=1024, depth=8, heads=16, seq_len=256, vocab=4096, num_sequences=4096, val_sequences=64)
wl = load_workload("demo:tiny-lm", **opts)
budget = 8 * 2**30
out = {"world_size": distributed.world_size(), "options": opts, "budget_bytes": budget}
for parallel in ("fsdp", "ddp"):
    t0 = time.perf_counter()
    r = find_batch_size(wl, device=dev, memory_budget=budget, parallel=parallel, throughput=False).to_dict()
    out[parallel] = {k: r.get(k) for k in ("max_batch_size", "recommended_batch_size", "real_trials", "memory_model",
                                           "sharding", "global_batch", "parallel")}
    out[parallel]["seconds"] = time.perf_counter() - t0
# exact: doubling then bisection on the same sharded trials
trials = MemoryTrials(wl, torch.device(dev), "fp32", 0, budget, budget, parallel="fsdp")
try:
    def ok(b):
        return distributed.agree_record(trials.run(b, "verify"))["ok"]
    lo, hi, runs = 0, 1, 0
    while ok(hi):
        lo, hi, runs = hi, hi * 2, runs + 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        runs += 1
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    out["exact_fsdp"] = {"max_batch_size": lo, "trials": runs, "steps_per_trial": STEPS_PER_TRIAL}
finally:
    trials.close()
f = out["fsdp"]["max_batch_size"] / max(1, out["exact_fsdp"]["max_batch_size"])
out["fsdp_found_share_of_exact"] = f
if distributed.is_main():
    json.dump(out, open(sys.argv[1], "w"), indent=1, default=str)
    print({k: out[k]["max_batch_size"] for k in ("fsdp", "ddp", "exact_fsdp")}, f"share {f:.3f}")
distributed.shutdown()
EOF
run_part fsdp_finder_nccl 90 "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 \
    "$DIR/fsdp_check.py" "$DIR/fsdp_finder_cuda_tiny_lm.json"

# 8. `batchfit plan` against this GPU (issue 22): the GPT-style demo (GPT-2 small, T = 1024) and the ResNet demo
#    (ResNet-50, 224x224), both bf16: planned vs measured peak max_memory_allocated and samples/s per batch size,
#    with the generic host constant and with the host's seconds per operator measured on the small MLP here.
run_part plan_vs_measured 90 "$PY" bench/plan_vs_measured.py --json "$DIR/plan_vs_measured_cuda.json"

# Summary: gpu_checks.json (+ gpu_tests.json from the JUnit XML), and a table on stdout.
"$PY" - "$DIR" "$BUDGET" "$((SECONDS - START))" <<'EOF'
import json, os, sys
import xml.etree.ElementTree as ET
out, budget, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
parts = []
for line in open(os.path.join(out, ".parts.tsv")):
    name, rc, took, box, timed_out = line.rstrip("\n").split("\t")
    parts.append({"part": name, "exit_code": None if rc == "skipped" else int(rc), "skipped": rc == "skipped",
                  "seconds": int(took), "time_box_s": int(box), "timed_out": timed_out == "1"})
xml = os.path.join(out, "gpu_tests.xml")
if os.path.exists(xml):
    tests = {"passed": [], "failed": [], "skipped": []}
    for case in ET.parse(xml).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kind = "failed" if case.find("failure") is not None or case.find("error") is not None else \
            "skipped" if case.find("skipped") is not None else "passed"
        tests[kind].append(name)
    json.dump(tests, open(os.path.join(out, "gpu_tests.json"), "w"), indent=2)
    print(f"CUDA tests: {len(tests['passed'])} passed, {len(tests['failed'])} failed, "
          f"{len(tests['skipped'])} skipped" + (f": failed {tests['failed']}" if tests["failed"] else ""))
ok = all(p["exit_code"] == 0 and not p["timed_out"] for p in parts)
json.dump({"ok": ok, "seconds": total, "budget_s": budget, "parts": parts},
          open(os.path.join(out, "gpu_checks.json"), "w"), indent=2)
for p in parts:
    state = "skipped" if p["skipped"] else "timed out" if p["timed_out"] else f"exit {p['exit_code']}"
    print(f"  {p['part']:<24} {state:<10} {p['seconds']:>4} s (box {p['time_box_s']} s)")
print(f"all parts ok: {ok}; {total} s in all; results in {out}")
sys.exit(0 if ok else 1)
EOF
