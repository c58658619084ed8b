"""Sampling with a KV cache: one jitted prefill, then a jitted decode loop, 8 tokens per call.

    python -m llmjax.sample --workdir=DIR --prompt="Once upon a time" --max_new_tokens=100 \
        --temperature=0.8 --top_k=40 --top_p=0.95 --seed=0

The cache is preallocated for the whole generation, so the decode step has fixed shapes and compiles
once; the prompt is never re-run. Prompts of different lengths share a batch: the shortest prefix
(rounded down to one of a few lengths, `prefill_length`) is prefilled, and rows whose prompt is
still running are fed their prompt token instead of a sample.
Decode steps run `chunk` at a time in one lax.scan with sampling inside: one dispatch and one host
sync per chunk rather than per token (on a GPU those cost more than a 124M decode step).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from llmjax import errors, instruct
from llmjax.model import GPT, MASKED_LOGIT
from llmjax.tokenizer import Tokenizer

# The training loop's periodic samples (train.sample_every): nanoGPT's settings.
PERIODIC_TEMPERATURE = 0.8
PERIODIC_TOP_K = 40


class SampleError(errors.UserError):
    """Sampling arguments that cannot be used; the message names the argument and its value."""


@functools.partial(jax.jit, static_argnums=0, donate_argnums=3)
def prefill_step(
    graphdef, params, idx_BT, cache, prompt_BS, lengths_B, key, temperature, top_k, top_p
):
    """Runs the shared prompt prefix; returns the token at index T (sampled or forced), [B, 1]."""
    T = idx_BT.shape[1]
    logits_BTV, cache = nnx.merge(graphdef, params).decode(idx_BT, cache, 0)
    return _next(logits_BTV[:, -1], T, prompt_BS, lengths_B, key, temperature, top_k, top_p)[
        :, None
    ], cache


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=4)
def decode_chunk(
    graphdef, n, params, toks_BK, cache, pos, prompt_BS, lengths_B, key, temperature, top_k, top_p
):
    """Feeds toks_BK[:, -1], the token at index `pos`, then n-1 of its own: returns the tokens at
    indices pos+1..pos+n as [B, n] and the updated cache.

    The n steps are one lax.scan with sampling inside, so n new tokens cost one dispatch and one
    host sync instead of n.
    """
    model = nnx.merge(graphdef, params)
    S = prompt_BS.shape[1]  # the prompt table is as long as the cache

    def step(carry, i):
        tok_B, cache = carry
        # The last chunk may run past the cache: those steps redo position S-1 and their tokens
        # are discarded by the caller.
        p = jnp.minimum(pos + i, S - 1)
        logits_BTV, cache = model.decode(tok_B[:, None], cache, p)
        tok_B = _next(
            logits_BTV[:, -1], p + 1, prompt_BS, lengths_B, key, temperature, top_k, top_p
        )
        return (tok_B, cache), tok_B

    (_, cache), toks_nB = jax.lax.scan(step, (toks_BK[:, -1], cache), jnp.arange(n))
    return toks_nB.T, cache


def prefill_length(shortest: int) -> int:
    """Prompt tokens run by the one prefill call: the shortest prompt rounded down (to a power of
    two below 64, else to a multiple of 64), so that prompts of nearby lengths share one compiled
    prefill (the harness sends thousands of lengths); the rest of each prompt is fed by the decode
    steps as forced tokens."""
    return 1 << (shortest.bit_length() - 1) if shortest < 64 else shortest // 64 * 64


def _next(logits_BV, index, prompt_BS, lengths_B, key, temperature, top_k, top_p):
    # A row whose prompt is still running is fed its own prompt token instead of a sample.
    sampled_B = sample_logits(logits_BV, jax.random.fold_in(key, index), temperature, top_k, top_p)
    forced_B = jax.lax.dynamic_index_in_dim(prompt_BS, index, axis=1, keepdims=False)
    return jnp.where(index < lengths_B, forced_B, sampled_B)


@jax.jit
def sample_logits(logits_BV, key, temperature, top_k, top_p):
    """Temperature, then top-k and top-p (nucleus) filtering; temperature 0 is greedy.

    Excluded tokens (and the padded vocabulary, already at a huge negative logit) get -inf, so they
    can never be drawn. top_k <= 0 and top_p >= 1 disable their filters. Greedy decoding and
    unfiltered sampling skip the vocabulary sort (`lax.cond` runs only the branch taken).
    """
    V = logits_BV.shape[-1]
    valid_BV = logits_BV > MASKED_LOGIT / 10
    scaled_BV = logits_BV / jnp.maximum(temperature, 1e-6)

    def filtered(scaled_BV):
        sorted_BV = jnp.sort(scaled_BV, axis=-1)[:, ::-1]
        k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
        kth_B1 = jax.lax.dynamic_slice_in_dim(sorted_BV, k - 1, 1, axis=-1)
        # Nucleus: keep the smallest prefix of sorted tokens whose probability reaches top_p.
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
        cutoff_B1 = jnp.min(
            jnp.where(before_BV < top_p, sorted_BV, jnp.inf), axis=-1, keepdims=True
        )
        return jnp.where((scaled_BV >= kth_B1) & (scaled_BV >= cutoff_B1), scaled_BV, -jnp.inf)

    def sample(_):
        use_filter = (top_k > 0) | (top_p < 1.0)
        logits = jax.lax.cond(use_filter, filtered, lambda x: x, scaled_BV)
        logits = jnp.where(valid_BV, logits, -jnp.inf)
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)

    def greedy(_):
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, sample, greedy, None)


def check_settings(temperature: float, top_k: int, top_p: float) -> None:
    """Sampling settings that mean something: raises SampleError naming the one that does not."""
    for ok, what in [
        (temperature >= 0, f"temperature={temperature} must be >= 0 (0 = greedy)"),
        (top_k >= 0, f"top_k={top_k} must be >= 0 (0 = all tokens)"),
        (0 < top_p <= 1, f"top_p={top_p} must be in (0, 1] (1 = off)"),
    ]:
        if not ok:
            raise SampleError(what)


def generate(
    model: GPT,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    eot_id: int | None = None,
    on_token: Callable[[int, int], None] | None = None,
    chunk: int = 8,
) -> list[list[int]]:
    """Continues each prompt by up to `max_new_tokens` tokens; a row stops after emitting `eot_id`.

    `on_token(row, token)` is called for every new token as soon as the host has it (for
    streaming); tokens arrive `chunk` at a time, one device dispatch each. The tokens do not depend
    on `chunk` (each index draws from its own key). Returns the new tokens of each row (the EOT
    included when it was produced).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise SampleError("every prompt needs at least one token")
    if chunk < 1:
        raise SampleError(f"chunk must be >= 1, got {chunk}")
    check_settings(temperature, top_k, top_p)
    if max_new_tokens < 1:
        return [[] for _ in prompts]
    B, lengths = len(prompts), [len(p) for p in prompts]
    total = max(lengths) + max_new_tokens
    if total > model.cfg.block_size:
        raise SampleError(
            f"prompt ({max(lengths)} tokens) + max_new_tokens ({max_new_tokens}) "
            f"exceeds the model's block_size ({model.cfg.block_size})"
        )
    bad = [t for p in prompts for t in p if not 0 <= t < model.cfg.valid_vocab_size]
    if bad:
        raise SampleError(
            f"prompt token {bad[0]} is outside the vocabulary [0, {model.cfg.valid_vocab_size})"
        )
    graphdef, params = nnx.split(model)
    # Round the cache (and the prompt table) up so that nearby lengths share one compiled step.
    S = min(-(-total // 64) * 64, model.cfg.block_size)
    tokens = np.zeros((B, S), np.int32)
    for r, p in enumerate(prompts):
        tokens[r, : len(p)] = p
    cache = model.init_cache(B, S)
    first = prefill_length(min(lengths))  # the index of the first token in toks_BK
    consts = (
        jnp.asarray(tokens),
        jnp.asarray(lengths, jnp.int32),
        jax.random.key(seed),
        jnp.float32(temperature),
        jnp.int32(top_k),
        jnp.float32(top_p),
    )
    toks_BK, cache = prefill_step(graphdef, params, jnp.asarray(tokens[:, :first]), cache, *consts)
    new: list[list[int]] = [[] for _ in range(B)]
    done = np.zeros(B, bool)
    while True:
        last = first + toks_BK.shape[1] - 1
        # Dispatch the next chunk before reading this one: the device computes while the host
        # streams. At most two chunks past the end are wasted.
        if last + 1 < total:
            next_BK, cache = decode_chunk(graphdef, chunk, params, toks_BK, cache, last, *consts)
        for j, col in enumerate(np.asarray(toks_BK).T.tolist()):
            if first + j >= total:
                break
            for r, t in enumerate(col):
                if first + j < lengths[r] or done[r]:
                    continue  # still inside this row's prompt, or finished
                new[r].append(t)
                if on_token:
                    on_token(r, t)
                done[r] = (eot_id is not None and t == eot_id) or len(new[r]) == max_new_tokens
        if done.all() or last + 1 >= total:
            return new
        toks_BK, first = next_BK, last + 1


FLAGS = flags.FLAGS


def sample_text(
    model: GPT,
    tok: Tokenizer,
    prompt: str,
    n: int,
    seed: int,
    on_token: Callable[[int, int], None] | None = None,
) -> str:
    """The training loop's periodic sample: a continuation of `prompt`, or for a chat model its
    answers to instruct.SAMPLE_QUESTIONS. `on_token`: as `generate`'s (the loop's stop check)."""
    chat = tok.chat
    if chat:
        prompts = [
            instruct.render(tok, [{"role": "user", "content": q}], add_generation_prompt=True)[0]
            for q in instruct.SAMPLE_QUESTIONS
        ]
        stop = tok.special["<|end|>"]
    else:
        prompts, stop = [tok.encode(prompt) or [tok.eot_id]], tok.eot_id
    n = min(n, model.cfg.block_size - max(map(len, prompts)))
    outs = generate(
        model,
        prompts,
        n,
        temperature=PERIODIC_TEMPERATURE,
        top_k=PERIODIC_TOP_K,
        seed=seed,
        eot_id=stop,
        on_token=on_token,
    )
    texts = [tok.decode([t for t in out if t != stop]) for out in outs]
    if chat:
        return "\n".join(
            f"Q: {q}\nA: {a}" for q, a in zip(instruct.SAMPLE_QUESTIONS, texts, strict=True)
        )
    return prompt + texts[0]


def main(argv):
    del argv
    from llmjax.checkpoint import load_model  # late: Orbax's import would slow `--help`

    check_settings(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p)
    if FLAGS.num_samples < 1 or FLAGS.max_new_tokens < 1:
        raise SampleError(
            f"--num_samples={FLAGS.num_samples} and --max_new_tokens={FLAGS.max_new_tokens} "
            "must be >= 1"
        )
    model, tok, step = load_model(FLAGS.workdir)
    print(f"# {FLAGS.workdir} at step {step}", file=sys.stderr)
    # An empty prompt starts a fresh document, as GPT-2 was trained; a long one keeps its end.
    ids = tok.encode(FLAGS.prompt)[-(model.cfg.block_size - 1) :] or [tok.eot_id]
    room = model.cfg.block_size - len(ids)
    if FLAGS.max_new_tokens > room:
        print(
            f"# {room} new tokens: the prompt ({len(ids)} tokens) and the continuation must "
            f"fit the model's context of {model.cfg.block_size}",
            file=sys.stderr,
        )
    n = min(FLAGS.max_new_tokens, room)
    if FLAGS.num_samples == 1:
        sys.stdout.write(FLAGS.prompt)
        stream = Streamer(tok)
        generate(
            model,
            [ids],
            n,
            temperature=FLAGS.temperature,
            top_k=FLAGS.top_k,
            top_p=FLAGS.top_p,
            seed=FLAGS.seed,
            eot_id=tok.eot_id,
            on_token=lambda _, t: stream(t),
        )
        print()
        return
    outs = generate(
        model,
        [ids] * FLAGS.num_samples,
        n,
        temperature=FLAGS.temperature,
        top_k=FLAGS.top_k,
        top_p=FLAGS.top_p,
        seed=FLAGS.seed,
        eot_id=tok.eot_id,
    )
    for i, out in enumerate(outs):
        print(f"--- sample {i}\n{FLAGS.prompt}{tok.decode(out)}")


class Streamer:
    """Prints text as tokens arrive, holding back bytes until they decode to whole characters."""

    def __init__(self, tok):
        self.tok, self.ids, self.printed = tok, [], 0

    def __call__(self, token: int) -> None:
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return  # an incomplete multi-byte character; wait for the rest
        sys.stdout.write(text[self.printed :])
        sys.stdout.flush()
        self.printed = len(text)


def _define_flags() -> None:
    # Defined only when run as a program, so importing this module never clashes with
    # another entry point's flags.
    flags.DEFINE_string(
        "workdir", None, "training workdir whose latest checkpoint is used", required=True
    )
    flags.DEFINE_string("prompt", "\n", "text to continue")
    flags.DEFINE_integer("max_new_tokens", 200, "tokens to generate")
    flags.DEFINE_float("temperature", 0.8, "softmax temperature; 0 = greedy")
    flags.DEFINE_integer("top_k", 40, "keep the k most likely tokens; 0 = all")
    flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass; 1 = off")
    flags.DEFINE_integer("seed", 0, "sampling seed")
    flags.DEFINE_integer("num_samples", 1, "independent samples of the same prompt")


if __name__ == "__main__":
    _define_flags()
    errors.run(main)
