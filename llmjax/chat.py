"""Chat with a finetuned model in the terminal.

    python -m llmjax.chat --workdir=runs/sft                    # interactive; /reset, /quit
    python -m llmjax.chat --workdir=runs/sft --prompt="What is the capital of France?"

Replies stream as they are generated and stop at <|end|>. The conversation is kept inside the
model's context window by dropping the oldest turns first (a system message, if any, stays).
"""

from __future__ import annotations

import itertools
import sys

from absl import flags

from llmjax import errors, instruct
from llmjax.model import GPT
from llmjax.sample import SampleError, Streamer, check_settings, generate
from llmjax.tokenizer import Tokenizer

FLAGS = flags.FLAGS
# Context kept for the conversation however long an answer may be: the template's turn tokens
# (<|user|>, newlines, <|end|>, <|assistant|>) and a few of the question's.
MIN_PROMPT_TOKENS = 8


def fit_context(tok: Tokenizer, messages: list[dict], budget: int) -> tuple[list[int], int]:
    """The prompt ids of the newest turns that fit in `budget` tokens, and how many turns were
    dropped. The system message (first, if present) is always kept."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system) :]
    for dropped in range(len(turns)):
        ids, _ = instruct.render(tok, system + turns[dropped:], add_generation_prompt=True)
        if len(ids) <= budget:
            return ids, dropped
    raise SampleError(
        f"the last message alone needs more than the {budget} tokens of context left for it"
    )


def reply(
    model: GPT,
    tok: Tokenizer,
    messages: list[dict],
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int,
    stream: bool = True,
) -> tuple[str, int]:
    """The assistant's answer to `messages` (streamed to stdout when `stream`) and the number of
    old turns dropped to fit the context."""
    end = tok.special["<|end|>"]
    max_new_tokens = min(max_new_tokens, model.cfg.block_size - MIN_PROMPT_TOKENS)
    ids, dropped = fit_context(tok, messages, model.cfg.block_size - max_new_tokens)
    printer = Streamer(tok) if stream else None
    on_token = (lambda _, t: t != end and printer(t)) if stream else None
    out = generate(
        model,
        [ids],
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        eot_id=end,
        on_token=on_token,
    )[0]
    return tok.decode([t for t in out if t != end]), dropped


def _define_flags() -> None:
    flags.DEFINE_string(
        "workdir", None, "finetuned workdir (its latest checkpoint is used)", required=True
    )
    flags.DEFINE_string("prompt", None, "answer this one question and exit")
    flags.DEFINE_string("system", None, "optional system message")
    flags.DEFINE_integer("max_new_tokens", 256, "longest reply, in tokens")
    flags.DEFINE_float("temperature", 0.7, "softmax temperature; 0 = greedy")
    flags.DEFINE_integer("top_k", 40, "keep the k most likely tokens; 0 = all")
    flags.DEFINE_float("top_p", 0.95, "nucleus sampling mass; 1 = off")
    flags.DEFINE_integer("seed", 0, "sampling seed")


def main(argv):
    del argv
    from llmjax.checkpoint import load_model  # late: Orbax's import would slow `--help`

    check_settings(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p)
    model, tok, _ = load_model(FLAGS.workdir)
    if not tok.chat:
        raise SampleError(
            f"--workdir={FLAGS.workdir} was trained with tokenizer {tok.name!r}, which has no "
            "chat tokens; finetune it first (configs/sft_gpt2.py)"
        )
    opts = dict(
        max_new_tokens=FLAGS.max_new_tokens,
        temperature=FLAGS.temperature,
        top_k=FLAGS.top_k,
        top_p=FLAGS.top_p,
    )
    system = [{"role": "system", "content": FLAGS.system}] if FLAGS.system else []
    if FLAGS.prompt is not None:
        reply(
            model,
            tok,
            system + [{"role": "user", "content": FLAGS.prompt}],
            seed=FLAGS.seed,
            **opts,
        )
        print()
        return
    messages = list(system)
    print("llmjax chat: /reset starts over, /quit or an empty line ends.", file=sys.stderr)
    for turn in itertools.count():  # until /quit, an empty line or end of input
        try:
            text = input("you> ").strip()
        except EOFError:
            break
        if text in ("", "/quit"):
            break
        if text == "/reset":
            messages = list(system)
            continue
        messages.append({"role": "user", "content": text})
        sys.stdout.write("assistant> ")
        try:
            answer, dropped = reply(model, tok, messages, seed=FLAGS.seed + turn, **opts)
        except SampleError as e:  # this message does not fit: the conversation goes on
            print(f"\nllmjax: {e}", file=sys.stderr)
            messages.pop()
            continue
        print()
        if dropped:
            print(f"(dropped the {dropped} oldest turns to fit the context)", file=sys.stderr)
        messages.append({"role": "assistant", "content": answer})


if __name__ == "__main__":
    _define_flags()
    errors.run(main)
