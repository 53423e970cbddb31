"""ModernBERT: equal to sentence-transformers on tiny random checkpoints of every config variant (global
layers every 2 or 3, windows small enough that texts cross them many times, with and without biases,
transformers 4's and 5's config keys), on the reference and the packed path; its sliding-window attention
against full masked attention; traces against transformers eager; bf16/int8 near fp32; strict configs;
the first training step against sentence-transformers' loss."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import corpus, single_thread
from new_archs import make_modernbert_checkpoint

from minisbert import SentenceEncoder
from minisbert.errors import ConfigError
from minisbert.fast import modernbert as fast_modernbert
from minisbert.fast.modernbert import local_attention
from minisbert.models.modernbert import ModernBertConfig, window_bias

pytestmark = pytest.mark.usefixtures("one_thread_module")
TOL = 1e-5

VARIANTS = {
    # global layers 0 and 3, window 8 each way (local_attention 16): the tiny gte-modernbert
    "every3": {},
    # global every 2nd layer, a 4-token window each way, biases everywhere, the tanh GELU
    "every2-biases": dict(global_attn_every_n_layers=2, local_attention=8, attention_bias=True, mlp_bias=True,
                          norm_bias=True, hidden_activation="gelu_pytorch_tanh"),
}


def v4_config(folder):
    """Rewrite a folder's config.json as transformers 4 wrote it (the released checkpoints): no
    ``layer_types``/``rope_parameters``, the two bases as keys, here other than the defaults."""
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    for key in ("layer_types", "rope_parameters"):
        cfg.pop(key)
    cfg.update(global_rope_theta=40000.0, local_rope_theta=5000.0, global_attn_every_n_layers=2)
    path.write_text(json.dumps(cfg))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("modernbert")
    out = {name: make_modernbert_checkpoint(root / name, config=cfg, seed=i) for i, (name, cfg) in
           enumerate(VARIANTS.items())}
    out["cls-normalize"] = make_modernbert_checkpoint(root / "cls", pooling="cls", normalize=True, seed=5,
                                                      prompts={"query": "query: ", "document": "document: "})
    out["v4-config"] = v4_config(make_modernbert_checkpoint(root / "v4", seed=7))
    return out


def texts() -> list[str]:
    """Mixed lengths up to past max_seq_length (2,048 tokens): the corpus, edge cases, long passages."""
    return corpus(40) + ["", "   ", "😀😀 🇰🇷", "x" * 3000, "한국어 문장입니다. " * 180, "a\u0301 e\u0301 (NFD)"]


def st_encode(folder, sentences, **kw):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu").encode(sentences, **kw)


@pytest.mark.parametrize("name", list(VARIANTS) + ["cls-normalize", "v4-config"])
def test_equal_sentence_transformers(folders, name):
    sentences = texts()
    want = st_encode(folders[name], sentences, batch_size=16)
    for fast in (True, False):
        enc = SentenceEncoder(str(folders[name]), fast=fast)
        assert enc.encode(sentences[:1]).shape == (1, want.shape[1])
        got = enc.encode(sentences, batch_size=16)
        one = enc.encode(sentences[-4:], batch_size=1)  # batch size 1, the longest texts
        diff = max(np.abs(got - want).max(), np.abs(one - want[-4:]).max())
        print(f"{name} fast={fast}: max abs diff {diff:.2e}")
        assert diff <= TOL, f"{name} fast={fast}: {diff:.3e}"


def test_long_texts_reach_max_seq_length_and_token_ids_match(folders):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(folders["every3"]), device="cpu")
    enc = SentenceEncoder(str(folders["every3"]))
    edge = ["한국어와 English, 숫자 1,234원", "😀👍🏽 이모지", "\u1100\u1161\u11a8 (NFD 한글)", "", "  \t \n ",
            "가나다라마바사 " * 1500]
    want = st.tokenize(edge)["input_ids"].tolist()
    got = enc.tokenizer.encode_ids(edge)
    pad = st.tokenizer.pad_token_id
    assert [[t for t in row if t != pad] or [pad] for row in want] == [row or [pad] for row in got]
    assert max(len(r) for r in got) == enc.max_seq_length == 2048 >= 1024


@pytest.mark.parametrize("T,window,block,pads", [(40, 4, 8, 0), (40, 4, 16, 7), (33, 8, 128, 0), (200, 16, 24, 50),
                                                (17, 8, 4, 3)])
def test_local_attention_equals_full_masked_attention(T, window, block, pads):
    """Blocks of queries against the keys their window reaches = full attention under the band mask."""
    torch.manual_seed(0)
    b, H, D = 2, 3, 8
    q, k, v = (torch.randn(b, H, T, D) for _ in range(3))
    mask = torch.ones(b, T, dtype=torch.long)
    mask[1, T - pads:] = 0
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=window_bias(mask, window, q.dtype))
    got = local_attention(q, k, v, mask.bool() if pads else None, window, block)
    real = mask.bool()[:, None, :, None].expand_as(want)
    assert (got - want)[real].abs().max() <= 1e-6


def test_local_layers_never_build_a_t_by_t_mask(folders, monkeypatch):
    """The packed path's local layers at 2,048 tokens attend in blocks: no (T, T) score or mask anywhere."""
    shapes = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        shapes.append((q.shape[2], k.shape[2]))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(fast_modernbert.F, "scaled_dot_product_attention", spy)
    enc = SentenceEncoder(str(folders["every3"]))
    enc.encode(["x" * 3000])
    T = 2048
    full = [s for s in shapes if s == (T, T)]
    assert len(full) == 2  # the two global layers (0 and 3) only
    assert all(k <= fast_modernbert.LOCAL_BLOCK + 2 * 8 for q, k in shapes if (q, k) != (T, T))


