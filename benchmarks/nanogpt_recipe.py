"""llmjax on nanoGPT's own CPU recipe (configs/nanogpt_cpu.py): ms/step and the validation loss over
the whole val split, one JSON line last.

    python benchmarks/nanogpt_recipe.py                       # 2,000 steps, ~2-4 min on 2 cores
    python benchmarks/nanogpt_recipe.py --steps=200 --noeval  # a short timing run
    python benchmarks/nanogpt_recipe.py --framework=torch     # the eager PyTorch reference
    python benchmarks/nanogpt_recipe.py --text=input.txt      # the full tiny Shakespeare

Data, as nanoGPT's data/shakespeare_char/prepare.py splits it: the first 90% of the text trains,
the last 10% validates (default text: tests/fixtures/tinyshakespeare_400k.txt, the first 400,000
characters of tiny Shakespeare, public domain). llmjax reads it as bytes (vocabulary 257, padded
to 320); the torch reference, as nanoGPT, as its distinct characters (65 in tiny Shakespeare).

ms/step is the median wall time over the steps after the first --warmup (compilation excluded),
each step waited for, as nanoGPT's loop waits on `loss.item()` at its log_interval of 1; batches
come from llmjax's own loader (data.train_batches), so reading is included as nanoGPT's get_batch
is. The learning-rate schedule is always the recipe's 2,000 steps: a short run times the same
program. The validation loss is the mean over every non-overlapping 64-character window of the val
split, for both frameworks.

`--framework=torch` trains this file's own eager PyTorch GPT with nanoGPT's architecture and
optimizer (LayerNorm without bias, fused q/k/v projection, SDPA causal attention, exact GELU, tied
head, AdamW with decay on matrices, global-norm clipping, nanoGPT's warm-up + cosine): a stand-in
for nanoGPT's train.py to interleave with llmjax on one machine. `--torch_profile` prints
torch.profiler's per-operator table for 20 steps to stderr (the breakdown in benchmarks/NOTES.md).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's llmjax, whatever is installed

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from llmjax import xla_flags  # noqa: E402

FLAGS = flags.FLAGS
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "tinyshakespeare_400k.txt")
TRAIN_FRACTION = 0.9  # nanoGPT's split: the first 90% of the characters train


def define_flags() -> None:
    flags.DEFINE_enum("framework", "llmjax", ["llmjax", "torch"], "what trains")
    flags.DEFINE_integer("steps", 2000, "optimizer steps to run (the schedule stays 2,000 steps)")
    flags.DEFINE_integer("warmup", 10, "first steps left out of the median")
    flags.DEFINE_string("text", FIXTURE, "the corpus (tiny Shakespeare's input.txt or the fixture)")
    flags.DEFINE_string("out", "", "where the llmjax shards go (default: a temporary directory)")
    flags.DEFINE_bool("prepare_only", False, "write the shards to --out and stop")
    flags.DEFINE_bool("eval", True, "the validation loss over the whole val split at the end")
    flags.DEFINE_bool("torch_profile", False, "print torch.profiler's table for 20 steps")


def split_text(path: str) -> tuple[bytes, bytes]:
    with open(path, "rb") as f:
        data = f.read()
    n = int(len(data) * TRAIN_FRACTION)
    return data[:n], data[n:]


def prepare(text: str, out: str) -> None:
    """The byte-level shards of nanoGPT's split: train_000000.bin and val_000000.bin (no meta.json:
    llmjax checks such shards' ids against the tokenizer when a run starts)."""
    from llmjax.shards import shard_name, write_shard

    os.makedirs(out, exist_ok=True)
    for split, data in zip(("train", "val"), split_text(text), strict=True):
        write_shard(os.path.join(out, shard_name(split, 0)), np.frombuffer(data, np.uint8))


def val_windows(tokens: np.ndarray, T: int) -> np.ndarray:
    """Every non-overlapping window of T+1 tokens (stride T): int32 [n, T+1]."""
    n = (len(tokens) - 1) // T
    return np.stack([tokens[i * T : i * T + T + 1] for i in range(n)]).astype(np.int32)


