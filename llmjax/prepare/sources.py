"""Sources of documents for prepare: each yields texts in a fixed order, and its count if known.

hf:NAME streams a Hugging Face dataset through `datasets`; jsonl:GLOB and parquet:GLOB take the very
same path (`datasets`' json/parquet builders over local files), so the hub code is the tested code.
text:GLOB reads each file as one document; paragraphs:GLOB makes each blank-line-separated block of
each file a document (single-file corpora such as tiny Shakespeare: its speeches); builtin:pydocs
is Python's own documentation (offline).
"""

from __future__ import annotations

import ast
import glob
import os
import re
import sysconfig
from collections.abc import Iterator

from llmjax.errors import UserError, one_line

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
        nodes = [tree] + [
            n
            for n in ast.walk(tree)
            if isinstance(n, ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef)
        ]
        docs = [ast.get_docstring(n) for n in nodes]
        text = "\n\n".join(d for d in docs if d)
        if text:
            yield text


def _glob(source: str, pattern: str) -> list[str]:
    paths = sorted(
        p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p)
    )
    if not paths:
        raise UserError(f"--source={source}: no file matches {pattern!r}")
    return paths


def text_documents(paths: list[str]) -> Iterator[str]:
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            yield f.read()


def paragraph_documents(paths: list[str]) -> Iterator[str]:
    """Blocks separated by blank lines: a one-file corpus still splits into train and val."""
    for text in text_documents(paths):
        yield from (block for block in re.split(r"\n[ \t]*\n", text) if block.strip())


def dataset_rows(
    source: str, builder: str, text_field: str, **kwargs
) -> tuple[Iterator[str], int | None]:
    """One `text_field` per row of a `datasets` stream: the hub (builder = the dataset's name) and
    local jsonl/parquet files (builder "json"/"parquet" with data_files) take this same path.
    Streaming reads record batches as it goes, so no dataset is ever downloaded whole."""
    import datasets

    try:
        ds = datasets.load_dataset(builder, streaming=True, **kwargs)
    except Exception as e:  # the hub raises many kinds (offline, gated, missing config, ...)
        raise UserError(f"--source={source}: cannot open ({one_line(e, named=True)})") from e
    if ds.column_names is not None:
        if text_field not in ds.column_names:
            raise UserError(
                f"--source={source}: no field --text_field={text_field!r} "
                f"(fields: {', '.join(ds.column_names)})"
            )
        ds = ds.select_columns([text_field])  # parquet then skips the other columns' bytes
    total = None
    split = kwargs.get("split")
    try:
        total = ds.info.splits[split].num_examples or None
    except (AttributeError, KeyError, TypeError):
        pass

    def batches() -> Iterator[dict]:
        it, n = ds.iter(batch_size=1024), 0
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except Exception as e:  # malformed JSON, a truncated parquet file, a dropped stream
                raise UserError(
                    f"--source={source}: cannot read past row {n:,} ({one_line(e, named=True)})"
                ) from e
            n += len(next(iter(batch.values()), []))
            yield batch

    def rows() -> Iterator[str]:
        for batch in batches():
            if text_field not in batch:
                raise UserError(
                    f"--source={source}: no field --text_field={text_field!r} "
                    f"(fields: {', '.join(batch)})"
                )
            for text in batch[text_field]:
                if text is not None and not isinstance(text, str):
                    raise UserError(
                        f"--source={source}: field {text_field!r} holds "
                        f"{type(text).__name__}, not text"
                    )
                yield text or ""

    return rows(), total


def open_source(
    source: str, text_field: str = "text", hf_config: str | None = None, hf_split: str = "train"
) -> tuple[Iterator[str], int | None]:
    """Documents of `source` in their fixed order, and how many there are when that is known."""
    kind, _, arg = source.partition(":")
    if kind == "hf" and arg:
        return dataset_rows(source, arg, text_field, name=hf_config or None, split=hf_split)
    if kind in ("jsonl", "parquet") and arg:
        paths = _glob(source, arg)
        total = None
        if kind == "parquet":
            import pyarrow.parquet as pq

            total = 0
            for path in paths:
                try:
                    total += pq.ParquetFile(path).metadata.num_rows
                except Exception as e:  # pyarrow's errors do not name the file
                    raise UserError(
                        f"--source={source}: {path}: not a readable parquet file "
                        f"({one_line(e, named=True)})"
                    ) from e
        rows, _ = dataset_rows(
            source, "json" if kind == "jsonl" else kind, text_field, data_files=paths, split="train"
        )
        return rows, total
    if kind == "text" and arg:
        paths = _glob(source, arg)
        return text_documents(paths), len(paths)
    if kind == "paragraphs" and arg:
        return paragraph_documents(_glob(source, arg)), None
    if kind == "builtin" and arg == "pydocs":
        return pydocs_documents(), None
    raise UserError(
        f"--source={source!r}: expected hf:NAME, jsonl:GLOB, parquet:GLOB, "
        "text:GLOB, paragraphs:GLOB or builtin:pydocs"
    )
