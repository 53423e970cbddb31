"""The command line as a user meets it: arguments checked before any model loads, one-line errors,
atomic output, the packaged short name, help text for every flag, and a cold start without
torch's compiler stack."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO

from minisbert import SentenceEncoder, __version__, cli


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a model is loaded: argument errors must be found before that."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")
    monkeypatch.setattr(SentenceEncoder, "from_pretrained", refuse)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_version(capsys):
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.strip() == f"minisbert {__version__}"


@pytest.mark.parametrize("flag, value", [("--batch-size", "0"), ("--batch-size", "x"), ("--max-seq-length", "1"),
                                         ("--truncate-dim", "0"), ("--dtype", "int8")])
def test_bad_numbers_fail_before_loading(capsys, no_loading, flag, value):
    code, _, err = run_cli(capsys, "encode", "--model", "all-MiniLM-L6-v2", flag, value, "text")
    assert code == 2 and flag in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_one_line(capsys, no_loading):
    code, _, err = run_cli(capsys, "encode", "--model", "all-MiniLM-L6-v2", "--device", "cuda", "text")
    assert code == 2 and "CUDA is not available" in err and len(err.strip().splitlines()) == 1, err


def test_undecodable_input_names_file_and_line(capsys, no_loading, tmp_path):
    path = tmp_path / "texts.txt"
    path.write_bytes("첫 줄\n둘째 줄\n".encode() + "셋째".encode("cp949") + b"\n")
    code, _, err = run_cli(capsys, "encode", "--model", "all-MiniLM-L6-v2", "--input", str(path))
    assert code == 2 and f"{path}:3: not UTF-8 text" in err and "iconv" in err, err


CP949_SECOND_LINE = "첫 줄\n".encode() + "둘째 줄".encode("cp949") + b"\n"


@pytest.mark.parametrize("to_file", [True, False], ids=["--output", "stdout"])
def test_undecodable_stdin_is_refused_before_loading_and_writes_nothing(tmp_path, to_file):
    """Before: all the work done, then the existing output truncated to 0 bytes, or invalid UTF-8 JSON on
    stdout with exit status 0. Now: refused before the model loads, naming the stream and line."""
    out = tmp_path / "existing.jsonl"
    out.write_text("precious\n")
    command = [sys.executable, "-m", "minisbert", "encode", "--model", "all-MiniLM-L6-v2"]
    run = subprocess.run(command + (["--output", str(out)] if to_file else []), input=CP949_SECOND_LINE,
                         capture_output=True, timeout=300, cwd=REPO)
    assert run.returncode == 2 and b"<stdin>:2: not UTF-8 text" in run.stderr, run.stderr
    assert run.stdout == b"" and out.read_text() == "precious\n" and [p.name for p in tmp_path.iterdir()] == [
        "existing.jsonl"]


def test_decode_errors_replace_reads_undecodable_bytes_as_replacement_characters(capsys, tiny_bert, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"ok\n\xff\xfe tail\n")))
    code, out, err = run_cli(capsys, "encode", "--model", str(tiny_bert), "--decode-errors", "replace")
    assert code == 0, err
    assert [json.loads(line)["text"] for line in out.splitlines()] == ["ok", "\ufffd\ufffd tail"]


def test_undecodable_text_argument_is_refused_naming_it(capsys, no_loading):
    """Python keeps an argument's undecodable bytes as surrogates, which would reach the JSON output."""
    code, _, err = run_cli(capsys, "encode", "--model", "all-MiniLM-L6-v2", "ok", "bad\udcff")
    assert code == 2 and "text argument 2 is not UTF-8 text" in err, err


def test_unwritable_output_fails_before_loading(capsys, no_loading, tmp_path):
    code, _, err = run_cli(capsys, "encode", "--model", "all-MiniLM-L6-v2", "--output",
                           str(tmp_path / "missing" / "e.npy"), "text")
    assert code == 2 and "does not exist" in err


def test_failed_run_leaves_existing_output_untouched(capsys, tmp_path, tiny_bert, monkeypatch):
    out = tmp_path / "e.jsonl"
    out.write_text("precious\n")

    def broken(self, *args, **kwargs):
        raise ValueError("encoding failed half way")
    monkeypatch.setattr(SentenceEncoder, "encode", broken)
    code, _, err = run_cli(capsys, "encode", "--model", str(tiny_bert), "--output", str(out), "text")
    assert code == 2 and "half way" in err
    assert out.read_text() == "precious\n" and [p.name for p in tmp_path.iterdir()] == ["e.jsonl"]  # no temp left
    monkeypatch.undo()
    assert run_cli(capsys, "encode", "--model", str(tiny_bert), "--output", str(out), "a", "b")[0] == 0
    assert [json.loads(line)["text"] for line in out.read_text().splitlines()] == ["a", "b"]


def test_folder_that_is_not_a_model_says_so(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    code, _, err = run_cli(capsys, "encode", "--model", str(tmp_path), "text")
    assert code == 2 and "no config.json: not a sentence-transformers or Hugging Face model folder" in err


def test_download_of_a_local_folder_does_not_blame_the_network(capsys, tiny_bert):
    code, _, err = run_cli(capsys, "download", str(tiny_bert))
    assert code == 2 and "local folder" in err and "hub" not in err.lower(), err


def test_every_flag_has_help():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    for add, _ in cli.COMMANDS.values():
        add(sub)
    for name, command in sub.choices.items():
        for action in command._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, f"{name} {action.option_strings or action.dest} has no help text"


def test_main_command_with_the_packaged_short_name(minilm_path):
    """The README's main command: the short name resolves to the installed package's folder."""
    texts = ["첫 문장", "second sentence"]
    run = subprocess.run([sys.executable, "-m", "minisbert", "encode", "--model", "all-MiniLM-L6-v2", *texts],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    got = np.array([json.loads(line)["embedding"] for line in run.stdout.splitlines()])
    expected = SentenceEncoder.from_pretrained(minilm_path).encode(texts)
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_cold_start_does_not_import_the_compiler(minilm_path):
    """Building on the meta device runs no initialiser: the first nn.init.normal_ there would import
    torch._dynamo (~2 s of a cold start); loading and one CPU encode need none of it."""
    code = ("import sys, minisbert; e = minisbert.SentenceEncoder.from_pretrained(sys.argv[1]); "
            "e.encode(['x']); print('torch._dynamo' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code, minilm_path], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "False"
