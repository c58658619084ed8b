"""llmjax.plan: GPU specs, HLO kernel counting and the roofline on CPU; a deviceless GPU compile
where jax's CUDA plugin is installed (`make plan-install`, then .venv-plan/bin/python -m pytest)."""

from __future__ import annotations

import pytest

from llmjax import config, plan
from llmjax.plan import hlo_stats, roofline
from llmjax.plan.hlo_stats import Kernel
from tests.conftest import run_cli, run_plan

# Hopper: 132 SMs x 4 tensor cores x 512 bf16 FMA per clock x 1.8295201 GHz x 2 FLOPs per FMA.
HOPPER_PEAK = 2 * 132 * 4 * 512 * 1.8295201e9


@pytest.mark.parametrize(
    "gpu, name, memory, hbm, peak, links",
    [
        ("h100", "NVIDIA H100 80GB HBM3", 84942979072, 3.35232e12, HOPPER_PEAK, 18),
        ("h200", "NVIDIA H200 141GB HBM3e", 151397597184, 4.8e12, HOPPER_PEAK, 18),
        # A100's spec has no rate tables or links: the peak from metrics.PEAK_FLOPS, NVLink 3.
        ("a100", "NVIDIA A100-SXM4-80GB", 85100068864, 2.03904e12, 312e12, 12),
    ],
)  # fmt: skip
def test_shipped_specs_parse(gpu, name, memory, hbm, peak, links):
    g = roofline.parse_gpu(plan.gpu_spec_text(gpu))
    assert (g.name, g.memory_bytes, g.hbm_bytes_per_s) == (name, memory, hbm)
    assert g.peak_flops == pytest.approx(peak, rel=1e-9)
    assert g.link_bytes_per_s == links * 25e9


@pytest.mark.parametrize(
    "text, complaint",
    [
        ("gpu_device_info { core_count: 132", "unclosed"),
        ("gpu_device_info { core_count: }", "core_count has no value"),
        ("gpu_device_info { core_count: 1 ]", "not a text proto"),
        ("core_count: 1 }", "unbalanced"),
        ('gpu_device_info { core_count: 1 }\ndevice_description_str: "x"', "no known peak"),
        ('gpu_device_info { core_count: 1 }\ndevice_description_str: "NVIDIA H100"', "memory_size"),
    ],
)
def test_bad_spec_is_one_error(text, complaint):
    with pytest.raises(roofline.SpecError, match=complaint):
        roofline.parse_gpu(text)


def test_unknown_gpu_is_a_config_error():
    with pytest.raises(config.ConfigError, match="v100"):
        plan.gpu_spec_text("v100")


def test_cli_bad_gpu_one_line_exit_2():
    proc = run_cli("llmjax.plan", "--config=configs/tiny.py", "--gpu=v100")
    assert proc.returncode == 2
    assert proc.stderr.startswith("llmjax: --gpu=v100") and proc.stderr.count("\n") == 1


def test_roofline_on_hand_built_kernels():
    gpu = roofline.Gpu("test", 80 * 10**9, 2e12, 1e15, 5e13, 4e11)
    E = roofline
    kernels = [
        Kernel("gemm", "cublas gemm", 7e11, 1e9, launches=2),  # compute-bound
        Kernel("attn", "cudnn attention", 4.5e11, 1e8),
        Kernel("norm", "loop fusion", 1e6, 1.6e9, launches=3),  # memory-bound
        Kernel("tiny", "copy", 0.0, 10.0),  # the launch floor
        Kernel("ar", "all-reduce", 0.0, 1.6e9, group=8),
        Kernel("ag", "all-gather", 0.0, 3.2e8, launches=2, group=4),
        Kernel("solo", "all-reduce", 0.0, 1e9, group=1),  # one device: nothing moves
    ]
    gemm = 2 * 7e11 / (E.EFF_GEMM * 1e15)
    attention = 4.5e11 / (E.EFF_ATTENTION * 1e15)
    other = 3 * 1.6e9 / (E.EFF_HBM * 2e12) + E.MIN_KERNEL_SECONDS
    link = E.EFF_LINK * 4e11
    collective = 2 * 7 / 8 * 1.6e9 / link + 2 * 3 / 4 * 3.2e8 / link
    p = roofline.predict(kernels, gpu)
    assert p.seconds_by_category == pytest.approx(
        {"gemm": gemm, "attention": attention, "other": other, "collective": collective}
    )
    assert p.no_overlap_seconds == pytest.approx(gemm + attention + other + collective)
    assert p.overlapped_seconds == pytest.approx(max(gemm + attention + other, collective))


