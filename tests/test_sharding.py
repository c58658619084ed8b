"""Meshes over 8 fake CPU devices: same losses as one device, weights placed as the rules say,
collectives that move weights (fsdp) or per-device activations (tensor), never the global batch,
and checkpoints that move between meshes.

The device count is fixed when JAX starts, and this pytest process already runs JAX on one device,
so the 8-device work runs in one child process (`_child`) that prints its measurements as JSON;
the assertions are made here against hand-derived expectations.
"""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import pytest

from llmjax import sharding
from llmjax.config import ConfigError
from tests.conftest import pretrain_run, run_json, run_plan, tiny_config

STEPS, SAVE_AT = 6, 3
# (mesh axes, optim.grad_accum): grad_accum 2 also exercises the micro-batch split.
MESHES = {
    "one": ({"data": 1}, 1),
    "data8": ({"data": 8}, 1),
    "fsdp8": ({"data": 1, "fsdp": 8}, 1),
    "data2_fsdp4": ({"data": 2, "fsdp": 4}, 1),
    "data2_fsdp2_tensor2": ({"data": 2, "fsdp": 2, "tensor": 2}, 2),
}
# The compiled steps whose collectives are checked: batch HLO_B x HLO_T, a length no weight
# dimension is a multiple of (tiny weights: 3, 64, 256, 320 and their shards), and batch rows per
# device (40 / 8, / 4) that do not divide the width HLO_D, so an array that carries activations
# shows it. name: (mesh axes, scan_layers).
HLO_B, HLO_T, HLO_D = 40, 36, 64
HLO_MESHES = {
    f"{name}{'_scan' if scan else ''}": (axes, scan)
    for name, axes in {
        "data8": {"data": 8},
        "fsdp8": {"data": 1, "fsdp": 8},
        "data2_fsdp4": {"data": 2, "fsdp": 4},
        "data4_tensor2": {"data": 4, "tensor": 2},
        "fsdp4_tensor2": {"data": 1, "fsdp": 4, "tensor": 2},
    }.items()
    for scan in (False, True)
}
# Tiny model: D=64, 4 heads, MLP 256, vocab padded to 320, block 64. Shapes one device holds.
SHARDS = {
    "one": {
        "wte.embedding": (320, 64),
        "h.0.attn.c_attn.kernel": (64, 3, 64),
        "h.0.mlp.c_fc.kernel": (64, 256),
        "h.0.mlp.c_proj.kernel": (256, 64),
        "h.0.ln_1.scale": (64,),
        "wpe.embedding": (64, 64),
    },
    "data8": {
        "wte.embedding": (320, 64),
        "h.0.attn.c_attn.kernel": (64, 3, 64),
        "h.0.mlp.c_fc.kernel": (64, 256),
        "h.0.mlp.c_proj.kernel": (256, 64),
        "h.0.ln_1.scale": (64,),
        "wpe.embedding": (64, 64),
    },
    "data2_fsdp4": {
        "wte.embedding": (320, 16),
        "h.0.attn.c_attn.kernel": (16, 3, 64),
        "h.0.mlp.c_fc.kernel": (16, 256),
        "h.0.mlp.c_proj.kernel": (256, 16),
        "h.0.ln_1.scale": (16,),
        "wpe.embedding": (64, 16),
    },
    "data2_fsdp2_tensor2": {
        "wte.embedding": (160, 32),
        "h.0.attn.c_attn.kernel": (32, 3, 32),
        "h.0.mlp.c_fc.kernel": (32, 128),
        "h.0.mlp.c_proj.kernel": (128, 32),
        "h.0.ln_1.scale": (32,),
        "wpe.embedding": (64, 32),
    },
}


_INST = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.+?) ([\w\-]+)\((.*)$", re.M)
_ARRAY = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4}


