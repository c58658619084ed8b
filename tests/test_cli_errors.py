"""Every command fails the same way on bad input: exit code 2, one line `llmjax: ...` on stderr
naming the offending path, key or value, and nothing on disk changed."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, snapshot


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", f"llmjax.{module}", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def _cases(workdir: str, byte_data: str, tmp) -> dict:
    bad_json = tmp / "no_instructions.json"
    bad_json.write_text(json.dumps([{"question": "q", "answer": "a"}]))
    return {
        "main": (
            [
                "--config=configs/tiny.py",
                f"--workdir={tmp / 'sft'}",
                f"--config.data.path={bad_json}",
                "--config.data.tokenizer=bytes-chat",
            ],
            str(bad_json),
        ),
        "prepare": (["--source=text:/nowhere/*.txt", f"--out={tmp / 'out'}"], "/nowhere/*.txt"),
        "sample": ([f"--workdir={workdir}", "--temperature=-1"], "temperature=-1"),
        "convert": ([f"--workdir={tmp / 'absent'}", f"--to_hf={tmp / 'hf'}"], "absent"),
        "evaluate": ([f"--workdir={workdir}", f"--data={tmp / 'no_data'}"], "no_data"),
        "chat": ([f"--workdir={workdir}", "--prompt=hi"], "no chat tokens"),
    }


@pytest.mark.parametrize("module", ["main", "prepare", "sample", "convert", "evaluate", "chat"])
def test_bad_input_is_one_line_exit_2(module, pretrained_bytes, byte_data, tmp_path):
    workdir = pretrained_bytes
    args, needle = _cases(workdir, byte_data, tmp_path)[module]
    before, before_tmp = snapshot(os.path.dirname(workdir)), snapshot(tmp_path)
    proc = _cli(module, *args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert 1 <= len(lines) <= 2 and lines[-1].startswith("llmjax: "), proc.stderr[-2000:]
    assert needle in lines[-1], proc.stderr
    assert snapshot(os.path.dirname(workdir)) == before
    assert snapshot(tmp_path) == before_tmp  # nothing created beside the inputs either


def test_bad_flag_is_one_line_exit_2(pretrained_bytes):
    proc = _cli("sample", f"--workdir={pretrained_bytes}", "--top_k=many")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "top_k" in lines[0], proc.stderr
