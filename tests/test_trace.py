"""Looking inside: traces equal transformers' hidden states and attentions, DeBERTa's score terms add
up to what the model softmaxes, module names take forward hooks, ``inspect`` describes every test
checkpoint, and the heat-map script draws a PNG."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import corpus, load_script, make_checkpoint

from minisbert import SentenceEncoder
from minisbert.cli import main
from minisbert.models import ARCHITECTURES

TOL = 1e-5
TEXTS = corpus(10) + ["", "한국어 " * 600]  # mixed lengths, one empty, one truncated


def stats(diffs: list[torch.Tensor]) -> tuple[float, float]:
    flat = torch.cat([d.flatten() for d in diffs])
    return flat.max().item(), flat.mean().item()


def need_deberta():
    if "deberta-v2" not in ARCHITECTURES:
        pytest.skip("minisbert.models has no deberta-v2 architecture yet")


@pytest.fixture(scope="module")
def tiny_deberta(tmp_path_factory) -> Path:
    need_deberta()
    return make_checkpoint(tmp_path_factory.mktemp("deberta"), "deberta-v2", max_seq_length=128)


def checkpoint_for(name: str, request) -> Path:
    fixture = {"bert": "tiny_bert", "roberta": "tiny_roberta", "deberta-v2": "tiny_deberta",
               "minilm": "minilm_path"}[name]
    return Path(request.getfixturevalue(fixture))


def transformers_outputs(path: Path, input_ids: torch.Tensor, mask: torch.Tensor):
    import transformers

    # transformers 5 returns attentions only from the eager implementation.
    hf = transformers.AutoModel.from_pretrained(str(path), attn_implementation="eager").eval()
    with torch.no_grad():
        out = hf(input_ids=input_ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    return hf, out


# ---------------------------------------------------------------------------------------------------
# Trace parity


@pytest.mark.parametrize("name", ["bert", "roberta", "deberta-v2", "minilm"])
def test_trace_equals_transformers(name, request):
    path = checkpoint_for(name, request)
    texts = TEXTS if name != "minilm" else TEXTS[:6] + ["The cat sits outside", "A man is playing guitar."]
    encoder = SentenceEncoder.from_pretrained(path)
    traces = encoder.trace(texts, batch_size=4)  # several batches, each padded differently from the reference
    input_ids, mask = encoder.tokenizer(texts)  # (N, T) one batch, padded to the longest text
    _, out = transformers_outputs(path, input_ids, mask)
    L = len(out.attentions)
    hidden_diffs, attention_diffs = [], []
    for b, tr in enumerate(traces):
        T = int(mask[b].sum())
        assert len(tr.tokens) == T and tr.input_ids.tolist() == input_ids[b, :T].tolist()
        assert tr.tokens == [encoder.tokenizer.tokenizer.id_to_token(i) for i in tr.input_ids.tolist()]
        assert tr.hidden_states.shape == (L + 1, T, out.hidden_states[0].shape[-1])
        assert tr.attentions.shape == (L, out.attentions[0].shape[1], T, T)
        assert torch.equal(tr.embeddings, tr.hidden_states[0])
        hidden_diffs.append((tr.hidden_states - torch.stack([h[b, :T] for h in out.hidden_states])).abs())
        attention_diffs.append((tr.attentions - torch.stack([a[b, :, :T, :T] for a in out.attentions])).abs())
    h_max, h_mean = stats(hidden_diffs)
    a_max, a_mean = stats(attention_diffs)
    print(f"{name}: hidden states max {h_max:.2e} mean {h_mean:.2e}; attentions max {a_max:.2e} mean {a_mean:.2e}")
    assert h_max <= TOL, f"{name} hidden states: max abs diff {h_max:.3e}, mean {h_mean:.3e}"
    assert a_max <= TOL, f"{name} attentions: max abs diff {a_max:.3e}, mean {a_mean:.3e}"
    # The trace's sentence embedding is the encoder's, through the unfused attention path.
    emb = torch.stack([tr.sentence_embedding for tr in traces])
    e_diff = (emb - encoder.encode(texts, convert_to_tensor=True)).abs()
    print(f"{name}: trace sentence embeddings vs encode() max {e_diff.max():.2e}")
    assert e_diff.max() <= TOL, f"{name} sentence embeddings: max {e_diff.max():.3e}, mean {e_diff.mean():.3e}"
    if name != "deberta-v2":
        assert all(getattr(traces[0], t) is None for t in ("c2c", "c2p", "p2c", "rel_buckets"))


def test_trace_single_string_and_bad_batch_size(tiny_bert):
    encoder = SentenceEncoder.from_pretrained(tiny_bert)
    (tr,) = encoder.trace("고양이가 창문 밖의 새를 본다.")
    assert tr.tokens[0] == "[CLS]" and tr.tokens[-1] == "[SEP]"
    assert torch.allclose(tr.attentions.sum(-1), torch.ones(()), atol=1e-6)  # rows are distributions
    assert "layers=2" in repr(tr) and "heads=4" in repr(tr)
    with pytest.raises(ValueError, match="batch_size"):
        encoder.trace(["a"], batch_size=0)


# ---------------------------------------------------------------------------------------------------
# DeBERTa-v2 score terms


def deberta_reference_terms(hf, out, b: int, T: int, layer: int) -> dict[str, torch.Tensor]:
    """c2c, c2p, p2c of one sentence and layer, from transformers' own modules: (H, T, T) each."""
    attn = hf.encoder.layer[layer].attention.self
    x = out.hidden_states[layer][b: b + 1, :T]  # (1, T, C) the layer's input, unpadded
    H = attn.num_attention_heads
    q = attn.transpose_for_scores(attn.query_proj(x), H)  # (H, T, D)
    k = attn.transpose_for_scores(attn.key_proj(x), H)
    scale_factor = 1 + len(attn.pos_att_type)
    scale = (q.shape[-1] * scale_factor) ** 0.5
    terms = {"c2c": (q @ k.transpose(-1, -2)) / scale}
    relative_pos = hf.encoder.get_rel_pos(x)
    rel_embeddings = hf.encoder.get_rel_embedding()
    selected = list(attn.pos_att_type)
    for term in selected:
        attn.pos_att_type = [term]  # the bias function sums the selected terms: ask for one at a time
        try:
            terms[term] = attn.disentangled_attention_bias(q, k, relative_pos, rel_embeddings, scale_factor)
        finally:
            attn.pos_att_type = selected
    return terms, relative_pos.reshape(T, T)


