"""See the GPU or TPU program before renting one: memory, FLOPs, bytes, kernels, collectives,
tokens/s.

    python -m llmjax.plan --config=configs/gpt2_124m.py --gpu=h100 [--devices=8] [--config.K=V]
        [--fit] [--fit_accum] [--decode] [--autotune_results=FILE] [--gpu_spec=FILE] [--dump=DIR]
        [--on_device]  # on a GPU machine: the same report for the real GPUs, to compare
    python -m llmjax.plan --config=configs/gpt2_124m.py --tpu=v5e-8 [--num_slices=2] [...]

Compiles the train step `llmjax.main` would run (same config checks, XLA flags, mesh, grad
accumulation; `model.attention=auto` resolved as on a GPU) for `--devices` compile-only GPUs
described by a GpuTargetConfigProto (llmjax/assets/gpu_specs/), on a machine with no GPU: XLA's
whole GPU pipeline runs (fusion, cuBLAS/cuDNN rewrites, SPMD partitioning, scheduling, buffer
assignment), only nothing executes. Needs the CUDA plugin, `jax[cuda12]`: `make plan-install`
sets up `.venv-plan` on a CPU machine. Prints a table, then one JSON object on the last line.
Memory, FLOPs and bytes are per device (an SPMD program is one device's share); tokens/s are
for all devices. The prediction is the roofline stated in roofline.py.

Without autotuning XLA gives Triton GEMMs a placeholder tiling, so GEMMs are compiled as cuBLAS
calls (`--xla_gpu_enable_triton_gemm=false`, cuBLAS picks its kernel at run time) unless
`--autotune_results` names results dumped on a real GPU (`--xla_gpu_dump_autotune_results_to`).

`--tpu=SLICE` (v4-N, v5e-N, v5p-N, v6e-N as Cloud TPU names them; `--num_slices=K` for K slices
joined by the data-center network) compiles the same step with libtpu's compiler for
compile-only TPU devices (`jax[tpu]`: `make plan-install-tpu` sets up `.venv-plan-tpu`). The chip
figures are roofline.TPU_CHIPS; FLOPs and bytes are read from the optimized HLO as for GPUs
(XLA's cost analysis misses the FLOPs in the TPU compiler's collective-matmul loops and in Pallas
kernels). A step that does not fit fails to compile on TPU; it is reported with `fits: false`
and the compiler's own figures, not as an error.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.resources
import importlib.util
import json
import math
import os
import re
import time

from absl import flags
from ml_collections import config_flags

from llmjax import config, xla_flags
from llmjax.plan import hlo_stats, roofline

GPUS = ("h100", "h200", "a100")
# jax's GPU client preallocates this fraction of device memory (XLA_PYTHON_CLIENT_MEM_FRACTION);
# a step whose peak exceeds it fails with RESOURCE_EXHAUSTED although the card has more.
DEFAULT_MEM_FRACTION = 0.75
FIT_MAX_BATCH = 1024  # per device; --fit stops doubling here

FLAGS = flags.FLAGS


def libtpu_available() -> bool:
    """Whether libtpu (jax[tpu]) is installed; deviceless TPU compiles need it."""
    return importlib.util.find_spec("libtpu") is not None


def quiet_libtpu(tpu_slice: roofline.TpuSlice, environ=None) -> None:
    """Without a TPU, libtpu warns at start-up that it cannot find one unless told the slice's
    accelerator type and that the workers are this host; values already set win. Only for
    compile-only devices: a real TPU VM has its own values."""
    environ = os.environ if environ is None else environ
    accelerator = tpu_slice.name.replace("v5e-", "v5litepod-")  # Cloud's name for v5e slices
    environ.setdefault("TPU_ACCELERATOR_TYPE", accelerator)
    environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # libtpu takes a lock file so that one process owns the chips; compiling owns none, and
    # several plans (the tests, a --fit in another shell) may run at once.
    environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def compile_only_tpu_devices(tpu_slice: roofline.TpuSlice, num_slices: int) -> list:
    """The devices of `num_slices` compile-only copies of `tpu_slice`, slice by slice."""
    from jax.experimental import topologies

    if not libtpu_available():
        raise config.ConfigError(
            "libtpu (jax[tpu]) is not installed: `make plan-install-tpu`, then "
            ".venv-plan-tpu/bin/python -m llmjax.plan ..."
        )
    topo = topologies.get_topology_desc(
        platform="tpu",
        topology_name=tpu_slice.topology_name,
        chip_config_name=tpu_slice.chip.chip_config,
        chips_per_host_bounds=tpu_slice.chips_per_host,
        num_slices=num_slices,
        wrap=tpu_slice.wrap,
    )
    return sorted(topo.devices, key=lambda d: (getattr(d, "slice_index", 0), d.id))


def slice_of(devices) -> list[int]:
    """Each device's slice (0 on a single slice), in the order given."""
    return [getattr(d, "slice_index", 0) for d in devices]


