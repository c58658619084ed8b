"""A GPU as the roofline sees it, read from its GpuTargetConfigProto (or a TPU chip from the table
below), and the predicted step time.

Model: each kernel takes max(flops / (eff_flops x peak), bytes / (EFF_HBM x HBM bandwidth),
MIN_KERNEL_SECONDS), kernels run one after another; each collective moves its ring share of the
message (all-reduce 2(n-1)/n, all-gather, reduce-scatter and all-to-all (n-1)/n, a permute the
whole message) at EFF_LINK x the NVLink bandwidth (on a TPU: ICI within a slice, DCN between
slices; see TPU_CHIPS). Reported twice: collectives after the compute (no overlap) and hidden
under it (fully overlapped). The efficiencies below are assumptions until
a GPU has run benchmarks/gpu_first_contact.sh; replace them with the measured ones. TPUs use the
same ones (MXU for "gemm", splash kernels for "attention"): unmeasured there too.
"""

from __future__ import annotations

import dataclasses
import math
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
    link_bytes_per_s: float  # NVLink, per direction (TPU: ICI); 0 when unknown
    dcn_bytes_per_s: float = 0.0  # TPU: data-center network between slices, per chip


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
    link = gpu.dcn_bytes_per_s if k.dcn else gpu.link_bytes_per_s
    if not link:
        raise SpecError(f"{gpu.name}: interconnect bandwidth unknown (no active_links)")
    ring = {"all-reduce": 2 * (n - 1) / n, "collective-permute": 1.0}.get(k.kind, (n - 1) / n)
    return ring * k.bytes / (EFF_LINK * link)


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


# --- TPUs -----------------------------------------------------------------------------------
# Cloud TPU generations as the roofline sees one chip (a "device" to JAX: v4 and v5p run their two
# TensorCores as one megacore device). Sources: "cloud" = the Cloud TPU system architecture page
# of the generation (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e); "book" = "How to Scale Your
# Model", part 2 (jax-ml.github.io/scaling-book/tpus), whose per-link ICI and per-chip DCN
# figures the cloud pages do not break down.


@dataclasses.dataclass(frozen=True)
class TpuChip:
    name: str  # JAX's device_kind
    hbm_bytes: int  # HBM per chip
    usable_hbm_bytes: int  # what the compiler lets a program use ("exceeds available HBM (X)")
    hbm_bytes_per_s: float
    peak_flops: float  # dense bf16 on the MXUs, per chip
    ici_link_bytes_per_s: float  # one ICI link, one direction
    dcn_bytes_per_s: float  # data-center network egress per chip (between slices)
    dims: int  # 2: v5e/v6e (2D torus of 4 links per chip); 3: v4/v5p (3D, 6 links)
    cores_per_chip: int  # Cloud's slice names count TensorCores (v4-8, v5p-8 are 4 chips)
    topology_prefix: str  # libtpu's topology name: "v5e:2x4", "v5:2x2x1"
    chip_config: str  # libtpu's chip config: megacore (v4, v5p) or default
    max_chips_one_host: int  # slices up to this many chips are one host; larger, 4 per host


GiB = 2**30


def _gib(g: float) -> int:
    return int(g * GiB)