# A 12-layer loop whose body reads its layer's weights through a dynamic-slice fusion and runs a
# cuBLAS GEMM; after it a loop fusion, a causal cuDNN attention call and an all-reduce.
HLO = """\
HloModule hand_written, entry_computation_layout={()->f32[8,16]{1,0}}

%fused_slice (param_0: bf16[12,64,128], param_1: s32[]) -> bf16[64,128] {
  %param_0 = bf16[12,64,128]{2,1,0} parameter(0)
  %param_1 = s32[] parameter(1)
  %zero = s32[] constant(0)
  %ds = bf16[1,64,128]{2,1,0} dynamic-slice(%param_0, %param_1, %zero, %zero), dynamic_slice_sizes={1,64,128}
  ROOT %bc = bf16[64,128]{1,0} bitcast(%ds)
}

%body (p: (s32[], bf16[128,64], bf16[12,64,128])) -> (s32[], bf16[128,64], bf16[12,64,128]) {
  %p = (s32[], bf16[128,64]{1,0}, bf16[12,64,128]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = bf16[128,64]{1,0} get-tuple-element(%p), index=1
  %stack = bf16[12,64,128]{2,1,0} get-tuple-element(%p), index=2
  %w = bf16[64,128]{1,0} fusion(%stack, %i), kind=kLoop, calls=%fused_slice
  %gemm = (bf16[128,128]{1,0}, s8[4194304]{0}) custom-call(%x, /*index=1*/%w), custom_call_target="__cublas$lt$matmul", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}
  ROOT %t = (s32[], bf16[128,64]{1,0}, bf16[12,64,128]{2,1,0}) tuple(%i, %x, %stack)
}

%cond (c: (s32[], bf16[128,64], bf16[12,64,128])) -> pred[] {
  %c = (s32[], bf16[128,64]{1,0}, bf16[12,64,128]{2,1,0}) parameter(0)
  %n = s32[] get-tuple-element(%c), index=0
  %twelve = s32[] constant(12)
  ROOT %lt = pred[] compare(%n, %twelve), direction=LT
}

%fused_gelu (param_0.1: f32[8,16]) -> f32[8,16] {
  %param_0.1 = f32[8,16]{1,0} parameter(0)
  %sq = f32[8,16]{1,0} multiply(%param_0.1, %param_0.1)
  ROOT %th = f32[8,16]{1,0} tanh(%sq)
}

%sum (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

ENTRY %main (init: (s32[], bf16[128,64], bf16[12,64,128]), h: f32[8,16], q: bf16[2,32,4,16]) -> f32[8,16] {
  %init = (s32[], bf16[128,64]{1,0}, bf16[12,64,128]{2,1,0}) parameter(0)
  %h = f32[8,16]{1,0} parameter(1)
  %q = bf16[2,32,4,16]{3,2,1,0} parameter(2)
  %loop = (s32[], bf16[128,64]{1,0}, bf16[12,64,128]{2,1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"12"}}
  %gelu = f32[8,16]{1,0} fusion(%h), kind=kLoop, calls=%fused_gelu
  %attn = (bf16[2,4,32,16]{3,1,2,0}, f32[2,4,32]{2,1,0}, u8[0]{0}) custom-call(%q, %q, %q), custom_call_target="__cudnn$fmhaSoftmax", backend_config={"cudnn_fmha_backend_config": {"intermediate_tensor_shape": {"element_type": "BF16", "dimensions": ["2", "4", "32", "32"]}, "mask_type": "CAUSAL"}}
  ROOT %ar = f32[8,16]{1,0} all-reduce(%gelu), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%sum
}
"""  # noqa: E501


def test_kernels_of_hand_written_hlo():
    found = {k.name: k for k in hlo_stats.kernels(HLO, devices=8)}
    assert set(found) == {"w", "gemm", "gelu", "attn", "ar"}
    # The layer's weights: one 64x128 bf16 slice read (not the 12-layer stack), plus the index.
    assert found["w"] == Kernel("w", "loop fusion", 0, 64 * 128 * 2 + 4 + 64 * 128 * 2, 12)
    # M=128, N=128, K=64; the cuBLAS workspace in the result tuple is not traffic.
    gemm_bytes = (128 * 64 + 64 * 128 + 128 * 128) * 2
    assert found["gemm"] == Kernel("gemm", "cublas gemm", 2 * 128 * 128 * 64, gemm_bytes, 12)
    # multiply and tanh over 8x16; one f32[8,16] read and one written.
    assert found["gelu"] == Kernel("gelu", "loop fusion", 2 * 8 * 16, 2 * 8 * 16 * 4)
    # Forward: 4 B N T S H, the causal half of it.
    attn_bytes = 3 * 2 * 32 * 4 * 16 * 2 + 2 * 4 * 32 * 16 * 2 + 2 * 4 * 32 * 4
    assert found["attn"] == Kernel(
        "attn", "cudnn attention", 4 * 2 * 4 * 32 * 32 * 16 / 2, attn_bytes
    )
    assert found["ar"] == Kernel("ar", "all-reduce", 0, 8 * 16 * 4, group=4)
    assert found["attn"].category == "attention" and found["ar"].category == "collective"


