"""llmjax.harness against the harness's own `hf` backend: the same tiny GPT-2 (llmjax workdir, and
its `convert --to_hf` export) scored on the fixture tasks (tests/fixtures/harness) by
simple_evaluate with LlmjaxLM and with HFLM must give the same per-request log-likelihoods, greedy
flags, generations and metrics."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

pytest.importorskip("lm_eval", reason="the harness extra: pip install -e '.[harness]'")

import yaml  # noqa: E402 (lm_eval's dependency)

from llmjax import checkpoint, convert, harness, hf_gpt2  # noqa: E402
from llmjax.sample import generate  # noqa: E402
from llmjax.tokenizer import get_tokenizer  # noqa: E402
from tests.conftest import FIXTURES, run_cli  # noqa: E402

TASKS = ("llmjax_mc", "llmjax_ll", "llmjax_rolling", "llmjax_gen")
BLOCK = 64  # the tiny model's context: the fixtures' long items need several windows
MAX_GEN = 12  # llmjax_gen.yaml's max_gen_toks


def fixture_items(text: str) -> dict[str, list[dict]]:
    """The fixture tasks' documents, cut from Tiny Shakespeare (the model-dependent items, a
    greedy continuation and an `until` stop, are added by `model_items`)."""
    lines = [ln for ln in text.splitlines() if len(ln) > 30][:40]
    long = " ".join(lines[:12])  # ~150 GPT-2 tokens: over two contexts of 64
    return {
        "mc": [
            {"context": lines[0], "choices": [" and", " the", " Citizen"], "label": 1},
            # A context ending in a space: the harness moves the space into the continuation.
            {"context": "Before we proceed any ", "choices": ["further", "more"], "label": 0},
            # An empty context: conditioned on the end-of-text token.
            {"context": "", "choices": ["First Citizen:", "Speak, speak."], "label": 0},
            # Longer than the context: cut from the left.
            {"context": long, "choices": [" you", " famish", " resolved"], "label": 2},
        ],
        "ll": [
            {"context": lines[1], "continuation": " of the people"},
            {"context": "You are all resolved rather to die than to ", "continuation": "famish"},
            {"context": long, "continuation": " We know it"},
        ],
        "rolling": [
            {"text": lines[2]},
            {"text": "\n".join(lines[:30])},  # several rolling windows of 64
        ],
        "gen": [
            {"context": lines[3], "answer": "x"},
            {"context": long, "answer": "y"},  # longer than block_size - max_gen_toks
        ],
    }


def model_items(model, tok, text: str) -> tuple[dict, str]:
    """Items that depend on the model: a continuation it predicts greedily (2 tokens), and a
    generation that an `until` string stops midway. Returns (items to add, the until string)."""
    lines = [ln for ln in text.splitlines() if len(ln) > 30][10:40]
    greedy = None
    for ln in lines:
        ids = tok.encode(ln)
        out = generate(model, [ids], 2, temperature=0.0)[0]
        cont = tok.decode(out)
        if "\ufffd" not in cont and tok.encode(ln + cont) == ids + out:
            greedy = {"context": ln, "continuation": cont}
            break
    assert greedy is not None
    ids = tok.encode(lines[0])
    out = generate(model, [ids], MAX_GEN, temperature=0.0)[0]
    full = tok.decode(out)
    until = None
    for k in range(3, MAX_GEN - 2):
        piece = tok.decode(out[k : k + 1]).strip()
        if len(piece) >= 2 and "\ufffd" not in piece and 0 < full.find(piece) < len(full) - 1:
            until = piece
            break
    assert until is not None, full
    return {
        "ll": [greedy],
        "mc": [{**greedy, "choices": [greedy["continuation"], " nothing"], "label": 0}],
        "gen": [{"context": lines[0], "answer": full.split(until)[0]}],
    }, until


def write_tasks(folder, items: dict, until: str = "\n") -> str:
    """The fixture YAMLs in `folder`, their data_files absolute (relative paths resolve against
    the working directory, not the YAML's folder), the data beside them."""
    os.makedirs(folder, exist_ok=True)
    for name, docs in items.items():
        with open(os.path.join(folder, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(d) + "\n" for d in docs)
    for task in TASKS:
        with open(os.path.join(FIXTURES, "harness", f"{task}.yaml")) as f:
            cfg = yaml.safe_load(f)
        name = os.path.basename(cfg["dataset_kwargs"]["data_files"]["test"])
        cfg["dataset_kwargs"]["data_files"]["test"] = os.path.join(str(folder), name)
        if task == "llmjax_gen":
            cfg["generation_kwargs"]["until"] = [until]
        with open(os.path.join(folder, f"{task}.yaml"), "w") as f:
            yaml.safe_dump(cfg, f)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory, shakespeare):
    """(workdir, its HF export, the fixture task folder): a 2-layer GPT-2 with GPT-2's
    vocabulary, initialised wide (std 0.2) so that its argmax is never a near tie."""
    import torch
    import transformers

    tmp = tmp_path_factory.mktemp("harness")
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, n_positions=BLOCK, initializer_range=0.2
    )
    hf = transformers.GPT2LMHeadModel(hf_cfg)
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    work, out = str(tmp / "work"), str(tmp / "hf")
    model = hf_gpt2.from_state_dict(hf_cfg.to_dict(), sd)
    convert.write_workdir(model, work, "test")
    # The export users run: `python -m llmjax.convert --workdir=W --to_hf=OUT`.
    hf_gpt2.to_hf(checkpoint.load_model(work)[0], out)
    tok = get_tokenizer("gpt2")
    items = fixture_items(shakespeare)
    extra, until = model_items(model, tok, shakespeare)
    for k, v in extra.items():
        items[k] = v + items[k]
    return work, out, write_tasks(tmp / "tasks", items, until)


