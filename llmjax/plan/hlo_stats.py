"""What an optimized GPU HLO module launches: kernels with their FLOPs and HBM bytes, collectives.

`compiled.cost_analysis()` is None for a compile-only GPU executable, and XLA's generic cost
analysis sees neither inside cuBLAS/cuDNN custom calls (they carry only their shapes) nor through
while loops (a body counts once). So the optimized HLO text is read here: every instruction that
launches work (a fusion, a custom call, a copy, a collective), in the entry computation and in
the computations it runs (while bodies, conditional branches, command-buffer calls), with its
launches per step = the product of the known trip counts of the loops around it.

FLOPs: 2*M*N*K per GEMM (cuBLAS, or a dot inside a fusion; on TPU a convolution, see
`convolution_flops`); cuDNN flash attention 4*B*N*T*S*H
forward and 10*B*N*T*S*H backward (it recomputes the scores), halved for a causal mask, which
the kernel skips (TPU: Pallas splash attention's kernels, SPLASH_FLOPS_PER_SCORE, counted the
same way); one FLOP per element for each arithmetic op in a fusion and per input element
of a reduce. Bytes: every operand read plus every result written, except that a fusion operand
read only through dynamic-slice counts at the slice's size and one updated in place through
dynamic-update-slice counts at the update's size (the layer and micro-batch loops do both), and
a TPU async slice (slice-start) at its piece's. The TPU compiler's reduce-scatter, a fusion of an
all-reduce and each device's slice of it, is a reduce-scatter.
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
    # TPU: an async copy between HBM and on-chip memory (VMEM) prefetches what the fusion after
    # it reads, whose operand bytes already count the read.
    "copy-start", "copy-done",
}  # fmt: skip

# One FLOP per result element (XLA's HloCostAnalysis counts these the same way).
_ARITHMETIC = {
    "add", "subtract", "multiply", "divide", "maximum", "minimum", "negate", "abs", "power",
    "exponential", "exponential-minus-one", "log", "log-plus-one", "tanh", "logistic", "rsqrt",
    "sqrt", "cbrt", "erf", "remainder", "atan2", "sine", "cosine",
}  # fmt: skip

# FLOPs per score (B N T S H) of each Pallas splash-attention kernel: the forward pass 4 (q k^T,
# then p v); the backward pass in two kernels that each recompute the scores: dq 6 (s, dp, dq),
# dk/dv 8 (s, dp, dv, dk).
SPLASH_FLOPS_PER_SCORE = {"fwd": 4, "dq": 6, "dkv": 8}

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
    dcn: bool = False  # collectives: a group spans TPU slices (the data-center network)

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


def _logical_lines(text: str) -> Iterator[str]:
    """The module's lines with continuations joined: a Pallas kernel's custom call carries its
    metadata as JSON with line breaks, whose pieces start at column 0 (`"xprof_metadata": ...`,
    `}}, metadata=...`) like computation headers and closing braces."""
    pending = None
    for line in text.splitlines():
        top = (
            not line
            or line[0].isspace()
            or line.strip() == "}"
            or line.startswith(("HloModule", "ENTRY", "%"))
        )
        if top:
            if pending is not None:
                yield pending
            pending = line
        else:
            pending = line if pending is None else pending + " " + line
    if pending is not None:
        yield pending


def parse_module(text: str) -> tuple[dict[str, list[_Inst]], str]:
    """Computation name -> its instructions, and the entry computation's name."""
    comps: dict[str, list[_Inst]] = {}
    current, entry = None, ""
    for line in _logical_lines(text):
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


def _iota(dims: str, perm: str | None) -> list[int]:
    """Device ids of XLA's iota tile assignment [d0,d1,...]T(p0,p1,...), flattened."""
    import numpy as np

    shape = [int(d) for d in dims.split(",")]
    ids = np.arange(math.prod(shape)).reshape(shape)
    if perm:
        ids = ids.transpose([int(p) for p in perm.split(",")])
    return ids.reshape(-1).tolist()


