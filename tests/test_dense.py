"""sentence-transformers' Dense module after the pooling (LaBSE's layout: CLS pooling, Dense 768 -> 768
with tanh, Normalize): parity with sentence-transformers, strict loading, and the errors naming keys."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import add_dense, corpus, make_checkpoint, st_model

from minisbert import SentenceEncoder
from minisbert.errors import CheckpointError, ConfigError

TOL = 1e-5
TEXTS = corpus(60, seed=5) + ["", "짧다", "한국어 " * 200]


def assert_parity(folder: Path, what: str) -> SentenceEncoder:
    ref = st_model(folder).encode(TEXTS, batch_size=32)
    for fast in (True, False):
        enc = SentenceEncoder.from_pretrained(folder, fast=fast)
        for batch_size in (1, 32):
            ours = enc.encode(TEXTS, batch_size=batch_size)
            assert ours.shape == ref.shape, f"{what}: {ours.shape} vs {ref.shape}"
            diff = np.abs(ours - ref).max()
            assert diff <= TOL, f"{what} (fast={fast}, batch {batch_size}): max abs diff {diff:.3e}"
    return enc


def test_labse_layout_equals_sentence_transformers(tmp_path):
    """CLS pooling -> Dense(tanh) -> Normalize, as LaBSE."""
    folder = add_dense(make_checkpoint(tmp_path / "m", "bert", pooling="cls"),
                       [{"in_features": 64, "out_features": 64}], normalize=True)
    enc = assert_parity(folder, "cls + Dense(tanh) + Normalize")
    assert enc.embedding_dim == enc.get_sentence_embedding_dimension() == 64
    np.testing.assert_allclose(np.linalg.norm(enc.encode(TEXTS[:5]), axis=1), 1.0, atol=1e-5)
    # The Dense is applied: without it the embeddings differ.
    plain = SentenceEncoder.from_pretrained(make_checkpoint(tmp_path / "plain", "bert", pooling="cls",
                                                            normalize=True))
    assert np.abs(plain.encode(TEXTS[:5]) - enc.encode(TEXTS[:5])).max() > 1e-2


@pytest.mark.parametrize("arch", ["roberta", "deberta-v2"])
def test_dense_chain_equals_sentence_transformers(tmp_path, arch):
    """Two Dense modules that change the width, other activations, residuals, no bias."""
    specs = [{"in_features": 64 * 2, "out_features": 48, "activation_function": torch.nn.ReLU(),
              "use_residual": True},
             {"in_features": 48, "out_features": 48, "bias": False, "activation_function": torch.nn.GELU(),
              "use_residual": True},
             {"in_features": 48, "out_features": 16, "activation_function": None}]
    config = {"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128} if arch == "deberta-v2" else None
    folder = add_dense(make_checkpoint(tmp_path / "m", arch, pooling=("mean", "max"), config=config), specs)
    enc = assert_parity(folder, f"{arch}: mean+max -> Dense x3")
    assert enc.embedding_dim == 16 and len(enc.dense) == 3


def test_legacy_bin_dense_and_trace(tmp_path):
    folder = add_dense(make_checkpoint(tmp_path / "m", "bert"), [{"in_features": 64, "out_features": 32}],
                       safe=False)
    assert (folder / "2_Dense" / "pytorch_model.bin").is_file()
    assert not (folder / "2_Dense" / "model.safetensors").exists()
    enc = assert_parity(folder, "Dense weights from pytorch_model.bin")
    traces = enc.trace(TEXTS[:4])
    traced = torch.stack([t.sentence_embedding for t in traces]).numpy()
    np.testing.assert_allclose(traced, enc.encode(TEXTS[:4]), atol=TOL)


def dense_folder(tmp_path: Path) -> Path:
    return add_dense(make_checkpoint(tmp_path / "m", "bert"), [{"in_features": 64, "out_features": 32}])


def test_dense_config_errors_name_the_key(tmp_path):
    folder = dense_folder(tmp_path)
    config_path = folder / "2_Dense" / "config.json"
    good = json.loads(config_path.read_text())
    for change, match in [({"in_features": 32}, "in_features=32, but the module before it gives 64"),
                          ({"activation_function": "my.module.Swish"}, "activation_function='my.module.Swish'"),
                          ({"bias": "yes"}, "bias='yes'"),
                          ({"out_features": 0}, "out_features=0"),
                          ({"module_input_name": "token_embeddings"}, "module_input_name='token_embeddings'"),
                          ({"dropout": 0.1}, r"\['dropout'\]")]:
        config_path.write_text(json.dumps(dict(good, **change)))
        with pytest.raises(ConfigError, match=match):
            SentenceEncoder.from_pretrained(folder)
    config_path.write_text(json.dumps(good))
    SentenceEncoder.from_pretrained(folder)


def test_dense_weights_are_loaded_strictly(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = dense_folder(tmp_path)
    path = folder / "2_Dense" / "model.safetensors"
    good = load_file(path)
    for state, match in [({**good, "linear.weight": good["linear.weight"][:, :32].contiguous()},
                          r"'linear.weight' has shape \(32, 32\).*needs \(32, 64\)"),
                         ({"linear.weight": good["linear.weight"]}, "missing.*linear.bias"),
                         ({**good, "extra.weight": good["linear.bias"].clone()}, "unexpected.*extra.weight"),
                         ({**good, "linear.bias": torch.full_like(good["linear.bias"], float("nan"))}, "NaN")]:
        save_file(state, path)
        with pytest.raises(CheckpointError, match=match):
            SentenceEncoder.from_pretrained(folder)


def test_module_order_is_checked(tmp_path):
    from minisbert.errors import UnsupportedModuleError

    folder = dense_folder(tmp_path)
    modules = json.loads((folder / "modules.json").read_text())
    # A Dense before Pooling has no sentence embedding to work on. (Normalize before a Dense is fine:
    # every module after Pooling runs in order, see test_st_dropin.)
    order = [modules[0], modules[2], modules[1]]
    (folder / "modules.json").write_text(json.dumps([dict(m, idx=i) for i, m in enumerate(order)]))
    with pytest.raises(UnsupportedModuleError, match="Pooling\\[, Dense \\| LayerNorm \\| Normalize ...\\]"):
        SentenceEncoder.from_pretrained(folder)


def test_inspect_lists_the_dense_modules(tmp_path, capsys):
    from minisbert.cli import main

    folder = dense_folder(tmp_path)
    assert main(["inspect", "--model", str(folder), "--json"]) == 0
    dense = json.loads(capsys.readouterr().out)["sentence_transformers"]["dense"]
    assert dense == [{"in_features": 64, "out_features": 32, "bias": True, "use_residual": False,
                      "activation_function": "torch.nn.modules.activation.Tanh"}]
    assert main(["inspect", "--model", str(folder)]) == 0
    assert "dense        64 -> 32 · Tanh" in capsys.readouterr().out