def _evaluate(lm, folder: str, **kwargs) -> dict:
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    return evaluator.simple_evaluate(
        model=lm,
        tasks=list(TASKS),
        task_manager=TaskManager(include_path=folder, include_defaults=False),
        bootstrap_iters=0,
        log_samples=True,
        **kwargs,
    )


def test_scores_match_the_hf_backend(tiny_gpt2):
    from lm_eval.models.huggingface import HFLM

    work, hf_dir, folder = tiny_gpt2
    ours = harness.LlmjaxLM(workdir=work, batch_size=3)
    theirs = HFLM(pretrained=hf_dir, dtype="float32", device="cpu")
    assert ours.max_length == theirs.max_length == BLOCK
    got, want = _evaluate(ours, folder), _evaluate(theirs, folder)
    tok = get_tokenizer("gpt2")
    greedy_seen = stopped = 0
    for task in TASKS:
        a, b = got["samples"][task], want["samples"][task]
        assert len(a) == len(b) > 0
        for sa, sb in zip(a, b, strict=True):
            assert sa["arguments"] == sb["arguments"]
            for ra, rb, args in zip(sa["resps"], sb["resps"], sa["arguments"], strict=True):
                if task == "llmjax_gen":
                    assert ra == rb, args
                    stopped += sa["doc"]["answer"] == ra[0] and len(ra[0]) > 0
                    continue
                n = len(tok.encode(args[-1]))  # tokens scored (the continuation or document)
                if task == "llmjax_rolling":
                    assert abs(ra[0] - rb[0]) <= 1e-4 * n, (ra, rb)
                else:
                    (lla, ga), (llb, gb) = ra[0], rb[0]
                    assert abs(lla - llb) <= 1e-4 * n, (args, lla, llb)
                    assert ga == gb, args
                    greedy_seen += ga
        for metric, value in want["results"][task].items():
            if metric == "alias" or "_stderr" in metric:
                continue
            if isinstance(value, str) or metric.startswith(("acc", "exact_match")):
                assert got["results"][task][metric] == value, (task, metric)
            else:
                np.testing.assert_allclose(got["results"][task][metric], value, rtol=1e-5)
    # The fixtures reach the cases they are there for.
    assert greedy_seen >= 2  # the greedy continuation, scored in llmjax_ll and llmjax_mc
    assert stopped == 1  # the generation cut by `until`
    n_rolling = len(tok.encode(got["samples"]["llmjax_rolling"][1]["arguments"][0][0]))
    assert n_rolling > 3 * BLOCK