def _groups(attrs: str, devices: int) -> list[list[int]] | None:
    """The replica groups of a collective as lists of device (partition) ids, where the text
    spells them out or in iota or mesh form; None for a form not read here."""
    import numpy as np

    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?", attrs)
    if iota:
        g, n = int(iota.group(1)), int(iota.group(2))
        ids = _iota(iota.group(3), iota.group(4))
        return [ids[i * n : (i + 1) * n] for i in range(g)]
    mesh = re.search(
        r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(\[([0-9,]+)\](?:T\(([0-9,]+)\))?\))?"
        r" \{([^}]*)\}",
        attrs,
    )
    if mesh:
        names_sizes = re.findall(r"'([^']+)'=(\d+)", mesh.group(1))
        named = [a.replace("'", "").strip() for a in mesh.group(4).split(",") if a.strip()]
        if any(":" in a for a in named):
            return None  # sub-axes: only the group size is read (_group_size)
        names = [n for n, _ in names_sizes]
        sizes = [int(v) for _, v in names_sizes]
        ids = (
            _iota(mesh.group(2), mesh.group(3)) if mesh.group(2) else list(range(math.prod(sizes)))
        )
        grid = np.asarray(ids).reshape(sizes)
        inside = [names.index(a) for a in named]
        outside = [i for i in range(len(names)) if i not in inside]
        grid = grid.transpose(outside + inside).reshape(-1, math.prod(sizes[i] for i in inside))
        return grid.tolist()
    listed = re.search(r"replica_groups=\{(\{[0-9,{} ]*\})\}", attrs)
    if listed:
        return [
            [int(x) for x in g.split(",") if x]
            for g in re.findall(r"\{([0-9, ]*)\}", listed.group(1))
        ]
    if re.search(r"replica_groups=\{\}", attrs):
        return [list(range(devices))]
    pairs = re.search(r"source_target_pairs=\{(.*?)\}\}", attrs)
    if pairs:
        return [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)", pairs.group(0))]
    return None


