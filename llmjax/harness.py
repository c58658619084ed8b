"""EleutherAI's lm-evaluation-harness on an llmjax checkpoint, scored as its `hf` backend scores a
Hugging Face model: every harness task (HellaSwag, ARC, PIQA, LAMBADA, MMLU, wikitext, ...).

    python -m llmjax.harness --workdir=RUN --tasks=hellaswag,arc_easy [--num_fewshot=N] \
        [--limit=N] [--batch_size=N] [--include_path=DIR] [--output=FILE] [--dtype=float32]
    python -m llmjax.harness --from_hf=gpt2 --tasks=...      # a Hugging Face model, imported
    python -m llmjax.harness --lm_eval -- --model llmjax --model_args workdir=RUN --tasks ...

Prints the harness's results table, then one JSON object: {"results": {TASK: {METRIC: VALUE}}}
with the harness's own metric keys ("acc,none", "word_perplexity,none", ...). `--lm_eval` hands
everything after `--` to the harness's own command line, with `--model llmjax` registered (its
model_args: workdir=, pretrained= for a Hugging Face model, dtype=, batch_size=).

`LlmjaxLM` is a `TemplateLM`, so the harness's own rules split context and continuation (trailing
context spaces move into the continuation; the two are encoded together) and an empty context is
conditioned on the end-of-text token. What it adds is the scoring, built like the `hf` backend's:
  - loglikelihood: context + continuation cut to the last block_size + 1 tokens (left truncation),
    the continuation's summed log-probabilities and whether each of its tokens is the argmax;
  - loglikelihood_rolling: the harness's disjoint windows of block_size tokens, summed;
  - generate_until: greedy or sampled decoding (sample.generate, KV cache) of max_gen_toks tokens
    after the context's last block_size - max_gen_toks tokens, cut at the first `until` string.
Rows are sorted by length, padded to a power of two (at least 16, at most block_size) and scored
`batch_size` rows at a time by one jitted function, the LM head applied to the scored positions
only (also padded to a power of two): a handful of compiled shapes for a whole evaluation, and one
host read per batch. Scoring is in float32 whatever dtype the run trained in
(--dtype chooses). Text containing "<|endoftext|>" gets the end-of-text token there, as a Hugging
Face tokenizer gives it (llmjax's own encoders read it as plain text).

The harness is an optional extra (pip install -e '.[harness]'), imported only when used.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from llmjax import checkpoint, errors, evaluate, hf_gpt2
from llmjax.model import GPT, GPTConfig
from llmjax.sample import generate
from llmjax.tokenizer import EOT, Tokenizer, get_tokenizer

INSTALL = "pip install -e '.[harness]'"
DTYPES = ("float32", "bfloat16", "float16")
BATCH_ROWS = 16  # rows per scoring batch (and per generation batch) unless --batch_size
MIN_LENGTH = 16  # the shortest padded row: short requests share one compiled shape
HEAD_TOKENS = 2048  # tokens per LM-head chunk: [chunk, V] float32 logits, never [rows, T, V]
# Hugging Face's GenerationConfig default, which the `hf` backend samples with unless a task
# sets top_k.
HF_TOP_K = 50


class HarnessError(errors.UserError):
    """Harness input that cannot be used (task, model, option); the message names it."""


def require_lm_eval() -> None:
    """Raises HarnessError naming the extra to install when the harness is missing."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise HarnessError(f"the lm-evaluation-harness is not installed: {INSTALL}") from e


def check_one_process() -> None:
    if jax.process_count() > 1:
        raise HarnessError(
            f"llmjax.harness runs in one process; this job has {jax.process_count()}"
        )


# ---------------------------------------------------------------------------------------------
# The model and its tokenizer


def eval_model(cfg: GPTConfig, params, dtype: str = "float32") -> GPT:
    """The model of `params` (a pure dict or State of cfg's parameters) computing in `dtype`,
    its weights in float32: what was trained in bfloat16 is scored in float32 unless asked."""
    if dtype not in DTYPES:
        raise HarnessError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    cfg = dataclasses.replace(cfg, dtype=dtype, param_dtype="float32", remat="none", dropout=0.0)
    if jax.default_backend() != "gpu":
        cfg = dataclasses.replace(cfg, attention="xla")
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: GPT(cfg, nnx.Rngs(0))))
    return nnx.merge(graphdef, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params))