def test_trace_equals_transformers_eager(folders):
    import transformers

    from minisbert.trace import trace

    path = folders["every2-biases"]
    hf = transformers.AutoModel.from_pretrained(str(path), attn_implementation="eager").eval()
    enc = SentenceEncoder(str(path))
    sentences = ["짧은 문장", "조금 더 긴 문장이 여기에 있습니다, 창을 여러 번 넘도록. " * 3]
    traces = trace(enc, sentences)
    for tr in traces:
        ids = tr.input_ids[None]
        with torch.no_grad():
            out = hf(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True,
                     output_attentions=True)
        h = (tr.hidden_states - torch.stack([s[0] for s in out.hidden_states])).abs().max()
        a = (tr.attentions - torch.stack([s[0] for s in out.attentions])).abs().max()
        assert h <= TOL and a <= TOL, f"hidden states {h:.2e}, attentions {a:.2e}"
        assert tr.attentions.shape[0] == 4 and tr.hidden_states.shape[0] == 5


@pytest.mark.parametrize("kw", [{"dtype": "bfloat16"}, {"quantize": "int8"}], ids=["bf16", "int8"])
def test_half_and_int8_close_to_reference(folders, kw):
    from minisbert.fast.linear import mkldnn_usable

    if "dtype" in kw and not mkldnn_usable(torch.bfloat16):
        pytest.skip("bf16 linears do not run on this CPU")
    sentences = texts()
    ref = SentenceEncoder(str(folders["every3"]), fast=False).encode(sentences)
    got = SentenceEncoder(str(folders["every3"]), **kw).encode(sentences)
    cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
    print(f"{kw}: min cosine to fp32 reference {cos.min():.6f}")
    assert cos.min() >= 0.999 and np.abs(got - ref).max() > TOL


BASE = dict(vocab_size=100, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=24,
            max_position_embeddings=64, pad_token_id=0)


