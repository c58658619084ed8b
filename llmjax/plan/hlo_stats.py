"""What an optimized GPU HLO module launches: kernels with their FLOPs and HBM bytes, collectives.

`compiled.cost_analysis()` is None for a compile-only GPU executable, and XLA's generic cost
analysis sees neither inside cuBLAS/cuDNN custom calls (they carry only their shapes) nor through
while loops (a body counts once). So the optimized HLO text is read here: every instruction that
launches work (a fusion, a custom call, a copy, a collective), in the entry computation and in
the computations it runs (while bodies, conditional branches, command-buffer calls), with its
launches per step = the product of the known trip counts of the loops around it.

FLOPs: 2*M*N*K per GEMM (cuBLAS, or a dot inside a fusion); cuDNN flash attention 4*B*N*T*S*H
forward and 10*B*N*T*S*H backward (it recomputes the scores), halved for a causal mask, which
the kernel skips; one FLOP per element for each arithmetic op in a fusion and per input element
of a reduce. Bytes: every operand read plus every result written, except that a fusion operand
read only through dynamic-slice counts at the slice's size and one updated in place through
dynamic-update-slice counts at the update's size (the layer and micro-batch loops do both).
Static and per device: an SPMD program is one device's share.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator

ITEMSIZE = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
    "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5,
    "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e8m0fnu": 1, "token": 0,
}  # fmt: skip

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

# Instructions that launch nothing: structure, aliasing, or the second half of an async pair.
_NO_LAUNCH = {
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
    "add-dependency", "partition-id", "replica-id", "opt-barrier", "while", "conditional",
    "call", "domain", "async-update", "async-done", "send-done", "recv-done",
}  # fmt: skip

# One FLOP per result element (XLA's HloCostAnalysis counts these the same way).
_ARITHMETIC = {
    "add", "subtract", "multiply", "divide", "maximum", "minimum", "negate", "abs", "power",
    "exponential", "exponential-minus-one", "log", "log-plus-one", "tanh", "logistic", "rsqrt",
    "sqrt", "cbrt", "erf", "remainder", "atan2", "sine", "cosine",
}  # fmt: skip

_FUSION_KINDS = {"input": "reduction"}  # XLA calls a fusion rooted in a reduction "input"

_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One launching instruction; `flops` and `bytes` are per launch."""

    name: str
    kind: str  # "cublas gemm", "triton gemm", "cudnn attention", "loop fusion", "all-reduce", ...
    flops: float
    bytes: float  # HBM: operands read + results written; for collectives, the message size
    launches: int = 1  # per step: the product of the trip counts of the loops around it
    group: int = 1  # collectives: devices taking part

    @property
    def category(self) -> str:
        """gemm | attention | collective | other: the four lines of the roofline."""
        if self.kind in COLLECTIVES:
            return "collective"
        if self.kind.endswith("gemm"):
            return "gemm"
        if self.kind.endswith("attention"):
            return "attention"
        return "other"


@dataclasses.dataclass(frozen=True)
class _Inst:
    name: str
    shape: str  # "f32[16,1024]{1,0}" or a tuple "(bf16[...], s8[...])"
    opcode: str
    operands: tuple[str, ...]
    args: str  # the text inside the parentheses: operand names, or a parameter's index
    attrs: str  # everything after the operand list
    root: bool


def arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype, dims) of every array in a shape, tuples flattened."""
    return [
        (t, tuple(int(d) for d in dims.split(",") if d))
        for t, dims in _ARRAY.findall(shape)
        if t in ITEMSIZE
    ]


def shape_bytes(shape: str) -> float:
    return sum(ITEMSIZE[t] * math.prod(dims) for t, dims in arrays(shape))


def _elements(shape: str) -> int:
    return sum(math.prod(dims) for _, dims in arrays(shape))


def _balanced(text: str, start: int) -> int:
    """Index just past the bracket group opening at text[start]."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, "{": 1, ")": -1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return i + 1
    raise ValueError(f"unbalanced brackets: {text[start : start + 80]!r}")


def _parse_inst(line: str) -> _Inst | None:
    m = re.match(r"\s*(ROOT\s+)?%([\w.\-]+)\s*=\s*", line)
    if not m:
        return None
    rest = line[m.end() :]
    end = _balanced(rest, 0) if rest.startswith("(") else rest.index(" ")
    shape, rest = rest[:end], rest[end:].lstrip()
    op = re.match(r"([\w\-]+)\(", rest)
    if not op:
        return None
    close = _balanced(rest, op.end() - 1)
    args = re.sub(r"/\*.*?\*/", "", rest[op.end() : close - 1])
    names = tuple(re.findall(r"%([\w.\-]+)", args))
    return _Inst(m.group(2), shape, op.group(1), names, args, rest[close:], bool(m.group(1)))


