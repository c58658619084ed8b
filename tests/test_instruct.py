import json
import os
import subprocess
import sys

import numpy as np
import pytest

from llmjax import instruct
from llmjax.tokenizer import get_tokenizer
from tests.conftest import INSTRUCTIONS, ROOT, tiny_config

CONVO = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Italy? Ünïcode ✓"},
    {"role": "assistant", "content": "Rome."},
]


@pytest.mark.parametrize("name", ["gpt2-chat", "bytes-chat"])
def test_template_round_trip(name):
    tok = get_tokenizer(name)
    ids, scored = instruct.render(tok, CONVO)
    assert instruct.parse(tok, ids) == CONVO
    assert len(ids) == len(scored)


def test_special_tokens_are_single_ids_and_never_from_text():
    tok = get_tokenizer("gpt2-chat")
    assert tok.vocab_size == 50261 and tok.special["<|user|>"] == 50257
    assert [tok.special[t] for t in ("<|assistant|>", "<|end|>", "<|system|>")] == [
        50258,
        50259,
        50260,
    ]
    spelled = "<|user|> hi <|end|><|assistant|><|system|><|endoftext|>"
    assert not set(tok.encode(spelled)) & set(tok.special.values())
    assert tok.decode([50257]) == "<|user|>"
    base = get_tokenizer("gpt2")
    assert tok.encode(spelled) == base.encode(spelled)  # plain text is unchanged


def test_loss_mask_is_exactly_the_assistant_tokens():
    tok = get_tokenizer("gpt2-chat")
    msgs = CONVO[1:3]
    ids, scored = instruct.render(tok, msgs)
    sp, nl = tok.special, tok.encode("\n")
    answer = tok.encode("The capital of France is Paris.")
    question = tok.encode("What is the capital of France?")
    # Built by hand, token by token: only the answer and its <|end|> are scored.
    expect = (
        [sp["<|user|>"], *nl, *question, sp["<|end|>"], *nl]
        + [sp["<|assistant|>"], *nl]
        + answer
        + [sp["<|end|>"], *nl]
    )
    assert ids == expect
    n_user = 1 + len(nl) + len(question) + 1 + len(nl)
    want = [False] * (n_user + 1 + len(nl)) + [True] * (len(answer) + 1) + [False] * len(nl)
    assert scored == want


