"""The GPU table ``batchfit plan --gpu NAME`` reads: memory, compute capability, dense peaks, bandwidth, links.

Every figure is a *dense* peak from the vendor's datasheet or whitepaper: NVIDIA quotes Tensor Core peaks "with
sparsity" (2:4 structured sparsity doubles them), and those are halved here. Sources are listed in docs/plan.md.

``memory_bytes`` is what ``torch.cuda.get_device_properties(i).total_memory`` reports, the figure the caching
allocator lives within. Where no such reading is at hand it is estimated as the nominal capacity in GiB x 0.99 (the
H100 reading below is 0.990 of 80 GiB, an A100-40GB deviceQuery reading 0.987 of 40 GiB: the driver keeps the rest);
``memory_source`` says which, and ``--memory`` overrides it (MIG slices, other drivers, ECC settings).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from batchfit.errors import ConfigError

__all__ = ["CUDA_CONTEXT_BYTES", "DEVICES", "GpuSpec", "gpu_names", "lookup"]

GiB = 2**30
MiB = 2**20

# Device memory a process cannot hand to PyTorch's allocator: the CUDA context with its kernel images, and the
# handles cuBLAS/cuDNN keep outside the allocator. Commonly 0.3-0.7 GiB on recent drivers and CUDA 12/13 builds; the
# plan's limit is memory_bytes minus this, and the margin (5 %, as the finder keeps) comes on top.
CUDA_CONTEXT_BYTES = 512 * MiB

# PyTorch's default cuBLAS workspace per (thread, stream) (aten/src/ATen/cuda/CublasHandlePool.cpp,
# parseChosenWorkspaceSize): 32 MiB on compute capability 9.x, 10.x and 12.x; ":4096:2:16:8" (2 x 4 MiB + 8 x 16 KiB)
# on every other architecture.
CUBLAS_WORKSPACE_HOPPER = 32 * MiB
CUBLAS_WORKSPACE_DEFAULT = 4096 * 1024 * 2 + 16 * 1024 * 8


@dataclass(frozen=True)
class GpuSpec:
    """One GPU model. FLOP/s are dense peaks; ``bandwidth`` is DRAM bytes/s; ``link`` is the per-direction
    GPU-to-GPU bandwidth data-parallel collectives run over (NVLink, or PCIe where there is none)."""

    name: str
    full_name: str
    memory_bytes: int
    memory_source: str
    compute_capability: tuple[int, int]
    fp32_flops: float  # CUDA cores (no Tensor Cores)
    tf32_flops: float  # Tensor Cores, dense
    bf16_flops: float  # Tensor Cores, dense, FP32 accumulate
    fp16_flops: float  # Tensor Cores, dense, FP32 accumulate
    bandwidth: float
    link: float
    link_name: str
    aliases: tuple[str, ...] = field(default=())
    sms: int = 0  # streaming multiprocessors: a GEMM's tiles run in waves of this many (0: not known)

    @property
    def cublas_workspace_bytes(self) -> int:
        return CUBLAS_WORKSPACE_HOPPER if self.compute_capability[0] in (9, 10, 12) else CUBLAS_WORKSPACE_DEFAULT

    def peak_flops(self, kind: str) -> float:
        """Dense peak for ``fp32``, ``tf32``, ``bf16`` or ``fp16``."""
        return {"fp32": self.fp32_flops, "tf32": self.tf32_flops, "bf16": self.bf16_flops,
                "fp16": self.fp16_flops}[kind]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("aliases")
        out["compute_capability"] = f"{self.compute_capability[0]}.{self.compute_capability[1]}"
        out["cublas_workspace_bytes"] = self.cublas_workspace_bytes
        return out


def _estimate(nominal_gib: float) -> int:
    return int(nominal_gib * GiB * 0.99) // MiB * MiB


T = 1e12
DEVICES: dict[str, GpuSpec] = {
    spec.name: spec
    for spec in (
        GpuSpec("H100-80GB", "NVIDIA H100 80GB HBM3 (SXM5)", 85_017_493_504,
                "measured: torch total_memory on an H100 80GB HBM3 (shared ground truth)", (9, 0),
                fp32_flops=67 * T, tf32_flops=989 / 2 * T, bf16_flops=1979 / 2 * T, fp16_flops=1979 / 2 * T,
                bandwidth=3.35e12, link=450e9, link_name="NVLink 4 (900 GB/s both directions)",
                aliases=("h100", "h100-sxm", "h100-sxm5", "h100-80g", "h100 80gb hbm3", "nvidia h100 80gb hbm3"),
                sms=132),
        GpuSpec("H200", "NVIDIA H200 141GB HBM3e (SXM)", _estimate(141), "estimate: 141 GiB x 0.99", (9, 0),
                fp32_flops=67 * T, tf32_flops=989 / 2 * T, bf16_flops=1979 / 2 * T, fp16_flops=1979 / 2 * T,
                bandwidth=4.8e12, link=450e9, link_name="NVLink 4 (900 GB/s both directions)",
                aliases=("h200-141gb", "h200-sxm", "nvidia h200"), sms=132),
        GpuSpec("A100-40GB", "NVIDIA A100-SXM4-40GB", 42_405_855_232,
                "deviceQuery total global memory of an A100-SXM4-40GB", (8, 0),
                fp32_flops=19.5 * T, tf32_flops=156 * T, bf16_flops=312 * T, fp16_flops=312 * T,
                bandwidth=1.555e12, link=300e9, link_name="NVLink 3 (600 GB/s both directions)",
                aliases=("a100-40g", "a100-sxm4-40gb", "nvidia a100-sxm4-40gb"), sms=108),
        GpuSpec("A100-80GB", "NVIDIA A100-SXM4-80GB", _estimate(80), "estimate: 80 GiB x 0.99", (8, 0),
                fp32_flops=19.5 * T, tf32_flops=156 * T, bf16_flops=312 * T, fp16_flops=312 * T,
                bandwidth=2.039e12, link=300e9, link_name="NVLink 3 (600 GB/s both directions)",
                aliases=("a100", "a100-80g", "a100-sxm4-80gb", "nvidia a100-sxm4-80gb"), sms=108),
        GpuSpec("L4", "NVIDIA L4 (24 GB GDDR6, ECC on)", _estimate(22.5), "estimate: 22.5 GiB (24 GiB less ECC) x 0.99",
                (8, 9), fp32_flops=30.3 * T, tf32_flops=120 / 2 * T, bf16_flops=242 / 2 * T, fp16_flops=242 / 2 * T,
                bandwidth=300e9, link=32e9, link_name="PCIe 4.0 x16 (no NVLink)", aliases=("nvidia l4",), sms=58),
        GpuSpec("RTX-4090", "NVIDIA GeForce RTX 4090 (24 GB GDDR6X)", _estimate(24), "estimate: 24 GiB x 0.99",
                (8, 9), fp32_flops=82.6 * T, tf32_flops=82.6 * T, bf16_flops=165.2 * T, fp16_flops=165.2 * T,
                bandwidth=1008e9, link=32e9, link_name="PCIe 4.0 x16 (no NVLink, no peer-to-peer)",
                aliases=("4090", "rtx4090", "geforce rtx 4090", "nvidia geforce rtx 4090"), sms=128),
    )
}


def _key(text: str) -> str:
    """Case, spaces, dashes and underscores do not matter: ``RTX 4090`` = ``rtx-4090`` = ``rtx_4090``."""
    return "".join(ch for ch in text.lower() if ch.isalnum())


_LOOKUP = {_key(k): k for k in DEVICES} | {_key(a): spec.name for spec in DEVICES.values() for a in spec.aliases}


def gpu_names() -> list[str]:
    return list(DEVICES)


def lookup(name: Any, memory_bytes: int | None = None) -> GpuSpec:
    """The spec for ``name`` (case-insensitive; ``H100``, ``h100-80gb`` ... ), with ``memory_bytes`` overriding the
    table's memory when given."""
    if isinstance(name, GpuSpec):
        spec = name
    else:
        if not isinstance(name, str) or _key(name) not in _LOOKUP:
            raise ConfigError(f"unknown gpu {name!r}; choose one of: {', '.join(DEVICES)}")
        spec = DEVICES[_LOOKUP[_key(name)]]
    if memory_bytes is not None:
        if isinstance(memory_bytes, bool) or not isinstance(memory_bytes, int) or memory_bytes <= CUDA_CONTEXT_BYTES:
            shown = f"{memory_bytes / MiB:.1f} MiB" if isinstance(memory_bytes, int) else repr(memory_bytes)
            raise ConfigError(f"memory_bytes must be more than the {CUDA_CONTEXT_BYTES // MiB} MiB the CUDA context "
                              f"takes, got {shown}")
        spec = replace(spec, memory_bytes=memory_bytes, memory_source="given")
    return spec