def parse_module(text: str) -> tuple[dict[str, list[_Inst]], str]:
    """Computation name -> its instructions, and the entry computation's name."""
    comps: dict[str, list[_Inst]] = {}
    current, entry = None, ""
    for line in text.splitlines():
        header = re.match(r"(ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$", line)
        if header and not line[0].isspace():
            current = header.group(2)
            comps[current] = []
            entry = current if header.group(1) else entry
        elif line.startswith("}"):
            current = None
        elif current is not None and (inst := _parse_inst(line)):
            comps[current].append(inst)
    if not entry:
        raise ValueError("no ENTRY computation in the HLO text")
    return comps, entry


def _attr(name: str, attrs: str) -> str | None:
    m = re.search(rf"\b{name}=%?([\w.\-$]+)", attrs)
    return m.group(1) if m else None


def _json_ints(key: str, attrs: str) -> list[int]:
    """A list of integers from the backend_config JSON, e.g. "lhs_contracting_dimensions"."""
    m = re.search(rf'"{key}"\s*:\s*(?:\{{[^}}]*?"dimensions"\s*:\s*)?\[([^\]]*)\]', attrs)
    return [int(x) for x in re.findall(r"\d+", m.group(1))] if m else []


def _group_size(attrs: str, devices: int) -> int:
    """Devices per replica group: {{0,1},{2,3}} -> 2; iota form [G,S]<=[...] -> S; mesh form
    mesh['axis_0'=4,'axis_1'=2] {'axis_1'} -> the product of the named axes' sizes (a sub-axis,
    'axis_0':(1)2, by its own size); {} -> all."""
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attrs)
    if iota:
        return int(iota.group(2))
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\S+)? \{([^}]*)\}", attrs)
    if mesh:
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", mesh.group(1)))
        group = 1
        for axis in mesh.group(2).split(","):
            name, _, sub_axis = axis.replace("'", "").strip().partition(":")
            group *= int(sub_axis.split(")")[1]) if sub_axis else int(sizes[name])
        return group
    listed = re.search(r"replica_groups=\{\{([^}]*)\}", attrs)
    if listed:
        return len(listed.group(1).split(","))
    pairs = re.search(r"source_target_pairs=\{([^=]*)\}", attrs)  # collective-permute
    return 2 if pairs else devices


_TRIP_COUNT = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')


def _callees(inst: _Inst) -> list[tuple[str, int]]:
    """Computations run as a sequence of kernels by a control-flow instruction, with their runs."""
    if inst.opcode == "while":
        trips = _TRIP_COUNT.search(inst.attrs)
        return [(_attr("body", inst.attrs), int(trips.group(1)) if trips else 1)]
    if inst.opcode == "call":  # command buffers wrap runs of kernels in calls
        return [(_attr("to_apply", inst.attrs), 1)]
    if inst.opcode == "conditional":
        # Every branch counted: an upper bound (which one runs is decided on the device).
        branches = re.search(r"branch_computations=\{([^}]*)\}", inst.attrs)
        names = re.findall(r"%([\w.\-]+)", branches.group(1)) if branches else []
        names += [_attr(k, inst.attrs) for k in ("true_computation", "false_computation")]
        return [(name, 1) for name in names if name]
    return []