def _oom_figures(message: str) -> tuple[int, int] | None:
    """(required, available) bytes from libtpu's "Ran out of memory in memory space hbm" error."""
    sizes = re.findall(r"\(([0-9.]+)([KMGT])\)", message)
    if "RESOURCE_EXHAUSTED" not in message or len(sizes) < 2:
        return None
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    required, available = (int(float(v) * scale[u]) for v, u in (sizes[0], sizes[-1]))
    return required, available


def cuda_plugin_available() -> bool:
    """Whether jax's CUDA plugin (jax[cuda12]) is installed; deviceless compiles need it."""
    return xla_flags.cuda_plugin_installed()


def gpu_spec_text(gpu: str, spec_file: str | None = None) -> str:
    """The GpuTargetConfigProto text of a shipped GPU, or of `spec_file`."""
    if spec_file:
        try:
            with open(spec_file) as f:
                return f.read()
        except OSError as e:
            raise config.ConfigError(f"--gpu_spec={spec_file}: {e.strerror}") from e
    if gpu not in GPUS:
        raise config.ConfigError(f"--gpu={gpu} is not one of {', '.join(GPUS)} (or --gpu_spec)")
    return (
        importlib.resources.files("llmjax") / "assets" / "gpu_specs" / f"{gpu}.txtpb"
    ).read_text()


def planning_xla_flags(user_flags: str, autotune_results: str | None) -> str:
    """llmjax's GPU flags, plus cuBLAS GEMMs or the given autotune results; the user's win."""
    extra = ["--xla_gpu_enable_triton_gemm=false"]
    if autotune_results:
        extra = [f"--xla_gpu_load_autotune_results_from={os.path.abspath(autotune_results)}"]
    names = {f.split("=", 1)[0] for f in user_flags.split()}
    ours = [f for f in extra if f.split("=", 1)[0] not in names]
    return xla_flags.merged_xla_flags(" ".join([*user_flags.split(), *ours]))


def compile_only_devices(spec_text: str, n: int) -> list:
    """`n` compile-only GPUs in one host, described by `spec_text`."""
    from jax.experimental import topologies

    if not cuda_plugin_available():
        raise config.ConfigError(
            "the CUDA plugin (jax[cuda12]) is not installed: `make plan-install`, then "
            ".venv-plan/bin/python -m llmjax.plan ..."
        )
    try:
        # topology "P x H x D": partitions x hosts per partition x devices per host
        topo = topologies.get_topology_desc(
            platform="cuda", topology=f"1x1x{n}", target_config=spec_text
        )
    except Exception as e:  # XLA's parse error: one line, without the field's name
        raise config.ConfigError(f"GPU spec rejected by XLA: {str(e).splitlines()[0]}") from e
    return list(topo.devices)


def _usable_bytes(gpu: roofline.Gpu, platform: str) -> int:
    """Device memory a step may use: on a GPU jax's preallocated fraction of it; on a TPU what
    libtpu offers a program (roofline.TPU_CHIPS)."""
    if platform == "tpu":
        return gpu.memory_bytes
    fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", DEFAULT_MEM_FRACTION))
    return int(gpu.memory_bytes * fraction)


