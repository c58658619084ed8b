"""Sources -> documents -> tokens -> llm.c-format shards plus meta.json.

    python -m llmjax.prepare --source=text:'docs/*.txt' --out=data/mydocs
    python -m llmjax.prepare --source=builtin:pydocs --tokenizer=bytes --out=data/pydocs

Every document is preceded by the end-of-text id, the delimiter GPT-2 and llm.c use. A document goes
wholly to train or wholly to val, decided by a stable hash of its text, so the split does not depend
on document order.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterator

import numpy as np
from absl import app, flags

from llmjax.data import HEADER_INTS, MAGIC, VERSION, shard_name
from llmjax.tokenizer import get_tokenizer

# The offline corpus's modules: docstrings of these stdlib modules, after pydoc's topic pages.
PYDOCS_MODULES = (
    "abc argparse ast asyncio/base_events asyncio/tasks asyncio/streams base64 bisect calendar "
    "collections/__init__ contextlib copy csv dataclasses datetime decimal difflib dis "
    "email/message enum fileinput fnmatch fractions ftplib functools getopt gettext glob gzip "
    "hashlib heapq hmac "
    "html/parser http/client http/server imaplib inspect ipaddress json/__init__ json/decoder "
    "json/encoder logging/__init__ logging/handlers mailbox mimetypes multiprocessing/pool "
    "numbers operator optparse os pathlib pickle pickletools platform plistlib poplib pprint "
    "pydoc queue random re/__init__ secrets selectors shlex shutil smtplib socket socketserver "
    "statistics string subprocess tarfile tempfile textwrap threading timeit tokenize trace "
    "traceback turtle typing unittest/case urllib/parse urllib/request uuid warnings wave weakref "
    "xml/dom/minidom zipfile/__init__ zipfile"
).split()


def pydocs_documents() -> Iterator[str]:
    """Python's own documentation: pydoc's topic pages, then stdlib docstrings (about 1 MB).

    Ships with every Python, so the demo needs no network and no data files.
    """
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name]
    stdlib = sysconfig.get_paths()["stdlib"]
    for mod in PYDOCS_MODULES:
        path = os.path.join(stdlib, mod + ".py")
        if not os.path.exists(path):
            continue  # modules come and go between Python versions
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        nodes = [tree] + [n for n in ast.walk(tree)
                          if isinstance(n, ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef)]
        docs = [ast.get_docstring(n) for n in nodes]
        text = "\n\n".join(d for d in docs if d)
        if text:
            yield text


def text_documents(pattern: str) -> Iterator[str]:
    paths = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    if not paths:
        raise ValueError(f"--source=text:{pattern}: no file matches")
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            yield f.read()


def documents(source: str) -> Iterator[str]:
    kind, _, arg = source.partition(":")
    if kind == "text":
        return text_documents(arg)
    if kind == "builtin" and arg == "pydocs":
        return pydocs_documents()
    raise ValueError(f"--source={source!r}: expected text:GLOB or builtin:pydocs")


def doc_hash(text: str) -> float:
    """A document's stable position in [0, 1): its hash, independent of order and worker count."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
    return h / 2**64


class ShardWriter:
    """Writes one split's tokens into fixed-size llm.c shards: {split}_{index:06d}.bin."""

    def __init__(self, out: str, split: str, shard_tokens: int):
        self.out, self.split, self.shard_tokens = out, split, shard_tokens
        self.buf = np.empty(shard_tokens, np.uint16)
        self.n = 0
        self.shards: list[dict] = []

    def add(self, tokens: list[int]) -> None:
        arr = np.asarray(tokens, np.uint16)
        while len(arr):
            take = min(len(arr), self.shard_tokens - self.n)
            self.buf[self.n:self.n + take] = arr[:take]
            self.n += take
            arr = arr[take:]
            if self.n == self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        if self.n == 0:
            return
        name = shard_name(self.split, len(self.shards))
        header = np.zeros(HEADER_INTS, np.int32)
        header[:3] = (MAGIC, VERSION, self.n)
        blob = header.tobytes() + self.buf[:self.n].tobytes()
        tmp = os.path.join(self.out, name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(blob)
        os.replace(tmp, os.path.join(self.out, name))  # a shard appears whole or not at all
        self.shards.append({"name": name, "tokens": self.n,
                            "sha256": hashlib.sha256(blob).hexdigest()})
        self.n = 0

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards) + self.n


def prepare(source: str, out: str, tokenizer: str = "gpt2", val_fraction: float = 0.01,
            shard_tokens: int = 100_000_000) -> dict:
    """Tokenizes `source` into shards under `out` and returns the meta.json contents."""
    tok = get_tokenizer(tokenizer)
    if tok.vocab_size > 2**16:
        raise ValueError(f"tokenizer {tokenizer} has ids >= 65536; llm.c shards hold uint16")
    os.makedirs(out, exist_ok=True)
    writers = {s: ShardWriter(out, s, shard_tokens) for s in ("train", "val")}
    docs = {"seen": 0, "kept": 0, "dropped_empty": 0}
    # val gets every document whose hash falls below val_fraction, and at least one: the train
    # document with the lowest hash is held back until the end in case val would stay empty.
    held: tuple[float, list[int]] | None = None
    for text in documents(source):
        docs["seen"] += 1
        if not text.strip():
            docs["dropped_empty"] += 1
            continue
        docs["kept"] += 1
        h, tokens = doc_hash(text), [tok.eot_id] + tok.encode(text)
        if h < val_fraction:
            writers["val"].add(tokens)
            continue
        if held is not None and h < held[0]:
            held, (h, tokens) = (h, tokens), held
        elif held is None:
            held = (h, tokens)
            continue
        writers["train"].add(tokens)
    if held is not None:
        writers["val" if writers["val"].tokens == 0 else "train"].add(held[1])
    for w in writers.values():
        w.flush()
    for split, w in writers.items():
        if not w.shards:
            raise ValueError(f"no document went to {split} ({docs['kept']} kept); "
                             "a split needs at least 2 non-empty documents")
    meta = {
        "source": source, "tokenizer": tokenizer, "vocab_size": tok.vocab_size,
        "eot_id": tok.eot_id, "documents": docs,
        "tokens": {s: w.tokens for s, w in writers.items()},
        "shards": {s: w.shards for s, w in writers.items()},
        "command": " ".join(sys.argv),
    }
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return meta


FLAGS = flags.FLAGS


def main(argv):
    del argv
    try:
        meta = prepare(FLAGS.source, FLAGS.out, FLAGS.tokenizer, FLAGS.val_fraction,
                       FLAGS.shard_tokens)
    except (ValueError, OSError) as e:
        print(f"prepare: {e}", file=sys.stderr)
        sys.exit(2)
    d, t = meta["documents"], meta["tokens"]
    print(f"{FLAGS.out}: {d['kept']} documents kept of {d['seen']}; "
          f"train {t['train']:,} tokens, val {t['val']:,} tokens")


def _define_flags() -> None:
    # Defined only when run as a program, so importing this module never clashes with
    # another entry point's flags.
    flags.DEFINE_string("source", None, "text:GLOB | builtin:pydocs", required=True)
    flags.DEFINE_string("out", None, "output directory for shards and meta.json", required=True)
    flags.DEFINE_string("tokenizer", "gpt2", "gpt2 | bytes")
    flags.DEFINE_float("val_fraction", 0.01, "share of documents that go to val (by stable hash)")
    flags.DEFINE_integer("shard_tokens", 100_000_000, "tokens per shard")



if __name__ == "__main__":
    _define_flags()
    app.run(main)