def load(workdir: str | None = None, pretrained: str | None = None, dtype: str = "float32"):
    """(model, tokenizer, description) of an llmjax workdir's latest checkpoint, or of a Hugging
    Face GPT-2 (local directory or hub id) through hf_gpt2's importer."""
    if (workdir is None) == (pretrained is None):
        raise HarnessError("give a workdir (llmjax) or pretrained (Hugging Face), not both")
    if workdir is not None:
        model, tok, step = checkpoint.load_model(workdir)
        source = f"{workdir} at step {step}"
    else:
        model = hf_gpt2.from_hf(pretrained)
        name = hf_gpt2.TOKENIZER_FOR_VOCAB.get(model.cfg.valid_vocab_size)
        if name is None:
            raise HarnessError(
                f"{pretrained}: vocabulary of {model.cfg.valid_vocab_size} matches no llmjax "
                "tokenizer"
            )
        tok, source = get_tokenizer(name), pretrained
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return eval_model(model.cfg, params, dtype), tok, source


def encode(tok: Tokenizer, text: str) -> list[int]:
    """`tok.encode`, except that "<|endoftext|>" in the text is the end-of-text token, as Hugging
    Face tokenizers (and so the `hf` backend) read it."""
    pieces = [tok.encode(p) for p in text.split(EOT)]
    out = pieces[0]
    for p in pieces[1:]:
        out = out + [tok.eot_id] + p
    return out


# ---------------------------------------------------------------------------------------------
# Scoring