@pytest.mark.parametrize("changes,needle", [
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
    (dict(rope_parameters={"full_attention": {"rope_type": "yarn", "rope_theta": 1e4}}), "rope_parameters"),
    (dict(layer_types=["full_attention", "chunked_attention", "full_attention"]), "layer_types"),
    (dict(layer_types=["full_attention"]), "layer_types has 1 entries"),
    (dict(hidden_activation="geglu_fancy"), "hidden_activation"),
    (dict(head_dim=4), "head_dim"),
    (dict(hidden_size=18, num_attention_heads=2), "odd"),
    (dict(global_attn_every_n_layers=0), "global_attn_every_n_layers"),
    (dict(norm_bias="yes"), "norm_bias"),
    (dict(attention_dropout=1.5), "attention_dropout"),
    (dict(is_causal=True), "is_causal"),
])
def test_config_refuses_what_it_does_not_implement(changes, needle):
    with pytest.raises(ConfigError, match=needle):
        ModernBertConfig.from_hf(dict(BASE, **changes))


def test_config_reads_both_generations_of_keys():
    v4 = ModernBertConfig.from_hf(dict(BASE, global_attn_every_n_layers=2, global_rope_theta=1e5,
                                       local_rope_theta=None))
    assert v4.layer_types == ("full_attention", "sliding_attention", "full_attention")
    assert v4.local_rope_theta == v4.global_rope_theta == 1e5  # transformers 4: None means the global base
    v5 = ModernBertConfig.from_hf(dict(BASE, layer_types=["full_attention"] * 3, rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 7e4},
        "sliding_attention": {"rope_type": "default", "rope_theta": 3e3}}))
    assert v5.layer_types == ("full_attention",) * 3 and (v5.global_rope_theta, v5.local_rope_theta) == (7e4, 3e3)


def test_first_training_step_equals_sentence_transformers(tmp_path):
    """MultipleNegativesRankingLoss's first loss and every gradient against sentence-transformers' on the
    same batch (the bounds of tests/test_train.py), with the norms old_fit decays by their names."""
    from test_train import MNR, hf_names, recipe, relative, st_gradients, write_files

    from minisbert.train import loop, optim

    path = make_modernbert_checkpoint(tmp_path / "m", max_seq_length=64, seed=3)
    files = write_files(tmp_path)
    task = loop.build_tasks(recipe(files, [MNR]), random.Random(0))[0]
    batch = list(range(8))
    with single_thread():
        ours = SentenceEncoder(str(path))
        with ours.mode(train=True):
            loss = loop.batch_loss(ours, task, batch)
            loss.backward()
        st_loss, st_grads = st_gradients(path, MNR, task, batch)
        _, truth = st_gradients(path, MNR, task, batch, torch.float64)
    assert abs(loss.item() - st_loss) <= 1e-5 * abs(st_loss)
    names = hf_names(path, ours)
    for name, p in ours.model.named_parameters():
        st_grad, exact = st_grads[names[name]], truth[names[name]]
        st_error, ours_error = relative(st_grad, exact), relative(p.grad, exact)
        assert ours_error <= max(1e-5, 2 * st_error), f"{name}: {ours_error:.2e} vs old_fit's {st_error:.2e}"
    # old_fit decays every parameter whose Hugging Face name lacks "bias"/"LayerNorm": all of ModernBERT's
    groups = optim.adamw([ours.model], recipe(files, [MNR]).fit).param_groups
    assert len(groups[1]["params"]) == 0 and len(groups[0]["params"]) == len(list(ours.model.parameters()))


