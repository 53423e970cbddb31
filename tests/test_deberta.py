"""DeBERTa-v2 (kf-deberta-multitask): every config option against transformers' DebertaV2Model (hidden
states, attentions) and sentence-transformers (embeddings), plus the bucket function by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import SEED_CONFIGS, corpus, make_checkpoint, st_model

from minisbert import SentenceEncoder
from minisbert.errors import CheckpointError, ConfigError
from minisbert.models import deberta_v2
from minisbert.models.deberta_v2 import DebertaV2Config, log_bucket, relative_positions

TOL = 1e-5

# Each option alone, then combined. The seed config is kf-deberta's: buckets 256, max_relative -1
# (-> 512), p2c+c2p, shared q/k, LayerNorm'ed table, no absolute positions, no token types, no conv.
OPTIONS = {
    "kf-deberta": {},
    "buckets-off": {"position_buckets": -1},  # S = max_position_embeddings = 512
    "buckets-8": {"position_buckets": 8},  # S = 8: long inputs hit the clamp
    "max-rel-16": {"position_buckets": -1, "max_relative_positions": 16},
    "buckets-8-max-rel-16": {"position_buckets": 8, "max_relative_positions": 16},
    "own-pos-proj": {"share_att_key": False},
    "c2p": {"pos_att_type": ["c2p"]},
    "p2c": {"pos_att_type": ["p2c"]},
    "c2c-only": {"pos_att_type": []},
    "c2p-own-proj": {"pos_att_type": ["c2p"], "share_att_key": False},
    "p2c-own-proj": {"pos_att_type": ["p2c"], "share_att_key": False},
    "rel-norm-none": {"norm_rel_ebd": "none"},
    "abs-pos": {"position_biased_input": True},
    "abs-pos-types": {"position_biased_input": True, "type_vocab_size": 2},
    "embed-proj": {"embedding_size": 32},
    "head-size": {"attention_head_size": 16},
    "conv-gelu": {"conv_kernel_size": 3, "conv_act": "gelu"},
    "conv-tanh-groups-2": {"conv_kernel_size": 3, "conv_act": "tanh", "conv_groups": 2},
    # deberta-v2-xlarge-like: conv on the first block, own keys off, no table LayerNorm
    "xlarge-like": {"conv_kernel_size": 3, "conv_act": "gelu", "norm_rel_ebd": "none", "position_buckets": -1},
    "everything": {"position_buckets": 8, "max_relative_positions": 16, "share_att_key": False,
                   "norm_rel_ebd": "none", "position_biased_input": True, "type_vocab_size": 2,
                   "embedding_size": 32, "attention_head_size": 16, "conv_kernel_size": 3,
                   "conv_act": "tanh", "conv_groups": 2},
}


def long_texts() -> list[str]:
    # conftest.corpus() drops its passages when KorSTS is present, so build long ones here.
    base = corpus(60)
    return [" ".join(base[i:i + k]) for i, k in ((0, 8), (10, 25), (20, 45))] + ["한국어 " * 600]


def texts(n: int) -> list[str]:
    return corpus(n) + long_texts() + ["", "a"]


def assert_close(a, b, what: str, tol: float = TOL) -> None:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    diff = np.abs(a - b)
    assert diff.max() <= tol, f"{what}: max abs diff {diff.max():.3e}, mean {diff.mean():.3e} (tol {tol})"


_CHECKPOINTS: dict = {}


# 64-wide models: a second intra-op thread only adds synchronisation, and on a shared 2-core
# machine oversubscription made this file 6x slower (231 s vs 35 s). Restored after the module.
pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """checkpoint(name, max_seq_length) -> folder, built once per module."""
    def get(name: str, max_seq_length: int = 128):
        key = (name, max_seq_length)
        if key not in _CHECKPOINTS:
            folder = tmp_path_factory.mktemp(f"deberta-{name}-{max_seq_length}")
            _CHECKPOINTS[key] = make_checkpoint(folder, "deberta-v2", max_seq_length=max_seq_length,
                                                config=OPTIONS[name])
        return _CHECKPOINTS[key]
    return get


def compare(path, sentences: list[str], batch_size: int, what: str) -> None:
    """Every layer's states (non-pad) and attentions equal transformers; embeddings equal ST."""
    ours, ref = SentenceEncoder.from_pretrained(path), st_model(path)
    assert ours.max_seq_length == ref.max_seq_length
    hf = ref[0].auto_model.eval()
    ids, mask = ours.tokenizer(sentences[:16])
    record: dict = {}
    with torch.inference_mode():
        last = ours.model(ids, mask, record=record)
        out = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    keep = mask.bool()
    assert_close(last[keep], out.last_hidden_state[keep], f"{what}: last hidden state")
    assert len(record["hidden_states"]) == len(out.hidden_states)
    for i, (a, b) in enumerate(zip(record["hidden_states"], out.hidden_states)):
        assert_close(a[keep], b[keep], f"{what}: hidden state {i}")
    for i, (a, b) in enumerate(zip(record["attentions"], out.attentions)):
        assert_close(a, b, f"{what}: attention {i}")  # pad rows too: both use the pair mask
    a = ours.encode(sentences, batch_size=batch_size)
    b = ref.encode(sentences, batch_size=batch_size)
    assert_close(a, b, f"{what}: embeddings vs sentence-transformers, batch {batch_size}")