@contextlib.contextmanager
def compiles_of(name: str):
    """The XLA compiles of jitted function `name` while the block runs, as jax reports them."""
    seen = []

    def listen(event: str, seconds: float, **kw) -> None:
        if event == "/jax/core/compile/backend_compile_duration" and name in kw.get("fun_name", ""):
            seen.append(seconds)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def test_compiles_once_per_length_and_gracefully_refuses(tiny_gpt2):
    """A whole evaluation compiles the scorer once per padded (row, scored) length pair (16, 32
    or 64 each here), a second one compiles nothing; an empty continuation scores 0 (the `hf`
    backend asserts)."""
    work, _, folder = tiny_gpt2
    lm = harness.LlmjaxLM(workdir=work, batch_size=3)
    with compiles_of("score_rows") as first:
        _evaluate(lm, folder)
    assert len(first) <= 6  # none where an earlier test compiled the same shapes
    with compiles_of("score_rows") as second:
        _evaluate(harness.LlmjaxLM(workdir=work, batch_size=3), folder, limit=2)
    assert second == []
    tok = get_tokenizer("gpt2")
    got = lm.scorer.loglikelihoods([(tok.encode("Speak"), []), (tok.encode("Speak"), [11])] * 2)
    assert got[0] == got[2] == (0.0, True) and got[1] == got[3]
    # Empty contexts generate from the end-of-text token, as the harness conditions them.
    empty = lm.scorer.generate([[]], 5, [], {"temperature": 0.0})
    eot = lm.scorer.generate([[tok.eot_id]], 5, [], {"temperature": 0.0})
    assert empty == eot and len(empty[0]) > 0


def _harness_cli(*args, env) -> subprocess.CompletedProcess:
    return run_cli("llmjax.harness", *args, env=env, timeout=600)