def collectives(hlo_text: str) -> list[dict]:
    """The collectives of an optimized HLO module: kind (all-gather, ...; async ones by their
    start), their operands and every array among operands and results, as [dtype, [dims]]."""
    shapes = {name: shape for name, shape, _, _ in _INST.findall(hlo_text)}
    found = []
    for name, shape, op, rest in _INST.findall(hlo_text):
        kind = op.removesuffix("-start")
        if kind not in ("all-gather", "reduce-scatter", "all-reduce", "all-to-all") and not (
            kind == "collective-permute"
        ):
            continue
        operands = " ".join(
            shapes.get(o, "") for o in re.findall(r"%([\w.\-]+)", rest.split(")")[0])
        )
        parse = lambda t: [[d, [int(n) for n in ds.split(",") if n]] for d, ds in _ARRAY.findall(t)]
        found.append(
            {
                "kind": kind,
                "name": name,
                "operands": parse(operands),
                "arrays": parse(shape + operands),
            }
        )
    return found


def batch_rows(dims: list[int], T: int = HLO_T, D: int = HLO_D) -> int:
    """How many sequences of length T (or T+1, the token batch) an array holds: the product of
    the dimensions before a T, or a flattened B*T dimension; 0 if it holds none. wpe's first T
    rows, [T, D/k] in either order, are a weight."""
    if len(dims) == 2 and T in dims and D % (dims[0] * dims[1] // T) == 0:
        return 0
    rows = 0
    for i, d in enumerate(dims):
        if d in (T, T + 1):
            rows = max(rows, math.prod(dims[:i]))
        for t in (T, T + 1):
            if d > t and d % t == 0:
                rows = max(rows, d // t)
    return rows


def _child(data_path: str, ckpt_dir: str) -> None:
    """Runs in a process with 8 CPU devices; prints one JSON object on its last line."""
    import jax
    import jax.numpy as jnp

    from llmjax import checkpoint, data

    assert jax.device_count() == 8, jax.devices()
    batches = list(
        data.train_batches(
            data_path, seq_len=32, batch=8, vocab_size=257, seed=0, start_step=0, steps=STEPS
        )
    )

    def build(name: str, **overrides):
        axes, accum = MESHES[name]
        cfg = tiny_config(
            data_path,
            **{
                "model.n_layer": 1,
                "optim.grad_accum": accum,
                "train.steps": STEPS,
                **{f"mesh.{k}": v for k, v in axes.items()},
                **overrides,
            },
        )
        return pretrain_run(cfg, jax.devices()[:1] if name == "one" else None)

    def steps(run, state, start: int, stop: int) -> tuple[list[float], object]:
        losses = []
        for b in batches[start:stop]:
            state, m = run.train_step(state, sharding.put_batch(b, run.mesh))
            losses.append(float(m["train/loss"]))
            grad_norms.setdefault(id(run), []).append(float(m["train/grad_norm"]))
        return losses, state

    grad_norms: dict = {}

    def placement(run, state) -> dict:
        flat = jax.tree_util.tree_flatten_with_path(state.params)[0]
        mu = jax.tree_util.tree_flatten_with_path(state.opt_state[1][0].mu)[0]
        name = lambda path: ".".join(str(getattr(k, "key", k)) for k in path)
        out = {}
        for (path, p), (_, m) in zip(flat, mu, strict=True):
            shards = {tuple(s.data.shape) for s in p.addressable_shards}
            out[name(path)] = {
                "spec": [list(a) if isinstance(a, tuple) else a for a in p.sharding.spec],
                "shards": [list(s) for s in shards],
                "mu_shards": [list(s.data.shape) for s in m.addressable_shards][:1],
                "devices": len(p.sharding.device_set),
            }
        return out

    out: dict = {
        "losses": {},
        "grad_norms": {},
        "placement": {},
        "restored": {},
        "errors": {},
        "hlo": {},
    }
    runs = {}
    for name in MESHES:
        run = runs[name] = build(name)
        out["placement"][name] = placement(run, run.init())
        state = run.init()
        if name == "data2_fsdp4":  # the checkpoint's writer: 8 devices, fsdp shards
            head, state = steps(run, state, 0, SAVE_AT)
            mngr = checkpoint.manager(ckpt_dir)
            record = checkpoint.Record(SAVE_AT, {}, {}, "pretrain", 0)  # a bare state's
            checkpoint.save(mngr, SAVE_AT, state, record)
            mngr.wait_until_finished()
            tail, _ = steps(run, state, SAVE_AT, STEPS)
            out["losses"][name] = head + tail
        else:
            out["losses"][name] = steps(run, state, 0, STEPS)[0]
        out["grad_norms"][name] = grad_norms[id(run)][:STEPS]
    # The compiled programs (nothing runs): which collectives move what.
    for name, (axes, scan) in HLO_MESHES.items():
        cfg = tiny_config(
            data_path,
            **{
                "data.batch_size": HLO_B,
                "data.seq_len": HLO_T,
                "model.scan_layers": scan,
                **{f"mesh.{k}": v for k, v in axes.items()},
            },
        )
        run = pretrain_run(cfg)
        batch = jax.ShapeDtypeStruct(
            (HLO_B, HLO_T + 1), jnp.int32, sharding=sharding.batch_sharding(run.mesh)
        )
        text = run.train_step.lower(run.abstract_state, batch).compile().as_text()
        params = jax.tree.leaves(run.abstract_state.params)
        out["hlo"][name] = {
            "collectives": collectives(text),
            "param_bytes": sum(p.size * p.dtype.itemsize for p in params),
        }
    # Resharding on restore: the 8-device fsdp checkpoint onto 1 device and onto another mesh.
    mngr = checkpoint.manager(ckpt_dir)
    for name in ("one", "data2_fsdp2_tensor2"):
        run = runs[name]
        state = checkpoint.restore(mngr, SAVE_AT, run.abstract_state)
        same = jax.tree.map(
            lambda a, s: a.sharding.is_equivalent_to(s, a.ndim), state, run.state_shardings
        )
        out["restored"][name] = {
            "step": int(state.step),
            "shardings_match": all(jax.tree.leaves(same)),
            "losses": steps(run, state, SAVE_AT, STEPS)[0],
        }
    invalid = {
        "batch": {"data.batch_size": 12},
        "heads": {"mesh.data": 1, "mesh.tensor": 8},
        "devices": {"mesh.data": 2, "mesh.fsdp": 2},
        "width": {"mesh.data": 1, "mesh.fsdp": 8, "model.n_embd": 68},
    }
    for key, overrides in invalid.items():
        try:
            build("data8", **overrides)
            out["errors"][key] = None
        except ConfigError as e:
            out["errors"][key] = str(e)
    print(json.dumps(out))


@pytest.fixture(scope="module")
def meshes(byte_data, tmp_path_factory) -> dict:
    ckpt = str(tmp_path_factory.mktemp("mesh_ckpt"))
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        # Optimization level 0 halves the compile time; the partitioning is the same.
        XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0",
    )
    code = f"from tests.test_sharding import _child; _child({byte_data!r}, {ckpt!r})"
    return run_json(["-c", code], env)


@pytest.mark.parametrize("name", ["data8", "fsdp8", "data2_fsdp4", "data2_fsdp2_tensor2"])
def test_mesh_matches_one_device(meshes, name):
    ref, got = np.array(meshes["losses"]["one"]), np.array(meshes["losses"][name])
    assert len(got) == STEPS and ref[-1] < ref[0] - 0.3  # it trained
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=0)
    ref, got = meshes["grad_norms"]["one"], meshes["grad_norms"][name]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=0)


