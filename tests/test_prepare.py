"""prepare: sources, exact tokens, split, filters, caps, resume, bad input, CLI."""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from llmjax import data
from llmjax import prepare as prep
from llmjax.prepare import dataset, documents, encode, prepare, writer
from tests.conftest import ROOT


def corpus(shakespeare: str) -> list[str]:
    """40 distinct documents, plus the awkward cases: empty, whitespace-only, duplicates, short,
    a literal "<|endoftext|>" (must stay plain text) and non-ASCII."""
    docs = [shakespeare[i * 1500 : (i + 1) * 1500] for i in range(40)]
    docs += [
        "",
        "  \n\t ",
        "\n\n",
        docs[3],
        docs[7],
        docs[3],
        "tiny",
        "ok.",
        "Not a special token: <|endoftext|> stays text.",
        "naïve café ☃ — 😀 " * 20,
    ]
    return docs


def shard_docs(out: str, split: str, eot: int) -> list[tuple[int, ...]]:
    """The documents of one split, in order, recovered from its shards (EOT before each)."""
    paths = data.split_paths(out, split)
    stream = np.concatenate([data.read_shard(p) for p in paths]).astype(np.int64)
    cuts = list(np.flatnonzero(stream == eot)) + [len(stream)]
    assert cuts[0] == 0, "a split starts with EOT"
    return [tuple(stream[a + 1 : b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


def shard_bytes(out: str) -> dict[str, bytes]:
    return {
        os.path.basename(p): open(p, "rb").read()
        for p in sorted(glob.glob(os.path.join(out, "*.bin")))
    }


def write_jsonl(path, docs, field="text"):
    with open(path, "w", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, field: d}) + "\n")


def write_parquet(path, docs, field="text"):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": list(range(len(docs))), field: docs}), path, row_group_size=7)


@pytest.fixture(autouse=True)
def small_batches(monkeypatch):
    """Several tokenizer tasks per test corpus, so order across tasks and workers is exercised."""
    monkeypatch.setattr(encode, "BATCH_CHARS", 5_000)


@pytest.fixture(scope="module")
def docs(shakespeare):
    return corpus(shakespeare)


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory, docs):
    path = tmp_path_factory.mktemp("src") / "docs.jsonl"
    write_jsonl(path, docs)
    return str(path)