def run_llmjax(cfg, steps: int, warmup: int, data_path: str, evaluate: bool) -> dict:
    import jax

    from llmjax import batches, data, sharding, train
    from llmjax import evaluate as evaluate_lib
    from llmjax.shards import read_shard, shard_name

    B, T = cfg.data.batch_size, cfg.data.seq_len
    run = train.build(cfg, batches.objective(cfg, "pretrain"))
    state = train.initial_state(run)
    batches = data.train_batches(
        data_path,
        seq_len=T,
        batch=B,
        vocab_size=run.model_cfg.valid_vocab_size,
        seed=cfg.train.seed,
        start_step=0,
        steps=steps,
    )
    step = run.train_step.lower(run.abstract_state, run.batch_spec).compile()
    times, cpu, losses = [], [], []
    for batch in batches:
        t, c = time.perf_counter(), time.process_time()
        state, m = step(state, sharding.put_batch(batch, run.mesh))
        losses.append(float(m["train/loss"]))  # waits for the step, as nanoGPT's loss.item()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    val = None
    if evaluate:
        w = val_windows(np.asarray(read_shard(os.path.join(data_path, shard_name("val", 0)))), T)
        # The last batch filled with unscored context-only rows (id -1 - 0: see loss.py).
        pad = np.full(((-len(w)) % B, T + 1), -1, np.int32)
        w = np.concatenate([w, pad])
        rows = [sharding.put_batch(w[i : i + B], run.mesh) for i in range(0, len(w), B)]
        val = evaluate_lib.mean_metrics(run.eval_step, state.params, rows)["loss"]
    return {
        "framework": "llmjax",
        "jax": jax.__version__,
        "train_loss_last": losses[-1],
        **_figures(times, cpu, warmup, val),
    }


def _figures(times: list[float], cpu: list[float], warmup: int, val: float | None) -> dict:
    timed, cpu = times[warmup:] or times, cpu[warmup:] or cpu
    return {
        "steps": len(times),
        "ms_per_step": 1e3 * statistics.median(timed),
        "ms_per_step_min": 1e3 * min(timed),
        "ms_per_step_mean": 1e3 * statistics.fmean(timed),
        # CPU time the process spent per step (all its threads): less sensitive than wall time to
        # other processes on a shared machine, but it counts spin-waiting threads too.
        "cpu_ms_per_step": 1e3 * statistics.median(cpu),
        "val_loss": val,
    }


# ---------------------------------------------------------------------------------------------
# The eager PyTorch reference: nanoGPT's architecture and loop, written here from its description.