def check_collectives(found: list[dict], axes: dict, param_bytes: int, B: int = HLO_B) -> None:
    """What every mesh's step may move: never the global batch; with data and fsdp only, no
    activation at all (weights gathered, gradients reduced); with tensor, only rows of the
    device's own data replica, gathered from or scattered to the tensor ranks' shares of its
    residual stream (sequence parallelism); never an all-to-all or a collective-permute."""
    dp, tp = axes.get("data", 1) * axes.get("fsdp", 1), axes.get("tensor", 1)
    kinds = {c["kind"] for c in found}
    assert kinds <= {"all-gather", "reduce-scatter", "all-reduce"}, kinds
    for c in found:
        arrays = [d for _, d in c["arrays"]]
        if tp > 1 and c["kind"] == "all-reduce":
            # Under tensor a 1-D all-reduce is several buffers combined (the vocabulary-parallel
            # loss's sums, the embedding's gradient): its length is no shape to read rows from.
            arrays = [d for d in arrays if len(d) > 1]
        rows = {batch_rows(dims) for dims in arrays} - {0}
        where = f"{c['kind']} {c['name']} {c['arrays']}"
        assert all(r < B for r in rows), f"moves the global batch: {where}"
        if tp == 1:
            assert not rows or max(rows) < B // dp, f"moves activations: {where}"
        elif rows:
            assert max(rows) <= B // dp, f"moves another replica's rows: {where}"
            if c["kind"] != "all-reduce":
                assert min(rows) == B // (dp * tp), f"not the residual stream's share: {where}"
    # Each device's shard of the weights is gathered at most twice (forward and backward).
    shards = sum(
        math.prod(dims) * _DTYPE_BYTES[dtype]
        for c in found
        if c["kind"] == "all-gather" and not any(batch_rows(d) for _, d in c["arrays"])
        for dtype, dims in c["operands"]
    )
    assert shards <= 2 * param_bytes / axes.get("fsdp", 1), (shards, param_bytes)


