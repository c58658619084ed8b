"""The training run: state creation, the pure step functions, and the loop with its cadence.

`_train_step` and `_eval_step` are pure functions of (state, batch), jitted once with explicit
shardings and with the state donated, so parameters are updated in place. The loop reads metrics
back from the device only every `train.log_every` steps.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from llmjax import checkpoint, data, instruct, metrics, optim, sharding
from llmjax.config import ConfigError, model_config
from llmjax.model import GPT, GPTConfig, count_params, flops_per_token
from llmjax.sample import generate
from llmjax.tokenizer import Tokenizer, get_tokenizer


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # optimizer steps taken (skipped non-finite steps included)
    params: Any  # pure dict of arrays, the model's nnx.Param state
    opt_state: Any
    skipped: jax.Array  # total non-finite steps skipped
    bad_streak: jax.Array  # consecutive non-finite steps up to now


def _loss(params, graphdef, batch_BT1, rng, deterministic: bool):
    """Summed cross-entropy over scored targets, and their count.

    A negative id -1-t is token t read as context but never scored as a target (prompt and padding
    in finetuning batches, see instruct.py); pretraining batches score every target.
    """
    tokens_BT1 = jnp.where(batch_BT1 < 0, -1 - batch_BT1, batch_BT1)
    weights_BT = (batch_BT1[:, 1:] >= 0).astype(jnp.float32)
    model = nnx.merge(graphdef, params)
    rngs = None if deterministic else nnx.Rngs(dropout=rng)
    logits_BTV = model(tokens_BT1[:, :-1], deterministic=deterministic, rngs=rngs)
    # Logits arrive in float32 whatever the compute dtype: the softmax and loss stay exact.
    ce_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, tokens_BT1[:, 1:])
    return (ce_BT * weights_BT).sum(), weights_BT.sum()


def _train_step(
    state: TrainState,
    batch_BT1,
    *,
    graphdef,
    tx,
    accum: int,
    seed: int,
    dropout: bool,
    schedule,
    micro_sh,
    param_sh,
):
    """One optimizer step over `accum` micro-batches; skipped if the loss or gradient is not finite.

    The step is pure: the dropout key derives from (seed, step), so a resumed run repeats it
    exactly. The loss is the mean over every scored target of the whole batch, whatever the split
    into micro-batches.
    """
    B = batch_BT1.shape[0]
    # Micro-batch a is rows a, a + accum, ...: each device keeps its own rows in every micro-batch,
    # so splitting the batch moves no data between devices.
    micro_ABT1 = batch_BT1.reshape(B // accum, accum, -1).swapaxes(0, 1)
    micro_ABT1 = jax.lax.with_sharding_constraint(micro_ABT1, micro_sh)
    key = jax.random.fold_in(jax.random.key(seed), state.step)
    grad_fn = jax.value_and_grad(_loss, has_aux=True)

    def micro(acc, xs):
        grads, total, count = acc
        batch_BT1, i = xs
        (loss_sum, n), g = grad_fn(
            state.params, graphdef, batch_BT1, jax.random.fold_in(key, i), not dropout
        )
        # Gradients take the parameters' layout: with fsdp > 1 they are reduce-scattered (ZeRO),
        # never all-reduced into full copies on every device.
        g = jax.lax.with_sharding_constraint(g, param_sh)
        return (jax.tree.map(jnp.add, grads, g), total + loss_sum, count + n), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    init = (zeros, jnp.zeros(()), jnp.zeros(()))
    (grads, total, count), _ = jax.lax.scan(micro, init, (micro_ABT1, jnp.arange(accum)))
    count = jnp.maximum(count, 1.0)  # nothing scored: a zero gradient, never a division by zero
    grads = jax.tree.map(lambda g: g / count, grads)
    loss, grad_norm = total / count, optax.tree_utils.tree_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # Checked before anything is applied: a non-finite step leaves params and optimizer untouched.
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    new_state = TrainState(
        step=state.step + 1,
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        skipped=state.skipped + (~ok),
        bad_streak=jnp.where(ok, 0, state.bad_streak + 1),
    )
    # Skipped steps never reached the optimizer, so its schedule counts only the applied ones.
    lr = schedule(state.step - state.skipped)
    return new_state, {"train/loss": loss, "train/grad_norm": grad_norm, "train/lr": lr}


def _eval_step(params, batch_BT1, *, graphdef):
    """(summed loss, scored targets): summed over batches, their ratio is the exact mean."""
    return _loss(params, graphdef, batch_BT1, None, True)


@dataclasses.dataclass
class Run:
    """Everything derived once from the config: model structure, optimizer, mesh, jitted steps."""

    cfg: ml_collections.ConfigDict
    model_cfg: GPTConfig
    graphdef: Any
    tx: optax.GradientTransformation
    mesh: jax.sharding.Mesh
    state_shardings: Any
    abstract_state: Any
    train_step: Any
    eval_step: Any
    init: Any


def build(cfg: ml_collections.ConfigDict, devices=None) -> Run:
    try:
        mesh = sharding.make_mesh(cfg.mesh, devices)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    model_cfg = model_config(cfg, jax.default_backend())
    tx = optim.make_optimizer(cfg.optim, cfg.train.steps)

    def init() -> TrainState:
        model = GPT(model_cfg, nnx.Rngs(params=jax.random.key(cfg.train.seed)))
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        zero = jnp.zeros((), jnp.int32)
        return TrainState(zero, params, tx.init(params), zero, zero)

    abstract_model = nnx.eval_shape(lambda: GPT(model_cfg, nnx.Rngs(0)))
    graphdef = nnx.graphdef(abstract_model)
    param_sh = sharding.param_shardings(nnx.state(abstract_model, nnx.Param), mesh)
    abstract = jax.eval_shape(init)
    sharding.check_run(cfg, mesh, param_sh, abstract.params)
    repl = sharding.replicated(mesh)
    opt_sh = optax.tree_map_params(
        tx, lambda _, s: s, abstract.opt_state, param_sh, transform_non_params=lambda _: repl
    )
    state_sh = TrainState(repl, param_sh, opt_sh, repl, repl)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh
    )
    batch_sh = sharding.batch_sharding(mesh)
    step_fn = functools.partial(
        _train_step,
        graphdef=graphdef,
        tx=tx,
        accum=cfg.optim.grad_accum,
        seed=cfg.train.seed,
        dropout=cfg.model.dropout > 0,
        schedule=optim.lr_schedule(cfg.optim, cfg.train.steps),
        micro_sh=sharding.micro_batch_sharding(mesh),
        param_sh=param_sh,
    )
    return Run(
        cfg=cfg,
        model_cfg=model_cfg,
        graphdef=graphdef,
        tx=tx,
        mesh=mesh,
        state_shardings=state_sh,
        abstract_state=abstract,
        train_step=jax.jit(
            step_fn,
            in_shardings=(state_sh, batch_sh),
            out_shardings=(state_sh, repl),
            donate_argnums=0,
        ),
        eval_step=jax.jit(
            functools.partial(_eval_step, graphdef=graphdef),
            in_shardings=(param_sh, batch_sh),
            out_shardings=repl,
        ),
        init=jax.jit(init, out_shardings=state_sh),
    )


def initial_state(run: Run) -> TrainState:
    """Step-0 state: random init, or the weights named by `model.init_from` (see convert.py)."""
    if run.cfg.model.init_from == "scratch":
        return run.init()
    from llmjax.convert import load_params  # late: convert reads workdirs through this module

    sh = run.state_shardings
    params = jax.device_put(load_params(run.cfg.model.init_from, run.model_cfg), sh.params)
    opt_state = jax.jit(run.tx.init, out_shardings=sh.opt_state)(params)
    zero = jax.device_put(jnp.zeros((), jnp.int32), sh.step)
    metrics.console(f"initialised from {run.cfg.model.init_from}")
    return TrainState(zero, params, opt_state, zero, zero)


def _meta(run: Run, step: int, loop: dict) -> dict:
    """`loop`: what the loop needs to log the resumed steps exactly as an uninterrupted run would
    (per-step metrics not yet logged, the running loss mean, the length of metrics.jsonl)."""
    return {
        "step": step,
        "data_step": step,
        "config": run.cfg.to_dict(),
        "model": dataclasses.asdict(run.model_cfg),
        "loop": loop,
    }


SPIKE_DECAY = 0.98  # running mean of the loss for spike events: about the last 50 steps


def _loss_spikes(losses: list[float], mean: float, count: int, factor: float):
    """Steps (indices into `losses`) whose loss exceeds `factor` x the running mean of the finite
    losses before it, as (index, loss, mean); and the updated (mean, count)."""
    spikes = []
    for i, loss in enumerate(losses):
        if not np.isfinite(loss):
            continue  # a skipped step: counted elsewhere, never averaged in
        if factor and count and loss > factor * mean:
            spikes.append((i, loss, mean))
        mean = loss if count == 0 else SPIKE_DECAY * mean + (1 - SPIKE_DECAY) * loss
        count += 1
    return spikes, mean, count


def is_instruct(cfg: ml_collections.ConfigDict) -> bool:
    """A file (JSON/JSONL conversations) means finetuning; a directory of shards, pretraining."""
    return os.path.isfile(cfg.data.path)


def _instruct_rows(cfg: ml_collections.ConfigDict, tok: Tokenizer) -> dict[str, np.ndarray]:
    if not tok.chat:
        raise data.DataError(
            f"data.path={cfg.data.path!r} is an instruction dataset but "
            f"data.tokenizer={cfg.data.tokenizer!r} has no chat tokens "
            "(use gpt2-chat or bytes-chat)"
        )
    rows, counts = instruct.encode_split(tok, cfg.data.path, cfg.data.seq_len, 0.05)
    metrics.console(
        f"instructions: {counts['train']} train / {counts['val']} val examples, "
        f"{counts['truncated']} truncated to {cfg.data.seq_len + 1} tokens"
    )
    return rows


def evaluate(run: Run, params, val_rows: np.ndarray | None = None) -> float:
    """Mean loss per scored target over the validation batches (the same every time): the first
    `train.eval_batches` of the shards, or every held-out instruction example."""
    cfg = run.cfg
    batch = cfg.data.batch_size // cfg.optim.grad_accum
    rows = data.process_rows(batch, jax.process_index(), jax.process_count())
    if val_rows is None:
        batches = data.val_batches(
            cfg.data.path,
            seq_len=cfg.data.seq_len,
            batch=batch,
            vocab_size=run.model_cfg.valid_vocab_size,
            num_batches=cfg.train.eval_batches,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
    else:
        batches = instruct.val_batches(val_rows, batch=batch, rows_slice=rows)
    sums = [run.eval_step(params, sharding.put_batch(b, run.mesh)) for b in batches]
    total, count = np.sum(jax.device_get(sums), axis=0)
    return float(total / count)


def sample_text(run: Run, params, tok: Tokenizer, prompt: str, n: int, seed: int) -> str:
    """A continuation of `prompt`, or for a chat model its answers to the fixed questions."""
    model = nnx.merge(run.graphdef, jax.device_get(params))
    chat = tok.chat
    if chat:
        prompts = [
            instruct.render(tok, [{"role": "user", "content": q}], add_generation_prompt=True)[0]
            for q in instruct.SAMPLE_QUESTIONS
        ]
        stop = tok.special["<|end|>"]
    else:
        prompts, stop = [tok.encode(prompt) or [tok.eot_id]], tok.eot_id
    n = min(n, run.model_cfg.block_size - max(map(len, prompts)))
    outs = generate(model, prompts, n, temperature=0.8, top_k=40, seed=seed, eot_id=stop)
    texts = [tok.decode([t for t in out if t != stop]) for out in outs]
    if chat:
        return "\n".join(
            f"Q: {q}\nA: {a}" for q, a in zip(instruct.SAMPLE_QUESTIONS, texts, strict=True)
        )
    return prompt + texts[0]


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains (or resumes) the run in `workdir` until `train.steps`; returns the final state."""
    workdir = os.path.abspath(workdir)
    t = cfg.train
    tok = get_tokenizer(cfg.data.tokenizer)
    if is_instruct(cfg):
        rows = _instruct_rows(cfg, tok)
    else:
        data.check_dataset(cfg.data.path, cfg.data.tokenizer, cfg.data.seq_len)
        rows = None
    run = build(cfg)
    lead = jax.process_index() == 0
    # Whatever can refuse the run only reads; the workdir is first written after these checks.
    restored = checkpoint.restore_latest(
        workdir, run.abstract_state, dataclasses.asdict(run.model_cfg)
    )
    checkpoint.check_writable(workdir)
    if restored is not None:
        latest, state, meta = restored
        checkpoint.set_aside(workdir, meta["corrupt"])
        metrics.console(f"resumed from {checkpoint.directory(workdir)}/{latest}")
    else:
        state = initial_state(run)
        meta = {"loop": {"pending": [], "loss_mean": [0.0, 0], "log_bytes": 0}}
    mngr = checkpoint.manager(workdir, t.keep_ckpts, t.keep_every)
    start = int(jax.device_get(state.step))
    hellaswag_items = None
    if t.hellaswag_every:  # read (or downloaded) before anything compiles: a bad path fails fast
        from llmjax import evaluate as evaluation  # `evaluate` here is the val-loss function

        hellaswag_items = evaluation.load_hellaswag(
            evaluation.hellaswag_path(t.hellaswag_path), t.hellaswag_items
        )
    writer = metrics.Writer(workdir, enabled=lead)
    # A resumed run logs again the steps after its checkpoint: what the interrupted run logged for
    # them is cut off, so metrics.jsonl reads as one uninterrupted run. Per-step metrics not yet
    # logged at the checkpoint come back from it, so every later row is bit for bit the same.
    loop = meta.get("loop")  # absent in checkpoints of older versions: logs are left alone
    if loop is not None:
        writer.truncate(loop["log_bytes"], start)
    loop = loop or {"pending": [], "loss_mean": [0.0, 0]}
    loss_mean, loss_count = loop["loss_mean"]
    shapes = nnx.merge(
        run.graphdef, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state.params)
    )
    n_params = count_params(shapes)
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    flops_per_step = flops_per_token(run.model_cfg, n_params, cfg.data.seq_len) * tokens_per_step
    peak = metrics.peak_flops(jax.devices()[0])
    metrics.console(
        f"model: {n_params:,} parameters ({count_params(shapes, padding=False):,} without vocab "
        f"padding); mesh {dict(run.mesh.shape)}; {tokens_per_step:,} tokens/step; "
        f"attention {run.model_cfg.attention}; steps {start} -> {t.steps}"
    )

    if rows is None:
        batches = data.train_batches(
            cfg.data.path,
            seq_len=cfg.data.seq_len,
            batch=cfg.data.batch_size,
            vocab_size=run.model_cfg.valid_vocab_size,
            seed=t.seed,
            start_step=start,
            steps=t.steps,
            workers=cfg.data.workers,
            prefetch=cfg.data.prefetch,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
    else:
        batches = instruct.train_batches(
            rows["train"],
            batch=cfg.data.batch_size,
            seed=t.seed,
            start_step=start,
            steps=t.steps,
            rows_slice=data.process_rows(
                cfg.data.batch_size, jax.process_index(), jax.process_count()
            ),
        )
    t0 = time.time()
    # Compiled once, ahead of time, so the first logged throughput measures steps, not compilation.
    batch_spec = jax.ShapeDtypeStruct(
        (cfg.data.batch_size, cfg.data.seq_len + 1),
        jnp.int32,
        sharding=sharding.batch_sharding(run.mesh),
    )
    train_step = run.train_step.lower(run.abstract_state, batch_spec).compile()
    metrics.console(f"compiled train step in {time.time() - t0:.1f}s")
    metrics.console(sharding.describe(run.mesh))
    metrics.console(sharding.memory_report(state.params, state.opt_state, train_step))
    progress = metrics.Progress(t.steps, start)
    pending: list[dict] = [{k: np.float32(v) for k, v in m.items()} for m in loop["pending"]]
    t_log, step_log = time.time(), start
    for step in range(start, t.steps):
        state, m = train_step(state, sharding.put_batch(next(batches), run.mesh))
        pending.append(m)
        done = step + 1
        if done % t.log_every == 0 or done == t.steps:
            fetched = jax.device_get(pending)  # the loop's only host sync
            pending = []
            elapsed = time.time() - t_log
            tps = tokens_per_step * (done - step_log) / elapsed
            row = {k: float(np.mean([f[k] for f in fetched])) for k in fetched[0]}
            row["train/lr"] = float(fetched[-1]["train/lr"])
            skipped, streak = (int(x) for x in jax.device_get((state.skipped, state.bad_streak)))
            row["train/skipped_steps"] = skipped
            row["perf/tokens_per_sec"] = tps
            row["perf/mfu"] = (
                flops_per_step * (done - step_log) / elapsed / peak / jax.device_count()
                if peak
                else None
            )
            writer.scalars(done, row)
            progress.clear()
            eta = (t.steps - done) * elapsed / (done - step_log)
            mfu = f" | mfu {100 * row['perf/mfu']:.1f}%" if row["perf/mfu"] else ""
            metrics.console(
                f"step {done:>6}/{t.steps} | loss {row['train/loss']:.4f} | "
                f"lr {row['train/lr']:.2e} | gnorm {row['train/grad_norm']:.3f} | "
                f"{tps / 1e3:,.1f}k tok/s{mfu} | eta {metrics._hms(eta)}"
            )
            spikes, loss_mean, loss_count = _loss_spikes(
                [float(f["train/loss"]) for f in fetched], loss_mean, loss_count, t.spike_factor
            )
            for i, loss, mean in spikes:
                at = done - len(fetched) + 1 + i
                writer.scalars(at, {"event/loss_spike": loss, "event/loss_mean": mean})
                metrics.console(
                    f"step {at:>6}/{t.steps} | loss spike: {loss:.4f} is above "
                    f"{t.spike_factor} x the running mean {mean:.4f}"
                )
            t_log, step_log = time.time(), done
            if streak >= t.max_bad_steps:
                checkpoint.wait(mngr)
                last, good = fetched[-1], mngr.latest_step()
                # Skipped steps never change the state, so every checkpoint holds finite values.
                raise FloatingPointError(
                    f"training diverged: {streak} consecutive non-finite steps up to step {done} "
                    f"(loss {float(last['train/loss'])}, grad norm "
                    f"{float(last['train/grad_norm'])}, lr {float(last['train/lr']):.3e}; "
                    f"{skipped} steps skipped in all); last good checkpoint: "
                    f"{f'{mngr.directory}/{good}' if good is not None else 'none yet'}"
                )
        if t.eval_every and (done % t.eval_every == 0 or done == t.steps):
            loss = evaluate(run, state.params, None if rows is None else rows["val"])
            writer.scalars(done, {"eval/loss": loss})
            progress.clear()
            metrics.console(f"step {done:>6}/{t.steps} | eval loss {loss:.4f}")
        if hellaswag_items and (done % t.hellaswag_every == 0 or done == t.steps):
            hs = evaluation.hellaswag(
                run.graphdef, state.params, hellaswag_items, tok, run.model_cfg.block_size
            )
            writer.scalars(
                done,
                {
                    "eval/hellaswag_acc": hs["hellaswag_acc"],
                    "eval/hellaswag_acc_norm": hs["hellaswag_acc_norm"],
                },
            )
            progress.clear()
            metrics.console(
                f"step {done:>6}/{t.steps} | hellaswag acc {hs['hellaswag_acc']:.4f}"
                f" | acc_norm {hs['hellaswag_acc_norm']:.4f}"
            )
        if t.sample_every and (done % t.sample_every == 0 or done == t.steps):
            params = sharding.gather(state.params)  # all processes: weights may span hosts
            if lead:
                text = sample_text(run, params, tok, t.sample_prompt, t.sample_tokens, done)
                writer.text(done, "sample", text)
                progress.clear()
                metrics.console(f"step {done:>6}/{t.steps} | sample: {text!r}")
        stop = checkpoint.should_stop(done)  # SIGTERM/SIGINT: save now and return
        if done % t.ckpt_every == 0 or done == t.steps or stop:
            pending = jax.device_get(pending)
            loop = {
                "pending": [{k: float(v) for k, v in m.items()} for m in pending],
                "loss_mean": [loss_mean, loss_count],
                "log_bytes": writer.log_bytes(),
            }
            checkpoint.save(mngr, done, state, _meta(run, done, loop))
        if stop:
            checkpoint.wait(mngr)
            progress.clear()
            metrics.console(
                f"stopped by {stop} after step {done}: saved {mngr.directory}/{done}; "
                "the same command continues the run"
            )
            break
        if done == step_log and done != t.steps:
            # Evaluation, sampling and checkpointing happen right after a log; keep them out of
            # the next interval's tokens/s.
            jax.block_until_ready(state.step)
            t_log = time.time()
        progress.update(done)
    checkpoint.wait(mngr)
    mngr.close()
    writer.close()
    return state


def load_model(workdir: str, step: int | None = None) -> tuple[GPT, Tokenizer, int]:
    """The model of a workdir's latest (or given) checkpoint, its tokenizer and its step."""
    mngr = checkpoint.manager(workdir, read_only=True)
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{mngr.directory}: no checkpoint")
    meta = checkpoint.read_meta(mngr, step)
    model_cfg = GPTConfig(**meta["model"])
    if jax.default_backend() != "gpu":
        model_cfg = dataclasses.replace(model_cfg, attention="xla")  # e.g. trained on GPU
    abstract = nnx.eval_shape(lambda: GPT(model_cfg, nnx.Rngs(0)))
    graphdef = nnx.graphdef(abstract)
    target = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    params = checkpoint.restore_params(mngr, step, target)
    tok = get_tokenizer(meta["config"]["data"]["tokenizer"])
    return nnx.merge(graphdef, params), tok, step