def _torch_model(vocab: int, cfg):
    import torch
    import torch.nn.functional as F
    from torch import nn

    D, N, L = cfg.model.n_embd, cfg.model.n_head, cfg.model.n_layer

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(D, bias=False), nn.LayerNorm(D, bias=False)
            self.c_attn = nn.Linear(D, 3 * D, bias=False)
            self.attn_proj = nn.Linear(D, D, bias=False)
            self.c_fc = nn.Linear(D, 4 * D, bias=False)
            self.mlp_proj = nn.Linear(4 * D, D, bias=False)

        def forward(self, x):
            B, T, _ = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).split(D, dim=2)
            q, k, v = (a.view(B, T, N, D // N).transpose(1, 2) for a in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.attn_proj(y.transpose(1, 2).contiguous().view(B, T, D))
            return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(vocab, D)
            self.wpe = nn.Embedding(cfg.model.block_size, D)
            self.h = nn.ModuleList(Block() for _ in range(L))
            self.ln_f = nn.LayerNorm(D, bias=False)
            for name, p in self.named_parameters():
                if p.dim() == 2:
                    std = 0.02 / math.sqrt(2 * L) if name.endswith("_proj.weight") else 0.02
                    nn.init.normal_(p, 0.0, std)

        def forward(self, idx, targets):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
            for block in self.h:
                x = block(x)
            logits = F.linear(self.ln_f(x), self.wte.weight)  # tied head
            return F.cross_entropy(logits.view(-1, vocab), targets.reshape(-1))

    return GPT()


def run_torch(cfg, steps: int, warmup: int, text: str, evaluate: bool, profile: bool) -> dict:
    import torch

    torch.manual_seed(cfg.train.seed)
    train_b, val_b = split_text(text)
    chars = sorted(set(train_b + val_b))  # nanoGPT's vocabulary: the text's distinct characters
    lut = np.zeros(256, np.int64)
    lut[chars] = np.arange(len(chars))
    train_ids = lut[np.frombuffer(train_b, np.uint8)]
    val_ids = lut[np.frombuffer(val_b, np.uint8)]
    model = _torch_model(len(chars), cfg)
    o = cfg.optim
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=o.lr,
        betas=(o.b1, o.b2),
        eps=o.eps,
    )
    B, T, total = cfg.data.batch_size, cfg.data.seq_len, cfg.train.steps
    rng = np.random.default_rng(cfg.train.seed)

    def lr_at(it: int) -> float:
        if it < o.warmup_steps:
            return o.lr * (it + 1) / (o.warmup_steps + 1)
        ratio = min(1.0, (it - o.warmup_steps) / (total - o.warmup_steps))
        return o.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (o.lr - o.min_lr)

    def one_step(it: int) -> float:
        starts = rng.integers(0, len(train_ids) - T - 1, B)
        xy = torch.from_numpy(np.stack([train_ids[s : s + T + 1] for s in starts]))
        for g in opt.param_groups:
            g["lr"] = lr_at(it)
        loss = model(xy[:, :-1], xy[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        for it in range(5):
            one_step(it)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for it in range(5, 25):
                one_step(it)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
        print(table, file=sys.stderr)
    times, cpu, losses = [], [], []
    for it in range(steps):
        t, c = time.perf_counter(), time.process_time()
        losses.append(one_step(it))
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    val = None
    if evaluate:
        w = torch.from_numpy(val_windows(val_ids, T)).long()
        with torch.no_grad():
            sums = [
                model(w[i : i + B, :-1], w[i : i + B, 1:]).item() * len(w[i : i + B]) * T
                for i in range(0, len(w), B)
            ]
        val = sum(sums) / (len(w) * T)
    return {
        "framework": "torch-eager",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "vocab": len(chars),
        "train_loss_last": losses[-1],
        **_figures(times, cpu, warmup, val),
    }


def main(argv: list[str]) -> None:
    del argv
    xla_flags.apply()  # before jax starts a backend
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    import nanogpt_cpu

    cfg = nanogpt_cpu.get_config()
    if not os.path.isfile(FLAGS.text):
        print(f"nanogpt_recipe: --text={FLAGS.text!r}: no such file", file=sys.stderr)
        sys.exit(2)
    if FLAGS.steps < 1 or FLAGS.steps > cfg.train.steps:
        limit = cfg.train.steps
        print(f"nanogpt_recipe: --steps={FLAGS.steps} must be in 1..{limit}", file=sys.stderr)
        sys.exit(2)
    if FLAGS.prepare_only and not FLAGS.out:
        print("nanogpt_recipe: --prepare_only needs --out=DIR", file=sys.stderr)
        sys.exit(2)
    t0 = time.perf_counter()
    if FLAGS.framework == "torch":
        r = run_torch(cfg, FLAGS.steps, FLAGS.warmup, FLAGS.text, FLAGS.eval, FLAGS.torch_profile)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            out = FLAGS.out or tmp
            prepare(FLAGS.text, out)
            if FLAGS.prepare_only:
                print(json.dumps({"prepared": out}))
                return
            cfg.data.path = out
            r = run_llmjax(cfg, FLAGS.steps, FLAGS.warmup, out, FLAGS.eval)
    r["seconds"] = round(time.perf_counter() - t0, 1)
    r["load_avg_1m"] = os.getloadavg()[0]
    print(json.dumps(r))


if __name__ == "__main__":
    define_flags()
    app.run(main)