def test_group_size_iota_form():
    hlo = HLO.replace("replica_groups={{0,1,2,3},{4,5,6,7}}", "replica_groups=[4,2]<=[2,4]T(1,0)")
    assert {k.name: k.group for k in hlo_stats.kernels(hlo, devices=8)}["ar"] == 2


@pytest.mark.parametrize(
    "groups, size",
    [
        ("mesh['axis_0'=4,'axis_1'=2,'axis_2'=1] {'axis_1'}", 2),
        ("mesh['axis_0'=2,'axis_1'=1,'axis_2'=4], device_ids=([4,2]T(1,0)) {'axis_0'}", 2),
        ("mesh['axis_0'=4,'axis_1'=1,'axis_2'=2] {'axis_0','axis_2'}", 8),
        ("mesh['axis_0'=4,'axis_1'=2] {'axis_0':(1)2}", 2),  # a sub-axis: name:(pre-size)size
        ("mesh['axis_0'=4,'axis_1'=2] {'axis_0':(2)2,'axis_1'}", 4),
    ],
)
def test_group_size_mesh_form(groups, size):
    # Newer XLA prints replica groups as mesh axes; counting them as all 8 devices made a 2-way
    # tensor-parallel all-gather look 4x larger than it is.
    hlo = HLO.replace("replica_groups={{0,1,2,3},{4,5,6,7}}", f"replica_groups={groups}")
    assert {k.name: k.group for k in hlo_stats.kernels(hlo, devices=8)}["ar"] == size


@pytest.mark.plan
def test_tiny_compiles_for_h100_without_a_gpu():
    r = run_plan("--config=configs/tiny.py")
    assert r["gpu"] == "NVIDIA H100 80GB HBM3" and r["devices"] == 1 and r["fits"]
    # configs/tiny.py: wte 320x64, wpe 64x64, 2 blocks of 12*64^2 + 13*64, ln_f 2*64.
    n = 320 * 64 + 64 * 64 + 2 * (12 * 64 * 64 + 13 * 64) + 2 * 64
    assert r["params"] == n
    hand = (6 * n + 6 * 2 * 64 * 32) * 8 * 32  # 6N + 6LDT per token x B x T
    assert r["flops_hand_6N_6LDT"] == hand
    assert (r["flops"]["gemm"] + r["flops"]["attention"]) / hand == pytest.approx(1, abs=0.02)
    # Donation: the whole state (float32 params, Adam m and v, a few int32 counters) is aliased.
    assert r["aliased_bytes"] == r["state_bytes"]
    assert 3 * 4 * n <= r["state_bytes"] <= 3 * 4 * n + 64
    assert r["predicted_tokens_per_sec"] > 0 and r["kernel_launches"] > 0


@pytest.mark.plan
def test_preference_config_plans_its_own_batch():
    """A DPO config compiles with the batch main feeds it: pairs [B, 2, T+1] plus reference
    log-probs, two sequences per pair in the token and FLOP counts."""
    B, T = 8, 64
    r = run_plan(
        "--config=configs/tiny.py",
        f"--config.data.batch_size={B}",
        f"--config.data.seq_len={T}",
        "--config.data.path=data/instruction-data-with-preference.json",
        "--config.data.tokenizer=bytes-chat",
    )
    n = r["params"]
    assert r["flops_hand_6N_6LDT"] == (6 * n + 6 * 2 * 64 * T) * B * 2 * T
    tokens = r["predicted_tokens_per_sec"] * r["predicted_step_seconds"]
    assert tokens == pytest.approx(B * 2 * T)


@pytest.mark.parametrize(
    "base, per_row, bend, most_compiles",
    [
        (1.5e9, 0.4e9, 0.0, 4),  # affine (124M-like): 1, 2, the prediction, one 1/8 above it
        (30e9, 1.1e9, 0.0, 4),  # a large model: 30 rows
        (1.5e9, 0.4e9, 2e6, 8),  # a quadratic term: predictions overshoot, the bracket still closes
        (70e9, 1e9, 0.0, 1),  # not even one row fits
        (0.1e9, 1e6, 0.0, 3),  # everything fits: capped at FIT_MAX_BATCH
    ],
)
def test_largest_fitting_within_an_eighth_in_few_compiles(base, per_row, bend, most_compiles):
    usable = 63.7e9
    peak = lambda n: base + per_row * n + bend * n * n
    exact = max([n for n in range(1, plan.FIT_MAX_BATCH + 1) if peak(n) <= usable], default=0)
    tried = []

    def attempt(n):
        tried.append(n)
        return peak(n) <= usable, peak(n), usable

    got = plan.largest_fitting(attempt)
    assert exact - max(1, exact // 8) <= got <= exact
    assert peak(got) <= usable or got == 0
    assert len(tried) <= most_compiles, tried