class _Module:
    def __init__(self, text: str, devices: int):
        self.comps, self.entry = parse_module(text)
        self.shape = {i.name: i.shape for insts in self.comps.values() for i in insts}
        self.devices = devices

    def operand_shapes(self, inst: _Inst) -> list[str]:
        return [self.shape.get(o, "") for o in inst.operands]

    def schedule(self) -> Iterator[tuple[_Inst, int]]:
        """Every instruction that runs, with its runs per step (loop trip counts multiplied)."""
        todo = [(self.entry, 1)]
        while todo:
            comp, runs = todo.pop()
            for inst in self.comps.get(comp, []):
                yield inst, runs
                todo += [(callee, runs * times) for callee, times in _callees(inst)]

    def fused_flops(self, comp: str) -> tuple[float, float]:
        """(dot FLOPs, elementwise FLOPs) of a fused computation, nested fusions included."""
        dots = rest = 0.0
        for inst in self.comps.get(comp, []):
            if inst.opcode == "dot":
                lhs = arrays(self.shape.get(inst.operands[0], ""))[0][1]
                contracting = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", inst.attrs)
                k = math.prod(lhs[int(d)] for d in contracting.group(1).split(",") if d)
                dots += 2.0 * _elements(inst.shape) * k
            elif inst.opcode in _ARITHMETIC:
                rest += _elements(inst.shape)
            elif inst.opcode == "reduce":
                rest += _elements(self.shape.get(inst.operands[0], ""))
            callee = _attr("calls", inst.attrs)
            if callee:
                inner = self.fused_flops(callee)
                dots, rest = dots + inner[0], rest + inner[1]
        return dots, rest

    def fusion_bytes(self, inst: _Inst, comp: str) -> float:
        body = self.comps.get(comp, [])
        users: dict[str, list[tuple[_Inst, int]]] = {}
        for user in body:
            for position, operand in enumerate(user.operands):
                users.setdefault(operand, []).append((user, position))
        read = 0.0
        for param in (i for i in body if i.opcode == "parameter"):
            full = shape_bytes(self.shape.get(inst.operands[int(param.args)], ""))
            uses = users.get(param.name, [])
            if uses and all(u.opcode == "dynamic-slice" and pos == 0 for u, pos in uses):
                read += min(full, sum(shape_bytes(u.shape) for u, _ in uses))
            elif not (uses and all(u.opcode == "dynamic-update-slice" and p == 0 for u, p in uses)):
                read += full  # an in-place update reads (and writes) only the update
        root = next((i for i in body if i.root), None)
        outs = [root] if root and root.opcode != "tuple" else []
        if root and root.opcode == "tuple":
            outs = [i for i in body if i.name in root.operands]
        written = sum(
            shape_bytes(self.shape.get(o.operands[1], ""))
            if o.opcode == "dynamic-update-slice"
            else shape_bytes(o.shape)
            for o in outs
        )
        return read + written if outs else read + shape_bytes(inst.shape)

    def kernel(self, inst: _Inst, runs: int) -> Kernel | None:
        op = inst.opcode
        if op in _NO_LAUNCH or op.endswith("-done"):
            return None
        base = op.removesuffix("-start")
        if op == "async-start":  # e.g. a reduce-scatter wrapped to run on another stream
            wrapped = self.comps.get(_attr("calls", inst.attrs), [])
            inner = next((i for i in wrapped if i.root), None)
            if inner is None:
                return None
            base, inst = inner.opcode, dataclasses.replace(inner, name=inst.name)
        if base in COLLECTIVES:
            # The message is the whole buffer: all-gather's result, the others' input.
            group = _group_size(inst.attrs, self.devices)
            size = shape_bytes(self._operands_str(inst)) * (group if base == "all-gather" else 1)
            return Kernel(inst.name, base, 0.0, size, runs, group)
        io = shape_bytes(self._operands_str(inst)) + shape_bytes(inst.shape)
        if op == "fusion":
            comp = _attr("calls", inst.attrs)
            dots, rest = self.fused_flops(comp)
            kind = re.search(r"kind=k(\w+)", inst.attrs).group(1).lower()
            name = "triton gemm" if dots else f"{_FUSION_KINDS.get(kind, kind)} fusion"
            return Kernel(inst.name, name, dots + rest, self.fusion_bytes(inst, comp), runs)
        if op == "custom-call":
            target = _attr("custom_call_target", inst.attrs.replace('"', "")) or ""
            results = arrays(inst.shape)
            if "cublas" in target or target.startswith("__cudnn$gemm"):
                # The result tuple ends in a cuBLAS workspace, scratch rather than traffic.
                out = results[0][1]
                lhs = arrays(self.shape.get(inst.operands[0], ""))[0][1]
                k = math.prod(lhs[d] for d in _json_ints("lhs_contracting_dimensions", inst.attrs))
                flops = 2.0 * math.prod(out) * k
                io = shape_bytes(self._operands_str(inst)) + ITEMSIZE[results[0][0]] * math.prod(
                    out
                )
                return Kernel(inst.name, "cublas gemm", flops, io, runs)
            if target.startswith("__cudnn$fmha"):
                scores_BNTS = _json_ints("intermediate_tensor_shape", inst.attrs)
                head_dim = arrays(self.shape.get(inst.operands[0], ""))[0][1][-1]
                per_score = 10 if "Backward" in target else 4
                causal = 0.5 if '"mask_type": "CAUSAL"' in inst.attrs else 1.0
                flops = per_score * math.prod(scores_BNTS) * head_dim * causal
                return Kernel(inst.name, "cudnn attention", flops, io, runs)
            return Kernel(inst.name, f"custom-call {target}", 0.0, io, runs)
        return Kernel(inst.name, op, 0.0, io, runs)

    def _operands_str(self, inst: _Inst) -> str:
        return " ".join(self.operand_shapes(inst))


def kernels(hlo_text: str, devices: int = 1) -> list[Kernel]:
    """The kernels of an optimized HLO module, in no particular order (see the module docstring).

    `devices`: the SPMD partition count, the group size of a collective over all devices.
    """
    module = _Module(hlo_text, devices)
    found = (module.kernel(inst, runs) for inst, runs in module.schedule())
    return [k for k in found if k is not None]
