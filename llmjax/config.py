"""Every config key, declared once with its meaning, and the checks run before anything compiles.

Config files under configs/ start from `base_config()` and override values; a key that is not
declared here is an error (ml_collections locks the dict), so a typo never silently does nothing.

A leaf: it imports no other llmjax module but errors, so reading and checking a config starts
neither jax nor a tokenizer. The values each choice key allows, and each tokenizer's vocabulary
size, are declared here with the keys; the modules that implement them (model, optim, tokenizer,
trackers) import them from here, and tests/test_config.py checks the vocabulary sizes against
the tokenizers.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections

from llmjax.errors import UserError

DTYPES = ("float32", "bfloat16", "float16")
DATA_KINDS = ("auto", "pretrain", "instruct", "preference")
VERIFY = ("full", "cached", "off")  # data.verify: integrity.py's modes
ATTENTION = ("auto", "xla", "cudnn", "splash")
POSITIONS = ("learned", "rope")  # model.position
NORMS = ("layernorm", "rmsnorm")  # model.norm
MLPS = ("gelu", "relu2")  # model.mlp
REMAT = ("none", "dots_saveable", "full")  # model.remat: model.REMAT_POLICIES's names
OPTIMIZERS = ("adamw", "muon")  # optim.name
SCHEDULES = ("cosine", "wsd")  # optim.schedule
TRACKERS = ("tensorboard", "mlflow", "wandb", "none")  # train.trackers, comma-separated
# data.tokenizer -> its vocabulary (the -chat variants add 4 chat tokens after the base's).
VOCAB_SIZES = {"gpt2": 50257, "bytes": 257, "gpt2-chat": 50261, "bytes-chat": 261}
TOKENIZERS = tuple(VOCAB_SIZES)
# Tokens per loss chunk, train.loss_chunk's default (per device: train.build multiplies it by the
# data-parallel size, as loss.py's `chunk` counts the batch the loss is given). A chunk's logits
# are chunk x V in the compute dtype (bf16, GPT-2's vocabulary: 206 MB at 2,048 tokens); each
# chunk also reads and writes the float32 gradient of the tied embedding once (0.3 GB for GPT-2).
# benchmarks/NOTES.md has the trade-off measured for 124M on an H100.
CHUNK_TOKENS = 2048


class ConfigError(UserError):
    """A user-facing configuration problem; its message is one line naming the key and value."""


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.model = m = ml_collections.ConfigDict()
    m.n_layer = 12  # transformer blocks
    m.n_head = 12  # attention heads; must divide n_embd
    m.n_embd = 768  # model width D
    m.block_size = 1024  # longest context (rows of the position embedding)
    m.vocab_size = 0  # embedding rows; 0 = the tokenizer's vocabulary padded to a multiple of 64
    m.dropout = 0.0  # residual/embedding dropout; GPT-2 pretraining uses 0
    m.dtype = "float32"  # compute dtype: float32 | bfloat16 (bf16 matmuls, f32 loss and softmax)
    m.param_dtype = "float32"  # dtype of the master weights and optimizer state
    # auto | xla | cudnn | splash; auto = cudnn flash on GPU with bf16, Pallas splash attention on
    # TPU, else xla (the tested reference)
    m.attention = "auto"
    # Weights a fresh run starts from: scratch (random init) | a hub id (gpt2, gpt2-medium, ...) |
    # a local Hugging Face directory | an llmjax workdir (e.g. written by llmjax.convert). Shape
    # keys above must match the source; a longer source context is cropped to block_size.
    m.init_from = "scratch"
    # Stack the blocks on a leading "layers" axis and run them with one lax.scan: compile time stays
    # flat with depth; unrolled layers (False) let XLA fuse across layer boundaries.
    m.scan_layers = False
    # Recompute each block's activations in the backward pass so bigger batches/models fit:
    # none | dots_saveable (keep weight-matmul outputs) | full (keep only block inputs).
    m.remat = "none"
    # Architecture beside exact GPT-2 (the defaults; llmjax.convert exports only those). The
    # speedrun recipe (configs/speedrun_*.py, README) turns these on; each is ablated in
    # benchmarks/RESULTS.md.
    m.position = "learned"  # learned (GPT-2's wpe) | rope (rotary q and k, no wpe)
    m.norm = "layernorm"  # layernorm (GPT-2's, scale and bias) | rmsnorm (no parameters)
    m.qk_norm = False  # parameter-free RMSNorm of q and k per head before attention
    m.mlp = "gelu"  # gelu (GPT-2's tanh GELU) | relu2 (ReLU squared)
    m.bias = True  # biases in the linear layers (and c_attn)
    m.tie_embeddings = True  # head = wte (GPT-2); False = its own lm_head, initialised to zero
    m.zero_init_proj = False  # attn/mlp c_proj start at zero: each block starts as the identity
    m.logit_cap = 0.0  # logits -> cap * tanh(logits / cap) (Gemma 2's soft-cap); 0 = off
    m.x0_mix = False  # each block's input is a * x + b * x0 (x0: the embedding), a, b learned

    c.data = d = ml_collections.ConfigDict()
    d.path = ""  # directory of shards written by `python -m llmjax.prepare`
    # What the run trains on: auto | pretrain (shards) | instruct (a file of conversations) |
    # preference (a file of chosen/rejected pairs: DPO). auto = what data.path holds, decided once
    # at start and stored in the checkpoint.
    d.kind = "auto"
    d.tokenizer = "gpt2"  # gpt2 | bytes; must match the tokenizer the shards were made with
    d.batch_size = 512  # global batch, in sequences, summed over devices and accumulation
    d.seq_len = 1024  # tokens per training sequence (<= model.block_size)
    d.workers = 0  # Grain worker processes (0 = read in threads of this process)
    d.prefetch = 4  # batches read ahead of the train step
    # Shard contents checked before step 1 (integrity.py): full = every shard's sha256 (against
    # meta.json) and largest token id on every start; cached = only shards changed since this
    # user last verified them (path, size, mtime); off = none (ids still checked as read).
    d.verify = "cached"

    c.optim = o = ml_collections.ConfigDict()
    o.lr = 6e-4  # peak learning rate, reached after warmup
    o.min_lr = 6e-5  # learning rate at the end of the cosine decay
    o.warmup_steps = 715  # linear warmup from 0 (375M tokens at 524,288 tokens/step)
    o.weight_decay = 0.1  # decoupled AdamW decay, applied to kernels and embeddings only
    o.b1 = 0.9  # Adam first-moment decay
    o.b2 = 0.95  # Adam second-moment decay (GPT-3's choice, steadier than 0.999)
    o.eps = 1e-8  # Adam epsilon
    o.grad_clip = 1.0  # global-norm clipping threshold; 0 disables
    o.grad_accum = 1  # micro-batches per step; data.batch_size must divide evenly
    # adamw | muon: Muon (optax.contrib) on the blocks' weight matrices, with its own peak rate
    # muon_lr on the same schedule; AdamW with the keys above for embeddings, head, norms, biases.
    o.name = "adamw"
    # cosine: warmup then cosine to min_lr | wsd: warmup, constant, then linear to min_lr over the
    # last decay_frac of the steps (warm-up/stable/decay, the speedruns' trapezoid)
    o.schedule = "cosine"
    o.decay_frac = 0.2  # share of train.steps the wsd schedule spends decaying
    o.muon_lr = 0.02  # Muon's peak learning rate (its updates are orthogonalised, so ~unit RMS)
    o.muon_momentum = 0.95  # Muon's (Nesterov) momentum after its warm-up
    o.muon_momentum_start = 0.85  # momentum at step 0, raised linearly over the warm-up
    o.muon_momentum_warmup = 0  # steps of Muon momentum warm-up; 0 = muon_momentum throughout
    o.muon_weight_decay = 0.0  # Muon's decoupled weight decay (multiplied by its learning rate)
    # Preference finetuning (a data.path of chosen/rejected pairs, see dpo.py): beta scales the
    # implicit reward beta * (log pi - log pi_ref); label smoothing > 0 is conservative DPO (the
    # share of pairs assumed mislabelled), 0 plain DPO.
    o.dpo_beta = 0.1
    o.dpo_label_smoothing = 0.0

    c.train = t = ml_collections.ConfigDict()
    t.steps = 19073  # optimizer steps (19073 x 524288 tokens = 10B tokens)
    t.seed = 0  # one seed: init, dropout and data order derive from it
    # Tokens per device in each LM-head/cross-entropy chunk of a micro-batch (loss.py): the
    # [B, T, V] logits never exist, only one chunk's. Smaller saves memory, larger saves traffic
    # (see CHUNK_TOKENS).
    t.loss_chunk = CHUNK_TOKENS
    t.z_loss = 0.0  # weight of PaLM's z-loss, z * logsumexp^2 per scored target; 0 = off
    t.log_every = 10  # steps between metric logs (the only host syncs in the loop)
    t.eval_every = 250  # steps between validation-loss evaluations; 0 disables
    t.eval_batches = 20  # validation batches per evaluation (same batches every time)
    t.ckpt_every = 1000  # steps between checkpoints (one is always written at the end)
    t.keep_ckpts = 3  # most recent checkpoints kept on disk
    t.keep_every = 0  # also keep forever the checkpoints at multiples of this step; 0 = none
    t.sample_every = 1000  # steps between text samples from sample_prompt; 0 disables
    t.sample_prompt = "Hello, I'm a language model,"  # prompt for periodic samples
    t.sample_tokens = 64  # tokens generated per periodic sample
    t.max_bad_steps = 10  # consecutive non-finite steps (skipped) before the run stops
    t.spike_factor = 1.3  # loss-spike event when a step's loss > this x its running mean; 0 = off
    t.hellaswag_every = 0  # steps between HellaSwag evaluations (eval/hellaswag_acc*); 0 disables
    t.hellaswag_path = "download"  # HellaSwag val jsonl, or "download" (official file, cached)
    t.hellaswag_items = 0  # first N items per evaluation; 0 = all 10,042
    # lm-evaluation-harness tasks (names or YAML files, comma-separated) scored every
    # harness_every steps as harness/<task>/<metric> (llmjax.harness; the `harness` extra).
    t.harness_tasks = ""
    t.harness_every = 0  # steps between harness evaluations; 0 disables
    t.harness_limit = 0  # first N documents per task per evaluation; 0 = all
    # Where metrics.jsonl's rows are also sent, comma-separated: tensorboard (WORKDIR/tb) | mlflow
    # | wandb | none. MLflow and W&B are extras: pip install -e ".[mlflow]" / ".[wandb]".
    t.trackers = "tensorboard"
    t.mlflow_uri = ""  # MLflow tracking URI (http://127.0.0.1:5000, sqlite:///...); "" = env
    t.experiment = ""  # MLflow experiment (W&B project if wandb_project is ""); "" = config name
    t.wandb_project = ""  # W&B project; "" = the experiment; WANDB_MODE=offline is honoured
    t.tracker_optional = False  # a tracker that cannot start: True = one warning, False = error

    c.mesh = h = ml_collections.ConfigDict()
    h.data = -1  # data-parallel axis; -1 takes the devices the other axes leave
    h.fsdp = 1  # parameter/optimizer sharding (ZeRO-3) axis
    h.tensor = 1  # tensor-parallel axis (attention heads, MLP hidden)
    # TPU multislice: data-parallel replicas over the data-center network, one per slice; the
    # three axes above then tile one slice. -1 = as many as the devices span (1 off TPU).
    h.dcn_data = -1
    return c


def load(path: str) -> ml_collections.ConfigDict:
    """What a config file's get_config() returns, read by path as `--config=PATH` reads it
    (configs/ is not a package): for a config built on another, and for tests and benchmarks."""
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Raises ConfigError on the first problem; touches no files and no devices."""
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train
    for key, v in [
        ("model.n_layer", m.n_layer),
        ("model.n_head", m.n_head),
        ("model.n_embd", m.n_embd),
        ("model.block_size", m.block_size),
        ("data.batch_size", d.batch_size),
        ("data.seq_len", d.seq_len),
        ("optim.grad_accum", o.grad_accum),
        ("train.steps", t.steps),
        ("train.log_every", t.log_every),
        ("train.ckpt_every", t.ckpt_every),
        ("train.keep_ckpts", t.keep_ckpts),
        ("train.max_bad_steps", t.max_bad_steps),
        ("train.loss_chunk", t.loss_chunk),
    ]:
        _check(v >= 1, f"{key}={v} must be >= 1")
    for key, v in [
        ("train.eval_every", t.eval_every),
        ("train.sample_every", t.sample_every),
        ("train.eval_batches", t.eval_batches),
        ("optim.warmup_steps", o.warmup_steps),
        ("data.workers", d.workers),
        ("data.prefetch", d.prefetch),
        ("optim.weight_decay", o.weight_decay),
        ("optim.grad_clip", o.grad_clip),
        ("model.vocab_size", m.vocab_size),
        ("train.sample_tokens", t.sample_tokens),
        ("train.keep_every", t.keep_every),
        ("train.hellaswag_every", t.hellaswag_every),
        ("train.hellaswag_items", t.hellaswag_items),
        ("train.harness_every", t.harness_every),
        ("train.harness_limit", t.harness_limit),
        ("train.z_loss", t.z_loss),
        ("model.logit_cap", m.logit_cap),
        ("optim.muon_weight_decay", o.muon_weight_decay),
        ("optim.muon_momentum_warmup", o.muon_momentum_warmup),
    ]:
        _check(v >= 0, f"{key}={v} must be >= 0")
    _check(
        t.keep_every % t.ckpt_every == 0,
        f"train.keep_every={t.keep_every} is not a multiple of train.ckpt_every={t.ckpt_every}",
    )
    _check(
        t.spike_factor == 0 or t.spike_factor > 1,
        f"train.spike_factor={t.spike_factor} must be 0 (off) or > 1",
    )
    _check(
        m.n_embd % m.n_head == 0,
        f"model.n_embd={m.n_embd} is not divisible by model.n_head={m.n_head}",
    )
    _check(
        d.seq_len <= m.block_size,
        f"data.seq_len={d.seq_len} exceeds model.block_size={m.block_size}",
    )
    _check(0.0 <= m.dropout < 1.0, f"model.dropout={m.dropout} must be in [0, 1)")
    for key, v, allowed in [
        ("model.dtype", m.dtype, DTYPES),
        ("model.param_dtype", m.param_dtype, DTYPES),
        ("model.remat", m.remat, REMAT),
        ("model.attention", m.attention, ATTENTION),
        ("model.position", m.position, POSITIONS),
        ("model.norm", m.norm, NORMS),
        ("model.mlp", m.mlp, MLPS),
        ("optim.name", o.name, OPTIMIZERS),
        ("optim.schedule", o.schedule, SCHEDULES),
        ("data.kind", d.kind, DATA_KINDS),
        ("data.tokenizer", d.tokenizer, TOKENIZERS),
        ("data.verify", d.verify, VERIFY),
    ]:
        _check(v in allowed, f"{key}={v!r} is not one of {', '.join(allowed)}")
    _check(0 < o.decay_frac <= 1, f"optim.decay_frac={o.decay_frac} must be in (0, 1]")
    _check(o.muon_lr > 0, f"optim.muon_lr={o.muon_lr} must be > 0")
    for key, v in [
        ("optim.muon_momentum", o.muon_momentum),
        ("optim.muon_momentum_start", o.muon_momentum_start),
    ]:
        _check(0 <= v < 1, f"{key}={v} must be in [0, 1)")
    _check(
        m.position != "rope" or (m.n_embd // m.n_head) % 2 == 0,
        f"model.position=rope needs an even head size, not {m.n_embd}/{m.n_head}",
    )
    _check(bool(m.init_from), "model.init_from is empty (use scratch for a random init)")
    _check(
        not t.hellaswag_every or bool(t.hellaswag_path),
        "train.hellaswag_path is empty but train.hellaswag_every > 0",
    )
    _check(
        not t.harness_every or bool(t.harness_tasks.strip(", ")),
        "train.harness_tasks is empty but train.harness_every > 0",
    )
    parse_trackers(t.trackers)
    _check(o.lr > 0, f"optim.lr={o.lr} must be > 0")
    _check(o.dpo_beta > 0, f"optim.dpo_beta={o.dpo_beta} must be > 0")
    _check(
        0 <= o.dpo_label_smoothing < 0.5,
        f"optim.dpo_label_smoothing={o.dpo_label_smoothing} must be in [0, 0.5)",
    )
    _check(0 <= o.min_lr <= o.lr, f"optim.min_lr={o.min_lr} must be in [0, optim.lr={o.lr}]")
    _check(0 <= o.b1 < 1 and 0 <= o.b2 < 1, f"optim.b1={o.b1}, optim.b2={o.b2} must be in [0, 1)")
    _check(
        d.batch_size % o.grad_accum == 0,
        f"data.batch_size={d.batch_size} is not divisible by optim.grad_accum={o.grad_accum}",
    )
    vocab = VOCAB_SIZES[d.tokenizer]
    _check(
        m.vocab_size == 0 or m.vocab_size >= vocab,
        f"model.vocab_size={m.vocab_size} is below the {d.tokenizer} vocabulary ({vocab})",
    )
    for key, v in [
        ("mesh.data", cfg.mesh.data),
        ("mesh.fsdp", cfg.mesh.fsdp),
        ("mesh.tensor", cfg.mesh.tensor),
        ("mesh.dcn_data", cfg.mesh.dcn_data),
    ]:
        _check(v == -1 or v >= 1, f"{key}={v} must be >= 1 or -1")
    _check(
        [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor].count(-1) <= 1,
        "only one of mesh.data, mesh.fsdp, mesh.tensor may be -1",
    )


def parse_trackers(spec: str) -> list[str]:
    """The trackers named by `train.trackers` ("tensorboard,mlflow"; "none" = only
    metrics.jsonl), in order, without "none"."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    for n in names:
        _check(n in TRACKERS, f"train.trackers={spec!r}: {n!r} is not one of {', '.join(TRACKERS)}")
    _check(
        bool(names) and ("none" not in names or len(names) == 1),
        f"train.trackers={spec!r}: name trackers, or none alone",
    )
    return [n for n in names if n != "none"]


def overrides(argv: list[str]) -> set[str]:
    """The config keys given on a command line (`--config.model.n_layer=2` -> "model.n_layer"):
    what the user asked for explicitly, as opposed to the config file's defaults."""
    keys = set()
    for arg in argv:
        if arg.startswith("--config."):
            keys.add(arg[len("--config.") :].split("=", 1)[0])
    return keys