@pytest.mark.parametrize("name", list(OPTIONS))
def test_option_equals_transformers_and_sentence_transformers(name, checkpoint):
    compare(checkpoint(name), texts(12), 8, name)


@pytest.mark.parametrize("name", ["kf-deberta", "everything"])
@pytest.mark.parametrize("batch_size", [1, 32])
def test_batches_equal_sentence_transformers(name, batch_size, checkpoint):
    sentences = texts(60 if batch_size == 32 else 20)
    path = checkpoint(name)
    a = SentenceEncoder.from_pretrained(path).encode(sentences, batch_size=batch_size)
    b = st_model(path).encode(sentences, batch_size=batch_size)
    assert_close(a, b, f"{name}, batch {batch_size}")


@pytest.mark.parametrize("name", ["kf-deberta", "buckets-off"])
def test_512_tokens_reach_the_log_buckets(name, checkpoint):
    """With 512 tokens distances beyond 128 take kf-deberta's log buckets (and S=512 without them)."""
    path = checkpoint(name, 512)
    assert max(len(i) for i in SentenceEncoder.from_pretrained(path).tokenizer.encode_ids(long_texts())) == 512
    compare(path, long_texts() + corpus(4), 4, f"{name}, 512 tokens")


# ---------------------------------------------------------------------------------------------------
# Buckets and relative positions, by hand


def test_log_bucket_by_hand():
    # buckets 8 -> mid 4; max_position 16. |d| <= 4 stays d. Beyond:
    #   sign(d) * (4 + ceil(ln(|d|/4) / ln(15/4) * 3)), ln(15/4) = 1.32176
    #   d=5: ln 1.25 = 0.22314 -> 0.506 -> ceil 1 -> 5     d=6: ln 1.5 = 0.40547 -> 0.920 -> 1 -> 5
    #   d=7: ln 1.75 = 0.55962 -> 1.270 -> 2 -> 6          d=8: ln 2 = 0.69315 -> 1.573 -> 2 -> 6
    #   d=10: ln 2.5 = 0.91629 -> 2.080 -> 3 -> 7          d=15: exactly 3 -> 7 (= S - 1, the last row)
    #   d=16: ln 4 = 1.38629 -> 3.146 -> 4 -> 8            d=20: ln 5 = 1.60944 -> 3.653 -> 4 -> 8
    d = torch.tensor([-20, -10, -7, -5, -4, -1, 0, 1, 3, 4, 5, 6, 7, 8, 10, 15, 16, 20])
    want = [-8, -7, -6, -5, -4, -1, 0, 1, 3, 4, 5, 5, 6, 6, 7, 7, 8, 8]
    assert log_bucket(d, 8, 16).tolist() == want


