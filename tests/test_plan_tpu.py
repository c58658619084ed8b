"""llmjax.plan for TPUs: slice names, TPU HLO counting and DCN collectives on CPU; deviceless TPU
compiles where libtpu is installed (`make plan-install-tpu`, then .venv-plan-tpu/bin/python -m
pytest tests/test_plan_tpu.py); splash attention against XLA's in Pallas's interpreter (slow)."""

from __future__ import annotations

import os
import subprocess

import pytest

from llmjax.plan import hlo_stats, roofline
from tests.conftest import ROOT, run_cli, run_json
from tests.test_plan import HLO


@pytest.mark.parametrize(
    "name, topology, chips, per_host, hosts",
    [
        ("v5e-1", "v5e:1x1", 1, (1, 1, 1), 1),
        ("v5e-4", "v5e:2x2", 4, (2, 2, 1), 1),
        ("v5e-8", "v5e:2x4", 8, (2, 4, 1), 1),  # v5litepod-8: one host of 8 chips
        ("v5e-16", "v5e:4x4", 16, (2, 2, 1), 4),
        ("v6e-8", "v6e:2x4", 8, (2, 4, 1), 1),
        ("v6e-256", "v6e:16x16", 256, (2, 2, 1), 64),
        ("v5p-8", "v5:2x2x1", 4, (2, 2, 1), 1),  # v5p and v4 names count TensorCores
        ("v5p-64", "v5:2x4x4", 32, (2, 2, 1), 8),
        ("v5p-128", "v5:4x4x4", 64, (2, 2, 1), 16),
        ("v4-32", "v4:2x2x4", 16, (2, 2, 1), 4),
    ],
)
def test_slice_names(name, topology, chips, per_host, hosts):
    s = roofline.tpu_slice(name)
    assert (s.topology_name, s.chips, s.chips_per_host, s.hosts) == (
        topology,
        chips,
        per_host,
        hosts,
    )


@pytest.mark.parametrize("name", ["v5e-3", "v5e-512", "v5p-4", "v5p-12", "v7-8", "v5e", "tpu"])
def test_bad_slice_names(name):
    with pytest.raises(roofline.SpecError, match=name):
        roofline.tpu_slice(name)


def test_cli_bad_tpu_one_line_exit_2():
    proc = run_cli("llmjax.plan", "--config=configs/tiny.py", "--tpu=v5e-3")
    assert proc.returncode == 2
    assert proc.stderr.startswith("llmjax: --tpu=v5e-3") and proc.stderr.count("\n") == 1


# Two of the TPU compiler's matmuls as convolutions (from a compiled GPT step): attention scores
# q k^T batched over B and N through a dilated window, and c_attn's [D, 3, D] weight gradient,
# whose k axis is a padded window.
TPU_CONVOLUTIONS = """\
HloModule tpu_convolutions, entry_computation_layout={()->f32[2,4,32,32]{3,2,1,0}}

ENTRY %main (q: bf16[2,32,4,16], x: f32[2,32,64,1], g: f32[2,32,3,64]) -> f32[2,4,32,32] {
  %q = bf16[2,32,4,16]{1,3,2,0} parameter(0)
  %x = f32[2,32,64,1]{2,1,0,3} parameter(1)
  %g = f32[2,32,3,64]{3,1,0,2} parameter(2)
  %dw = f32[64,3,64,1]{2,0,3,1} convolution(%x, %g), window={size=3x2 pad=2_2x0_0 rhs_reversal=1x0}, dim_labels=1fb0_1i0o->b0f1
  ROOT %s = f32[2,4,32,32]{2,3,1,0} convolution(%q, %q), window={size=2x4 stride=1x3 lhs_dilate=2x4}, dim_labels=0b1f_0o1i->01bf
}
"""  # noqa: E501


def test_tpu_convolutions_count_their_matmul_flops():
    found = {k.name: k for k in hlo_stats.kernels(TPU_CONVOLUTIONS)}
    assert found["s"].kind == "mxu gemm" and found["s"].category == "gemm"
    assert found["s"].flops == 2 * 2 * 4 * 32 * 32 * 16  # 2 B N T S H
    assert found["dw"].flops == 2 * (2 * 32) * 64 * 3 * 64  # 2 x rows x D x 3D