@pytest.mark.parametrize("overrides", [
    {},  # kf-deberta's settings: p2c + c2p, shared keys, 256 log buckets
    {"pos_att_type": ["c2p"], "share_att_key": False, "position_buckets": -1, "max_relative_positions": 64},
], ids=["seed", "c2p-only"])
def test_deberta_terms(overrides, tmp_path):
    need_deberta()
    path = make_checkpoint(tmp_path / "d", "deberta-v2", max_seq_length=160, config=overrides)
    encoder = SentenceEncoder.from_pretrained(path)
    texts = corpus(5) + ["한국어 " * 200]  # the long one reaches past the 128 unbucketed positions
    traces = encoder.trace(texts, batch_size=3)
    input_ids, mask = encoder.tokenizer(texts)
    hf, out = transformers_outputs(path, input_ids, mask)
    selected = ["c2c"] + [t for t in ("c2p", "p2c") if t in hf.config.pos_att_type]
    term_diffs, softmax_diffs, bucket_ok = [], [], True
    for b, tr in enumerate(traces):
        T = len(tr.tokens)
        assert [t for t in ("c2c", "c2p", "p2c") if getattr(tr, t) is not None] == selected
        logits = sum(getattr(tr, t) for t in selected)  # (L, H, T, T), already scaled
        # Inside one sentence there is no pad key, so the mask bias is zero on every kept column.
        softmax_diffs.append((logits.softmax(-1) - tr.attentions).abs())
        with torch.no_grad():
            for layer in range(tr.num_layers):
                ref, rel_pos = deberta_reference_terms(hf, out, b, T, layer)
                term_diffs += [(getattr(tr, t)[layer] - ref[t]).abs() for t in selected]
        bucket_ok &= torch.equal(tr.rel_buckets, rel_pos)
    t_max, t_mean = stats(term_diffs)
    s_max, s_mean = stats(softmax_diffs)
    print(f"deberta {overrides}: terms vs transformers max {t_max:.2e}; softmax(sum) vs attentions max {s_max:.2e}")
    assert bucket_ok, "rel_buckets differ from transformers' build_relative_position"
    assert t_max <= TOL, f"score terms vs transformers: max abs diff {t_max:.3e}, mean {t_mean:.3e}"
    assert s_max <= TOL, f"softmax(c2c + c2p + p2c) vs attentions: max abs diff {s_max:.3e}, mean {s_mean:.3e}"


# ---------------------------------------------------------------------------------------------------
# Module names and hooks


