import json
import os

import numpy as np
import pytest

from llmjax import data, shards
from llmjax.prepare import prepare
from tests.conftest import write_docs


def test_prepare_exact_tokens_and_disjoint_split(tmp_path, shakespeare, reference_tiktoken):
    pattern = write_docs(tmp_path / "docs", shakespeare[:60_000], 12)
    meta = prepare(f"text:{pattern}", str(tmp_path / "out"), tokenizer="gpt2", val_fraction=0.25)
    docs = sorted(os.listdir(tmp_path / "docs"))
    texts = [open(tmp_path / "docs" / d, encoding="utf-8").read() for d in docs]
    expected = sum(len(reference_tiktoken.encode_ordinary(t)) + 1 for t in texts)  # + EOT each
    assert meta["tokens"]["train"] + meta["tokens"]["val"] == expected
    streams = {
        s: np.concatenate([data.read_shard(p) for p in data.split_paths(str(tmp_path / "out"), s)])
        for s in ("train", "val")
    }
    eot = reference_tiktoken.eot_token

    def split_docs(tokens):
        cuts = np.flatnonzero(tokens == eot)
        return {
            tuple(tokens[a + 1 : b])
            for a, b in zip(cuts, list(cuts[1:]) + [len(tokens)], strict=True)
        }

    train_docs, val_docs = split_docs(streams["train"]), split_docs(streams["val"])
    assert train_docs and val_docs and not train_docs & val_docs
    assert len(train_docs) + len(val_docs) == 12
    assert train_docs | val_docs == {tuple(reference_tiktoken.encode_ordinary(t)) for t in texts}


def test_missing_and_mismatched_data(tmp_path, byte_data):
    with pytest.raises(data.DataError, match="no such directory"):
        data.check_dataset(str(tmp_path / "nope"), "bytes", 32)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(data.DataError, match=r"no train_\*\.bin shards"):
        data.check_dataset(str(tmp_path / "empty"), "bytes", 32)
    with pytest.raises(data.DataError, match="tokenized with 'bytes'"):
        data.check_dataset(byte_data, "gpt2", 32)
    with pytest.raises(data.DataError, match="smaller than one window"):
        data.check_dataset(byte_data, "bytes", 10_000_000)


def test_token_id_out_of_range(byte_data):
    batches = data.train_batches(
        byte_data, seq_len=32, batch=4, vocab_size=100, seed=0, start_step=0, steps=1
    )
    with pytest.raises(data.DataError, match="token id .* >= vocabulary size 100"):
        next(batches)


def _take(path, **kw):
    return list(data.train_batches(path, seq_len=32, vocab_size=257, seed=3, **kw))


def test_batches_addressed_by_step(byte_data):
    full = _take(byte_data, batch=8, start_step=0, steps=6)
    assert all(b.shape == (8, 33) and b.dtype == np.int32 for b in full)
    # Resuming at step 4 gives exactly batches 4 and 5, whatever the worker count.
    for workers in (0, 2):
        tail = _take(byte_data, batch=8, start_step=4, steps=6, workers=workers)
        np.testing.assert_array_equal(np.stack(tail), np.stack(full[4:]))
    # Different seeds give different data; batches are not repeats of each other.
    other = list(
        data.train_batches(
            byte_data, seq_len=32, vocab_size=257, seed=4, batch=8, start_step=0, steps=1
        )
    )
    assert not np.array_equal(other[0], full[0]) and not np.array_equal(full[0], full[1])


def test_process_slices_cover_global_batch(byte_data):
    full = _take(byte_data, batch=8, start_step=0, steps=3)
    parts = [
        _take(byte_data, batch=8, start_step=0, steps=3, process_index=p, process_count=4)
        for p in range(4)
    ]
    for step in range(3):
        np.testing.assert_array_equal(np.concatenate([p[step] for p in parts]), full[step])


def test_windows_are_real_text_and_val_is_fixed(byte_data):
    meta = json.load(open(os.path.join(byte_data, "meta.json")))
    assert meta["tokenizer"] == "bytes"
    b = _take(byte_data, batch=4, start_step=0, steps=1)[0]
    stream = np.concatenate([data.read_shard(p) for p in data.split_paths(byte_data, "train")])
    for row in b:  # every window is a contiguous slice of the token stream
        hits = np.flatnonzero(stream[: len(stream) - 32] == row[0])
        assert any(np.array_equal(stream[h : h + 33], row) for h in hits)
    v1 = list(data.val_batches(byte_data, seq_len=32, batch=4, vocab_size=257, num_batches=3))
    v2 = list(data.val_batches(byte_data, seq_len=32, batch=4, vocab_size=257, num_batches=3))
    np.testing.assert_array_equal(np.stack(v1), np.stack(v2))
    val = np.concatenate([data.read_shard(p) for p in data.split_paths(byte_data, "val")])
    np.testing.assert_array_equal(v1[0][1], val[32:65])  # window 1 starts at seq_len


