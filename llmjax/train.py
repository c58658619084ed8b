"""The training run: state creation, the pure train step, and the loop with its cadence.

`_train_step` is a pure function of (state, batch), jitted once with explicit shardings and with
the state donated, so parameters are updated in place; the eval step is evaluate.py's, jitted
here with the same shardings. The loop reads metrics back from the device only every
`train.log_every` steps (metrics.RunLog).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from llmjax import checkpoint, data, evaluate, instruct, metrics, optim, sharding, trackers
from llmjax.config import ConfigError, model_config
from llmjax.convert import load_params
from llmjax.loss import lm_loss
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
    loss_chunk: int,
    z_loss: float,
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
    grad_fn = jax.value_and_grad(
        functools.partial(lm_loss, chunk=loss_chunk, z_loss=z_loss), has_aux=True
    )

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
        loss_chunk=cfg.train.loss_chunk,
        z_loss=cfg.train.z_loss,
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
            sharding.under_rules(step_fn, mesh),
            in_shardings=(state_sh, batch_sh),
            out_shardings=(state_sh, repl),
            donate_argnums=0,
        ),
        eval_step=jax.jit(
            sharding.under_rules(
                functools.partial(
                    evaluate.eval_step, graphdef=graphdef, chunk=cfg.train.loss_chunk
                ),
                mesh,
            ),
            in_shardings=(param_sh, batch_sh),
            out_shardings=repl,
        ),
        init=jax.jit(init, out_shardings=state_sh),
    )


def initial_state(run: Run) -> TrainState:
    """Step-0 state: random init, or the weights named by `model.init_from` (see convert.py)."""
    if run.cfg.model.init_from == "scratch":
        return run.init()

    def start_from(params) -> TrainState:
        # Every leaf its own buffer: the train step donates the state, and a buffer shared by
        # two leaves (one zero for step and skipped, say) cannot be donated twice.
        zero = lambda: jnp.zeros((), jnp.int32)
        return TrainState(zero(), params, run.tx.init(params), zero(), zero())

    sh = run.state_shardings
    params = jax.device_put(load_params(run.cfg.model.init_from, run.model_cfg), sh.params)
    metrics.console(f"initialised from {run.cfg.model.init_from}")
    return jax.jit(start_from, out_shardings=sh, donate_argnums=0)(params)


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


def is_instruct(cfg: ml_collections.ConfigDict) -> bool:
    """A file (JSON/JSONL conversations) means finetuning; a directory of shards, pretraining."""
    return os.path.isfile(cfg.data.path)


def open_data(
    cfg: ml_collections.ConfigDict, tok: Tokenizer, vocab_size: int
) -> tuple[Callable[[int], Iterator[np.ndarray]], Callable[[], Iterator[np.ndarray]]]:
    """(train batches from a step on, the validation batches, the same each call) of this
    process: shards for pretraining, or an instruction file for finetuning. Reads and checks the
    data before anything compiles, so bad data fails fast."""
    d, t = cfg.data, cfg.train
    micro = d.batch_size // cfg.optim.grad_accum
    pid, n_proc = jax.process_index(), jax.process_count()
    if not is_instruct(cfg):
        data.check_dataset(d.path, d.tokenizer, d.seq_len)
        common = dict(
            seq_len=d.seq_len, vocab_size=vocab_size, process_index=pid, process_count=n_proc
        )
        train = lambda start: data.train_batches(
            d.path,
            batch=d.batch_size,
            seed=t.seed,
            start_step=start,
            steps=t.steps,
            workers=d.workers,
            prefetch=d.prefetch,
            **common,
        )
        val = lambda: data.val_batches(d.path, batch=micro, num_batches=t.eval_batches, **common)
        return train, val
    if not tok.chat:
        raise data.DataError(
            f"data.path={d.path!r} is an instruction dataset but data.tokenizer={d.tokenizer!r} "
            "has no chat tokens (use gpt2-chat or bytes-chat)"
        )
    rows, counts = instruct.encode_split(tok, d.path, d.seq_len, 0.05)
    metrics.console(
        f"instructions: {counts['train']} train / {counts['val']} val examples, "
        f"{counts['truncated']} truncated to {d.seq_len + 1} tokens"
    )
    train = lambda start: instruct.train_batches(
        rows["train"],
        batch=d.batch_size,
        seed=t.seed,
        start_step=start,
        steps=t.steps,
        rows_slice=data.process_rows(d.batch_size, pid, n_proc),
    )
    val = lambda: instruct.val_batches(
        rows["val"], batch=micro, rows_slice=data.process_rows(micro, pid, n_proc)
    )
    return train, val


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
    workdir, t = os.path.abspath(workdir), cfg.train
    tok = get_tokenizer(cfg.data.tokenizer)
    run = build(cfg)
    train_batches, val_batches = open_data(cfg, tok, run.model_cfg.valid_vocab_size)
    hellaswag_items = None
    if t.hellaswag_every:  # read (or downloaded) before anything compiles: a bad path fails fast
        path = evaluate.hellaswag_path(t.hellaswag_path)
        hellaswag_items = evaluate.load_hellaswag(path, t.hellaswag_items)
    # Whatever can refuse the run only reads; the workdir is first written after these checks.
    model_dict = dataclasses.asdict(run.model_cfg)
    restored = checkpoint.restore_latest(workdir, run.abstract_state, model_dict)
    checkpoint.check_writable(workdir)
    # Process 0 only, before anything compiles: a tracker that cannot start fails the run now.
    opened = trackers.start_run(cfg, workdir) if jax.process_index() == 0 else []
    if restored is not None:
        latest, state, meta = restored
        checkpoint.set_aside(workdir, meta["corrupt"])
        metrics.console(f"resumed from {checkpoint.directory(workdir)}/{latest}")
    else:
        state, meta = (
            initial_state(run),
            {"loop": {"pending": [], "loss_mean": [0.0, 0], "log_bytes": 0}},
        )
    mngr = checkpoint.manager(workdir, t.keep_ckpts, t.keep_every)
    start = int(jax.device_get(state.step))
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    n_params = count_params(model_shapes(run))
    log = metrics.RunLog(
        workdir,
        steps=t.steps,
        start=start,
        tokens_per_step=tokens_per_step,
        flops_per_step=flops_per_token(run.model_cfg, n_params, cfg.data.seq_len) * tokens_per_step,
        spike_factor=t.spike_factor,
        replay=meta.get("loop"),
        enabled=jax.process_index() == 0,
        trackers=opened,
    )
    train_step = compile_train_step(run, state, start)
    put = lambda batch: sharding.put_batch(batch, run.mesh)
    batches = train_batches(start)
    for step in range(start, t.steps):
        state, m = train_step(state, put(next(batches)))
        log.record(m)
        done = step + 1
        if _due(done, t.log_every, t.steps):
            streak = log.interval(done, state.skipped, state.bad_streak)
            if streak >= t.max_bad_steps:
                raise diverged(log.last, done, streak, mngr)
        if _due(done, t.eval_every, t.steps):
            loss = evaluate.mean_loss(run.eval_step, state.params, map(put, val_batches()))
            log.writer.scalars(done, {"eval/loss": loss})
            log.line(f"step {done:>6}/{t.steps} | eval loss {loss:.4f}")
        if hellaswag_items and _due(done, t.hellaswag_every, t.steps):
            hs = evaluate.hellaswag(
                run.graphdef, state.params, hellaswag_items, tok, run.model_cfg.block_size
            )
            log.writer.scalars(
                done, {f"eval/{k}": hs[k] for k in ("hellaswag_acc", "hellaswag_acc_norm")}
            )
            log.line(
                f"step {done:>6}/{t.steps} | hellaswag acc {hs['hellaswag_acc']:.4f} | "
                f"acc_norm {hs['hellaswag_acc_norm']:.4f}"
            )
        if _due(done, t.sample_every, t.steps):
            params = sharding.gather(state.params)  # all processes: weights may span hosts
            if jax.process_index() == 0:
                text = sample_text(run, params, tok, t.sample_prompt, t.sample_tokens, done)
                log.writer.text(done, "sample", text)
                log.line(f"step {done:>6}/{t.steps} | sample: {text!r}")
        stop = checkpoint.should_stop(done)  # SIGTERM/SIGINT: save now and return
        if _due(done, t.ckpt_every, t.steps) or stop:
            checkpoint.save(mngr, done, state, _meta(run, done, log.replay_state()))
        if stop:
            checkpoint.wait(mngr)
            log.line(
                f"stopped by {stop} after step {done}: saved {mngr.directory}/{done}; "
                "the same command continues the run"
            )
            break
        log.restart_clock(done, state.step)
    checkpoint.wait(mngr)
    mngr.close()
    log.close()
    return state


def _due(done: int, every: int, steps: int) -> bool:
    """Whether a cadence `every` (0 = never) falls on step `done`; the last step always counts."""
    return bool(every) and (done % every == 0 or done == steps)


def model_shapes(run: Run) -> GPT:
    """The model with shapes for arrays: what parameter and FLOP counts read."""
    strip = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)
    return nnx.merge(run.graphdef, jax.tree.map(strip, run.abstract_state.params))


def compile_train_step(run: Run, state: TrainState, start: int):
    """The train step compiled ahead of time, so the first logged throughput measures steps,
    not compilation; prints the run's shape, mesh and memory."""
    cfg = run.cfg
    shapes = model_shapes(run)
    n_params = count_params(shapes)
    metrics.console(
        f"model: {n_params:,} parameters ({count_params(shapes, padding=False):,} without vocab "
        f"padding); mesh {dict(run.mesh.shape)}; "
        f"{cfg.data.batch_size * cfg.data.seq_len:,} tokens/step; "
        f"attention {run.model_cfg.attention}; steps {start} -> {cfg.train.steps}"
    )
    t0 = time.time()
    batch_spec = jax.ShapeDtypeStruct(
        (cfg.data.batch_size, cfg.data.seq_len + 1),
        jnp.int32,
        sharding=sharding.batch_sharding(run.mesh),
    )
    train_step = run.train_step.lower(run.abstract_state, batch_spec).compile()
    metrics.console(f"compiled train step in {time.time() - t0:.1f}s")
    metrics.console(sharding.describe(run.mesh))
    metrics.console(sharding.memory_report(state.params, state.opt_state, train_step))
    return train_step


def diverged(last: dict, done: int, streak: int, mngr) -> FloatingPointError:
    """The error that stops a run after `train.max_bad_steps` non-finite steps in a row."""
    checkpoint.wait(mngr)
    good = mngr.latest_step()
    # Skipped steps never change the state, so every checkpoint holds finite values.
    return FloatingPointError(
        f"training diverged: {streak} consecutive non-finite steps up to step {done} "
        f"(loss {last['train/loss']}, grad norm {last['train/grad_norm']}, "
        f"lr {last['train/lr']:.3e}; {last['train/skipped_steps']} steps skipped in all); "
        f"last good checkpoint: {f'{mngr.directory}/{good}' if good is not None else 'none yet'}"
    )