def test_relative_positions_by_hand():
    # No buckets, S = 2, T = 4: distance i - j, table row clamp(d + 2, 0, 3); every row reachable.
    rp = relative_positions(4, 2, -1, 2)
    assert rp.buckets.tolist() == [[0, -1, -2, -3], [1, 0, -1, -2], [2, 1, 0, -1], [3, 2, 1, 0]]
    assert rp.c2p.tolist() == [[2, 1, 0, 0], [3, 2, 1, 0], [3, 3, 2, 1], [3, 3, 3, 2]]
    assert rp.p2c.tolist() == [[2, 3, 3, 3], [1, 2, 3, 3], [0, 1, 2, 3], [0, 0, 1, 2]]  # row of j - i
    assert rp.rows == slice(0, 4)
    # S = 8, T = 3: distances -2..2 reach rows 6..10 only; indices count from row 6.
    rp = relative_positions(3, 8, -1, 8)
    assert rp.rows == slice(6, 11)
    assert rp.c2p.tolist() == [[2, 1, 0], [3, 2, 1], [4, 3, 2]]


def test_disentangled_terms_follow_the_formula(checkpoint):
    """c2p[i,j] = q_i . Kr[row(i-j)] / s and p2c[i,j] = k_j . Qr[row(i-j)] / s, s = sqrt(3 D), written
    as loops over the table, independent of the gathers and the transpose in the model."""
    enc = SentenceEncoder.from_pretrained(checkpoint("buckets-8"))
    ids, mask = enc.tokenizer(["오늘 서울의 날씨는 맑고 바람이 조금 분다."])
    record: dict = {}
    with torch.inference_mode():
        enc.model(ids, mask, record=record)
        x, attn, cfg = record["hidden_states"][0][0], enc.model.blocks[0].attn, enc.model.config
        table = enc.model.rel_ln(enc.model.rel_embed.weight)  # (2S, C)
        H, D, S, T = cfg.num_attention_heads, cfg.attention_head_size, cfg.att_span, x.shape[0]
        q, k = attn.query(x).view(T, H, D), attn.key(x).view(T, H, D)
        q_r, k_r = attn.query(table).view(2 * S, H, D), attn.key(table).view(2 * S, H, D)
        s = math.sqrt(3 * D)
        c2p, p2c = torch.zeros(H, T, T), torch.zeros(H, T, T)
        for i in range(T):
            for j in range(T):
                row = min(max(int(log_bucket(torch.tensor(i - j), 8, 512)) + S, 0), 2 * S - 1)
                c2p[:, i, j] = (q[i] * k_r[row]).sum(-1) / s
                p2c[:, i, j] = (k[j] * q_r[row]).sum(-1) / s
    assert T > S  # some distances are clamped to the table's ends
    assert_close(record["c2p"][0][0], c2p, "c2p", 1e-6)
    assert_close(record["p2c"][0][0], p2c, "p2c", 1e-6)
    assert_close(record["c2c"][0][0], (q.transpose(0, 1) @ k.permute(1, 2, 0)) / s, "c2c", 1e-6)


@pytest.mark.parametrize("name, terms", [("kf-deberta", {"c2c", "c2p", "p2c"}), ("c2p", {"c2c", "c2p"}),
                                         ("p2c-own-proj", {"c2c", "p2c"}), ("c2c-only", {"c2c"})])
