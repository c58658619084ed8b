"""Whether the compiled train step fits the memory it will run in, checked before the first step.

XLA's estimate for the compiled step (arguments + outputs - donated aliases + temporaries, per
device) is compared with what is available: on GPU and TPU each device's free memory; on CPU the
host's, the least of MemAvailable, the cgroup's limit and the address-space limit (ulimit -v)
shared by this process's devices. A step that cannot fit is refused in one line naming the keys
that change it, instead of a RESOURCE_EXHAUSTED traceback from the first step; one that fails at
run time anyway (the estimate misses allocator fragmentation and libraries' own buffers) gets the
same line (`advice`).
"""

from __future__ import annotations

import resource

import jax
import ml_collections

from llmjax.config import ConfigError

GIB = 2**30


def step_bytes(compiled) -> int | None:
    """XLA's estimate of one device's peak for the compiled step, or None where there is none."""
    try:
        m = compiled.memory_analysis()
    except (NotImplementedError, jax.errors.JaxRuntimeError):
        return None
    if m is None:
        return None
    return (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cgroup_available() -> int | None:
    for limit, used in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    ):
        try:
            with open(limit) as f, open(used) as g:
                raw = f.read().strip()
                if raw == "max" or int(raw) >= 2**60:
                    return None
                return int(raw) - int(g.read().strip())
        except (OSError, ValueError):
            continue
    return None


def _address_space_available() -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        with open("/proc/self/status") as f:
            size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    except (OSError, StopIteration):
        size = 0
    return soft - size


def host_available() -> tuple[int, str] | None:
    """(bytes, what limits them) this process can still allocate on the host."""
    found = [
        (b, what)
        for b, what in (
            (_meminfo_available(), "available host memory"),
            (_cgroup_available(), "the cgroup's memory limit"),
            (_address_space_available(), "the address-space limit (ulimit -v)"),
        )
        if b is not None
    ]
    return min(found) if found else None


def device_available(device) -> tuple[int, str] | None:
    """(bytes free, what) on an accelerator, or the host's share on CPU."""
    if device.platform == "cpu":
        host = host_available()
        if host is None:
            return None
        n = len(jax.local_devices())
        return host[0] // n, host[1] + (f" / {n} devices" if n > 1 else "")
    stats = device.memory_stats() or {}
    if "bytes_limit" not in stats:
        return None
    return stats["bytes_limit"] - stats.get("bytes_in_use", 0), f"free on {device.device_kind}"


def advice(cfg: ml_collections.ConfigDict) -> str:
    """The keys that make a step smaller, with their values now."""
    d, o, m = cfg.data, cfg.optim, cfg.model
    remat = "" if m.remat == "full" else f" or set model.remat=full (now {m.remat})"
    return (
        f"lower data.batch_size (now {d.batch_size}), raise optim.grad_accum (now "
        f"{o.grad_accum}){remat}"
    )


def check_fits(compiled, cfg: ml_collections.ConfigDict) -> None:
    """Raises ConfigError when XLA's estimate for the step exceeds the memory available."""
    need = step_bytes(compiled)
    have = device_available(jax.local_devices()[0])
    if need is None or have is None or need <= have[0]:
        return
    raise ConfigError(
        f"the train step needs {need / GIB:,.2f} GiB per device (XLA's estimate) but "
        f"{have[0] / GIB:,.2f} GiB are free ({have[1]}); {advice(cfg)}"
    )


def is_out_of_memory(e: BaseException) -> bool:
    text = str(e)
    return isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in text or "Out of memory" in text