def _memory(compiled, usable: int) -> dict:
    from llmjax.sharding import peak_bytes

    m = compiled.memory_analysis()
    peak = peak_bytes(m)
    return {
        "arguments_bytes": m.argument_size_in_bytes,
        "outputs_bytes": m.output_size_in_bytes,
        "aliased_bytes": m.alias_size_in_bytes,
        "temp_bytes": m.temp_size_in_bytes,
        "xla_peak_bytes": m.peak_memory_in_bytes,
        "peak_memory_bytes": peak,
        "usable_memory_bytes": usable,
        "fits": peak <= usable,
        "margin_bytes": usable - peak,
    }


def _program(kernels: list[hlo_stats.Kernel], gpu: roofline.Gpu) -> dict:
    """FLOPs, bytes, launches, collectives and the roofline of one compiled step (per device)."""
    flops = collections.Counter()
    launches = collections.Counter()
    collectives: dict[str, dict] = {}
    for k in kernels:
        flops[k.category] += k.flops * k.launches
        launches[k.kind] += k.launches
        if k.category == "collective":
            c = collectives.setdefault(
                k.kind + (" over DCN" if k.dcn else ""), {"count": 0, "bytes": 0}
            )
            c["count"] += k.launches
            c["bytes"] += int(k.bytes * k.launches)
    compute = [k for k in kernels if k.category != "collective"]
    heaviest = sorted(compute, key=lambda k: k.bytes * k.launches, reverse=True)[:5]
    pred = roofline.predict(kernels, gpu)
    return {
        "flops_per_step": sum(flops.values()),
        "flops": {c: flops[c] for c in ("gemm", "attention", "other")},
        "hbm_bytes_per_step": int(sum(k.bytes * k.launches for k in compute)),
        "kernel_launches": sum(k.launches for k in compute),
        "launches_by_kind": dict(launches.most_common()),
        "collectives": collectives,
        "heaviest_kernels": [
            {
                "name": k.name,
                "kind": k.kind,
                "bytes": int(k.bytes * k.launches),
                "launches": k.launches,
            }
            for k in heaviest
        ],
        "predicted_seconds": {
            **{c: round(s, 6) for c, s in pred.seconds_by_category.items()},
            "no_overlap": pred.no_overlap_seconds,
            "overlapped": pred.overlapped_seconds,
        },
    }


def _compile(jitted, args, static=(), options=None) -> tuple:
    t0 = time.perf_counter()
    compiled = jitted.trace(*static, *args).lower().compile(options)
    return compiled, time.perf_counter() - t0


def _dump(dump: str | None, name: str, compiled) -> None:
    if dump:
        os.makedirs(dump, exist_ok=True)
        with open(os.path.join(dump, f"{name}.after_optimizations.hlo"), "w") as f:
            f.write(compiled.as_text())