def test_recorded_terms_sum_to_the_softmaxed_logits(name, terms, checkpoint):
    enc = SentenceEncoder.from_pretrained(checkpoint(name))
    ids, mask = enc.tokenizer(corpus(6))
    record: dict = {}
    with torch.inference_mode():
        enc.model(ids, mask, record=record)
    L, (B, T) = enc.model.config.num_hidden_layers, ids.shape
    assert {"c2c", "c2p", "p2c"} & set(record) == terms
    assert all(len(record[t]) == L for t in terms) and len(record["hidden_states"]) == L + 1
    assert torch.equal(record["rel_buckets"], log_bucket(torch.arange(T)[:, None] - torch.arange(T), 256, 512))
    pair = (mask[:, None, :, None] * mask[:, None, None, :]).bool()  # (B, 1, T, T)
    for layer in range(L):
        logits = sum(record[t][layer] for t in terms)  # (B, H, T, T)
        assert logits.shape == (B, enc.model.config.num_attention_heads, T, T)
        probs = logits.masked_fill(~pair, torch.finfo(logits.dtype).min).softmax(-1)
        assert_close(probs, record["attentions"][layer], f"{name} layer {layer}: softmax(sum of terms)", 1e-6)


# ---------------------------------------------------------------------------------------------------
# The position cache


def test_position_cache_is_lazy_exact_and_invalidated(checkpoint):
    """The packed path keeps the position projections (the reference recomputes them every forward, as
    transformers does): computed on first use, reused, and recomputed after an in-place edit or a
    dtype move of a weight they read."""
    enc = SentenceEncoder.from_pretrained(checkpoint("everything"), fast=True)
    if not enc.fast:
        pytest.skip("no fast path for this config")
    model, forward = enc.model, enc.runner.forward
    assert not forward.positions_cached  # nothing computed while building on meta or loading
    reference = lambda: [tuple(t.clone() if t is not None else None for t in pair)  # noqa: E731
                         for pair in model.position_projections()]
    with torch.inference_mode():
        first = forward.position_projections()
        assert forward.position_projections()[0][0] is first[0][0]  # reused
        for (k, q), (rk, rq) in zip(first, reference()):
            assert torch.equal(k, rk) and torch.equal(q, rq)
        # In-place edits to a weight the projections read invalidate the cache.
        model.rel_embed.weight.mul_(2)
        edited = forward.position_projections()
        assert edited[0][0] is not first[0][0] and torch.equal(edited[0][0], reference()[0][0])
        # So does a dtype change.
        model.double()
        assert forward.position_projections()[0][0].dtype == torch.float64


def test_only_reachable_table_rows_are_used():
    # kf-deberta: S = 256, 512 rows; 128 tokens reach distances -127..127 only: 255 rows.
    assert relative_positions(128, 256, 256, 512).rows == slice(129, 384)
    # 512 tokens reach every row through the log buckets: |d| = 511 -> bucket 255 -> row 511.
    assert relative_positions(512, 256, 256, 512).rows == slice(1, 512)


# ---------------------------------------------------------------------------------------------------
# Config and checkpoint names


def test_config_refuses_what_is_not_implemented():
    seed = dict(SEED_CONFIGS["deberta-v2"], vocab_size=100)
    DebertaV2Config.from_hf(seed)
    assert DebertaV2Config.from_hf(dict(seed, pos_att_type="P2C|c2p")).pos_att_type == ("c2p", "p2c")
    bad = {"relative_attention": False, "pos_att_type": ["c2p", "p2p"], "norm_rel_ebd": "batch_norm",
           "hidden_act": "swish", "conv_act": "mish", "conv_kernel_size": 2, "conv_groups": 3,
           "position_buckets": 0, "max_relative_positions": -2, "attention_head_size": 8,
           "share_att_key": "yes", "type_vocab_size": -1}
    for key, value in bad.items():
        with pytest.raises(ConfigError, match=f"{key}="):
            DebertaV2Config.from_hf(dict(seed, **{key: value}))
    with pytest.raises(ConfigError, match="relative_attention"):
        DebertaV2Config.from_hf({k: v for k, v in seed.items() if k != "relative_attention"})