def test_forward_hook_by_module_name(tiny_bert):
    encoder = SentenceEncoder.from_pretrained(tiny_bert)
    model = encoder.model
    names = dict(model.named_modules())
    assert {"embed", "blocks.0", "blocks.1.attn", "blocks.1.attn_ln", "blocks.1.ffn", "blocks.1.ffn_ln"} <= set(names)
    assert "(blocks): ModuleList" in str(model) and "(attn): SelfAttention" in str(model)
    captured = []
    handle = names["blocks.1.attn"].register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        texts = ["오늘 서울의 날씨는 맑다.", "비가 와서 소풍을 다음 주로 미뤘어요.", ""]
        input_ids, mask = encoder.tokenizer(texts)  # (B, T) in text order (encode() would sort them)
        with torch.no_grad():
            model(input_ids, mask)
        traces = encoder.trace(texts, batch_size=len(texts))  # the reference forward: hooks fire there too
    finally:
        handle.remove()
    attn_out, during_trace = captured
    assert attn_out.shape == during_trace.shape == (len(texts), input_ids.shape[1], model.config.hidden_size)
    # The hooked tensor is the attention sub-layer's output: finishing block 1 from it gives the
    # trace's last hidden states.
    block = model.blocks[1]
    with torch.no_grad():
        for b, tr in enumerate(traces):
            T = len(tr.tokens)
            x = block.attn_ln(tr.hidden_states[1] + attn_out[b, :T])
            x = block.ffn_ln(x + block.ffn(x))
            diff = (x - tr.hidden_states[2]).abs()
            assert diff.max() <= TOL, f"block 1 rebuilt from the hook: max {diff.max():.3e}, mean {diff.mean():.3e}"


def test_encode_runs_the_hooked_modules(tiny_bert):
    """A registered hook makes encode() take the reference forward, so the hook fires and the result stays."""
    encoder = SentenceEncoder.from_pretrained(tiny_bert, fast=True)
    texts = ["오늘 서울의 날씨는 맑다.", "비가 와서 소풍을 다음 주로 미뤘어요."]
    fast = encoder.encode(texts)
    calls = []
    handle = encoder.model.blocks[0].attn.register_forward_hook(lambda *args: calls.append(1))
    try:
        hooked = encoder.encode(texts)
    finally:
        handle.remove()
    assert calls, "the hook did not fire during encode()"
    assert abs(hooked - fast).max() <= TOL


# ---------------------------------------------------------------------------------------------------
# inspect