@pytest.mark.slow
def test_steps_equal_old_fit(tmp_path):
    """16 steps of MultipleNegativesRankingLoss at lr 1e-3 through minisbert's fit and old_fit, with the
    bounds tests/test_train.py derives (per-step loss, the weights' update, the trained embeddings)."""
    from test_train import MNR, run_both, write_files

    path = make_modernbert_checkpoint(tmp_path / "m", max_seq_length=64, seed=3)
    r = run_both(path, write_files(tmp_path), [MNR])
    rel = np.abs(r["ours"] - r["st"]) / np.abs(r["st"])
    print(f"modernbert mnr: loss rel max {rel.max():.2e}, update {r['update']:.2e}, embeddings {r['embeddings']:.2e}")
    assert len(r["ours"]) == 16 and rel.max() <= 1e-4
    assert r["update"] <= 5e-3 and r["embeddings"] <= 5e-3


def test_plain_transformers_folder_loads_as_sentence_transformers_does(folders, tmp_path):
    """A.X-Encoder-base is a transformers folder (no modules.json): Transformer + mean pooling, as ST reads it."""
    import shutil

    plain = tmp_path / "plain"
    shutil.copytree(folders["every3"], plain, ignore=shutil.ignore_patterns("modules.json", "1_Pooling",
                                                                            "sentence_bert_config.json"))
    sentences = texts()[:12]
    want = st_encode(plain, sentences)
    got = SentenceEncoder(str(plain)).encode(sentences)
    assert np.abs(got - want).max() <= TOL


def test_inspect_describes_the_alternating_layers(folders):
    from minisbert.inspect import describe, format_text

    info = describe(str(folders["every2-biases"]))
    assert info["model_type"] == "modernbert"
    assert info["alternating_attention"]["global_layers"] == [0, 2]
    assert info["alternating_attention"]["window"] == 4
    text = format_text(info)
    assert "global layers [0, 2]" in text and "keys within ±4" in text and "no bias in none" in text


def test_manifest_lists_the_new_embedders_with_supported_architectures():
    from minisbert.io import hub
    from minisbert.models import ARCHITECTURES

    names = hub.short_names()
    for name in ("bge-m3", "KURE-v1", "BGE-m3-ko", "KoE5", "multilingual-e5-base", "gte-modernbert-base",
                 "modernbert-embed-base", "A.X-Encoder-base"):
        assert names[name]["architecture"] in ARCHITECTURES, name
    assert names["KoE5"]["prompts"] == {"query": "query: ", "passage": "passage: "}


@pytest.mark.slow
def test_dropout_noise_equals_transformers(tmp_path):
    """Train-mode noise at transformers' three dropout sites (embeddings, attention probabilities and
    output, GeGLU): the mean squared deviation from eval mode over 200 forwards agrees with transformers'
    within 4 standard errors (Welch), as tests/test_train.py checks it for the other architectures.
    Measured: leaving out the GeGLU's, the attention output's or the probabilities' dropout on our side
    gives z = -6.3, -9.2, -7.3."""
    from test_train import dropout_noise

    path = make_modernbert_checkpoint(tmp_path / "noisy", max_seq_length=64, seed=4, config=dict(
        embedding_dropout=0.1, attention_dropout=0.1, mlp_dropout=0.1, initializer_range=0.3))
    z, a, b = dropout_noise(path)
    print(f"modernbert dropout noise: minisbert {a:.4e}, transformers {b:.4e} (z = {z:.1f})")
    assert abs(z) <= 4


def test_geglu_row_chunks_and_local_blocks_change_nothing(folders):
    """The packed path's tuned settings are layouts of the same sums: chunked GeGLU rows give the same
    bits as one pass; other local block sizes the same embeddings within float32 noise."""
    from minisbert.fast.runner import fast_forward

    enc = SentenceEncoder(str(folders["every3"]))
    ids = enc.tokenizer.encode_ids(texts())
    runs = {}
    for name, kw in {"default": {}, "chunked": dict(ffn_rows=64), "blocks": dict(local_block=24)}.items():
        enc.runner.forward = fast_forward(enc.model, **kw)
        runs[name] = enc.runner.embed(ids)
    assert torch.equal(runs["default"], runs["chunked"])
    assert (runs["default"] - runs["blocks"]).abs().max() <= 1e-6
