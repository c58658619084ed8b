"""A GPU as the roofline sees it, read from its GpuTargetConfigProto, and the predicted step time.

Model: each kernel takes max(flops / (eff_flops x peak), bytes / (EFF_HBM x HBM bandwidth),
MIN_KERNEL_SECONDS), kernels run one after another; each collective moves its ring share of the
message (all-reduce 2(n-1)/n, all-gather, reduce-scatter and all-to-all (n-1)/n, a permute the
whole message) at EFF_LINK x the NVLink bandwidth. Reported twice: collectives after the compute
(no overlap) and hidden under it (fully overlapped). The efficiencies below are assumptions until
a GPU has run benchmarks/gpu_first_contact.sh; replace them with the measured ones.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable

from llmjax.metrics import PEAK_FLOPS
from llmjax.plan.hlo_stats import Kernel

# cuBLAS bf16 GEMMs of GPT-2 shapes (K = 768..3072) reach ~70% of the dense peak on H100
# (NVIDIA's cuBLAS figures; the assumption benchmarks/NOTES.md has made since the first estimate).
EFF_GEMM = 0.70
# cuDNN / FlashAttention-3 at head dim 64, causal, forward + backward: ~400-450 TFLOP/s of 989
# (FlashAttention-3 paper, Shah et al. 2024, fig. 5-6); head dim 64 is its weakest case.
EFF_ATTENTION = 0.45
# Streaming elementwise kernels reach ~80-90% of HBM bandwidth (STREAM-like copies on H100:
# ~2.9 of 3.35 TB/s); fused kernels with several inputs sit at the low end.
EFF_HBM = 0.80
# Non-tensor-core arithmetic (elementwise work in fusions) against the FP32 CUDA-core peak.
EFF_VECTOR = 0.50
# nccl-tests on 8 x H100 SXM: all-reduce bus bandwidth ~360-370 GB/s of the 450 GB/s per direction.
EFF_LINK = 0.80
# A kernel that does almost nothing still costs its launch and ramp: ~2-4 us back to back on H100
# (CUDA graphs, which XLA's command buffers use, sit at the low end).
MIN_KERNEL_SECONDS = 2e-6
# NVLink 3 (A100) and 4 (H100, H200): 25 GB/s per link per direction.
NVLINK_BYTES_PER_LINK = 25e9
# Links of GPUs whose spec has no device_interconnect_info (A100 SXM: NVLink 3, 12 links).
LINKS_BY_NAME = {"NVIDIA A100-SXM4-80GB": 12, "NVIDIA A100-SXM4-40GB": 12}

_RATE_FIELDS = ("clock_rate_ghz", "units_per_core", "ops_per_clock")
# xla_data.proto PrimitiveType keys of the spec's rate tables.
_BF16, _F32 = 16, 11


class SpecError(ValueError):
    """A GPU description that is not a well-formed GpuTargetConfigProto text, or lacks a field."""


@dataclasses.dataclass(frozen=True)
class Gpu:
    name: str
    memory_bytes: int
    hbm_bytes_per_s: float
    peak_flops: float  # dense bf16 tensor-core FLOP/s
    vector_flops: float  # FP32 CUDA-core FLOP/s
    link_bytes_per_s: float  # NVLink, per direction; 0 when unknown


def _fields(text: str) -> dict[str, list[str]]:
    """Dotted field path -> its scalar values, checking the text is well-formed on the way.

    Only the grammar is checked (names, scalars, balanced braces); field names are XLA's business
    and it rejects unknown ones when the topology is made.
    """
    out: dict[str, list[str]] = {}
    path: list[str] = []
    token = re.compile(r'\s*(?:#[^\n]*|(\w+)\s*(:?)\s*(\{|"[^"\n]*"|[\w.+\-]+)?|(\}))')
    pos, text = 0, text.rstrip()
    while pos < len(text):
        m = token.match(text, pos)
        if not m or m.end() == pos:
            raise SpecError(f"not a text proto at {text[pos : pos + 40]!r}")
        pos = m.end()
        name, value, close = m.group(1), m.group(3), m.group(4)
        if close:
            if not path:
                raise SpecError("unbalanced '}'")
            path.pop()
        elif name and value == "{":
            path.append(name)
        elif name and value:
            out.setdefault(".".join([*path, name]), []).append(value.strip('"'))
        elif name:
            raise SpecError(f"field {name} has no value")
    if path:
        raise SpecError(f"unclosed '{{' in {'.'.join(path)}")
    return out


def _rate(fields: dict[str, list[str]], unit: str, key: int, cores: int) -> float:
    """FLOP/s of one dtype from a rate table: 2 (an FMA) x clock x units x ops/clock x cores."""
    prefix = f"gpu_device_info.{unit}.rate_infos"
    keys = [int(k) for k in fields.get(f"{prefix}.key", [])]
    if key not in keys:
        return 0.0
    i = keys.index(key)
    clock, units, ops = (float(fields[f"{prefix}.value.{f}"][i]) for f in _RATE_FIELDS)
    return 2 * clock * 1e9 * units * ops * cores


def parse_gpu(text: str) -> Gpu:
    """The roofline's view of a GpuTargetConfigProto text; SpecError if it cannot be read."""
    f = _fields(text)

    def one(key: str) -> str:
        if key not in f:
            raise SpecError(f"no {key}")
        return f[key][0]

    name = one("device_description_str")
    cores = int(one("gpu_device_info.core_count"))
    peak = _rate(f, "matrix_unit_description", _BF16, cores) or PEAK_FLOPS.get(name, 0.0)
    if not peak:
        raise SpecError(f"no bf16 matrix_unit_description rate and no known peak for {name!r}")
    links = int(f.get("gpu_device_info.device_interconnect_info.active_links", [0])[0])
    return Gpu(
        name=name,
        memory_bytes=int(one("gpu_device_info.device_memory_size")),
        hbm_bytes_per_s=float(one("gpu_device_info.memory_bandwidth")),
        peak_flops=peak,
        # No rate table: FP32 on CUDA cores is ~1/16 of the bf16 tensor-core peak (A100, H100).
        vector_flops=_rate(f, "scalar_unit_description", _F32, cores) or peak / 16,
        link_bytes_per_s=(links or LINKS_BY_NAME.get(name, 0)) * NVLINK_BYTES_PER_LINK,
    )