# usable_hbm_bytes: libtpu 0.0.42.1's "available HBM" for a program (its RESOURCE_EXHAUSTED message
# for an oversized one), a little under the chip's HBM.
TPU_CHIPS = {
    # v4: 275 TFLOP/s bf16, 32 GiB HBM2 at 1200 GB/s (cloud); ICI 4.5e10 B/s per link one way,
    # 6 links (book); DCN per chip not published for v4: taken as v5p's (an assumption).
    "v4": TpuChip(
        "TPU v4", 32 * GiB, _gib(30.75), 1200e9, 275e12, 4.5e10, 6.25e9, 3, 2, "v4", "megacore", 4
    ),
    # v5e: 197 TFLOP/s bf16, 16 GiB HBM2 at 819 GB/s (cloud); ICI 4.5e10 B/s per link one way,
    # 4 links; DCN 3.125e9 B/s per chip (book). v5litepod-8 is one host with 8 chips (cloud).
    "v5e": TpuChip(
        "TPU v5 lite",
        16 * GiB,
        _gib(15.75),
        819e9,
        197e12,
        4.5e10,
        3.125e9,
        2,
        1,
        "v5e",
        "default",
        8,
    ),
    # v5p: 459 TFLOP/s bf16, 95 GB HBM2e at 2765 GB/s (cloud; 96 GiB in the book, and libtpu
    # offers 95.74 GiB); ICI 9e10 B/s per link one way, 6 links; DCN 6.25e9 B/s per chip (book).
    "v5p": TpuChip(
        "TPU v5", 96 * GiB, _gib(95.74), 2765e9, 459e12, 9e10, 6.25e9, 3, 2, "v5", "megacore", 4
    ),
    # v6e (Trillium): 918 TFLOP/s bf16, 32 GiB HBM at 1640 GB/s (cloud); ICI 9e10 B/s per link
    # one way, 4 links; DCN 1.25e10 B/s per chip (book). v6e-8 is one host with 8 chips (cloud).
    "v6e": TpuChip(
        "TPU v6 lite",
        32 * GiB,
        _gib(31.25),
        1640e9,
        918e12,
        9e10,
        1.25e10,
        2,
        1,
        "v6e",
        "default",
        8,
    ),
}
# The VPU (vector unit: everything that is not a matmul) against the MXU peak: roughly a tenth
# (book, part 2), an assumption like EFF_VECTOR itself.
TPU_VECTOR_SHARE = 0.1


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    """One Cloud TPU slice (`v5e-16`): its chip, chips, ICI shape, hosts' shape, wraparound."""

    name: str
    chip: TpuChip
    chips: int
    topology: tuple[int, ...]  # chips along each ICI axis
    chips_per_host: tuple[int, int, int]
    wrap: tuple[bool, bool, bool]

    @property
    def topology_name(self) -> str:
        return f"{self.chip.topology_prefix}:{'x'.join(map(str, self.topology))}"

    @property
    def hosts(self) -> int:
        return self.chips // math.prod(self.chips_per_host)


def tpu_slice(name: str) -> TpuSlice:
    """`v5e-8`, `v5p-64`, `v6e-256`, `v4-32` as Cloud TPU sells them; SpecError if there is none.

    v5e/v6e slices of N chips are 2D (1x1, 2x2, 2x4, 4x4, 4x8, 8x8, 8x16, 16x16: a full pod);
    v4/v5p slices of N TensorCores (N/2 chips) are 3D (2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, ...),
    Cloud's default shape for each size: from the smallest, the last of the shortest axes doubles.
    """
    gen, _, count = name.partition("-")
    if gen not in TPU_CHIPS or not count.isdigit():
        raise SpecError(f"{name!r} is not a TPU slice name like {', '.join(_EXAMPLES)}")
    chip = TPU_CHIPS[gen]
    n = int(count)
    chips, rest = divmod(n, chip.cores_per_chip)
    shape = [2, 2] if chip.dims == 2 else [2, 2, 1]
    while math.prod(shape) < chips:
        last_min = max(i for i, s in enumerate(shape) if s == min(shape))
        shape[last_min] *= 2
    largest = 256 if chip.dims == 2 else 8960 * chip.cores_per_chip
    if chip.dims == 2 and chips == 1:
        shape = [1, 1]
    if rest or math.prod(shape) != chips or n > largest:
        sizes = [1, 4, 8, 16, 32, 64, 128, 256] if chip.dims == 2 else [8, 16, 32, 64, 128]
        raise SpecError(
            f"{name!r}: no {gen} slice of {n} "
            + ("chips" if chip.cores_per_chip == 1 else "TensorCores")
            + f" ({', '.join(f'{gen}-{s}' for s in sizes)}, ...)"
        )
    one_host = chips <= chip.max_chips_one_host
    per_host = (*shape, 1)[:3] if one_host else (2, 2, 1)
    # Wraparound ICI links close a ring where a whole torus dimension is present: a full v5e/v6e
    # pod (16x16) and v4/v5p axes of a slice that is a multiple of 4 chips on every axis (cubes).
    if chip.dims == 2:
        wrap = (chips == 256, chips == 256, False)
    else:
        cube = all(s % 4 == 0 for s in shape)
        wrap = (cube, cube, cube)
    return TpuSlice(name, chip, chips, tuple(shape), per_host, wrap)


_EXAMPLES = ("v4-8", "v5e-8", "v5p-64", "v6e-256")


def tpu_roofline(chip: TpuChip) -> Gpu:
    """A TPU chip in the roofline's terms: ICI as the link (one axis's ring, both directions),
    DCN between slices."""
    return Gpu(
        name=chip.name,
        memory_bytes=chip.usable_hbm_bytes,
        hbm_bytes_per_s=chip.hbm_bytes_per_s,
        peak_flops=chip.peak_flops,
        vector_flops=TPU_VECTOR_SHARE * chip.peak_flops,
        link_bytes_per_s=2 * chip.ici_link_bytes_per_s,
        dcn_bytes_per_s=chip.dcn_bytes_per_s,
    )
