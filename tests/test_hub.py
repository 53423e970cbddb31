"""The hub path: huggingface_hub's cache and offline mode for real, the download choices with a fake hub."""

from __future__ import annotations

import fnmatch
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import corpus, make_checkpoint

from minisbert import ModelNotFoundError, SentenceEncoder
from minisbert.io import hub

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_cache(tmp_path: Path, repo: str = "org/tiny") -> tuple[Path, Path]:
    """A huggingface_hub cache holding one snapshot of a tiny model at COMMIT, ref 'main'."""
    src = make_checkpoint(tmp_path / "src", "bert")
    cache = tmp_path / "cache"
    root = cache / ("models--" + repo.replace("/", "--"))
    shutil.copytree(src, root / "snapshots" / COMMIT)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)
    return src, cache


def test_offline_cache_and_revisions(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src, cache = fake_cache(tmp_path)
    expected = SentenceEncoder.from_pretrained(src).encode(corpus(5))
    for revision in (None, "main", COMMIT):
        enc = SentenceEncoder.from_pretrained("org/tiny", cache_dir=str(cache), revision=revision)
        assert Path(enc.source).name == COMMIT
        np.testing.assert_array_equal(enc.encode(corpus(5)), expected)
    with pytest.raises(ModelNotFoundError, match="revision 'f+'.*HF_HUB_OFFLINE.*local folder"):
        SentenceEncoder.from_pretrained("org/tiny", cache_dir=str(cache), revision="f" * 40)


class FakeHub:
    """Stands in for huggingface_hub.snapshot_download: copies what allow_patterns select."""

    def __init__(self, remote: Path, local: Path):
        self.remote, self.local, self.fetched, self.calls = remote, local, set(), []

    def __call__(self, repo_id, *, revision=None, token=None, cache_dir=None, local_dir=None, allow_patterns=()):
        self.calls.append((repo_id, revision, tuple(allow_patterns)))
        for f in self.remote.rglob("*"):
            rel = f.relative_to(self.remote).as_posix()
            if f.is_file() and any(fnmatch.fnmatch(rel, p) for p in allow_patterns):
                (self.local / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(f, self.local / rel)
                self.fetched.add(rel)
        return str(self.local)


@pytest.mark.parametrize("formats", ["both", "bin-only"])
def test_fetch_takes_configs_and_one_weights_format(tmp_path, monkeypatch, formats):
    from safetensors.torch import load_file

    remote = make_checkpoint(tmp_path / "remote", "roberta")
    torch.save({"roberta." + k: v for k, v in load_file(remote / "model.safetensors").items()},
               remote / "pytorch_model.bin")
    (remote / "onnx").mkdir()
    (remote / "onnx" / "model.onnx").write_bytes(b"not needed")
    if formats == "bin-only":
        (remote / "model.safetensors").unlink()
    fake = FakeHub(remote, tmp_path / "local")
    monkeypatch.setattr(hub, "snapshot_download", fake)
    enc = SentenceEncoder.from_pretrained("org/remote", revision="v1")
    assert {"modules.json", "config.json", "tokenizer.json", "1_Pooling/config.json"} <= fake.fetched
    assert "onnx/model.onnx" not in fake.fetched
    weights = {"model.safetensors"} if formats == "both" else {"pytorch_model.bin"}
    assert weights == fake.fetched & {"model.safetensors", "pytorch_model.bin"}
    assert all(call[:2] == ("org/remote", "v1") for call in fake.calls)
    assert enc.encode("안녕하세요?").shape == (64,)


def test_download_converts_bin_only_repos(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    remote = make_checkpoint(tmp_path / "remote", "bert")
    torch.save(load_file(remote / "model.safetensors"), remote / "pytorch_model.bin")
    (remote / "model.safetensors").unlink()
    monkeypatch.setenv("MINISBERT_WEIGHTS", str(tmp_path / "weights"))

    def fake(repo_id, local_dir=None, **kw):
        return FakeHub(remote, Path(local_dir))(repo_id, local_dir=local_dir, **kw)

    monkeypatch.setattr(hub, "snapshot_download", fake)
    folder = hub.download("org/remote")
    assert folder == tmp_path / "weights" / "org__remote"
    assert (folder / "model.safetensors").is_file()
    (folder / "pytorch_model.bin").unlink()
    assert SentenceEncoder.from_pretrained(folder).embedding_dim == 64


@pytest.mark.parametrize("formats", ["safetensors", "bin"])
def test_fetch_and_download_take_dense_weights(tmp_path, monkeypatch, formats):
    """A Dense module's weights live in its own folder: fetched (one format) and converted like the model's."""
    from conftest import add_dense

    remote = add_dense(make_checkpoint(tmp_path / "remote", "bert"), [{"in_features": 64, "out_features": 16}],
                       safe=formats == "safetensors")
    expected = SentenceEncoder.from_pretrained(remote).encode(corpus(5))
    fake = FakeHub(remote, tmp_path / "local")
    monkeypatch.setattr(hub, "snapshot_download", fake)
    enc = SentenceEncoder.from_pretrained("org/remote")
    dense_file = "2_Dense/model.safetensors" if formats == "safetensors" else "2_Dense/pytorch_model.bin"
    assert {"2_Dense/config.json", dense_file, "model.safetensors"} <= fake.fetched
    assert not {"2_Dense/model.safetensors", "2_Dense/pytorch_model.bin"} - {dense_file} & fake.fetched
    np.testing.assert_array_equal(enc.encode(corpus(5)), expected)

    monkeypatch.setenv("MINISBERT_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.setattr(hub, "snapshot_download",
                        lambda repo_id, local_dir=None, **kw: FakeHub(remote, Path(local_dir))(
                            repo_id, local_dir=local_dir, **kw))
    folder = hub.download("org/remote")
    assert (folder / "2_Dense" / "model.safetensors").is_file()
    (folder / "2_Dense" / "pytorch_model.bin").unlink(missing_ok=True)
    np.testing.assert_array_equal(SentenceEncoder.from_pretrained(folder).encode(corpus(5)), expected)