def _crosses_slices(attrs: str, devices: int, slices: list[int] | None) -> bool:
    """Whether any group of the collective holds devices of different TPU slices."""
    if not slices or len(set(slices)) < 2:
        return False
    groups = _groups(attrs, devices)
    if groups is None:
        return False
    return any(len({slices[d] for d in g}) > 1 for g in groups)


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
    def __init__(self, text: str, devices: int, slices: list[int] | None = None):
        self.comps, self.entry = parse_module(text)
        self.shape = {i.name: i.shape for insts in self.comps.values() for i in insts}
        self.devices = devices
        self.slices = slices
        # TPU HLO carries its tiled layouts ({1,0:T(8,128)}) in every shape.
        self.tpu = ":T(" in text

    def operand_shapes(self, inst: _Inst) -> list[str]:
        return [self.shape.get(o, "") for o in inst.operands]

    def schedule(self) -> Iterator[tuple[_Inst, int]]:
        """Every instruction that runs, with its runs per step (loop trip counts multiplied)."""
        todo = [(self.entry, 1)]
        while todo:
            comp, runs = todo.pop()
            for inst in self.comps.get(comp, []):
                yield inst, runs
                callees = _callees(inst)
                if inst.opcode == "while" and not _TRIP_COUNT.search(inst.attrs):
                    callees = [(callees[0][0], self.condition_bound(inst))]
                todo += [(callee, runs * times) for callee, times in callees]

    def condition_bound(self, inst: _Inst) -> int:
        """A while loop's trip count where the compiler left no known_trip_count (TPU): its
        condition `counter < constant` (jax's scans count from 0); 1 if it reads otherwise."""
        cond = self.comps.get(_attr("condition", inst.attrs) or "", [])
        root = next((i for i in cond if i.root), None)
        if root is None or root.opcode != "compare" or "direction=LT" not in root.attrs:
            return 1
        consts = {i.name: i.args for i in cond if i.opcode == "constant"}
        bound = consts.get(root.operands[-1]) if len(root.operands) == 2 else None
        return int(bound) if bound and bound.strip().isdigit() else 1

    def fused_flops(self, comp: str) -> tuple[float, float]:
        """(dot FLOPs, elementwise FLOPs) of a fused computation, nested fusions included."""
        dots = rest = 0.0
        for inst in self.comps.get(comp, []):
            if inst.opcode == "convolution":
                dots += self.convolution_flops(inst)
            elif inst.opcode == "dot":
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

    def convolution_flops(self, inst: _Inst) -> float:
        """2 x multiply-adds of a convolution, the TPU compiler's form of every matmul (batched
        ones through dilated windows): per output feature and batch row, the input features
        (rhs `i`) times the window taps that land on the input (not padding, not a dilation
        hole), as XLA's HloCostAnalysis counts them."""
        labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", inst.attrs)
        lhs_l, rhs_l, out_l = labels.groups()
        lhs = arrays(self.shape.get(inst.operands[0], ""))[0][1]
        rhs = arrays(self.shape.get(inst.operands[1], ""))[0][1]
        out = arrays(inst.shape)[0][1]
        window = re.search(r"window=\{([^}]*)\}", inst.attrs)
        fields = dict(re.findall(r"(\w+)=(\S+)", window.group(1))) if window else {}
        spatial = sorted(c for c in out_l if c.isdigit())
        per = lambda key, default: (
            [int(v) for v in fields[key].split("x")] if key in fields else [default] * len(spatial)
        )
        size, stride, lhs_dil, rhs_dil = (
            per("size", 1),
            per("stride", 1),
            per("lhs_dilate", 1),
            per("rhs_dilate", 1),
        )
        pads = [(0, 0)] * len(spatial)
        if "pad" in fields:
            pads = [tuple(int(x) for x in p.split("_")) for p in fields["pad"].split("x")]
        taps = 1
        for i, d in enumerate(spatial):
            n_in, n_out = lhs[lhs_l.index(d)], out[out_l.index(d)]
            base = (n_in - 1) * lhs_dil[i] + 1  # the input with dilation holes, before padding
            taps *= sum(
                1
                for o in range(n_out)
                for k in range(size[i])
                if 0 <= (p := o * stride[i] + k * rhs_dil[i] - pads[i][0]) < base
                and p % lhs_dil[i] == 0
            )
        return 2.0 * out[out_l.index("b")] * out[out_l.index("f")] * rhs[rhs_l.index("i")] * taps

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
        if op in ("send", "recv") and "xla_megascale_runtime" in inst.attrs:
            # Multislice: the compiler splits a collective over slices into ICI collectives
            # inside each slice and a send/recv pair between slices that libtpu's megascale
            # runtime carries over the data-center network; the send is the message.
            if op == "recv":
                return None
            kind = re.search(r'_xla_megascale_transfer_type="?(\w+)', inst.attrs)
            kind = kind.group(1).lower().replace("_", "-") if kind else "collective-permute"
            kind = kind if kind in COLLECTIVES else "collective-permute"
            slices = max(2, len(set(self.slices or ())))
            message = shape_bytes(self._operands_str(inst).split(" token[]")[0])
            return Kernel(inst.name, kind, 0.0, message, runs, slices, dcn=True)
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
            dcn = _crosses_slices(inst.attrs, self.devices, self.slices)
            return Kernel(inst.name, base, 0.0, size, runs, group, dcn)
        io = shape_bytes(self._operands_str(inst)) + shape_bytes(inst.shape)
        if op == "fusion":
            comp = _attr("calls", inst.attrs)
            scatter = self.all_reduce_scatter(comp)
            if scatter is not None:
                # The TPU compiler's reduce-scatter: an all-reduce whose result each device
                # slices to its own shard, fused into one collective (a kCustom fusion).
                group = _group_size(scatter.attrs, self.devices)
                dcn = _crosses_slices(scatter.attrs, self.devices, self.slices)
                size = shape_bytes(self._operands_str(scatter))
                return Kernel(inst.name, "reduce-scatter", 0.0, size, runs, group, dcn)
            dots, rest = self.fused_flops(comp)
            kind = re.search(r"kind=k(\w+)", inst.attrs).group(1).lower()
            name = f"{_FUSION_KINDS.get(kind, kind)} fusion"
            if dots:  # TPU matmuls are convolutions on the MXU; GPU ones, Triton's dots
                name = "triton gemm"
                if self.has_convolution(comp):
                    # Elementwise work fused into a TPU matmul runs on the vector unit beside
                    # the MXU, in its shadow: the fusion's FLOPs are its matmuls'.
                    name, rest = "mxu gemm", 0.0
            return Kernel(inst.name, name, dots + rest, self.fusion_bytes(inst, comp), runs)
        if op == "convolution":
            return Kernel(inst.name, "mxu gemm", self.convolution_flops(inst), io, runs)
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
            splash = re.search(r"splash_mha_(fwd|dq|dkv)", inst.name + inst.attrs)
            if target == "tpu_custom_call" and splash:
                # A Pallas splash-attention kernel (tpu_attention.py: causal, self-attention).
                # Its output [B, N, T, H] ([N, T, H] for one example per device) is the first
                # array of the highest rank; lower ranks are the kernel's scratch.
                *batch, N, T, H = max((d for _, d in results), key=len)
                B = math.prod(batch)
                per_score = SPLASH_FLOPS_PER_SCORE[splash.group(1)]
                flops = per_score * B * N * T * T * H / 2  # the causal half
                return Kernel(inst.name, f"splash {splash.group(1)} attention", flops, io, runs)
            return Kernel(inst.name, f"custom-call {target}", 0.0, io, runs)
        if op == "dynamic-update-slice":  # in place: the update read and written
            io = 2 * shape_bytes(self.shape.get(inst.operands[1], ""))
        elif op == "dynamic-slice":  # reads only the slice
            io = 2 * shape_bytes(inst.shape)
        elif op == "slice-start":
            # TPU: an async slice, one piece (4 MB) of an array moved to another memory space.
            # Its shape is ((source), piece, context): only the piece is read and written.
            kind, dims = arrays(inst.shape)[-2]
            io = 2 * ITEMSIZE[kind] * math.prod(dims)
        if self.tpu and not any(dims for _, dims in arrays(inst.shape)):
            # A scalar op outside a fusion (loop counters, indices) runs on the TPU core's
            # scalar unit alongside the vector work: no kernel of its own.
            return None
        return Kernel(inst.name, op, 0.0, io, runs)

    def all_reduce_scatter(self, comp: str | None) -> _Inst | None:
        """The all-reduce of a fused computation rooted in a dynamic-slice of it, else None."""
        body = self.comps.get(comp or "", [])
        root = next((i for i in body if i.root), None)
        if root is None or root.opcode != "dynamic-slice":
            return None
        source = next((i for i in body if i.name == root.operands[0]), None)
        return source if source is not None and source.opcode == "all-reduce" else None

    def has_convolution(self, comp: str) -> bool:
        return any(
            i.opcode == "convolution"
            or (i.opcode == "fusion" and self.has_convolution(_attr("calls", i.attrs)))
            for i in self.comps.get(comp, [])
        )

    def _operands_str(self, inst: _Inst) -> str:
        return " ".join(self.operand_shapes(inst))


def kernels(hlo_text: str, devices: int = 1, slices: list[int] | None = None) -> list[Kernel]:
    """The kernels of an optimized HLO module, in no particular order (see the module docstring).

    `devices`: the SPMD partition count, the group size of a collective over all devices.
    `slices`: the TPU slice of each partition id; a collective whose group spans two is `dcn`.
    """
    module = _Module(hlo_text, devices, slices)
    found = (module.kernel(inst, runs) for inst, runs in module.schedule())
    return [k for k in found if k is not None]