def kernel_seconds(k: Kernel, gpu: Gpu) -> float:
    """One launch of a compute kernel (anything but a collective) on the roofline."""
    eff = {"gemm": EFF_GEMM, "attention": EFF_ATTENTION}.get(k.category)
    compute = k.flops / (eff * gpu.peak_flops) if eff else k.flops / (EFF_VECTOR * gpu.vector_flops)
    return max(compute, k.bytes / (EFF_HBM * gpu.hbm_bytes_per_s), MIN_KERNEL_SECONDS)


def collective_seconds(k: Kernel, gpu: Gpu) -> float:
    """One collective over a ring of `k.group` devices."""
    n = k.group
    if n <= 1:
        return 0.0
    if not gpu.link_bytes_per_s:
        raise SpecError(f"{gpu.name}: interconnect bandwidth unknown (no active_links)")
    ring = {"all-reduce": 2 * (n - 1) / n, "collective-permute": 1.0}.get(k.kind, (n - 1) / n)
    return ring * k.bytes / (EFF_LINK * gpu.link_bytes_per_s)


@dataclasses.dataclass(frozen=True)
class Prediction:
    seconds_by_category: dict[str, float]  # gemm, attention, other, collective (per step)
    compute_seconds: float
    collective_seconds: float

    @property
    def no_overlap_seconds(self) -> float:
        return self.compute_seconds + self.collective_seconds

    @property
    def overlapped_seconds(self) -> float:
        return max(self.compute_seconds, self.collective_seconds)


def predict(kernels: Iterable[Kernel], gpu: Gpu) -> Prediction:
    by = {"gemm": 0.0, "attention": 0.0, "other": 0.0, "collective": 0.0}
    for k in kernels:
        one = collective_seconds(k, gpu) if k.category == "collective" else kernel_seconds(k, gpu)
        by[k.category] += one * k.launches
    compute = by["gemm"] + by["attention"] + by["other"]
    return Prediction(by, compute, by["collective"])