def test_exact_tokens_every_local_source(tmp_path, docs, jsonl, reference_tiktoken):
    ref = reference_tiktoken
    kept = [d for d in docs if d.strip()]
    expected = {tuple(ref.encode_ordinary(d)) for d in kept}
    assert len(expected) == len(kept) - 3  # docs 3, 7, 3 are repeats
    (tmp_path / "texts").mkdir()
    for i, d in enumerate(docs):
        (tmp_path / "texts" / f"{i:03d}.txt").write_text(d, encoding="utf-8")
    write_parquet(tmp_path / "docs.parquet", docs)
    # The hf: path itself, on a local folder: `datasets` infers the format from its files.
    (tmp_path / "hub" / "data").mkdir(parents=True)
    write_parquet(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet", docs)
    sources = {
        "jsonl": f"jsonl:{jsonl}",
        "parquet": f"parquet:{tmp_path}/*.parquet",
        "text": f"text:{tmp_path}/texts/*.txt",
        "hf": f"hf:{tmp_path}/hub",
    }
    outs = {}
    for name, source in sources.items():
        out = str(tmp_path / name)
        meta = prepare(source, out, tokenizer="gpt2", val_fraction=0.2, shard_tokens=3_000)
        got = shard_docs(out, "train", ref.eot_token) + shard_docs(out, "val", ref.eot_token)
        assert sorted(got) == sorted(tuple(ref.encode_ordinary(d)) for d in kept), name
        assert meta["tokens"]["train"] + meta["tokens"]["val"] == sum(
            len(ref.encode_ordinary(d)) + 1 for d in kept
        )
        assert meta["documents"]["dropped_empty"] == 3 and meta["documents"]["kept"] == len(kept)
        outs[name] = shard_bytes(out)
        assert len(outs[name]) > 4  # several shards per split
    # Same documents in the same order: the same bytes whatever the source format.
    assert outs["jsonl"] == outs["parquet"] == outs["text"] == outs["hf"]


def test_output_identical_for_any_worker_count(tmp_path, jsonl):
    metas, outs = [], []
    for workers in (0, 2):
        for val in ({"val_fraction": 0.1}, {"val_docs": 5}):
            out = str(tmp_path / f"w{workers}_{next(iter(val))}")
            metas.append(
                prepare(
                    f"jsonl:{jsonl}",
                    out,
                    "bytes",
                    shard_tokens=5_000,
                    workers=workers,
                    dedup=True,
                    **val,
                )
            )
            outs.append(shard_bytes(out))
    assert outs[0] == outs[2] and outs[1] == outs[3] and outs[0] != outs[1]
    assert metas[0]["shards"] == metas[2]["shards"] and metas[1]["documents"]["val"] == 5


def test_split_is_by_document_hash_not_order(tmp_path, docs, reference_tiktoken):
    unique = list(dict.fromkeys(d for d in docs if d.strip()))
    rng = np.random.default_rng(0)
    splits = []
    for k, order in enumerate([np.arange(len(unique)), rng.permutation(len(unique))]):
        write_jsonl(tmp_path / f"{k}.jsonl", [unique[i] for i in order])
        out = str(tmp_path / f"out{k}")
        prepare(f"jsonl:{tmp_path}/{k}.jsonl", out, "bytes", val_fraction=0.25)
        splits.append({s: set(shard_docs(out, s, 256)) for s in ("train", "val")})
    for s in splits:
        assert s["train"] and s["val"] and not s["train"] & s["val"]
        assert len(s["train"]) + len(s["val"]) == len(unique)
    assert splits[0] == splits[1]
    # The rule itself: hash < val_fraction goes to val.
    want_val = {
        tuple(d.encode()) for d in unique if encode.doc_hash(encode.doc_digest(d.encode())) < 0.25
    }
    assert splits[0]["val"] == want_val


def test_filters_and_caps_counted(tmp_path, docs, jsonl):
    meta = prepare(f"jsonl:{jsonl}", str(tmp_path / "f"), "bytes", dedup=True, min_chars=10)
    d = meta["documents"]
    assert (d["seen"], d["dropped_empty"], d["dropped_duplicate"], d["dropped_short"]) == (
        len(docs),
        3,
        3,
        2,
    )  # "tiny" and "ok." are under 10 characters
    assert d["kept"] == len(docs) - 8 == d["train"] + d["val"]
    want = sum(len(x.encode()) + 1 for x in dict.fromkeys(docs) if len(x) >= 10 and x.strip())
    assert meta["tokens"]["train"] + meta["tokens"]["val"] == want
    meta = prepare(f"jsonl:{jsonl}", str(tmp_path / "m"), "bytes", max_docs=12)
    assert meta["documents"]["seen"] == 12 and meta["capped"]
    assert sum(meta["tokens"].values()) == sum(len(x.encode()) + 1 for x in docs[:12])
    meta = prepare(f"jsonl:{jsonl}", str(tmp_path / "t"), "bytes", max_tokens=10_000)
    # Documents stay whole: the run stops after the document that reaches the cap.
    n = meta["documents"]["kept"]
    assert n == 7 and sum(meta["tokens"].values()) == 7 * 1501


real_source = documents.open_source


def _interrupt_after(monkeypatch, n_docs):
    real = real_source

    def source(*args, **kwargs):
        texts, total = real(*args, **kwargs)

        def cut():
            for i, t in enumerate(texts):
                if i == n_docs:
                    raise KeyboardInterrupt
                yield t

        return cut(), total

    monkeypatch.setattr(documents, "open_source", source)


@pytest.mark.parametrize("val", [{"val_fraction": 0.1}, {"val_docs": 4}])
def test_resume_after_interrupt_is_byte_identical(tmp_path, monkeypatch, jsonl, val):
    kw = dict(tokenizer="bytes", shard_tokens=4_000, dedup=True, **val)
    full = prepare(f"jsonl:{jsonl}", str(tmp_path / "full"), **kw)
    out = str(tmp_path / "resumed")
    _interrupt_after(monkeypatch, 27)
    with pytest.raises(KeyboardInterrupt):
        prepare(f"jsonl:{jsonl}", out, **kw)
    state = json.load(open(os.path.join(out, data.PREPARE_STATE)))
    assert 0 < state["consumed"] <= 27 and state["splits"]["train"]["shards"]
    assert glob.glob(os.path.join(out, "*.tmp"))  # an unfinished tail, to be cut back
    with pytest.raises(data.DataError, match="prepare has not finished"):
        data.check_dataset(out, "bytes", 8)
    monkeypatch.setattr(documents, "open_source", real_source)
    resumed = prepare(f"jsonl:{jsonl}", out, workers=2, **kw)
    assert shard_bytes(out) == shard_bytes(str(tmp_path / "full"))
    assert resumed["shards"] == full["shards"] and resumed["documents"] == full["documents"]
    assert sorted(os.listdir(out)) == sorted(os.listdir(tmp_path / "full"))  # no state, no tmp


def test_resume_starts_over_when_a_finished_shard_is_damaged(tmp_path, monkeypatch, jsonl, capsys):
    kw = dict(tokenizer="bytes", shard_tokens=4_000)
    full = prepare(f"jsonl:{jsonl}", str(tmp_path / "full"), **kw)
    out = str(tmp_path / "out")
    _interrupt_after(monkeypatch, 30)
    with pytest.raises(KeyboardInterrupt):
        prepare(f"jsonl:{jsonl}", out, **kw)
    monkeypatch.setattr(documents, "open_source", real_source)
    victim = os.path.join(out, "train_000001.bin")
    blob = bytearray(open(victim, "rb").read())
    blob[2000] ^= 1  # same size, different checksum
    open(victim, "wb").write(blob)
    with pytest.raises(ValueError, match="other options"):
        prepare(f"jsonl:{jsonl}", out, **{**kw, "shard_tokens": 5_000})
    assert prepare(f"jsonl:{jsonl}", out, **kw)["shards"] == full["shards"]
    assert "does not match its checkpoint; starting over" in capsys.readouterr().err
    assert shard_bytes(out) == shard_bytes(str(tmp_path / "full"))
    # A finished dataset is not redone; a different one is not written over it.
    assert prepare(f"jsonl:{jsonl}", out, **kw) == json.load(open(os.path.join(out, "meta.json")))
    with pytest.raises(ValueError, match="already holds a prepared dataset"):
        prepare(f"jsonl:{jsonl}", out, **{**kw, "dedup": True})


def test_shard_writer_fills_shards_in_turn(tmp_path):
    w = writer.ShardWriter(str(tmp_path), "train", shard_tokens=5)
    w.add(list(range(12)))
    w.flush()
    assert [s["tokens"] for s in w.shards] == [5, 5, 2]
    header = np.fromfile(tmp_path / "train_000001.bin", np.int32, count=256)
    assert list(header[:3]) == [20240520, 1, 5] and not header[3:].any()
    np.testing.assert_array_equal(data.read_shard(str(tmp_path / "train_000002.bin")), [10, 11])
    assert not glob.glob(str(tmp_path / "*.tmp"))


def test_meta_json_describes_the_run(tmp_path, jsonl):
    out = str(tmp_path / "o")
    meta = prepare(f"jsonl:{jsonl}", out, "bytes", shard_tokens=20_000, min_chars=5)
    on_disk = json.load(open(os.path.join(out, "meta.json")))
    assert on_disk == meta
    assert meta["format"] == {
        "magic": 20240520,
        "version": 1,
        "header_bytes": 1024,
        "dtype": "uint16",
        "eot": "before every document",
    }
    assert meta["options"]["min_chars"] == 5 and meta["source"] == f"jsonl:{jsonl}"
    for split in ("train", "val"):
        assert sum(s["tokens"] for s in meta["shards"][split]) == meta["tokens"][split]
        for s in meta["shards"][split]:
            assert writer.file_sha256(os.path.join(out, s["name"])) == s["sha256"]
    card = dataset.summary(meta, out)
    assert f"{meta['tokens']['train']:,}" in card and "dropped" in card


def test_bad_inputs_named(tmp_path, jsonl, monkeypatch):
    with pytest.raises(ValueError, match="no file matches"):
        prepare(f"jsonl:{tmp_path}/none/*.jsonl", str(tmp_path / "o"))
    with pytest.raises(ValueError, match=r"expected hf:NAME, jsonl:GLOB"):
        prepare("csv:x.csv", str(tmp_path / "o"))
    with pytest.raises(ValueError, match=r"no field --text_field='body' \(fields: id, text\)"):
        prepare(f"jsonl:{jsonl}", str(tmp_path / "o"), text_field="body")
    with pytest.raises(ValueError, match=r"--val_fraction=1.5 must be in \[0, 1\)"):
        prepare(f"jsonl:{jsonl}", str(tmp_path / "o"), val_fraction=1.5)
    with pytest.raises(ValueError, match="no document went to train"):
        prepare(f"jsonl:{jsonl}", str(tmp_path / "o"), "bytes", max_docs=1)
    assert os.listdir(tmp_path / "o") == []  # nothing half-made is left behind
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": "b"\n')
    with pytest.raises(ValueError, match=r"jsonl:.*bad.jsonl: cannot read past row 0 \(Arrow"):
        prepare(f"jsonl:{bad}", str(tmp_path / "o"))
    with pytest.raises(ValueError, match=r"bad.jsonl: not a readable parquet file"):
        prepare(f"parquet:{bad}", str(tmp_path / "o"))
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "train_000000.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="prepare did not start"):
        prepare(f"jsonl:{jsonl}", str(tmp_path / "foreign"), "bytes")

    class Wide:  # a tokenizer like cl100k_base, whose ids do not fit uint16
        name, eot_id, vocab_size = "wide", 100257, 100277

    monkeypatch.setattr(prep, "get_tokenizer", lambda name: Wide())
    with pytest.raises(ValueError, match=r"ids up to 100276, beyond uint16"):
        prepare(f"jsonl:{jsonl}", str(tmp_path / "o"))


def _cli(*args, **env):
    return subprocess.run(
        [sys.executable, "-m", "llmjax.prepare", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )


def test_cli_errors_are_one_line_exit_2(tmp_path):
    # hf: goes through `datasets` for real; offline it fails to open, named in one line.
    r = _cli(
        "--source=hf:HuggingFaceFW/fineweb-edu",
        "--hf_config=sample-10BT",
        f"--out={tmp_path}/o",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
    )
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmjax: --source=hf:HuggingFaceFW/fineweb-edu")
    for args, needle in [
        (["--source=text:x"], "--out"),
        (["--source=text:x", "--out=o", "--workers=two"], "workers"),
        (["--source=text:x", "--out=o", "--val_docs=3", "--val_fraction=0.1"], "not both"),
    ]:
        r = _cli(*args)
        assert r.returncode == 2, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr


def test_paragraphs_make_one_file_a_corpus(tmp_path, shakespeare, reference_tiktoken):
    import re

    from llmjax.prepare import prepare as run_prepare

    path = tmp_path / "shakespeare.txt"
    path.write_text(shakespeare[:50_000], encoding="utf-8")
    meta = run_prepare(f"paragraphs:{path}", str(tmp_path / "out"), val_fraction=0.1)
    blocks = [b for b in re.split(r"\n[ \t]*\n", shakespeare[:50_000]) if b.strip()]
    assert meta["documents"]["kept"] == len(blocks) > 100
    assert meta["tokens"]["train"] + meta["tokens"]["val"] == sum(
        len(reference_tiktoken.encode_ordinary(b)) + 1 for b in blocks
    )
    assert meta["tokens"]["val"] > 0