@functools.partial(jax.jit, static_argnums=0)
def score_rows(graphdef, params, tokens_RT1, pos_RC, scored_RC):
    """Per row: the summed log-probability of the targets at positions pos_RC where scored_RC
    (target t is token t+1, read after tokens 0..t) and whether each is the argmax; float32.

    Only the scored positions go through the LM head: a multiple-choice row scores a few
    continuation tokens after a long context, and the head is a third of GPT-2 124M's work."""
    model = nnx.merge(graphdef, params)
    x_RTD = model.hidden(tokens_RT1[:, :-1])
    x_RCD = jnp.take_along_axis(x_RTD, pos_RC[:, :, None], axis=1)
    tgt_RC = jnp.take_along_axis(tokens_RT1[:, 1:], pos_RC, axis=1)

    def one(xs):
        x_CD, tgt_C, scored_C = xs
        logits_CV = model.logits(x_CD)
        logp_CV = jax.nn.log_softmax(logits_CV, axis=-1)
        logp_C = jnp.take_along_axis(logp_CV, tgt_C[:, None], axis=-1)[:, 0]
        greedy_C = jnp.argmax(logits_CV, axis=-1) == tgt_C
        return jnp.sum(jnp.where(scored_C, logp_C, 0.0)), jnp.all(greedy_C | ~scored_C)

    # Rows a few at a time through the head: a [rows, C, V] float32 array may not fit.
    C = pos_RC.shape[1]
    return jax.lax.map(one, (x_RCD, tgt_RC, scored_RC), batch_size=max(1, HEAD_TOKENS // C))


def padded_length(n: int, block_size: int) -> int:
    """The row length (positions fed to the model) that n positions are padded to."""
    return min(max(MIN_LENGTH, 1 << (n - 1).bit_length()), block_size)


class Scorer:
    """The model's side of the harness: log-likelihoods of token rows and generations, batched
    into a few fixed shapes. `LlmjaxLM` turns the harness's requests into these calls."""

    def __init__(self, model: GPT, tok: Tokenizer, batch_rows: int = BATCH_ROWS, seed: int = 0):
        if batch_rows < 1:
            raise HarnessError(f"batch_size={batch_rows} must be >= 1")
        self.model, self.tok, self.rows, self.seed = model, tok, batch_rows, seed
        self.graphdef, self.params = nnx.split(model)
        self.block_size = model.cfg.block_size

    def loglikelihoods(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(log p(continuation | context), every continuation token the argmax) per pair, in
        order. A pair longer than block_size + 1 tokens loses its oldest tokens, as the `hf`
        backend cuts it; an empty continuation has log-likelihood 0 and is greedy."""
        L = self.block_size
        rows: dict[tuple[int, ...], int] = {}  # a repeated request is scored once
        keys = []
        for ctx, cont in pairs:
            if len(cont) > L:
                raise HarnessError(
                    f"a continuation of {len(cont)} tokens does not fit the model's context of {L}"
                )
            if not cont:
                keys.append(None)
                continue
            if not ctx:
                raise HarnessError(
                    "a continuation needs a context (at least the end-of-text token)"
                )
            row = tuple((ctx + cont)[-(L + 1) :])
            key = (len(cont), *row)
            keys.append(key)
            rows.setdefault(key, len(rows))
        order = sorted(rows, key=lambda k: -len(k))  # longest first, as the `hf` backend
        results: dict[tuple[int, ...], tuple[float, bool]] = {}
        pending = None
        for b in range(0, len(order), self.rows):
            batch = order[b : b + self.rows]
            T = padded_length(len(batch[0]) - 2, L)
            C = padded_length(max(k[0] for k in batch), T)  # scored positions per row
            tokens = np.zeros((self.rows, T + 1), np.int32)
            pos = np.zeros((self.rows, C), np.int32)
            scored = np.zeros((self.rows, C), bool)
            for r, (n_cont, *row) in enumerate(batch):
                tokens[r, : len(row)] = row
                pos[r, :n_cont] = np.arange(len(row) - 1 - n_cont, len(row) - 1)
                scored[r, :n_cont] = True
            out = score_rows(self.graphdef, self.params, tokens, pos, scored)
            # Read the previous batch while this one computes: one host read per batch.
            if pending is not None:
                self._store(results, *pending)
                evaluate.stop_point()  # the trainer's SIGTERM: evaluate.Stopped
            pending = (batch, out)
        if pending is not None:
            self._store(results, *pending)
        return [(0.0, True) if k is None else results[k] for k in keys]

    @staticmethod
    def _store(results: dict, batch: list, out) -> None:
        logp, greedy = jax.device_get(out)
        for r, key in enumerate(batch):
            results[key] = (float(logp[r]), bool(greedy[r]))

    def rolling(self, tokens: list[int]) -> list[tuple[list[int], list[int]]]:
        """The harness's disjoint windows of a document: (context, continuation) pairs whose
        continuations cover every token once, each predicted from up to block_size tokens."""
        from lm_eval import utils

        windows = utils.get_rolling_token_windows(
            token_list=tokens,
            prefix_token=self.tok.eot_id,
            max_seq_len=self.block_size,
            context_len=1,
        )
        return [utils.make_disjoint_window(w) for w in windows]

    def generate(
        self, contexts: list[list[int]], max_gen_toks: int, until: list[str], sampling: dict
    ) -> list[str]:
        """Each context's continuation (text), cut before the first `until` string or the
        end-of-text token. The context keeps its last block_size - max_gen_toks tokens, as the
        `hf` backend cuts it; an empty context starts a document (the end-of-text token)."""
        room = self.block_size - max_gen_toks
        if room < 1:
            raise HarnessError(
                f"max_gen_toks={max_gen_toks} leaves no room for a context in the model's "
                f"{self.block_size} positions"
            )
        prompts = [c[-room:] or [self.tok.eot_id] for c in contexts]
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        texts: list[str] = [""] * len(prompts)
        for b in range(0, len(order), self.rows):
            idx = order[b : b + self.rows]
            # A full batch always (the last row repeated): one compiled shape per cache size.
            batch = [prompts[i] for i in idx] + [prompts[idx[-1]]] * (self.rows - len(idx))
            outs = generate(
                self.model,
                batch,
                max_gen_toks,
                seed=self.seed + b,
                eot_id=self.tok.eot_id,
                **sampling,
            )
            for i, out in zip(idx, outs, strict=False):
                if self.tok.eot_id in out:
                    out = out[: out.index(self.tok.eot_id)]
                text = self.tok.decode(out)
                for term in until:  # the harness's own order: each stop string cuts in turn
                    if term:
                        text = text.split(term)[0]
                texts[i] = text
            evaluate.stop_point()
        return texts


def sampling_settings(gen_kwargs: dict) -> dict:
    """sample.generate's temperature, top_k and top_p for the harness's normalised gen_kwargs:
    greedy unless do_sample, then Hugging Face's defaults for what the task leaves out."""
    if not gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature", 0.0)) == 0.0:
        return {"temperature": 0.0}
    known = {"do_sample", "temperature", "top_k", "top_p", "until", "max_gen_toks"}
    if unknown := sorted(set(gen_kwargs) - known):
        raise HarnessError(f"generation_kwargs {', '.join(unknown)} are not supported by llmjax")
    return {
        "temperature": float(gen_kwargs["temperature"]),
        "top_k": int(gen_kwargs.get("top_k", HF_TOP_K) or 0),
        "top_p": float(gen_kwargs.get("top_p", 1.0) or 1.0),
    }


# ---------------------------------------------------------------------------------------------
# The harness's model class (built on first use: lm_eval is an optional extra)


@functools.cache
def lm_class() -> type:
    """`LlmjaxLM`, the harness backend; HarnessError when the harness is not installed."""
    require_lm_eval()
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

    class LlmjaxLM(TemplateLM):
        """An llmjax model as an lm-evaluation-harness LM (see the module docstring).

        workdir: an llmjax run (its latest checkpoint); pretrained: a Hugging Face GPT-2
        directory or hub id; model + tokenizer: a GPT in memory (the training loop's).
        """

        def __init__(
            self,
            workdir: str | None = None,
            pretrained: str | None = None,
            dtype: str = "float32",
            batch_size: int | str | None = BATCH_ROWS,
            seed: int = 0,
            model: GPT | None = None,
            tokenizer: Tokenizer | None = None,
            device: str | None = None,  # the harness's: llmjax places the model itself
            max_batch_size: int | None = None,  # the harness's: batch_size rows always
            **unknown,
        ) -> None:
            super().__init__()
            if unknown:
                raise HarnessError(
                    f"unknown model_args {', '.join(sorted(unknown))} for llmjax (workdir, "
                    "pretrained, dtype, batch_size, seed)"
                )
            check_one_process()
            if model is None:
                model, tokenizer, self.source = load(workdir, pretrained, dtype)
            else:
                self.source = "in memory"
            rows = BATCH_ROWS if batch_size in (None, "auto") else int(batch_size)
            self.scorer = Scorer(model, tokenizer, rows, int(seed))
            self.tok = tokenizer

        @property
        def eot_token_id(self) -> int:
            return self.tok.eot_id

        @property
        def max_length(self) -> int:
            return self.scorer.block_size

        @property
        def max_gen_toks(self) -> int:
            return 256  # the `hf` backend's default

        @property
        def tokenizer_name(self) -> str:
            return self.tok.name

        def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
            return encode(self.tok, string)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
            results = self.scorer.loglikelihoods([(ctx, cont) for _, ctx, cont in requests])
            for (request, _, _), answer in zip(requests, results, strict=True):
                if request is not None:
                    self.cache_hook.add_partial("loglikelihood", request, answer)
            return results

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            windows, owner = [], []
            for i, (string,) in enumerate(req.args for req in requests):
                for w in self.scorer.rolling(self.tok_encode(string)):
                    windows.append(w)
                    owner.append(i)
            totals = [0.0] * len(requests)
            for i, (logp, _) in zip(owner, self.scorer.loglikelihoods(windows), strict=True):
                totals[i] += logp
            for req, total in zip(requests, totals, strict=True):
                self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
            return totals

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            eos = self.tok.decode([self.tok.eot_id]) or EOT
            groups: dict[str, list[int]] = {}
            for i, req in enumerate(requests):
                groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(
                    i
                )
            out: list[str] = [""] * len(requests)
            for idx in groups.values():
                kwargs = normalize_gen_kwargs(requests[idx[0]].args[1], self.max_gen_toks)
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
                texts = self.scorer.generate(
                    [self.tok_encode(requests[i].args[0]) for i in idx],
                    int(kwargs.pop("max_gen_toks")),
                    until,
                    sampling_settings(kwargs),
                )
                for i, text in zip(idx, texts, strict=True):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
            return out

        def get_model_info(self) -> dict:
            return {"model_source": self.source, "block_size": self.scorer.block_size}

    return LlmjaxLM


def register() -> type:
    """Registers `LlmjaxLM` with the harness as `--model llmjax`; returns it."""
    from lm_eval.api.registry import register_model

    cls = lm_class()
    register_model("llmjax")(cls)
    return cls


def __getattr__(name: str):
    # `from llmjax.harness import LlmjaxLM` works, and needs the harness only then.
    if name == "LlmjaxLM":
        return lm_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------
# Tasks


def task_manager(names: list[str], include_path: str | None = None):
    """The harness's TaskManager for `names`: over `include_path` (a folder of YAML task files)
    alone when that holds every name (or the names are YAML files), else over the harness's own
    tasks too (indexing its ~15,000 task files takes tens of seconds)."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    if include_path and not os.path.isdir(include_path):
        raise HarnessError(f"--include_path={include_path}: no such folder")
    local = TaskManager(include_path=include_path, include_defaults=False)
    if all(n in local.all_tasks or os.path.isfile(n) for n in names):
        return local
    if include_path and (bad := _unparsable([include_path])):
        raise HarnessError(bad)  # a name missing here may be this broken file's task
    return TaskManager(include_path=include_path)


def _unparsable(paths: list[str]) -> str | None:
    """The first YAML file among `paths` (files, or folders searched) that does not parse."""
    from lm_eval.tasks._yaml_loader import load_yaml

    files = []
    for p in paths:
        if os.path.isdir(p):
            for root, _, names in sorted(os.walk(p)):
                files += [os.path.join(root, n) for n in sorted(names) if n.endswith(".yaml")]
        elif p.endswith((".yaml", ".yml")) and os.path.isfile(p):
            files.append(p)
    for f in files:
        try:
            load_yaml(f, resolve_func=False)
        except Exception as e:  # yaml's errors, a bad include, a non-mapping document
            return f"{f}: the task file does not parse ({errors.one_line(e)})"
    return None


def check_tasks(names: list[str], manager) -> None:
    """Reads the tasks once (their datasets too): an unknown name, a task file that does not
    parse, or a dataset that cannot be read is one HarnessError naming it. Hub datasets need the
    network the first time; the harness caches them."""
    if not names:
        raise HarnessError("--tasks is empty: give task names or YAML task files")
    unknown = [n for n in names if n not in manager.all_tasks and not os.path.isfile(n)]
    if unknown:
        local = [n for n in names if os.path.isfile(n)] + [manager.include_path or ""]
        bad = _unparsable([p for p in local if p])
        if bad:
            raise HarnessError(bad)
        raise HarnessError(
            f"unknown task {unknown[0]!r}: not a harness task, nor one under --include_path, "
            "nor a YAML file"
        )
    bad = _unparsable([n for n in names if os.path.isfile(n)])
    if bad:
        raise HarnessError(bad)
    try:
        manager.load(names)
    except Exception as e:  # datasets' and the harness's errors while reading a task's data
        raise HarnessError(
            f"--tasks={','.join(names)}: cannot load ({type(e).__name__}: {errors.one_line(e)})"
        ) from e


def run_tasks(lm, names: list[str], manager, **kwargs) -> dict:
    """simple_evaluate of `lm` on the tasks (stderrs and per-sample logs off unless asked)."""
    from lm_eval import evaluator

    kwargs.setdefault("bootstrap_iters", 0)
    kwargs.setdefault("log_samples", False)
    return evaluator.simple_evaluate(model=lm, tasks=names, task_manager=manager, **kwargs)


def metric_values(results: dict) -> dict[str, dict[str, float]]:
    """{task or group: {metric key ("acc,none"): value}} of a harness results dict: numbers
    only (stderrs that were not computed, "N/A"), without aliases and sample counts."""
    out = {}
    for section in ("results", "groups"):
        for task, row in (results.get(section) or {}).items():
            out.setdefault(task, {}).update(
                {
                    k: float(v)
                    for k, v in row.items()
                    if "," in k and isinstance(v, int | float) and not isinstance(v, bool)
                }
            )
    return out


# ---------------------------------------------------------------------------------------------
# The training loop's hook


@dataclasses.dataclass
class TrainingTasks:
    """train.harness_tasks, checked once before training starts; `scores` runs them."""

    names: list[str]
    manager: object  # the harness's TaskManager
    limit: int

    def scores(self, cfg: GPTConfig, params, tok: Tokenizer) -> dict[str, float]:
        """{"harness/<task>/<metric>": value} for the model of `params`, scored in float32.
        Stops between batches (evaluate.stop_point)."""
        import logging as std_logging

        std_logging.getLogger("lm_eval").setLevel(std_logging.WARNING)
        lm = lm_class()(model=eval_model(cfg, params), tokenizer=tok)
        results = run_tasks(lm, self.names, self.manager, limit=self.limit or None)
        return {
            f"harness/{task}/{metric.removesuffix(',none')}": value
            for task, row in metric_values(results).items()
            for metric, value in row.items()
            if "_stderr" not in metric
        }


def training_tasks(tasks: str, limit: int) -> TrainingTasks:
    """train.harness_tasks read before anything compiles: a bad name fails the run at once."""
    require_lm_eval()
    check_one_process()
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    manager = task_manager(names)
    check_tasks(names, manager)
    return TrainingTasks(names, manager, limit)


# ---------------------------------------------------------------------------------------------
# CLI

FLAGS = flags.FLAGS


def main(argv) -> None:
    if FLAGS.lm_eval:
        lm_eval_main(argv[1:])
        return
    require_lm_eval()
    check_one_process()
    if FLAGS.workdir is None and FLAGS.from_hf is None:
        raise HarnessError("give --workdir=RUN (an llmjax run) or --from_hf=DIR|HUB_ID")
    if FLAGS.workdir is not None:
        if FLAGS.from_hf is not None:
            raise HarnessError("give --workdir or --from_hf, not both")
        # Checked before the tasks are read (which may download): a wrong path fails at once.
        if not checkpoint.steps_on_disk(checkpoint.directory(FLAGS.workdir)):
            raise HarnessError(f"--workdir={FLAGS.workdir}: no checkpoint (not a training run)")
    if FLAGS.output and os.path.isdir(FLAGS.output):
        raise HarnessError(f"--output={FLAGS.output} is a folder; give a file name")
    if FLAGS.limit is not None and FLAGS.limit <= 0:
        raise HarnessError(f"--limit={FLAGS.limit} must be > 0 (a count, or a fraction below 1)")
    if FLAGS.num_fewshot is not None and FLAGS.num_fewshot < 0:
        raise HarnessError(f"--num_fewshot={FLAGS.num_fewshot} must be >= 0")
    names = [t.strip() for t in FLAGS.tasks.split(",") if t.strip()]
    manager = task_manager(names, FLAGS.include_path)
    check_tasks(names, manager)
    cls = register()
    lm = cls(
        workdir=FLAGS.workdir,
        pretrained=FLAGS.from_hf,
        dtype=FLAGS.dtype,
        batch_size=FLAGS.batch_size,
        seed=FLAGS.seed,
    )
    print(f"# {lm.source}", file=sys.stderr)
    limit = FLAGS.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    results = run_tasks(
        lm,
        names,
        manager,
        num_fewshot=FLAGS.num_fewshot,
        limit=limit,
        bootstrap_iters=FLAGS.bootstrap_iters,
    )
    from lm_eval.utils import handle_non_serializable, make_table

    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    if FLAGS.output:
        out = os.path.abspath(FLAGS.output)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out + ".tmp", "w") as f:
            json.dump(results, f, indent=2, default=handle_non_serializable)
        os.replace(out + ".tmp", out)
    values = metric_values(results)
    print(json.dumps({"results": {t: _json_safe(m) for t, m in values.items()}}))


def _json_safe(metrics: dict[str, float]) -> dict:
    return {k: (v if math.isfinite(v) else str(v)) for k, v in metrics.items()}


def lm_eval_main(args: list[str]) -> None:
    """The harness's own command line (`lm_eval ARGS`) with `--model llmjax` registered."""
    require_lm_eval()
    register()
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *args]
    cli_evaluate()


def _define_flags() -> None:
    flags.DEFINE_string("workdir", None, "llmjax workdir whose latest checkpoint is evaluated")
    flags.DEFINE_string("from_hf", None, "or: a Hugging Face GPT-2 directory or hub id")
    flags.DEFINE_string("tasks", "", "comma-separated harness task names or YAML task files")
    flags.DEFINE_integer("num_fewshot", None, "few-shot examples per prompt (default: the task's)")
    flags.DEFINE_float("limit", None, "first N documents per task (or a fraction below 1)")
    flags.DEFINE_integer("batch_size", BATCH_ROWS, "rows per scoring and generation batch")
    flags.DEFINE_string("include_path", None, "a folder of extra YAML task files")
    flags.DEFINE_string("output", None, "write the harness's full results JSON to this file")
    flags.DEFINE_enum("dtype", "float32", DTYPES, "compute dtype of the evaluation")
    flags.DEFINE_integer("bootstrap_iters", 100_000, "bootstrap samples for stderrs; 0 = none")
    flags.DEFINE_integer("seed", 0, "sampling seed of generation tasks that sample")
    flags.DEFINE_bool("lm_eval", False, "run lm_eval's own CLI with --model llmjax (args after --)")


if __name__ == "__main__":
    _define_flags()
    errors.run(main)