def test_collectives_across_slices_run_on_dcn():
    # Eight devices, two slices of four; groups {0..3}, {4..7} stay inside a slice, groups
    # {0,4}, {1,5}, ... cross it.
    slices = [0] * 4 + [1] * 4
    inside = HLO.replace("replica_groups={{0,1,2,3},{4,5,6,7}}", "replica_groups=[2,4]<=[8]")
    across = HLO.replace(
        "replica_groups={{0,1,2,3},{4,5,6,7}}", "replica_groups=[4,2]<=[2,4]T(1,0)"
    )
    mesh = HLO.replace(
        "replica_groups={{0,1,2,3},{4,5,6,7}}",
        "replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}",
    )
    ar = lambda text: {k.name: k for k in hlo_stats.kernels(text, 8, slices)}["ar"]
    assert not ar(HLO).dcn and not ar(inside).dcn
    assert ar(across).dcn and ar(mesh).dcn and ar(mesh).group == 2
    # How the TPU compiler writes the part of a multislice all-reduce between slices: a send (and
    # a recv, not counted twice) that libtpu's megascale runtime carries over DCN.
    send = (
        "  %s = (f32[8,16]{1,0}, u32[], token[]) send(%gelu, %tok), channel_id=9, "
        "is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="
        '"xla_megascale_runtime",_xla_megascale_transfer_type="ALL_REDUCE"}\n'
    )
    recv = send.replace("%s = ", "%r = ").replace("send(%gelu, %tok)", "recv(%tok)")
    megascale = HLO.replace(
        "  ROOT %ar", "  %tok = token[] after-all()\n" + send + recv + "  ROOT %ar"
    )
    found = {k.name: k for k in hlo_stats.kernels(megascale, 4, slices)}
    assert "r" not in found
    assert found["s"] == hlo_stats.Kernel("s", "all-reduce", 0.0, 8 * 16 * 4, 1, 2, dcn=True)
    chip = roofline.tpu_roofline(roofline.TPU_CHIPS["v5e"])
    seconds = roofline.collective_seconds(ar(across), chip)
    assert seconds == pytest.approx(2 * 1 / 2 * 8 * 16 * 4 / (roofline.EFF_LINK * 3.125e9))


