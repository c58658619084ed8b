"""The training run: state creation, the pure train step, and the loop with its cadence.

`_train_step` is a pure function of (state, batch), jitted once with explicit shardings and with
the state donated, so parameters are updated in place. What it minimises is the objective `build`
is given (loss.Objective, built by its module for the run's kind, see batches.py): the
language-model loss (pretraining shards, finetuning conversations) or DPO's (preference pairs);
the eval step is the objective's evaluation, jitted with the same shardings. The loop reads
metrics back from the device only every `train.log_every` steps (metrics.RunLog).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from llmjax import (
    batches,
    checkpoint,
    evaluate,
    loss,
    memory,
    metrics,
    optim,
    sharding,
    trackers,
)
from llmjax.config import ConfigError
from llmjax.init_from import load_params
from llmjax.model import GPT, GPTConfig, count_params, flops_per_token, model_config
from llmjax.sample import sample_text
from llmjax.tokenizer import get_tokenizer


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # optimizer steps taken (skipped non-finite steps included)
    params: Any  # pure dict of arrays, the model's nnx.Param state
    opt_state: Any
    skipped: jax.Array  # total non-finite steps skipped
    bad_streak: jax.Array  # consecutive non-finite steps up to now


def _train_step(
    state: TrainState,
    batch,
    *,
    graphdef,
    tx,
    accum: int,
    seed: int,
    dropout: bool,
    schedule,
    micro_sh,
    param_sh,
    objective: Callable,
):
    """One optimizer step over `accum` micro-batches; skipped if the loss or gradient is not finite.

    The step is pure: the dropout key derives from (seed, step), so a resumed run repeats it
    exactly. The loss, and every metric the objective sums, is the mean over the units of the
    whole batch, whatever the split into micro-batches. `batch` is an array [B, ...] or a dict of
    them (DPO's pairs and reference log-probabilities), split alike.
    """
    B = jax.tree.leaves(batch)[0].shape[0]
    # Micro-batch a is rows a, a + accum, ...: each device keeps its own rows in every micro-batch,
    # so splitting the batch moves no data between devices.
    micro_AB = jax.tree.map(
        lambda x: x.reshape(B // accum, accum, *x.shape[1:]).swapaxes(0, 1), batch
    )
    micro_AB = jax.lax.with_sharding_constraint(micro_AB, micro_sh)
    key = jax.random.fold_in(jax.random.key(seed), state.step)
    grad_fn = jax.value_and_grad(objective, has_aux=True)

    def micro(acc, xs):
        grads, total, count, sums = acc
        batch, i = xs
        (loss_sum, (n, m)), g = grad_fn(
            state.params, graphdef, batch, jax.random.fold_in(key, i), not dropout
        )
        # Gradients take the parameters' layout: with fsdp > 1 they are reduce-scattered (ZeRO),
        # never all-reduced into full copies on every device.
        g = jax.lax.with_sharding_constraint(g, param_sh)
        sums = jax.tree.map(jnp.add, sums, m)
        return (jax.tree.map(jnp.add, grads, g), total + loss_sum, count + n, sums), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    # The metrics' structure, from a trace of the objective (nothing of it is computed).
    _, (_, shapes) = jax.eval_shape(
        lambda p, b, k: objective(p, graphdef, b, k, not dropout),
        state.params,
        jax.tree.map(lambda x: x[0], micro_AB),
        key,
    )
    init = (zeros, jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, shapes))
    (grads, total, count, sums), _ = jax.lax.scan(micro, init, (micro_AB, jnp.arange(accum)))
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
    extra = {f"train/{k}": v / count for k, v in sums.items()}
    return new_state, {"train/loss": loss, "train/grad_norm": grad_norm, "train/lr": lr, **extra}


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
    eval_step: Any  # (params, batch) -> the objective's (sum, (count, sums)), no dropout
    init: Any
    batch_spec: Any  # the global batch's shapes, dtypes and sharding (a pytree for DPO)
    objective: loss.Objective


def build(cfg: ml_collections.ConfigDict, objective: loss.Objective, devices=None) -> Run:
    """The run of `cfg` minimising `objective` (batches.objective builds the run kind's) on
    `devices` (None: all)."""
    try:
        mesh = sharding.make_mesh(cfg.mesh, devices)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    # The devices' platform: plan compiles for TPUs from a CPU process.
    tpu = mesh.devices.flat[0].platform == "tpu"
    model_cfg = model_config(cfg, "tpu" if tpu else jax.default_backend())
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
    B, T1 = cfg.data.batch_size, cfg.data.seq_len + 1
    # train.loss_chunk counts one device's tokens; the objectives see the global batch.
    chunk = cfg.train.loss_chunk * sharding.data_parallel_size(mesh)
    train_loss = functools.partial(objective.loss, chunk=chunk)
    eval_loss = functools.partial(objective.eval_loss, chunk=chunk)
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
        objective=train_loss,
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
                lambda params, batch: eval_loss(params, graphdef, batch, None, True), mesh
            ),
            in_shardings=(param_sh, batch_sh),
            out_shardings=repl,
        ),
        init=jax.jit(init, out_shardings=state_sh),
        batch_spec=objective.batch_spec(B, T1, batch_sh),
        objective=objective,
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


def _record(run: Run, step: int, loop: dict, redo: list[str]) -> checkpoint.Record:
    """`loop`: what the loop needs to log the resumed steps exactly as an uninterrupted run would
    (per-step metrics not yet logged, the running loss mean, the length of metrics.jsonl);
    `redo`: the evaluations after `step` that a stop cut short, redone first on resume."""
    return checkpoint.Record(
        step=step,
        config=run.cfg.to_dict(),
        model=dataclasses.asdict(run.model_cfg),
        kind=run.objective.kind,
        tokens_per_step=step_tokens(run),
        loop=loop,
        redo=redo or None,
    )


def train_and_evaluate(
    cfg: ml_collections.ConfigDict, workdir: str, config_name: str = "llmjax"
) -> TrainState:
    """Trains (or resumes) the run in `workdir` until `train.steps`; returns the final state.
    `config_name`: the config file's name, the trackers' default experiment."""
    workdir, t = os.path.abspath(workdir), cfg.train
    tok = get_tokenizer(cfg.data.tokenizer)
    kind = batches.resolve_kind(cfg)  # the one decision of what the run trains on
    run = build(cfg, batches.objective(cfg, kind))
    batches_of = batches.open_data(cfg, kind, tok, run.model_cfg.valid_vocab_size)
    hellaswag_items = None
    if t.hellaswag_every:  # read (or downloaded) before anything compiles: a bad path fails fast
        path = evaluate.hellaswag_path(t.hellaswag_path)
        hellaswag_items = evaluate.load_hellaswag(path, t.hellaswag_items)
    harness_tasks = None
    if t.harness_every:  # the same: an unknown task or a missing extra fails before compiling
        from llmjax import harness

        harness_tasks = harness.training_tasks(t.harness_tasks, t.harness_limit)
    # Whatever can refuse the run only reads; the workdir is first written after these checks.
    model_dict = dataclasses.asdict(run.model_cfg)
    restored = checkpoint.restore_latest(workdir, run.abstract_state, model_dict)
    checkpoint.check_writable(workdir)
    # Process 0 only, before anything compiles: a tracker that cannot start fails the run now.
    opened = trackers.start_run(cfg, workdir, config_name) if jax.process_index() == 0 else []
    replay = {"pending": [], "loss_mean": [0.0, 0], "log_bytes": 0}  # a fresh run's log
    redo: list[str] = []  # evaluations the stop that saved the checkpoint cut short
    if restored is not None:
        latest, state, record, corrupt = restored
        checkpoint.set_aside(workdir, corrupt)
        metrics.console(f"resumed from {checkpoint.directory(workdir)}/{latest}")
        replay, redo = record.loop, record.redo or []
    else:
        state = initial_state(run)
    if run.objective.prepare is not None:  # DPO's reference: after every check, before step 1
        batches_of = run.objective.prepare(
            run, batches_of, state.params, workdir, fresh=restored is None
        )
    mngr = checkpoint.manager(workdir, t.keep_ckpts, t.keep_every)
    start = int(jax.device_get(state.step))
    tokens_per_step = step_tokens(run)
    n_params = count_params(model_shapes(run))
    log = metrics.RunLog(
        workdir,
        steps=t.steps,
        start=start,
        tokens_per_step=tokens_per_step,
        flops_per_step=flops_per_token(run.model_cfg, n_params, cfg.data.seq_len) * tokens_per_step,
        spike_factor=t.spike_factor,
        replay=replay,
        enabled=jax.process_index() == 0,
        trackers=opened,
    )
    train_step = compile_train_step(run, state, start)
    put = lambda batch: jax.tree.map(lambda a: sharding.put_batch(a, run.mesh), batch)
    train_batches = batches_of.train(start)
    cadences = {
        "eval": t.eval_every,
        "hellaswag": t.hellaswag_every if hellaswag_items else 0,
        "harness": t.harness_every if harness_tasks else 0,
        "sample": t.sample_every,
    }
    evaluations = functools.partial(
        _evaluations,
        run,
        lambda: state.params,
        log,
        batches_of,
        hellaswag_items,
        harness_tasks,
        tok,
    )
    if cadences["eval"] and start < t.steps:
        _compile_eval(run, state.params, batches_of, put)
    # Cut short by the stop that saved `start` (those the resumed config still runs).
    evaluations(start, [k for k in redo if cadences.get(k)])
    for step in range(start, t.steps):
        state, m = train_step(state, put(next(train_batches)))
        log.record(m)
        done = step + 1
        if _due(done, t.log_every, t.steps):
            streak = log.interval(done, state.skipped, state.bad_streak)
            if streak >= t.max_bad_steps:
                raise diverged(log.last, done, streak, mngr)
        due = [k for k, every in cadences.items() if _due(done, every, t.steps)]
        cut = evaluations(done, due)  # those a stop request cut short: redone on resume
        stop = checkpoint.should_stop(done)  # SIGTERM/SIGINT: save now and return
        if _due(done, t.ckpt_every, t.steps) or stop:
            checkpoint.save(mngr, done, state, _record(run, done, log.replay_state(), cut))
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


def _evaluations(
    run: Run,
    params,
    log,
    batches_of: batches.Data,
    hellaswag_items,
    harness_tasks,
    tok,
    done: int,
    due: list,
) -> list[str]:
    """The evaluations in `due` ("eval", "hellaswag", "harness", "sample") after step `done`,
    logged; returns those a stop request (SIGTERM) cut short, between two batches (tokens), so
    that the save comes within a preemption's grace period. One process only: with several, a
    stop is agreed at a step."""
    t, params, finished = run.cfg.train, params(), []
    put = lambda batch: jax.tree.map(lambda a: sharding.put_batch(a, run.mesh), batch)
    try:
        if "eval" in due:
            ev = evaluate.mean_metrics(run.eval_step, params, map(put, batches_of.val()))
            log.writer.scalars(done, {f"eval/{k}": v for k, v in ev.items()})
            log.line(
                f"step {done:>6}/{t.steps} | "
                + " | ".join(f"eval {k} {v:.4f}" for k, v in ev.items())
            )
            finished.append("eval")
        if "hellaswag" in due:
            hs = evaluate.hellaswag(
                run.graphdef, params, hellaswag_items, tok, run.model_cfg.block_size
            )
            log.writer.scalars(
                done, {f"eval/{k}": hs[k] for k in ("hellaswag_acc", "hellaswag_acc_norm")}
            )
            log.line(
                f"step {done:>6}/{t.steps} | hellaswag acc {hs['hellaswag_acc']:.4f} | "
                f"acc_norm {hs['hellaswag_acc_norm']:.4f}"
            )
            finished.append("hellaswag")
        if "harness" in due:
            scores = harness_tasks.scores(run.model_cfg, params, tok)
            log.writer.scalars(done, scores)
            log.line(
                f"step {done:>6}/{t.steps} | "
                + " | ".join(f"{k} {v:.4f}" for k, v in scores.items())
            )
            finished.append("harness")
        if "sample" in due:
            gathered = sharding.gather(params)  # all processes: weights may span hosts
            if jax.process_index() == 0:
                model = nnx.merge(run.graphdef, jax.device_get(gathered))
                on_token = lambda row, token: evaluate.stop_point()
                text = sample_text(model, tok, t.sample_prompt, t.sample_tokens, done, on_token)
                log.writer.text(done, "sample", text)
                log.line(f"step {done:>6}/{t.steps} | sample: {text!r}")
    except evaluate.Stopped:
        return [k for k in due if k not in finished]
    return []


def _compile_eval(run: Run, params, batches_of: batches.Data, put) -> None:
    """Runs the eval step on the first val batch, so that it compiles at start-up: compiled at
    the first evaluation instead, it held a SIGTERM there for seconds (the stop is checked
    between batches)."""
    first = next(iter(batches_of.val()), None)
    if first is not None:
        jax.block_until_ready(run.eval_step(params, put(first)))


def _due(done: int, every: int, steps: int) -> bool:
    """Whether a cadence `every` (0 = never) falls on step `done`; the last step always counts."""
    return bool(every) and (done % every == 0 or done == steps)


def model_shapes(run: Run) -> GPT:
    """The model with shapes for arrays: what parameter and FLOP counts read."""
    strip = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)
    return nnx.merge(run.graphdef, jax.tree.map(strip, run.abstract_state.params))


def step_tokens(run: Run) -> int:
    """Tokens in one step's batch: sequences x seq_len (a DPO pair is two sequences)."""
    return run.cfg.data.batch_size * run.objective.sequences_per_row * run.cfg.data.seq_len


def compile_train_step(run: Run, state: TrainState, start: int):
    """The train step compiled ahead of time, so the first logged throughput measures steps,
    not compilation; prints the run's shape, mesh and memory."""
    cfg = run.cfg
    shapes = model_shapes(run)
    n_params = count_params(shapes)
    metrics.console(
        f"model: {n_params:,} parameters ({count_params(shapes, padding=False):,} without vocab "
        f"padding); mesh {dict(run.mesh.shape)}; "
        f"{step_tokens(run):,} tokens/step; "
        f"attention {run.model_cfg.attention}; steps {start} -> {cfg.train.steps}"
    )
    if cfg.optim.name == "muon":
        ns = optim.newton_schulz_flops(run.abstract_state.params)
        model = flops_per_token(run.model_cfg, n_params, cfg.data.seq_len) * step_tokens(run)
        # MFU counts the model's FLOPs only, so it compares across optimizers; say what Muon adds.
        metrics.console(
            f"muon: Newton-Schulz {ns / 1e9:,.1f} GFLOP per step on every replica "
            f"({ns / model:.2%} of the model's {model / 1e12:,.2f} TFLOP; not in MFU)"
        )
    t0 = time.time()
    train_step = run.train_step.lower(run.abstract_state, run.batch_spec).compile()
    metrics.console(f"compiled train step in {time.time() - t0:.1f}s")
    metrics.console(sharding.mesh_line(run.mesh))
    metrics.console(sharding.memory_report(state.params, state.opt_state, train_step))
    memory.check_fits(train_step, cfg)  # before the first step: one line, not an OOM traceback
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