def plan_train(cfg, devices: list, gpu: roofline.Gpu, dump: str | None = None) -> dict:
    """Compiles the train step of `cfg` for `devices` and reports its program and prediction."""
    import jax

    from llmjax import batches, optim, sharding, train
    from llmjax.model import flops_per_token

    # The objective main would train (a DPO config's pairs and reference log-probs included).
    run = train.build(cfg, batches.objective(cfg, batches.resolve_kind(cfg)), devices)
    B, T = cfg.data.batch_size, cfg.data.seq_len
    n_params = sum(math.prod(p.shape) for p in jax.tree.leaves(run.abstract_state.params))
    tokens = train.step_tokens(run)
    hand = flops_per_token(run.model_cfg, n_params, T) * tokens / len(devices)
    # Muon orthogonalises every matrix on every replica: GEMM FLOPs the hand count lacks.
    ns = optim.newton_schulz_flops(run.abstract_state.params) if cfg.optim.name == "muon" else 0.0
    report = {
        "gpu": gpu.name,
        "devices": len(devices),
        "mesh": dict(run.mesh.shape),
        "batch_size": B,
        "seq_len": T,
        "grad_accum": cfg.optim.grad_accum,
        "attention": run.model_cfg.attention,
        "params": n_params,
    }
    # The batch exactly as main feeds it (a DPO config's pairs and reference log-probs included).
    try:
        compiled, seconds = _compile(run.train_step, (run.abstract_state, run.batch_spec))
    except jax.errors.JaxRuntimeError as e:
        # libtpu refuses a program larger than HBM at compile time: that is the answer.
        oom = _oom_figures(str(e))
        if oom is None or devices[0].platform != "tpu":
            raise
        required, available = oom
        return {
            **report,
            "state_bytes": sharding.bytes_per_device(run.abstract_state),
            "peak_memory_bytes": required,
            "usable_memory_bytes": available,
            "fits": False,
            "margin_bytes": available - required,
            "compiler_error": str(e).splitlines()[0][:300],
            "flops_hand_6N_6LDT": hand,
        }
    _dump(dump, "train_step", compiled)
    slices = slice_of(run.mesh.devices.flat)  # partition id -> slice, for DCN collectives
    # Over several slices the compiled program is one slice's (its collectives' groups name the
    # slice's devices); what crosses slices is megascale send/recv (hlo_stats).
    per_program = len(devices) // len(set(slices))
    kernels = hlo_stats.kernels(compiled.as_text(), per_program, slices)
    report.update(
        {
            "compile_seconds": round(seconds, 2),
            "state_bytes": sharding.bytes_per_device(run.abstract_state),
            **_memory(compiled, _usable_bytes(gpu, devices[0].platform)),
            **_program(kernels, gpu),
            "flops_hand_6N_6LDT": hand,
            "flops_newton_schulz": ns,
        }
    )
    step = report["predicted_seconds"]["no_overlap"]
    # 6N+6LDT counts matmuls only: compare it with GEMMs + attention, not the elementwise rest.
    report["flops_ratio_to_hand"] = (report["flops"]["gemm"] + report["flops"]["attention"]) / (
        hand + ns
    )
    report["predicted_step_seconds"] = step
    report["predicted_tokens_per_sec"] = tokens / step
    report["predicted_tokens_per_sec_overlapped"] = (
        tokens / report["predicted_seconds"]["overlapped"]
    )
    report["predicted_mfu"] = hand / (step * gpu.peak_flops)
    return report


