"""llmjax against transformers' PyTorch GPT2LMHeadModel, same shapes, same device, one process.

    python benchmarks/compare_torch.py --config=configs/gpt2_124m.py --batch_size=32 \
        --seq_len=1024 --steps=50

The PyTorch baseline is the strong one of the issue: bf16 autocast (when the config computes in
bf16 on a GPU), SDPA attention, fused AdamW, torch.compile, global-norm clipping, float32 loss
over the same padded vocabulary. PyTorch runs first and frees its memory before JAX starts.
On CPU both run in float32 (a smoke run; --torch_compile defaults to off there, as Inductor's CPU
compile takes minutes). Prints both results, the ratio llmjax/torch of tokens/s, and one JSON
object last: {"llmjax": {...}, "torch": {...}, "ratio": ...}.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_time  # noqa: E402  (also puts this checkout's llmjax first on sys.path)
from absl import app, flags  # noqa: E402

from llmjax import xla_flags  # noqa: E402

FLAGS = flags.FLAGS


def torch_benchmark(cfg, steps: int, warmup: int, compile_model: bool | None) -> dict:
    """Times one training step of transformers' GPT-2 with the config's shapes and optimizer."""
    import torch
    import torch.nn.functional as F
    import transformers

    from llmjax.model import flops_per_token, model_config

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if not cuda:
        # OpenMP workers spin-wait; on a busy shared CPU two of them made a tiny step 2.3 s instead
        # of 25 ms (measured). A CPU run is a smoke test, so one thread.
        torch.set_num_threads(1)
    compile_model = cuda if compile_model is None else compile_model
    mc = model_config(cfg, "gpu" if cuda else "cpu")
    bf16 = cuda and mc.dtype == "bfloat16"
    B, T, V = cfg.data.batch_size, cfg.data.seq_len, mc.vocab_size
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(
        vocab_size=V,
        n_positions=mc.block_size,
        n_embd=mc.n_embd,
        n_layer=mc.n_layer,
        n_head=mc.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        activation_function="gelu_new",
        bos_token_id=mc.valid_vocab_size - 1,
        eos_token_id=mc.valid_vocab_size - 1,
    )
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa")
    model.to(device).train()
    n_params = sum(p.numel() for p in model.parameters())  # tied wte counted once
    o = cfg.optim
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": o.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=o.lr,
        betas=(o.b1, o.b2),
        eps=o.eps,
        fused=True,
    )
    forward = torch.compile(model) if compile_model else model
    accum = o.grad_accum
    rng = torch.Generator().manual_seed(0)
    data = torch.randint(0, mc.valid_vocab_size, (B, T + 1), generator=rng).to(device)
    x_ABT = data[:, :-1].reshape(accum, B // accum, T)
    y_ABT = data[:, 1:].reshape(accum, B // accum, T)

    def step() -> torch.Tensor:
        total = 0.0
        for x_BT, y_BT in zip(x_ABT, y_ABT, strict=True):
            with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                logits_BTV = forward(x_BT).logits
            loss = F.cross_entropy(logits_BTV.float().view(-1, V), y_BT.reshape(-1)) / accum
            loss.backward()
            total = total + loss.detach()
        if o.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    first_loss = float(step())  # includes torch.compile's compilation
    compile_s = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        step()
    sync()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t)
    ms = 1e3 * statistics.median(times)
    tokens_per_sec = B * T / (ms / 1e3)
    fpt = flops_per_token(mc, n_params, T)
    from llmjax import metrics

    # The same peak table as llmjax, keyed by the name jax would report for this GPU.
    kind = torch.cuda.get_device_name() if cuda else "cpu"
    peak = metrics.PEAK_FLOPS.get(kind) or next(
        (v for k, v in metrics.PEAK_FLOPS.items() if kind.startswith(k)), None
    )
    result = {
        "framework": "torch",
        "device": kind,
        "n_devices": 1,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "batch_size": B,
        "seq_len": T,
        "grad_accum": accum,
        "n_layer": mc.n_layer,
        "n_embd": mc.n_embd,
        "n_params": n_params,
        "dtype": "bfloat16 autocast" if bf16 else "float32",
        "attention": "sdpa",
        "torch_compile": compile_model,
        "fused_adamw": True,
        "steps": steps,
        "warmup": warmup,
        "compile_s": round(compile_s, 2),
        "ms_per_step": ms,
        "ms_per_step_min": 1e3 * min(times),
        "ms_per_step_max": 1e3 * max(times),
        "tokens_per_sec": tokens_per_sec,
        "flops_per_token": fpt,
        "peak_flops": peak,
        "mfu": tokens_per_sec * fpt / peak if peak else None,
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "loss_first": first_loss,
        "loss_last": float(loss),
    }
    return result


def main(argv: list[str]) -> None:
    del argv
    xla_flags.apply()  # before jax starts a backend
    cfg = step_time.apply_overrides(FLAGS.config, FLAGS.batch_size, FLAGS.seq_len)
    import torch

    if not torch.cuda.is_available():
        cfg.model.dtype = "float32"  # CPU smoke run: both sides in float32
    compile_flag = {"auto": None, "true": True, "false": False}[FLAGS.torch_compile]
    torch_r = torch_benchmark(cfg, FLAGS.steps, FLAGS.warmup, compile_flag)
    gc.collect()  # the model, optimizer and compiled graphs went out of scope above
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # hand the memory back before JAX allocates its pool
    jax_r = step_time.benchmark(cfg, FLAGS.steps, FLAGS.warmup)
    step_time.report(torch_r)
    step_time.report(jax_r)
    ratio = jax_r["tokens_per_sec"] / torch_r["tokens_per_sec"]
    print(f"llmjax / torch tokens/s: {ratio:.3f}x (goal on H100: >= 1.3x)")
    print(json.dumps({"llmjax": jax_r, "torch": torch_r, "ratio": ratio}))


if __name__ == "__main__":
    step_time.define_flags()
    flags.DEFINE_enum(
        "torch_compile",
        "auto",
        ["auto", "true", "false"],
        "torch.compile the model; auto = on with CUDA, off on CPU",
    )
    app.run(main)