@pytest.mark.parametrize("name", ["bert", "roberta", "deberta-v2", "minilm"])
def test_inspect_json_describes_the_checkpoint(name, request, capsys):
    import transformers
    from safetensors import safe_open

    path = checkpoint_for(name, request)
    assert main(["inspect", "--model", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    hf_config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    assert info["model_type"] == hf_config["model_type"]
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                "max_position_embeddings", "layer_norm_eps", "hidden_act", "pad_token_id"):
        assert info["config"][key] == hf_config[key], key
    assert info["config"]["head_dim"] * hf_config["num_attention_heads"] == hf_config["hidden_size"]
    assert (info["relative_attention"] is not None) == (name == "deberta-v2")

    # Every checkpoint key exactly once, loaded or ignored, with the file's own shapes.
    ck = info["checkpoint"]
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        encoder = SentenceEncoder.from_pretrained(path)
        own = dict(encoder.model.named_parameters())
        # ... and every parameter of the loaded model once, holding exactly the tensor of its key.
        assert sorted(r["parameter"] for r in ck["mapped"]) == sorted(own)
        for row in ck["mapped"]:
            assert torch.equal(f.get_tensor(row["key"]), own[row["parameter"]]), row
    rows = ck["mapped"] + ck["ignored"]
    assert sorted(r["key"] for r in rows) == sorted(shapes) and ck["keys"] == len(shapes)
    assert all(r["shape"] == shapes[r["key"]] for r in rows)
    if name == "minilm":
        assert {r["key"] for r in ck["ignored"]} == {"embeddings.position_ids", "pooler.dense.weight",
                                                     "pooler.dense.bias"}

    # Parameter counts agree with the model and with transformers' (less the pooler we do not load).
    params = info["parameters"]
    hf = transformers.AutoModel.from_pretrained(str(path))
    hf_total = sum(p.numel() for n, p in hf.named_parameters() if not n.startswith("pooler."))
    assert params["total"] == sum(p.numel() for p in own.values()) == hf_total == sum(params["parts"].values())
    blocks = params["blocks"]
    assert blocks["count"] == hf_config["num_hidden_layers"] and blocks["all_equal"]
    assert blocks["per_block"] * blocks["count"] == params["parts"]["blocks"] == sum(
        p.numel() for n, p in own.items() if n.startswith("blocks."))
    assert sum(blocks["sub_layers"].values()) == blocks["per_block"]

    st = info["sentence_transformers"]
    assert st["max_seq_length"] == encoder.max_seq_length and st["pooling"] == list(encoder.folder.pooling.modes)
    assert st["normalize"] == (name == "minilm") and st["do_lower_case"] == encoder.folder.do_lower_case
    assert info["tokenizer"]["vocab_size"] == encoder.tokenizer.tokenizer.get_vocab_size()
    assert info["dtype"] == {"model": "float32", "checkpoint": ["float32"]}
    files = {f["path"]: f["bytes"] for f in info["files"]}
    assert files["model.safetensors"] == (path / "model.safetensors").stat().st_size
    assert {"config.json", "modules.json", "1_Pooling/config.json"} <= set(files)


def test_inspect_text_abbreviates_layers(minilm_path, capsys):
    assert main(["inspect", "--model", minilm_path]) == 0
    out = capsys.readouterr().out
    total = sum(p.numel() for p in SentenceEncoder.from_pretrained(minilm_path).model.parameters())
    assert f"{total:,} total" in out
    assert re.search(r"encoder\.layer\.0\.attention\.self\.query\.weight +→ blocks\.0\.attn\.query\.weight", out)
    assert "… same for layers 1–5 (16 keys each)" in out and "encoder.layer.3." not in out
    assert re.search(r"pooler\.dense\.weight \(384, 384\) float32: ignored", out)
    assert "pooling mean · normalize yes · max_seq_length 256" in out and "WordPiece" in out
    assert main(["inspect", "--model", minilm_path, "--all-keys"]) == 0
    assert "encoder.layer.5.output.LayerNorm.bias" in capsys.readouterr().out


def test_inspect_deberta_text_shows_relative_settings(tiny_deberta, capsys):
    assert main(["inspect", "--model", str(tiny_deberta)]) == 0
    out = capsys.readouterr().out
    assert "pos_att_type ['p2c', 'c2p']" in out or "pos_att_type ['c2p', 'p2c']" in out
    assert "position_buckets 256" in out and "share_att_key True" in out
    assert re.search(r"encoder\.rel_embeddings\.weight +→ rel_embed\.weight +\(512, 64\)", out)
    assert "… same for layer 1 (" in out


def test_inspect_prefixed_checkpoint_with_heads(tmp_path, capsys):
    """A checkpoint saved from BertForMaskedLM-style code: ``bert.`` prefix and an MLM head to ignore."""
    from safetensors.torch import load_file, save_file

    path = make_checkpoint(tmp_path / "prefixed", "bert")
    state = load_file(path / "model.safetensors")
    head = {"cls.predictions.bias": torch.zeros(state["embeddings.word_embeddings.weight"].shape[0])}
    save_file({**{"bert." + k: v for k, v in state.items()}, **head}, path / "model.safetensors")
    assert main(["inspect", "--model", str(path), "--json"]) == 0
    ck = json.loads(capsys.readouterr().out)["checkpoint"]
    assert ck["prefix"] == "bert." and [r["key"] for r in ck["ignored"]] == ["cls.predictions.bias"]
    assert {r["key"] for r in ck["mapped"]} == {"bert." + k for k in state}


def test_inspect_missing_model_is_a_clean_error(tmp_path, capsys):
    assert main(["inspect", "--model", str(tmp_path / "no-such-model")]) == 2
    assert "minisbert inspect: error:" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# scripts/attention_heatmap.py


def test_heatmap_writes_png(tiny_bert, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    script = load_script("attention_heatmap")
    for head in ("mean", "3"):
        out = tmp_path / f"attention-{head}.png"
        assert script.main(["--model", str(tiny_bert), "--text", "오늘 서울의 날씨는 맑다.", "--layer", "1",
                            "--head", head, "--output", str(out)]) == 0
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert script.main(["--model", str(tiny_bert), "--text", "a", "--layer", "2", "--output", str(out)]) == 2
    assert "the model has 2 layers" in capsys.readouterr().err


def test_heatmap_without_matplotlib_says_how_to_install(tiny_bert, tmp_path, monkeypatch, capsys):
    script = load_script("attention_heatmap")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert script.main(["--model", str(tiny_bert), "--text", "a", "--output", str(tmp_path / "x.png")]) == 2
    assert "matplotlib is not installed" in capsys.readouterr().err and not (tmp_path / "x.png").exists()