@pytest.mark.parametrize("name", list(HLO_MESHES))
def test_collectives_move_weights_not_the_batch(meshes, name):
    axes, _ = HLO_MESHES[name]
    hlo = meshes["hlo"][name]
    check_collectives(hlo["collectives"], axes, hlo["param_bytes"])
    kinds = {c["kind"] for c in hlo["collectives"]}
    if axes.get("fsdp", 1) > 1:
        assert "all-gather" in kinds  # the weights, layer by layer
    if axes.get("tensor", 1) > 1:
        # Sequence parallelism: the residual stream's rows gathered into the projections (their
        # partial sums come back as all-reduces on CPU, where XLA forms no reduce-scatters).
        assert "all-gather" in kinds, kinds
    elif axes.get("fsdp", 1) == 1:
        assert kinds == {"all-reduce"}  # data parallel: the gradients, nothing else


@pytest.mark.plan
@pytest.mark.parametrize(
    "axes, scan",
    [
        ({"data": 1, "fsdp": 8}, False),
        ({"data": 1, "fsdp": 8}, True),
        ({"data": 4, "tensor": 2}, False),
        ({"data": 1, "fsdp": 4, "tensor": 2}, False),
    ],
    ids=["fsdp8", "fsdp8_scan", "data4_tensor2", "fsdp4_tensor2"],
)
def test_gpu_collectives_move_weights_not_the_batch(tmp_path, axes, scan):
    """The same checks on the program XLA compiles for 8 H100s (llmjax.plan, deviceless)."""
    axes = {"fsdp": 1, **axes}
    report = run_plan(
        "--config=configs/tiny.py",
        "--devices=8",
        *(f"--config.mesh.{k}={v}" for k, v in axes.items()),
        f"--config.data.batch_size={HLO_B}",
        f"--config.data.seq_len={HLO_T}",
        f"--config.model.scan_layers={scan}",
        "--config.model.dtype=bfloat16",
        f"--dump={tmp_path}",
    )
    with open(tmp_path / "train_step.after_optimizations.hlo", encoding="utf-8") as f:
        found = collectives(f.read())
    # Weights are gathered in the compute dtype, bf16 on a GPU.
    check_collectives(found, axes, 2 * report["params"])
    kinds = {c["kind"] for c in found}
    # fsdp: weights gathered, gradients reduce-scattered; tensor: the residual stream's rows
    # gathered into the projections, their partial sums reduce-scattered back.
    assert {"all-gather", "reduce-scatter"} <= kinds, kinds


