import json
import os

import numpy as np
import pytest

from llmjax import data, shards
from tests.conftest import run_main


def llmc_write_datafile(filename, toks):
    """llm.c's dev/data/data_common.py write_datafile (gpt-2 format), restated with NumPy: an
    independent reference for the files llm.c, and modded-nanogpt after it, hand to llmjax."""
    header = np.zeros(256, dtype=np.int32)
    header[0] = 20240520
    header[1] = 1
    header[2] = len(toks)
    toks_np = np.array(toks, dtype=np.uint16)
    with open(filename, "wb") as f:
        f.write(header.tobytes())
        f.write(toks_np.tobytes())


def _byte_tokens(text: str) -> np.ndarray:
    return np.frombuffer(text.encode(), np.uint8).astype(np.uint16)


# Names as each tool writes them. llm.c dev/data/fineweb.py: f"{name}_{split}_{i:06d}.bin" with
# name fineweb or edu_fineweb, shard 0 is val; dev/data/tinyshakespeare.py and tinystories.py: one
# unnumbered file per split. modded-nanogpt downloads llm.c's fineweb names. build-nanogpt's
# fineweb.py uses the prefix edufineweb (its own files are .npy; these are its names as .bin).
LAYOUTS = {
    "llm.c fineweb": {"val": ["fineweb_val_000000.bin"], "train": ["fineweb_train_000001.bin"]},
    "llm.c edu_fineweb": {
        "val": ["edu_fineweb_val_000000.bin"],
        "train": ["edu_fineweb_train_000001.bin", "edu_fineweb_train_000002.bin"],
    },
    "llm.c tinyshakespeare": {
        "val": ["tiny_shakespeare_val.bin"],
        "train": ["tiny_shakespeare_train.bin"],
    },
    "llm.c tinystories": {"val": ["TinyStories_val.bin"], "train": ["TinyStories_train.bin"]},
    "build-nanogpt names": {
        "val": ["edufineweb_val_000000.bin"],
        "train": ["edufineweb_train_000001.bin"],
    },
    "llmjax prepare": {
        "val": ["val_000000.bin"],
        "train": ["train_000000.bin", "train_000001.bin"],
    },
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_shards_of_other_tools_read_as_they_are(tmp_path, shakespeare, layout):
    tokens = _byte_tokens(shakespeare)
    names = LAYOUTS[layout]["val"] + LAYOUTS[layout]["train"]
    written = {name: tokens[i * 2000 : (i + 1) * 2000] for i, name in enumerate(names)}
    for name, toks in written.items():
        llmc_write_datafile(tmp_path / name, toks.tolist())
    for split in ("train", "val"):
        paths = data.split_paths(str(tmp_path), split)
        assert [os.path.basename(p) for p in paths] == LAYOUTS[layout][split]
        for p in paths:
            np.testing.assert_array_equal(data.read_shard(p), written[os.path.basename(p)])
    assert not os.path.exists(tmp_path / "meta.json")
    data.check_dataset(str(tmp_path), "bytes", 32)  # no meta.json: ids are checked instead


def test_llmjax_writes_what_llmc_writes(tmp_path):
    tokens = [0, 1, 50256, 65535, 7]
    llmc_write_datafile(tmp_path / "ref.bin", tokens)
    shards.write_shard(str(tmp_path / "ours.bin"), tokens)
    assert (tmp_path / "ours.bin").read_bytes() == (tmp_path / "ref.bin").read_bytes()


def test_index_order_is_numeric_and_hidden_files_are_skipped(tmp_path):
    for name in ("fineweb_train_10.bin", "fineweb_train_9.bin", "fineweb_train_000002.bin"):
        llmc_write_datafile(tmp_path / name, [1, 2, 3])
    (tmp_path / "._fineweb_train_000001.bin").write_bytes(b"macOS resource fork")
    (tmp_path / "fineweb_train_000011.bin.tmp").write_bytes(b"unfinished")
    paths = shards.split_paths(str(tmp_path), "train")
    assert [os.path.basename(p) for p in paths] == [
        "fineweb_train_000002.bin",
        "fineweb_train_9.bin",
        "fineweb_train_10.bin",
    ]


def test_two_prefixes_for_one_split_is_an_error(tmp_path):
    for name in ("fineweb_train_000001.bin", "train_000000.bin", "fineweb_val_000000.bin"):
        llmc_write_datafile(tmp_path / name, [1, 2, 3])
    with pytest.raises(data.DataError) as e:
        data.split_paths(str(tmp_path), "train")
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path) in msg
    assert "fineweb_train_*.bin" in msg and " train_*.bin" in msg
    assert [os.path.basename(p) for p in data.split_paths(str(tmp_path), "val")] == [
        "fineweb_val_000000.bin"
    ]
    llmc_write_datafile(tmp_path / "tiny_shakespeare_val.bin", [1, 2, 3])
    with pytest.raises(data.DataError, match=r"fineweb_val_\*\.bin and tiny_shakespeare_val\.bin"):
        data.split_paths(str(tmp_path), "val")