@pytest.mark.slow
def test_splash_attention_matches_xla_in_interpreter():
    """The kernel's numerics without a TPU: Pallas's interpreter runs the same kernel on CPU;
    forward and gradient against jax.nn.dot_product_attention (XLA), 40 tokens (padded to 128)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from llmjax import tpu_attention

    q, k, v = (
        jax.random.normal(key, (2, 40, 2, 16)) for key in jax.random.split(jax.random.key(0), 3)
    )
    splash = lambda q: tpu_attention.causal_attention(q, k, v, interpret=True)
    xla = lambda q: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    np.testing.assert_allclose(splash(q), xla(q), atol=2e-6)
    grad = lambda f: jax.grad(lambda q: jnp.sum(f(q) ** 2))(q)
    np.testing.assert_allclose(grad(splash), grad(xla), atol=2e-5)


def _plan_tpu(*args: str) -> dict:
    """`python -m llmjax.plan ARGS` for the tiny config (deviceless; needs libtpu)."""
    return run_json(["-m", "llmjax.plan", "--config=configs/tiny.py", *args])


# configs/tiny.py at 128 tokens (one splash tile): 2 layers, 4 heads of 16, width 64, 320 rows.
T = 128
TINY_AT_T = [f"--config.data.seq_len={T}", f"--config.model.block_size={T}"]
# Matmul weights: per layer c_attn 64x192, c_proj 64x64, c_fc 64x256, mlp c_proj 256x64; the tied
# head 320x64 (wpe, norms and biases are not matmuls).
MATMUL_PARAMS = 2 * (64 * 192 + 64 * 64 + 64 * 256 + 256 * 64) + 320 * 64


@pytest.mark.tpu
@pytest.mark.parametrize("tpu, chip", [("v5e-4", "TPU v5 lite"), ("v5p-8", "TPU v5")])
def test_tiny_compiles_for_a_tpu_slice_without_one(tpu, chip, tmp_path):
    r = _plan_tpu(f"--tpu={tpu}", f"--dump={tmp_path}", *TINY_AT_T)
    assert (r["gpu"], r["tpu"], r["devices"], r["num_slices"], r["hosts"]) == (chip, tpu, 4, 1, 1)
    assert r["fits"] and r["attention"] == "splash"
    rows = 8 // 4  # the batch over data=4
    # GEMMs: 6 FLOPs per matmul weight per token (forward 2, backward 4).
    assert r["flops"]["gemm"] == pytest.approx(6 * MATMUL_PARAMS * rows * T, rel=0.02)
    # Splash: forward 4, dq 6, dk/dv 8 FLOPs per score (B N T S H), the causal half, per layer.
    assert r["flops"]["attention"] == pytest.approx(2 * 18 * rows * 4 * T * T * 16 / 2, rel=0.02)
    # Donation: the whole state (float32 params, Adam m and v, counters) is aliased; every
    # argument but the batch (int32 [2, T + 1], at most 8 x 256 once laid out in TPU tiles).
    assert r["aliased_bytes"] >= r["state_bytes"]
    assert 0 < r["arguments_bytes"] - r["aliased_bytes"] <= 4 * 8 * 256
    hlo = (tmp_path / "train_step.after_optimizations.hlo").read_text()
    assert 'custom_call_target="tpu_custom_call"' in hlo
    assert {"splash fwd attention", "splash dq attention", "splash dkv attention"} <= set(
        r["launches_by_kind"]
    )
    assert r["predicted_tokens_per_sec"] > 0


@pytest.mark.tpu
def test_oversized_batch_is_reported_as_not_fitting():
    # ~50 GB of activations per v5e chip (16 GiB): libtpu refuses the program; plan says so.
    r = _plan_tpu(
        "--tpu=v5e-4",
        "--config.model.n_embd=512",
        "--config.model.n_head=8",
        "--config.data.batch_size=65536",
    )
    assert r["fits"] is False
    assert r["peak_memory_bytes"] > r["usable_memory_bytes"] == int(15.75 * 2**30)
    assert "RESOURCE_EXHAUSTED" in r["compiler_error"]


@pytest.mark.tpu
def test_two_slices_reduce_gradients_over_dcn():
    r = _plan_tpu("--tpu=v5e-4", "--num_slices=2", "--config.data.batch_size=16", *TINY_AT_T)
    assert (r["devices"], r["num_slices"], r["hosts"]) == (8, 2, 2)
    assert r["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}  # dcn_data=2 x data=4
    dcn = {k: c for k, c in r["collectives"].items() if k.endswith("over DCN")}
    assert dcn and all(c["count"] > 0 for c in dcn.values())
    assert r["predicted_seconds"]["collective"] > 0


@pytest.mark.tpu
def test_mesh_that_does_not_tile_the_slice_is_one_line_exit_2():
    proc = run_cli(
        "llmjax.plan", "--config=configs/tiny.py", "--tpu=v5e-4", "--config.mesh.tensor=3"
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "mesh.tensor=3" in proc.stderr and proc.stderr.count("\n") == 1


def test_tpu_vm_dry_run_prints_every_command():
    """launch/tpu_vm.sh --dry_run: the gcloud commands, in order, and no command run (no gcloud
    here); the same llmjax.main with the user's flags on every worker of both slices."""
    env = dict(os.environ, TPU_NAME="gpt2", ZONE="us-west4-a", NUM_SLICES="2", SPOT="1")
    env.update(ACCELERATOR="v5litepod-16", DATA_BUCKET="shards", PATH="/usr/bin:/bin")
    proc = subprocess.run(
        ["launch/tpu_vm.sh", "--dry_run", "--config=configs/gpt2_124m.py", "--workdir=/r/a b"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("+ gcloud")]
    assert "queued-resources create gpt2" in lines[0] and "--node-count=2" in lines[0]
    assert "--spot" in lines[0] and "--accelerator-type=v5litepod-16" in lines[0]
    train = [line for line in lines if "llmjax.main" in line]
    assert [line.split()[6] for line in train] == ["gpt2-0", "gpt2-1"]
    assert all("--worker=all" in line and r"--workdir=/r/a\\\ b" in line for line in train)
    assert sum("gcsfuse" in line for line in lines) == 2  # the data bucket on both slices


def test_tpu_while_loop_trip_count_from_its_condition():
    # The TPU compiler leaves no known_trip_count on a scan's while loop: `i < 12` says it.
    tpu_style = HLO.replace(', backend_config={"known_trip_count":{"n":"12"}}', "")
    assert "known_trip_count" not in tpu_style
    runs = {k.name: k.launches for k in hlo_stats.kernels(tpu_style, devices=8)}
    assert runs["gemm"] == runs["w"] == 12


def test_libtpu_flags_user_wins_and_only_where_a_tpu_is_expected():
    from llmjax import xla_flags

    user = "--xla_tpu_overlap_compute_collective_tc=false --xla_dump_to=/tmp/d"
    merged = xla_flags.merged_libtpu_args(user).split()
    assert merged[:2] == user.split()  # the user's own, unchanged, first
    assert "--xla_tpu_overlap_compute_collective_tc=true" not in merged
    assert len(merged) == 2 + len(xla_flags.TPU_LIBTPU_FLAGS) - 1
    assert not xla_flags.tpu_expected({"JAX_PLATFORMS": "cpu"})


def test_tpu_in_place_updates_and_scalar_ops():
    # Outside a fusion the TPU compiler leaves dynamic-update-slice (in place: the update's bytes,
    # read and written) and scalar index arithmetic (the scalar unit's: no kernel).
    hlo = """\
HloModule tpu_loop_ops, entry_computation_layout={()->f32[64,1024]{1,0}}

ENTRY %main (buf: f32[64,1024], row: f32[1,1024], i: s32[]) -> f32[64,1024] {
  %buf = f32[64,1024]{1,0:T(8,128)} parameter(0)
  %row = f32[1,1024]{1,0:T(1,128)} parameter(1)
  %i = s32[]{:T(128)} parameter(2)
  %two = s32[]{:T(128)} constant(2)
  %j = s32[]{:T(128)} multiply(%i, %two)
  %zero = s32[]{:T(128)} constant(0)
  ROOT %dus = f32[64,1024]{1,0:T(8,128)} dynamic-update-slice(%buf, %row, %j, %zero)
}
"""
    found = {k.name: k for k in hlo_stats.kernels(hlo)}
    assert set(found) == {"dus"}
    assert found["dus"].bytes == 2 * 1024 * 4


def test_tpu_reduce_scatter_fusion_and_async_slices():
    # Two forms of the TPU compiler's (trimmed from a compiled fsdp step and a v6e step): its
    # reduce-scatter is a kCustom fusion of an all-reduce and each device's dynamic-slice of it
    # (a collective, not a fusion); an activation moved to another memory space in async pieces,
    # whose slice-start repeats the whole source in its shape (only the piece moves).
    hlo = """\
HloModule tpu_forms, entry_computation_layout={()->bf16[400,3,1600]{2,0,1}}

%all-reduce-scatter.clone.1 (input.12: bf16[1600,3,1600]) -> bf16[400,3,1600] {
  %input.12 = bf16[1600,3,1600]{2,0,1:T(8,128)(2,1)} parameter(0)
  %all-reduce.81 = bf16[1600,3,1600]{2,0,1:T(8,128)(2,1)} all-reduce(%input.12), channel_id=16, replica_groups={{0,1,2,3}}, use_global_device_ids=true, to_apply=%add.clone
  %partition-id.40 = u32[] partition-id()
  %constant.1420 = u32[] constant(400)
  %multiply.360 = u32[]{:T(128)} multiply(%partition-id.40, %constant.1420)
  %constant.1421 = u32[] constant(0)
  ROOT %dynamic-slice.390 = bf16[400,3,1600]{2,0,1:T(8,128)(2,1)} dynamic-slice(%all-reduce.81, %multiply.360, %constant.1421, %constant.1421), dynamic_slice_sizes={400,3,1600}
}

ENTRY %main (g: bf16[1600,3,1600], x: s8[72351744]) -> bf16[400,3,1600] {
  %g = bf16[1600,3,1600]{2,0,1:T(8,128)(2,1)} parameter(0)
  %x = s8[72351744]{0:T(1024)(128)(4,1)} parameter(1)
  %slice-start.73 = ((s8[72351744]{0:T(1024)(128)(4,1)}), s8[4194304]{0:T(1024)(128)(4,1)S(1)}, s32[]{:S(2)}) slice-start(%x), slice={[0:4194304]}
  %slice-done.73 = s8[4194304]{0:T(1024)(128)(4,1)S(1)} slice-done(%slice-start.73)
  ROOT %rs = bf16[400,3,1600]{2,0,1:T(8,128)(2,1)} fusion(%g), kind=kCustom, calls=%all-reduce-scatter.clone.1
}
"""  # noqa: E501
    found = {k.name: k for k in hlo_stats.kernels(hlo, devices=4)}
    assert found["rs"] == hlo_stats.Kernel("rs", "reduce-scatter", 0.0, 1600 * 3 * 1600 * 2, 1, 4)
    assert found["slice-start.73"].bytes == 2 * 4194304