@pytest.mark.parametrize("name", list(SHARDS))
def test_parameters_sharded_by_rules(meshes, name):
    placed = meshes["placement"][name]
    for param, shape in SHARDS[name].items():
        assert placed[param]["shards"] == [list(shape)], (param, placed[param])
        assert placed[param]["mu_shards"] == [list(shape)], param  # Adam state: same layout
    assert all(p["devices"] == (1 if name == "one" else 8) for p in placed.values())
    if name == "data2_fsdp2_tensor2":
        assert placed["h.0.mlp.c_fc.kernel"]["spec"] == ["fsdp", "tensor"]
        assert placed["h.0.attn.c_proj.kernel"]["spec"] == ["tensor", "fsdp"]
        assert placed["wte.embedding"]["spec"] == ["tensor", "fsdp"]


@pytest.mark.parametrize("name", ["one", "data2_fsdp2_tensor2"])
def test_checkpoint_reshards_on_restore(meshes, name):
    restored = meshes["restored"][name]
    assert restored["step"] == SAVE_AT and restored["shardings_match"]
    writer = meshes["losses"]["data2_fsdp4"][SAVE_AT:]
    np.testing.assert_allclose(restored["losses"], writer, rtol=1e-5, atol=0)


def test_invalid_meshes_refused_before_compiling(meshes):
    errors = meshes["errors"]
    assert errors["batch"] == (
        "data.batch_size=12 is not divisible by data-parallel size 8 "
        "(mesh data=8 x fsdp=1) x optim.grad_accum=1; use a multiple of 8"
    )
    assert errors["heads"].startswith("model.n_head=4 is not divisible by mesh.tensor=8")
    assert errors["devices"] == (
        "mesh.data=2 x mesh.fsdp=2 x mesh.tensor=1 = 4 devices, but 8 are available"
    )
    assert errors["width"].startswith("parameter ") and "68" in errors["width"]
    assert "mesh.fsdp" in errors["width"]


def test_mesh_shape_resolves_minus_one():
    cfg = tiny_config("").mesh
    assert sharding.mesh_shape(cfg, 8) == (8, 1, 1)
    cfg.fsdp, cfg.tensor = 2, 2
    assert sharding.mesh_shape(cfg, 8) == (2, 2, 2)
    with pytest.raises(ConfigError, match="8 devices are not divisible by 3"):
        cfg.fsdp, cfg.tensor = 3, 1
        sharding.mesh_shape(cfg, 8)


def test_distributed_flags_go_together():
    with pytest.raises(ConfigError, match="--coordinator_address, --process_id missing"):
        sharding.init_distributed(None, 2, None)
    with pytest.raises(ConfigError, match=r"--process_id=2 must be in \[0, --num_processes=2\)"):
        sharding.init_distributed("localhost:1234", 2, 2)


@pytest.mark.parametrize(
    "env, launcher",
    [
        ({}, None),
        (
            {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"},
            None,
        ),  # sbatch script itself, not an srun step
        ({"SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "1"}, None),  # one task: nothing to join
        ({"SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "16"}, "SLURM"),
        ({"OMPI_COMM_WORLD_SIZE": "4"}, "Open MPI"),
        ({"JAX_COORDINATOR_ADDRESS": "h:1"}, "JAX_COORDINATOR_ADDRESS"),
    ],
)
def test_launcher_detection(monkeypatch, env, launcher):
    for key in (
        "SLURM_STEP_NODELIST",
        "SLURM_NTASKS",
        "SLURM_JOB_ID",
        "OMPI_COMM_WORLD_SIZE",
        "JAX_COORDINATOR_ADDRESS",
    ):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert sharding.launched_processes() == launcher