def test_no_shards_names_the_patterns_looked_for(tmp_path):
    llmc_write_datafile(tmp_path / "fineweb_val_000000.bin", [1, 2, 3])
    llmc_write_datafile(tmp_path / "pretrain_000000.bin", [1, 2, 3])  # "pre" is not a prefix_
    with pytest.raises(data.DataError) as e:
        data.split_paths(str(tmp_path), "train")
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path) in msg
    assert "no train_*.bin shards" in msg and "[PREFIX_]train[_INDEX].bin" in msg
    assert "fineweb_train_000001.bin" in msg and "tiny_shakespeare_train.bin" in msg


@pytest.mark.parametrize(
    "corrupt,needle",
    [
        (lambda b: b"\x00" * 4 + b[4:], "bad magic"),
        (lambda b: b[:4] + b"\x07\x00\x00\x00" + b[8:], "unsupported version 7"),
        (lambda b: b[:-2], "header says 5 tokens"),
        (lambda b: b[:100], "shorter than"),
    ],
)
def test_bad_shards_named(tmp_path, corrupt, needle):
    path = tmp_path / "train_000000.bin"
    shards.write_shard(str(path), [1, 2, 3, 4, 5])
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(data.DataError, match=needle) as e:
        data.read_shard(str(path))
    assert str(path) in str(e.value)


def test_unfinished_shard_file_never_reads_as_data(tmp_path):
    path = str(tmp_path / "train_000000.bin")
    f = shards.ShardFile(path)
    f.append([1, 2, 3])
    f.sync()
    with pytest.raises(data.DataError, match="bad magic 0"):
        data.read_shard(path)
    f.append([4])
    f.finish()
    np.testing.assert_array_equal(data.read_shard(path), [1, 2, 3, 4])
    resumed = shards.ShardFile(path, tokens=2)  # cut back to a checkpoint of 2 tokens
    resumed.append([9])
    resumed.finish()
    np.testing.assert_array_equal(data.read_shard(path), [1, 2, 9])


def test_training_on_llmc_named_shards(tmp_path, shakespeare):
    """The issue's report: llm.c's names, no meta.json, through the command line."""
    folder = tmp_path / "fineweb10B"
    os.makedirs(folder)
    tokens = _byte_tokens(shakespeare[:60_000])
    llmc_write_datafile(folder / "fineweb_val_000000.bin", tokens[:10_000].tolist())
    llmc_write_datafile(folder / "fineweb_train_000001.bin", tokens[10_000:35_000].tolist())
    llmc_write_datafile(folder / "fineweb_train_000002.bin", tokens[35_000:].tolist())
    workdir = tmp_path / "w"
    proc = run_main(
        "--config=configs/tiny.py",
        f"--workdir={workdir}",
        f"--config.data.path={folder}",
        "--config.train.steps=4",
        "--config.train.log_every=2",
        "--config.train.eval_every=4",
        "--config.train.ckpt_every=4",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(workdir / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows if "train/loss" in r] == [2, 4]
    assert [r["step"] for r in rows if "eval/loss" in r] == [4]


def test_foreign_token_ids_checked_against_the_vocabulary(tmp_path):
    llmc_write_datafile(tmp_path / "fineweb_val_000000.bin", list(range(40)))
    llmc_write_datafile(tmp_path / "fineweb_train_000001.bin", list(range(40)) + [300])
    with pytest.raises(data.DataError, match="fineweb_train_000001.bin: token id 300 >= vocab"):
        data.check_dataset(str(tmp_path), "bytes", 32)


def test_data_errors_are_user_errors():
    from llmjax.errors import UserError

    assert issubclass(data.DataError, UserError) and issubclass(data.DataError, ValueError)


def test_bad_id_at_the_end_of_a_foreign_shard(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMJAX_CACHE", str(tmp_path / "cache"))
    tokens = list(range(250)) * 20
    llmc_write_datafile(tmp_path / "val.bin", tokens)
    llmc_write_datafile(tmp_path / "train.bin", tokens + [257])  # the last token
    with pytest.raises(data.DataError, match=r"train.bin: token id 257 >= vocabulary size 257"):
        data.check_dataset(str(tmp_path), "bytes", 32)
    llmc_write_datafile(tmp_path / "train.bin", tokens + [256])
    assert data.check_dataset(str(tmp_path), "bytes", 32)["shards"] == 2
    with pytest.raises(data.DataError, match="data.verify='some' is not one of full, cached"):
        data.check_dataset(str(tmp_path), "bytes", 32, "some")
