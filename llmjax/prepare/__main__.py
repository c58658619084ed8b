"""python -m llmjax.prepare: the command line of llmjax/prepare/ (usage: the package docstring)."""

import os

from absl import flags

from llmjax import errors, prepare
from llmjax.prepare.dataset import summary
from llmjax.shards import DataError

__doc__ = prepare.__doc__  # what absl's --help prints: the program's usage, kept in the package

FLAGS = flags.FLAGS


def main(argv):
    del argv
    os.environ.setdefault("DATASETS_VERBOSITY", "critical")  # `datasets` logs the errors we report
    # Else `datasets` imports torch (seconds) for every stream, only to share ints with a
    # DataLoader's workers, which prepare never uses.
    os.environ.setdefault("USE_TORCH", "0")
    if FLAGS["val_fraction"].present and FLAGS.val_docs:
        raise DataError("pass --val_fraction or --val_docs, not both")
    try:
        meta = prepare.prepare(
            FLAGS.source,
            FLAGS.out,
            FLAGS.tokenizer,
            FLAGS.val_fraction,
            FLAGS.shard_tokens,
            val_docs=FLAGS.val_docs,
            workers=FLAGS.workers,
            dedup=FLAGS.dedup,
            min_chars=FLAGS.min_chars,
            max_docs=FLAGS.max_docs,
            max_tokens=FLAGS.max_tokens,
            text_field=FLAGS.text_field,
            hf_config=FLAGS.hf_config,
            hf_split=FLAGS.hf_split,
            verbose=True,
        )
    except OSError as e:  # an unreadable source or an unwritable --out: nothing half-done is kept
        errors.fail(e)
    except KeyboardInterrupt:
        errors.fail("prepare interrupted; run the same command again to resume", code=130)
    print(summary(meta, FLAGS.out))


def define_flags() -> None:
    flags.DEFINE_string(
        "source",
        None,
        "hf:NAME | jsonl:GLOB | parquet:GLOB | text:GLOB | paragraphs:GLOB | builtin:pydocs",
        required=True,
    )
    flags.DEFINE_string("out", None, "output directory for shards and meta.json", required=True)
    flags.DEFINE_string("tokenizer", "gpt2", "gpt2 | bytes (or their -chat variants)")
    flags.DEFINE_string("hf_config", "", "hf: the dataset's configuration, e.g. sample-10BT")
    flags.DEFINE_string("hf_split", "train", "hf: the split to stream")
    flags.DEFINE_string("text_field", "text", "hf/jsonl/parquet: the field holding the text")
    flags.DEFINE_float("val_fraction", 0.01, "share of documents that go to val (by stable hash)")
    flags.DEFINE_integer(
        "val_docs",
        0,
        "exactly this many documents go to val (the lowest hashes), instead of --val_fraction",
    )
    flags.DEFINE_integer("shard_tokens", 100_000_000, "tokens per shard")
    flags.DEFINE_integer("workers", os.cpu_count() or 1, "tokenizer processes (0: in-process)")
    flags.DEFINE_bool("dedup", False, "drop exact duplicates of an earlier document")
    flags.DEFINE_integer("min_chars", 0, "drop documents shorter than this many characters")
    flags.DEFINE_integer("max_docs", 0, "read at most this many source documents (0: all)")
    flags.DEFINE_integer("max_tokens", 0, "stop once this many tokens are written (0: no cap)")


define_flags()
errors.run(main)