def test_cli_prints_the_table_and_one_json_line(tiny_gpt2, tmp_path, env):
    work, _, folder = tiny_gpt2
    out = tmp_path / "results.json"
    r = _harness_cli(
        f"--workdir={work}",
        "--tasks=llmjax_mc,llmjax_rolling",
        f"--include_path={folder}",
        "--limit=3",
        "--bootstrap_iters=0",
        f"--output={out}",
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert any("llmjax_mc" in ln and "acc_norm" in ln for ln in lines)  # the harness's table
    printed = json.loads(lines[-1])["results"]
    want = _evaluate(harness.LlmjaxLM(workdir=work), folder, limit=3)["results"]
    for task in ("llmjax_mc", "llmjax_rolling"):
        for metric in printed[task]:
            np.testing.assert_allclose(printed[task][metric], want[task][metric], rtol=1e-6)
    assert set(printed["llmjax_rolling"]) >= {"word_perplexity,none", "bits_per_byte,none"}
    saved = json.loads(out.read_text())
    assert saved["results"]["llmjax_mc"]["acc,none"] == printed["llmjax_mc"]["acc,none"]


def test_cli_bad_inputs_are_one_line(tiny_gpt2, tmp_path, env):
    work, _, folder = tiny_gpt2
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.yaml").write_text("task: broken\ndoc_to_text: [unclosed\n")
    cases = [
        ([f"--workdir={tmp_path}", "--tasks=llmjax_mc"], "no checkpoint"),
        ([f"--workdir={work}", "--tasks=broken", f"--include_path={bad}"], "does not parse"),
        ([f"--workdir={work}", "--tasks=llmjax_mc", "--limit=-1"], "--limit=-1.0 must be > 0"),
    ]
    for args, message in cases:
        r = _harness_cli(*args, env=env)
        assert r.returncode == 2, r.stderr[-2000:]
        last = r.stderr.strip().splitlines()
        assert len(last) == 1 and message in last[0], r.stderr[-2000:]
    # An unknown name (the same check the command runs; the harness's own index is not built).
    from lm_eval.tasks import TaskManager

    local = TaskManager(include_path=folder, include_defaults=False)
    with pytest.raises(harness.HarnessError, match="unknown task 'nope'"):
        harness.check_tasks(["llmjax_mc", "nope"], local)


def test_training_logs_harness_rows(byte_data, shakespeare, tmp_path):
    """train.harness_* log harness/<task>/<metric> rows into metrics.jsonl: the numbers the
    harness gives the saved checkpoint (scored in float32 whatever the run's dtype)."""
    from llmjax import train
    from tests.conftest import tiny_config

    folder = write_tasks(tmp_path / "tasks", fixture_items(shakespeare))
    files = [os.path.join(folder, f"{t}.yaml") for t in ("llmjax_mc", "llmjax_rolling")]
    cfg = tiny_config(
        byte_data,
        **{
            "train.steps": 2,
            "train.eval_every": 0,
            "train.ckpt_every": 2,
            "train.harness_tasks": ",".join(files),
            "train.harness_every": 2,
            "train.harness_limit": 3,
            "model.dtype": "bfloat16",
        },
    )
    work = str(tmp_path / "w")
    train.train_and_evaluate(cfg, work)
    with open(os.path.join(work, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    logged = {k: v for r in rows for k, v in r.items() if k.startswith("harness/")}
    assert set(logged) == {
        "harness/llmjax_mc/acc",
        "harness/llmjax_mc/acc_norm",
        "harness/llmjax_rolling/word_perplexity",
        "harness/llmjax_rolling/byte_perplexity",
        "harness/llmjax_rolling/bits_per_byte",
    }
    want = _evaluate_files(harness.LlmjaxLM(workdir=work), files, limit=3)["results"]
    for key, value in logged.items():
        _, task, metric = key.split("/")
        np.testing.assert_allclose(value, want[task][f"{metric},none"], rtol=1e-6)


def test_scorer_stops_between_batches(monkeypatch):
    """The training loop's stop request (SIGTERM) ends a harness pass after the batch in flight
    (evaluate.Stopped, so the loop saves and names the pass for redo); unrequested, the scores
    are those of a pass without the check."""
    from flax import nnx

    from llmjax import checkpoint, evaluate
    from llmjax.model import GPT, GPTConfig

    cfg = GPTConfig(
        vocab_size=320, valid_vocab_size=257, n_layer=1, n_head=2, n_embd=32, block_size=32
    )
    scorer = harness.Scorer(GPT(cfg, nnx.Rngs(0)), get_tokenizer("bytes"), batch_rows=1)
    pairs = [([256, 65 + i], [66 + i, 67]) for i in range(5)]  # five rows: five batches
    want = scorer.loglikelihoods(pairs)
    checks = []
    monkeypatch.setattr(checkpoint, "stop_requested", lambda: checks.append(1) or len(checks) == 2)
    with pytest.raises(evaluate.Stopped):
        scorer.loglikelihoods(pairs)
    assert len(checks) == 2  # one check per batch read, none after the stop
    monkeypatch.setattr(checkpoint, "stop_requested", lambda: False)
    assert scorer.loglikelihoods(pairs) == want


def _evaluate_files(lm, files: list[str], **kwargs) -> dict:
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    return evaluator.simple_evaluate(
        model=lm,
        tasks=files,
        task_manager=TaskManager(include_defaults=False),
        bootstrap_iters=0,
        **kwargs,
    )


def test_missing_extra_unknown_args_and_several_processes_are_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    with pytest.raises(harness.HarnessError, match=r"pip install -e '\.\[harness\]'"):
        harness.require_lm_eval()
    monkeypatch.undo()
    with pytest.raises(harness.HarnessError, match="unknown model_args workdri for llmjax"):
        harness.LlmjaxLM(workdri="typo")
    monkeypatch.setattr(harness.jax, "process_count", lambda: 2)
    with pytest.raises(harness.HarnessError, match="runs in one process; this job has 2"):
        harness.LlmjaxLM(workdir="unused")