def test_attention_head_size_that_differs_fails_upstream_too():
    """attention_head_size x heads != hidden cannot run in transformers (output dense is C x C), so
    refusing it loses nothing; the value equal to hidden/heads is accepted (option "head-size")."""
    import transformers

    cfg = dict(SEED_CONFIGS["deberta-v2"], vocab_size=100, attention_head_size=8)
    hf = transformers.DebertaV2Model(transformers.DebertaV2Config(**cfg)).eval()
    with pytest.raises(RuntimeError):
        hf(input_ids=torch.tensor([[2, 7, 3]]))
    with pytest.raises(ConfigError, match="attention_head_size=8"):
        deberta_v2.build(cfg)


@pytest.mark.parametrize("legacy", [True, False])
def test_checkpoint_names_with_heads_prefix_and_strictness(legacy, checkpoint):
    """A DebertaV2ForMaskedLM state dict ("deberta." prefix, cls./lm_predictions. heads) loads; a
    stray key is refused by name."""
    import transformers

    from minisbert.io.weights import map_state_dict

    cfg = dict(SEED_CONFIGS["deberta-v2"], **OPTIONS["everything"], vocab_size=100, legacy=legacy)
    mlm = transformers.DebertaV2ForMaskedLM(transformers.DebertaV2Config(**cfg)).eval()
    state = mlm.state_dict()
    assert any(k.startswith("cls." if legacy else "lm_predictions.") for k in state)
    with torch.device("meta"):
        model = deberta_v2.build(cfg)
    model.load_state_dict(map_state_dict(state, deberta_v2, model, "mlm"), strict=True, assign=True)
    ids = torch.tensor([[2, 10, 11, 12, 3, 0], [2, 13, 3, 0, 0, 0]])
    mask = (ids != 0).long()
    with torch.inference_mode():
        a, b = model(ids, mask), mlm.deberta(input_ids=ids, attention_mask=mask).last_hidden_state
    assert_close(a[mask.bool()], b[mask.bool()], "DebertaV2ForMaskedLM's encoder")
    with pytest.raises(CheckpointError, match="encoder.stray"):
        map_state_dict(dict(state, **{"deberta.encoder.stray": torch.zeros(1)}), deberta_v2, model, "mlm")


# ---------------------------------------------------------------------------------------------------
# Base size


@pytest.mark.slow  # a 768 x 12 model with a 130000 vocab, built and run twice: ~9 s on 2 free cores
def test_kf_deberta_base_size_through_encode(tmp_path):
    """kf-deberta's real sizes (768 x 12, 12 heads, 3072 FFN, 130000 vocab), random weights, saved by
    transformers and read back through SentenceEncoder; compared with transformers' mean pooling."""
    import json

    import transformers

    path = make_checkpoint(tmp_path / "base", "deberta-v2")  # tokenizer + layout; weights replaced below
    cfg = dict(SEED_CONFIGS["deberta-v2"], hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
               intermediate_size=3072, vocab_size=130000)
    torch.manual_seed(0)
    hf = transformers.DebertaV2Model(transformers.DebertaV2Config(**cfg)).eval()
    hf.save_pretrained(path, safe_serialization=True)
    (path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 768, "pooling_mode_mean_tokens": True}))
    enc = SentenceEncoder.from_pretrained(path)
    assert enc.embedding_dim == 768 and enc.max_seq_length == 128
    sentences = ["안녕하세요?", "한국어 문장 임베딩을 위한 모델입니다.", "한국어 " * 200, "a"]
    ours = enc.encode(sentences, batch_size=4)
    ids, mask = enc.tokenizer(sentences)
    with torch.inference_mode():
        states = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask[:, :, None].float()
    assert_close(ours, (states * m).sum(1) / m.sum(1).clamp(min=1e-9), "base size vs transformers")