def plan_decode(
    cfg, device, gpu: roofline.Gpu, batch: int, context: int, chunk: int, dump: str | None = None
) -> dict:
    """Compiles llmjax.sample's decode step (`chunk` tokens per dispatch) on one device."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from llmjax import sample
    from llmjax.model import GPT, model_config

    model_cfg = model_config(cfg, "tpu" if device.platform == "tpu" else "gpu")
    model = nnx.eval_shape(lambda: GPT(model_cfg, nnx.Rngs(0)))
    graphdef, params = nnx.split(model)
    on_device = jax.sharding.SingleDeviceSharding(device)
    place = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=on_device)
    arg = lambda shape, dtype: place(jax.ShapeDtypeStruct(shape, dtype))
    args = jax.tree.map(
        place,
        (
            params,
            arg((batch, 1), jnp.int32),  # toks_BK
            jax.eval_shape(lambda: model.init_cache(batch, context)),
            arg((), jnp.int32),  # pos
            arg((batch, context), jnp.int32),  # prompt_BS
            arg((batch,), jnp.int32),  # lengths_B
            jax.eval_shape(lambda: jax.random.key(0)),
            arg((), jnp.float32),  # temperature
            arg((), jnp.int32),  # top_k
            arg((), jnp.float32),  # top_p
        ),
    )
    # The exact program `llmjax.sample` dispatches for each chunk of new tokens.
    # Top-k/top-p sort the vocabulary; sizing CUB's radix sort needs a CUDA runtime, so XLA's own
    # sort kernel stands in for it here (slower: the prediction errs on the slow side).
    options = {"xla_gpu_enable_cub_radix_sort": False} if device.platform == "gpu" else None
    compiled, seconds = _compile(sample.decode_chunk, args, (graphdef, chunk), options)
    _dump(dump, "decode_step", compiled)
    report = {
        "decode_batch": batch,
        "decode_context": context,
        "decode_chunk": chunk,
        "compile_seconds": round(seconds, 2),
        **_memory(compiled, _usable_bytes(gpu, device.platform)),
        **_program(hlo_stats.kernels(compiled.as_text(), 1), gpu),
    }
    step = report["predicted_seconds"]["no_overlap"]
    report["predicted_tokens_per_sec"] = batch * chunk / step
    return report


def fit_batch(cfg, devices: list, gpu: roofline.Gpu, on_try) -> dict | None:
    """The largest per-device micro-batch that fits, to within 1/8 (see `largest_fitting`).

    `on_try(report)` sees every compiled size; returns the report of the largest that fits.
    """
    from llmjax import sharding

    data, fsdp, _ = sharding.mesh_shape(cfg.mesh, len(devices), sharding.slice_count(devices))
    reports = {}

    def attempt(per_device: int) -> tuple[bool, int, int]:
        cfg.data.batch_size = per_device * data * fsdp * cfg.optim.grad_accum
        r = reports[per_device] = plan_train(cfg, devices, gpu)
        on_try(r)
        return r["fits"], r["peak_memory_bytes"], r["usable_memory_bytes"]

    best = largest_fitting(attempt)
    return reports[best] if best else None


def largest_fitting(attempt, limit: int = FIT_MAX_BATCH) -> int:
    """The largest size n <= limit with attempt(n) fitting, to within max(1, n // 8); 0 if 1 does
    not fit. attempt(n) -> (fits, peak bytes, usable bytes) compiles once, which takes minutes for
    a 48-layer model on a small machine, so sizes are guessed, not doubled: peak memory is close to
    affine in the batch, and the line through the last two compiles predicts where it meets the
    usable memory (1, 2, then typically the answer and one size 1/8 above it)."""
    seen: list[tuple[int, int]] = []
    lo, hi, size = 0, None, 1
    while True:
        fits, peak, usable = attempt(size)
        seen.append((size, peak))
        lo, hi = (size, hi) if fits else (lo, size)
        step = max(1, lo // 8)
        if lo == 0 or lo >= limit or (hi is not None and hi - lo <= step):
            return lo
        if len(seen) < 2:
            size = 2
            continue
        (s1, p1), (s2, p2) = sorted(seen[-2:])
        slope = (p2 - p1) / (s2 - s1)
        guess = int(s2 + (usable - p2) // slope) if slope > 0 else 2 * lo
        # Always move the bracket: past lo by the precision wanted, short of a size that failed.
        size = min(max(guess, lo + step), limit if hi is None else hi - 1)


def fit_accum(cfg, devices: list, gpu: roofline.Gpu, on_try) -> dict | None:
    """The smallest grad_accum dividing data.batch_size at which the step fits."""
    for accum in (a for a in range(1, cfg.data.batch_size + 1) if cfg.data.batch_size % a == 0):
        cfg.optim.grad_accum = accum
        try:
            config.validate(cfg)
            report = plan_train(cfg, devices, gpu)
        except config.ConfigError:
            continue  # e.g. micro-batch not divisible by the devices
        on_try(report)
        if report["fits"]:
            return report
    return None


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def table(r: dict) -> str:
    """The human-readable report of one compiled train step."""
    mesh = " x ".join(f"{k}={v}" for k, v in r["mesh"].items())
    target = f"{r['gpu']} x {r['devices']}"
    if "tpu" in r:
        slices = f"{r['num_slices']} x {r['tpu']}" if r["num_slices"] > 1 else r["tpu"]
        target += f" ({slices}, {r['hosts']} host{'s' if r['hosts'] > 1 else ''})"
    head = (
        f"{target}  mesh {mesh}  batch {r['batch_size']} x {r['seq_len']}"
        f"  grad_accum {r['grad_accum']}  attention {r['attention']}"
    )
    if "compiler_error" in r:  # a TPU step larger than HBM: the compiler's figures only
        return (
            f"{head}\nmemory per device  needs {_gb(r['peak_memory_bytes'])} of "
            f"{_gb(r['usable_memory_bytes'])} usable: DOES NOT FIT ({r['compiler_error']})"
        )
    p, f = r["predicted_seconds"], r["flops"]
    rows = [
        head,
        f"compile            {r['compile_seconds']:.1f} s",
        "memory per device  "
        f"arguments {_gb(r['arguments_bytes'])}, temporaries {_gb(r['temp_bytes'])}, "
        f"peak {_gb(r['peak_memory_bytes'])} of {_gb(r['usable_memory_bytes'])} usable: "
        + ("fits" if r["fits"] else "DOES NOT FIT")
        + f" (margin {_gb(r['margin_bytes'])})",
        f"FLOPs per device   {f['gemm'] / 1e12:.3f} T GEMM + {f['attention'] / 1e12:.3f} T "
        f"attention + {f['other'] / 1e12:.3f} T rest = {r['flops_per_step'] / 1e12:.3f} T; "
        f"6N+6LDT {r['flops_hand_6N_6LDT'] / 1e12:.3f} T"
        + (
            f" + Newton-Schulz {r['flops_newton_schulz'] / 1e12:.3f} T"
            if r["flops_newton_schulz"]
            else ""
        )
        + f" (GEMM + attention {r['flops_ratio_to_hand']:.3f}x)",
        f"HBM bytes          {_gb(r['hbm_bytes_per_step'])} per device per step",
        f"kernel launches    {r['kernel_launches']}: "
        + ", ".join(f"{n} {k}" for k, n in r["launches_by_kind"].items()),
        "collectives        "
        + (
            ", ".join(f"{c['count']} {k} ({_gb(c['bytes'])})" for k, c in r["collectives"].items())
            or "none"
        ),
        "heaviest kernels   "
        + "; ".join(f"{k['name']} ({k['kind']}) {_gb(k['bytes'])}" for k in r["heaviest_kernels"]),
        f"predicted step     {p['gemm'] * 1e3:.1f} ms GEMM + {p['attention'] * 1e3:.1f} ms "
        f"attention + {p['other'] * 1e3:.1f} ms rest + {p['collective'] * 1e3:.1f} ms "
        f"collectives = {p['no_overlap'] * 1e3:.1f} ms ({p['overlapped'] * 1e3:.1f} ms with "
        "collectives fully overlapped)",
        f"predicted          {r['predicted_tokens_per_sec']:,.0f} tokens/s "
        f"({r['predicted_tokens_per_sec_overlapped']:,.0f} overlapped), "
        f"MFU {r['predicted_mfu']:.1%}",
    ]
    return "\n".join(rows)


def _model_statement(tpu: bool = False) -> dict:
    link = "NVLink"
    if tpu:  # the GPU-calibrated efficiencies, unmeasured on TPU (roofline.py)
        link = "ICI (one axis, both directions) within a slice, DCN per chip between slices"
    return {
        "model": "per kernel max(flops/(eff*peak), bytes/(eff_hbm*HBM), min_kernel); "
        f"collectives ring at eff_link*{link}; no overlap and fully overlapped",
        "eff_gemm": roofline.EFF_GEMM,
        "eff_attention": roofline.EFF_ATTENTION,
        "eff_hbm": roofline.EFF_HBM,
        "eff_vector": roofline.EFF_VECTOR,
        "eff_link": roofline.EFF_LINK,
        "min_kernel_seconds": roofline.MIN_KERNEL_SECONDS,
    }


@dataclasses.dataclass(frozen=True)
class Options:
    """The command line's choices besides the config (see define_flags)."""

    gpu: str = "h100"
    tpu: str | None = None  # a Cloud TPU slice name; compiles for TPUs instead of --gpu
    num_slices: int = 1
    gpu_spec: str | None = None
    devices: int = 1
    on_device: bool = False
    fit: bool = False
    fit_accum: bool = False
    decode: bool = False
    decode_batch: int = 1
    decode_context: int = 0
    decode_chunk: int = 8
    dump: str | None = None


def _target(opts: Options) -> tuple[roofline.Gpu, list, dict]:
    """The roofline's chip, the devices to compile for, and the report keys naming the target."""
    if opts.tpu:
        tpu_slice = _tpu_slice(opts.tpu)
        if opts.num_slices < 1:
            raise config.ConfigError(f"--num_slices={opts.num_slices} must be >= 1")
        if opts.on_device:  # on the TPU VM itself: the same report for its real chips
            import jax

            devices = jax.devices()
            want = tpu_slice.chips * opts.num_slices
            if len(devices) != want or devices[0].platform != "tpu":
                raise config.ConfigError(f"--on_device: {want} TPU chips expected, {devices} found")
        else:
            devices = compile_only_tpu_devices(tpu_slice, opts.num_slices)
        hosts = tpu_slice.hosts * opts.num_slices
        return (
            roofline.tpu_roofline(tpu_slice.chip),
            devices,
            {
                "tpu": tpu_slice.name,
                "num_slices": opts.num_slices,
                "hosts": hosts,
            },
        )
    spec = gpu_spec_text(opts.gpu, opts.gpu_spec)
    try:
        gpu = roofline.parse_gpu(spec)
    except roofline.SpecError as e:
        raise config.ConfigError(f"GPU spec {opts.gpu_spec or opts.gpu}: {e}") from e
    if opts.devices < 1:
        raise config.ConfigError(f"--devices={opts.devices} must be >= 1")
    if opts.on_device:
        import jax

        devices = jax.devices()[: opts.devices]
        if len(devices) < opts.devices or devices[0].platform != "gpu":
            raise config.ConfigError(f"--on_device: {opts.devices} GPUs asked, {devices} found")
    else:
        devices = compile_only_devices(spec, opts.devices)
    return gpu, devices, {}


def _tpu_slice(name: str) -> roofline.TpuSlice:
    try:
        return roofline.tpu_slice(name)
    except roofline.SpecError as e:
        raise config.ConfigError(f"--tpu={name}: {e}") from e


def run(cfg, opts: Options) -> None:
    """Everything after the flags: prints the table(s), then the JSON object."""
    from llmjax.model import model_config

    config.validate(cfg)
    if cfg.model.attention == "auto":  # as the target would resolve it, not this CPU
        cfg.model.attention = model_config(cfg, "tpu" if opts.tpu else "gpu").attention
    gpu, devices, target = _target(opts)
    show = lambda r: print(table(r) + "\n", flush=True)
    if opts.fit or opts.fit_accum:
        search = fit_batch if opts.fit else fit_accum
        report = search(cfg, devices, gpu, lambda r: show({**r, **target}))
        if report is None:
            raise config.ConfigError(f"no size tried fits {gpu.name} x {len(devices)}")
        print(
            f"largest that fits: batch_size={report['batch_size']} "
            f"grad_accum={report['grad_accum']}"
        )
    else:
        report = plan_train(cfg, devices, gpu, opts.dump)
        show({**report, **target})
    if opts.decode:
        context = opts.decode_context or cfg.model.block_size
        decode = plan_decode(
            cfg, devices[0], gpu, opts.decode_batch, context, opts.decode_chunk, opts.dump
        )
        print(
            f"decode             batch {decode['decode_batch']}, cache {context}, "
            f"{decode['kernel_launches']} launches and {_gb(decode['hbm_bytes_per_step'])} per "
            f"{opts.decode_chunk} tokens: {decode['predicted_tokens_per_sec']:,.0f} tokens/s "
            f"predicted (peak memory {_gb(decode['peak_memory_bytes'])})"
        )
        report["decode"] = decode
    import jax

    flags_used = {"xla_flags": os.environ.get("XLA_FLAGS", "")}
    if opts.tpu:
        flags_used = {"libtpu_init_args": os.environ.get("LIBTPU_INIT_ARGS", "")}
    report.update(target)
    report.update(jax=jax.__version__, **flags_used, **_model_statement(bool(opts.tpu)))
    print(json.dumps(report))


def main(argv: list[str]) -> None:
    del argv
    # Before any backend starts: the CPU is the only real platform here (the CUDA plugin's
    # start-up check would look for a driver), and XLA reads its flags once.
    if FLAGS.tpu:
        if not FLAGS.on_device:
            quiet_libtpu(_tpu_slice(FLAGS.tpu))
        os.environ["LIBTPU_INIT_ARGS"] = xla_flags.merged_libtpu_args(
            os.environ.get("LIBTPU_INIT_ARGS", "")
        )
    else:
        os.environ["XLA_FLAGS"] = planning_xla_flags(
            os.environ.get("XLA_FLAGS", ""), FLAGS.autotune_results
        )
    if not FLAGS.on_device:
        import jax

        os.environ["JAX_PLATFORMS"] = "cpu"
        jax.config.update("jax_platforms", "cpu")
    opts = Options(
        gpu=FLAGS.gpu,
        tpu=FLAGS.tpu,
        num_slices=FLAGS.num_slices,
        gpu_spec=FLAGS.gpu_spec,
        devices=FLAGS.devices,
        on_device=FLAGS.on_device,
        fit=FLAGS.fit,
        fit_accum=FLAGS.fit_accum,
        decode=FLAGS.decode,
        decode_batch=FLAGS.decode_batch,
        decode_context=FLAGS.decode_context,
        decode_chunk=FLAGS.decode_chunk,
        dump=FLAGS.dump,
    )
    run(FLAGS.config, opts)  # a ConfigError is one line, exit code 2 (errors.run)


def define_flags() -> None:
    # Defined only when run as a program, so importing this module (the tests do) never clashes
    # with another entry point's flags.
    config_flags.DEFINE_config_file("config", None, "config file (configs/*.py)", lock_config=True)
    flags.DEFINE_string("gpu", "h100", f"one of {', '.join(GPUS)} (ignored with --gpu_spec)")
    flags.DEFINE_string("tpu", None, "a Cloud TPU slice (v4-8, v5e-8, v5p-64, v6e-256; not --gpu)")
    flags.DEFINE_integer("num_slices", 1, "TPU slices joined by the data-center network (--tpu)")
    flags.DEFINE_string("gpu_spec", None, "a GpuTargetConfigProto text file describing another GPU")
    flags.DEFINE_integer("devices", 1, "GPUs in one host; the mesh comes from the config's mesh.*")
    flags.DEFINE_string("autotune_results", None, "XLA autotune results dumped on the real GPU")
    flags.DEFINE_bool("fit", False, "find the largest per-device batch that fits, at grad_accum")
    flags.DEFINE_bool(
        "fit_accum", False, "find the smallest grad_accum at which data.batch_size fits"
    )
    flags.DEFINE_bool("decode", False, "also compile the KV-cache decode step of llmjax.sample")
    flags.DEFINE_integer("decode_batch", 1, "sequences sampled at once (--decode)")
    flags.DEFINE_integer("decode_context", 0, "KV-cache length (--decode); 0 = model.block_size")
    flags.DEFINE_integer("decode_chunk", 8, "decode steps per dispatch, as llmjax.sample runs them")
    flags.DEFINE_bool("on_device", False, "compile for this machine's real GPUs/TPUs (to compare)")
    flags.DEFINE_string("dump", None, "directory for the optimized HLO text of each compiled step")
    flags.mark_flags_as_required(["config"])