def test_resume_mid_stream_sees_the_same_batches(byte_data):
    # A run reads ahead (prefetch) and is cut after step 2; it resumes at step 2.
    # The resumed loader, with other worker/prefetch settings, continues exactly where it stopped.
    first = data.train_batches(
        byte_data, seq_len=32, batch=8, vocab_size=257, seed=3, start_step=0, steps=7, prefetch=4
    )
    seen = [next(first) for _ in range(2)]
    rest = list(first)
    resumed = _take(byte_data, batch=8, start_step=2, steps=7, workers=1, prefetch=1)
    np.testing.assert_array_equal(np.stack(resumed), np.stack(rest))
    assert not any(np.array_equal(s, r) for s in seen for r in rest)


def test_shards_must_match_meta(tmp_path, byte_data):
    import shutil

    path = tmp_path / "d"
    shutil.copytree(byte_data, path)
    extra = path / "train_000007.bin"
    shutil.copy(path / "train_000000.bin", extra)
    with pytest.raises(data.DataError, match="train_000007.bin: not listed in meta.json"):
        data.check_dataset(str(path), "bytes", 32)
    extra.unlink()
    (path / "val_000000.bin").unlink()
    with pytest.raises(data.DataError, match=r"no val_\*\.bin shards"):
        data.check_dataset(str(path), "bytes", 32)
    shutil.copy(path / "train_000000.bin", path / "val_000000.bin")
    with pytest.raises(data.DataError, match="val_000000.bin: .* tokens, but meta.json says"):
        data.check_dataset(str(path), "bytes", 32)
    (path / "meta.json").write_text("{not json")
    with pytest.raises(data.DataError, match="meta.json: unreadable"):
        data.check_dataset(str(path), "bytes", 32)
    # Shards from elsewhere (llm.c, modded-nanogpt) come without meta.json and still load.
    (path / "meta.json").unlink()
    data.check_dataset(str(path), "bytes", 32)


def test_split_smaller_than_a_window_named_by_the_loader(tmp_path):
    for split in ("train", "val"):
        shards.write_shard(str(tmp_path / shards.shard_name(split, 0)), list(range(20)))
    with pytest.raises(
        data.DataError,
        match=r"train_000000.bin: no shard holds one window of "
        r"seq_len\+1=33 tokens \(longest: 20\)",
    ):
        data.train_batches(
            str(tmp_path), seq_len=32, batch=2, vocab_size=257, seed=0, start_step=0, steps=1
        )
    with pytest.raises(data.DataError, match="batch_size=6 is not divisible by 4 processes"):
        data.train_batches(
            str(tmp_path),
            seq_len=8,
            batch=6,
            vocab_size=257,
            seed=0,
            start_step=0,
            steps=1,
            process_count=4,
        )


def test_count_val_windows_is_one_pass(byte_data):
    lengths = [len(data.read_shard(p)) for p in data.split_paths(byte_data, "val")]
    n = data.count_val_windows(byte_data, 32)
    assert n == sum((t - 33) // 32 + 1 for t in lengths)
    rows = np.concatenate(
        list(data.val_batches(byte_data, seq_len=32, batch=n, vocab_size=257, num_batches=2))
    )
    np.testing.assert_array_equal(rows[:n], rows[n:])  # the second pass repeats the first
    assert len({r.tobytes() for r in rows[:n]}) == n


def _flip_keeping_ids_valid(path: str, token: int) -> None:
    """Changes one token of a shard to the next byte value (a valid id), keeping the mtime."""
    st = os.stat(path)
    offset = shards.HEADER_BYTES + 2 * token
    with open(path, "r+b") as f:
        f.seek(offset)
        old = int.from_bytes(f.read(2), "little")
        f.seek(offset)
        f.write(((old + 1) % 256).to_bytes(2, "little"))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_shard_contents_checked_against_meta_and_cached(tmp_path, byte_data, monkeypatch):
    import hashlib
    import shutil

    monkeypatch.setenv("LLMJAX_CACHE", str(tmp_path / "cache"))
    path = str(tmp_path / "d")
    shutil.copytree(byte_data, path)
    shard = os.path.join(path, "train_000000.bin")
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if ".bin" in f)
    read = data.check_dataset(path, "bytes", 32, "cached")
    assert read["shards"] == 2 and read["bytes"] == size  # train and val, read once
    assert data.check_dataset(path, "bytes", 32, "cached")["shards"] == 0  # cached
    _flip_keeping_ids_valid(shard, 5000)
    # The mtime is the cache's key: an edit that restores it passes `cached`; `full` rereads.
    assert data.check_dataset(path, "bytes", 32, "cached")["shards"] == 0
    with pytest.raises(data.DataError, match="train_000000.bin: contents do not match the sha256"):
        data.check_dataset(path, "bytes", 32, "full")
    os.utime(shard)  # a normal edit moves the mtime: `cached` rereads the shard
    with pytest.raises(data.DataError, match="train_000000.bin: contents do not match the sha256"):
        data.check_dataset(path, "bytes", 32, "cached")
    assert data.check_dataset(path, "bytes", 32, "off")["shards"] == 0
    # The digest is the file's, as prepare and sha256sum compute it.
    meta = json.load(open(os.path.join(path, "meta.json")))
    want = meta["shards"]["val"][0]["sha256"]
    val = os.path.join(path, "val_000000.bin")
    assert hashlib.sha256(open(val, "rb").read()).hexdigest() == want
