import numpy as np
import pytest

from llmjax import data, shards


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


def test_llmjax_writes_what_llmc_writes(tmp_path):
    tokens = [0, 1, 50256, 65535, 7]
    llmc_write_datafile(tmp_path / "ref.bin", tokens)
    shards.write_shard(str(tmp_path / "ours.bin"), tokens)
    assert (tmp_path / "ours.bin").read_bytes() == (tmp_path / "ref.bin").read_bytes()


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