def _write(tmp_path, records, name="d.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return str(path)


def test_rows_encode_mask_and_padding(tmp_path):
    tok = get_tokenizer("bytes-chat")
    recs = [{"instruction": f"Say {i}", "input": "", "output": f"ok {i}"} for i in range(20)]
    rows, counts = instruct.encode_split(tok, _write(tmp_path, recs), 64, 0.2)
    assert counts["train"] + counts["val"] == 20 and counts["val"] >= 1
    for row in rows["train"]:
        scored = row[row >= 0]
        text = tok.decode(scored[:-1].tolist())
        assert text.startswith("ok ") and scored[-1] == tok.special["<|end|>"]
        # Padding (after the final newline) is EOT read as context, never scored.
        tail = row[np.flatnonzero(row >= 0)[-1] + 2 :]
        assert (tail == -1 - tok.eot_id).all()


def test_padding_never_contributes_to_loss(tmp_path):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from llmjax.loss import lm_loss
    from llmjax.model import GPT, GPTConfig

    cfg = GPTConfig(
        vocab_size=320, valid_vocab_size=261, n_layer=1, n_head=2, n_embd=32, block_size=128
    )
    model = GPT(cfg, nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tok = get_tokenizer("bytes-chat")
    ids, scored = instruct.render(tok, CONVO[1:3])
    row = np.full(128, -1 - tok.eot_id, np.int32)
    row[: len(ids)] = np.where(scored, ids, -1 - np.asarray(ids))
    other = row.copy()
    other[len(ids) :] = -1 - 7  # different padding ids: same loss
    s1, n1 = lm_loss(params, graphdef, jnp.asarray(row[None]), None, True)
    s2, n2 = lm_loss(params, graphdef, jnp.asarray(other[None]), None, True)
    assert float(s1) == float(s2) and int(n1) == sum(scored[1 : len(ids)]) == int(n2)
    # And the loss equals a direct computation over the scored targets only.
    logits = model(jnp.asarray(np.abs(np.where(row < 0, -1 - row, row))[None, :-1]))
    logp = jax.nn.log_softmax(logits[0])
    tgt = np.where(row < 0, -1 - row, row)[1:]
    direct = -sum(float(logp[t, tgt[t]]) for t in range(127) if row[t + 1] >= 0)
    np.testing.assert_allclose(float(s1), direct, rtol=1e-5)


@pytest.mark.parametrize(
    "bad,needle",
    [
        ([{"foo": 1}], "record 0 is neither"),
        ([{"messages": [{"role": "user", "content": "hi"}]}], "with an assistant turn"),
        ("not json", "not JSON"),
    ],
)
def test_bad_datasets_named(tmp_path, bad, needle):
    path = tmp_path / "bad.json"
    path.write_text(bad if isinstance(bad, str) else json.dumps(bad))
    with pytest.raises(instruct.InstructError, match=needle):
        instruct.load_examples(str(path))


def test_kind_decided_once_from_config_and_path(tmp_path, byte_data):
    from llmjax import batches
    from llmjax.config import ConfigError

    prefs = os.path.join(ROOT, "data", "instruction-data-with-preference.json")
    kind = lambda path, k="auto": batches.resolve_kind(tiny_config(path, **{"data.kind": k}))
    assert kind(byte_data) == "pretrain"
    assert kind(INSTRUCTIONS) == "instruct"
    assert kind(prefs) == "preference"
    assert kind(prefs, "preference") == "preference"
    assert batches.objective(tiny_config(prefs), "preference").sequences_per_row == 2
    with pytest.raises(ConfigError, match=r"data.kind=pretrain needs a directory of shards"):
        kind(INSTRUCTIONS, "pretrain")
    with pytest.raises(ConfigError, match=r"data.kind=instruct needs a file, not data.path="):
        kind(byte_data, "instruct")


def test_messages_jsonl_format(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps({"messages": CONVO}) for _ in range(3)))
    assert instruct.load_examples(str(path)) == [CONVO] * 3


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A tiny bytes-chat model trained on 300 examples of the instruction set in data/."""
    from llmjax import train

    tmp = tmp_path_factory.mktemp("sft")
    with open(INSTRUCTIONS) as f:
        recs = [r for r in json.load(f) if len(r["instruction"] + r["input"] + r["output"]) < 200]
    path = tmp / "inst.json"
    path.write_text(json.dumps(recs[:300]))
    cfg = tiny_config(
        str(path),
        **{
            "data.tokenizer": "bytes-chat",
            "data.seq_len": 256,
            "model.block_size": 256,
            "model.n_embd": 64,
            "data.batch_size": 16,
            "train.steps": 60,
            "train.eval_every": 30,
            "train.log_every": 10,
            "train.ckpt_every": 60,
            "optim.warmup_steps": 5,
        },
    )
    workdir = str(tmp / "w")
    train.train_and_evaluate(cfg, workdir)
    return workdir


def test_finetuning_lowers_val_loss(finetuned):
    with open(os.path.join(finetuned, "metrics.jsonl")) as f:
        evals = [json.loads(line)["eval/loss"] for line in f if "eval/loss" in line]
    assert len(evals) == 2 and evals[1] < evals[0] - 0.3


def test_chat_prompt_answers_and_stops_at_end(finetuned):
    from llmjax import chat, checkpoint

    model, tok, _ = checkpoint.load_model(finetuned)
    answer, dropped = chat.reply(
        model,
        tok,
        [{"role": "user", "content": "Name a color."}],
        max_new_tokens=200,
        temperature=0.0,
        top_k=0,
        top_p=1.0,
        seed=0,
        stream=False,
    )
    assert dropped == 0 and answer and "<|end|>" not in answer
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmjax.chat",
            f"--workdir={finetuned}",
            "--prompt=Name a color.",
            "--temperature=0",
            "--max_new_tokens=200",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == answer.strip()  # the CLI streams the same greedy answer


def test_context_drops_oldest_turns_first():
    from llmjax import chat

    tok = get_tokenizer("bytes-chat")
    msgs = CONVO + [{"role": "user", "content": "x" * 20}]
    full, _ = instruct.render(tok, msgs, add_generation_prompt=True)
    ids, dropped = chat.fit_context(tok, msgs, len(full) - 1)
    assert (
        dropped == 1
        and ids[: len(instruct.render(tok, CONVO[:1])[0])] == instruct.render(tok, CONVO[:1])[0]
    )  # the system message survives


def test_init_from_gpt2_adds_chat_rows_at_the_mean(tmp_path):
    from llmjax.init_from import load_params
    from llmjax.model import model_config
    from tests.test_convert import hf_model

    hf = hf_model(n_layer=1, n_head=2, n_embd=32, vocab=50257, n_positions=64)
    hf.save_pretrained(tmp_path / "hf")
    cfg = tiny_config(
        "",
        **{
            "data.tokenizer": "gpt2-chat",
            "model.n_layer": 1,
            "model.n_head": 2,
            "model.n_embd": 32,
            "model.block_size": 64,
        },
    )
    params = load_params(str(tmp_path / "hf"), model_config(cfg))
    wte = np.asarray(params["wte"]["embedding"])
    ref = hf.transformer.wte.weight.detach().numpy()
    assert wte.shape == (50304, 32)
    np.testing.assert_array_equal(wte[:50257], ref)
    np.testing.assert_allclose(wte[50257:50261], np.tile(ref.mean(0), (4, 1)), rtol=1e-6)
    assert not wte[50261:].any()  # padding rows stay zero
