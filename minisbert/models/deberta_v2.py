"""DeBERTa-v2 encoder (He et al., 2021) with disentangled attention, post-LayerNorm.

What differs from BERT, in the order the data flows (#L: lines of the transformers file it mirrors,
https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/models/deberta_v2/modeling_deberta_v2.py):
- embeddings: word (+ absolute positions only if ``position_biased_input``) (+ token type 0 only if
  ``type_vocab_size > 0``), projected when ``embedding_size != hidden_size``, LayerNorm, then
  multiplied by the attention mask so pads are exact zeros (#L480);
- no absolute positions in attention: every score gets two extra terms against a shared table of
  relative-position embeddings (``rel_embeddings``, LayerNorm'ed when ``norm_rel_ebd`` says so):
  content->position (c2p) and position->content (p2c), as ``pos_att_type`` selects (#L270);
- relative distances are log-bucketed beyond ``position_buckets / 2`` (#L56) and clamped into the
  table's ``2 * att_span`` rows (#L312, #L330); the p2c term is gathered along the key's row and then
  transposed (#L330-#L336);
- the scale is ``1 / sqrt(D * (1 + #position terms))``, applied to ``k`` before ``q k^T`` and to each
  position term after its gather (#L231-#L236);
- the mask is a (B, 1, T, T) pair mask ``mask_i * mask_j`` filled with ``finfo.min`` (#L595, #L251), so
  a pad query row is uniform, as in transformers;
- an optional convolution (``conv_kernel_size > 0``, deberta-v2-xlarge) mixes neighbouring embeddings
  into the first block's output (#L443, #L657);
- dropout in train mode at BERT's four places plus two of DeBERTa's own: on the relative table each
  block reads (#L239) and on the convolution's output (#L460), ``hidden_dropout_prob`` both.
The position keys/queries (``key_proj(LN(rel_embeddings))`` etc.) do not depend on the input; this
reference computes them every forward, as transformers does (the fast path caches them), and uses
only the table rows a length can reach.

Shape legend: B batch, T tokens, C hidden, E embedding width, H heads, D head dim, F feed-forward
width, S ``att_span`` (the table has 2S rows), R the rows a length T reaches (R <= 2S).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
from torch import nn

from minisbert.errors import ConfigError
from minisbert.models.bert import ACTIVATIONS, BertConfig, FeedForward, require_positive

# conv_act values; transformers' ConvLayer defaults to tanh.
CONV_ACTIVATIONS = dict(ACTIVATIONS, tanh=torch.tanh)
POSITION_TERMS = ("c2p", "p2c")


@dataclass(frozen=True)
class DebertaV2Config:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    pad_token_id: int
    hidden_act: str
    embedding_size: int
    attention_head_size: int
    position_biased_input: bool
    max_relative_positions: int  # -1: max_position_embeddings
    position_buckets: int  # -1: no bucketing
    pos_att_type: tuple[str, ...]
    share_att_key: bool
    norm_rel_ebd: str
    conv_kernel_size: int
    conv_act: str
    conv_groups: int
    hidden_dropout_prob: float
    attention_probs_dropout_prob: float

    @classmethod
    def from_hf(cls, hf: dict) -> "DebertaV2Config":
        """Build from a Hugging Face ``config.json`` dict, refusing what this file does not implement.
        Missing keys take transformers' defaults (which differ from kf-deberta's values)."""
        if hf.get("relative_attention") is not True:  # transformers' default is False
            raise ConfigError(f"config.json: relative_attention={hf.get('relative_attention')!r} is not implemented "
                              f"(supported: True; attention without relative positions is not DeBERTa's)")
        hidden, heads = hf.get("hidden_size"), hf.get("num_attention_heads")
        head_default = hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads else None
        defaults = {"type_vocab_size": 0, "layer_norm_eps": 1e-7, "pad_token_id": 0, "hidden_act": "gelu",
                    "embedding_size": hidden, "attention_head_size": head_default,
                    "position_biased_input": True, "max_relative_positions": -1, "position_buckets": -1,
                    "pos_att_type": None, "share_att_key": False, "norm_rel_ebd": "none",
                    "conv_kernel_size": 0, "conv_act": "tanh", "conv_groups": 1,
                    "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}
        values = {f.name: hf.get(f.name, defaults.get(f.name)) for f in fields(cls)}
        values["pos_att_type"] = _parse_pos_att_type(values["pos_att_type"])
        if isinstance(values["norm_rel_ebd"], str):
            values["norm_rel_ebd"] = values["norm_rel_ebd"].strip().lower()  # transformers lowercases it
        cfg = cls(**values)
        cfg.validate()
        return cfg

    @property
    def att_span(self) -> int:
        """S: the distance the relative table covers on each side (its 2S rows are -S .. S-1)."""
        return self.position_buckets if self.position_buckets > 0 else self.max_relative

    @property
    def max_relative(self) -> int:
        return self.max_relative_positions if self.max_relative_positions > 0 else self.max_position_embeddings

    def validate(self) -> None:
        BertConfig.validate(self)  # sizes, heads, hidden_act, type_vocab_size, eps, pad id, dropout: BERT's
        require_positive(self, "embedding_size", "attention_head_size", "conv_groups")
        if self.attention_head_size * self.num_attention_heads != self.hidden_size:
            # transformers builds q/k/v of width H*D but an output dense of C x C, so it fails too.
            raise ConfigError(f"config.json: attention_head_size={self.attention_head_size} x num_attention_heads="
                              f"{self.num_attention_heads} != hidden_size={self.hidden_size} is not implemented "
                              f"(transformers' DebertaV2 cannot run it either)")
        if self.conv_act not in CONV_ACTIVATIONS:
            raise ConfigError(f"config.json: conv_act={self.conv_act!r} is not implemented "
                              f"(supported: {sorted(CONV_ACTIVATIONS)})")
        for name in ("position_biased_input", "share_att_key"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"config.json: {name}={getattr(self, name)!r} must be true or false")
        if self.norm_rel_ebd not in ("none", "layer_norm"):
            raise ConfigError(f"config.json: norm_rel_ebd={self.norm_rel_ebd!r} is not implemented "
                              f"(supported: 'layer_norm', 'none')")
        for name in ("max_relative_positions", "position_buckets"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value == 0 or value < -1:
                raise ConfigError(f"config.json: {name}={value!r} must be -1 (off/default) or a positive integer")
        if 0 < self.position_buckets and not 2 <= self.position_buckets // 2 + 1 < self.max_relative:
            raise ConfigError(f"config.json: position_buckets={self.position_buckets} needs max_relative_positions "
                              f"(here {self.max_relative}) > position_buckets / 2 + 1 for its log buckets")
        k = self.conv_kernel_size
        if not isinstance(k, int) or k < 0 or (k and k % 2 == 0):  # even k: padding (k-1)//2 shortens T
            raise ConfigError(f"config.json: conv_kernel_size={k!r} must be 0 or an odd positive integer")
        if self.hidden_size % self.conv_groups:
            raise ConfigError(f"config.json: conv_groups={self.conv_groups} does not divide hidden_size="
                              f"{self.hidden_size}")


def _parse_pos_att_type(value) -> tuple[str, ...]:
    if value is None:
        return ()
    # Old configs write "p2c|c2p"; transformers splits and lowercases it the same way.
    items = [x.strip() for x in value.lower().split("|")] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or any(x not in POSITION_TERMS for x in items):
        raise ConfigError(f"config.json: pos_att_type={value!r} is not implemented (supported: a subset of "
                          f"{list(POSITION_TERMS)})")
    return tuple(t for t in POSITION_TERMS if t in items)


# ---------------------------------------------------------------------------------------------------
# Relative positions


def log_bucket(relative: torch.Tensor, buckets: int, max_position: int) -> torch.Tensor:
    """Signed distances -> bucketed distances (transformers' ``make_log_bucket_position``, #L56).

    With ``mid = buckets // 2``: |d| <= mid stays d; beyond, sign(d) * (mid + ceil(log(|d| / mid) /
    log((max_position - 1) / mid) * (mid - 1))), so d = max_position - 1 lands on mid + (mid - 1).
    Computed in float32 like transformers, since ceil() makes the rounding visible.
    """
    mid = buckets // 2
    # |d| < mid is swapped for mid - 1 only to keep log() finite; those entries keep d below.
    abs_pos = torch.where(relative.abs() < mid, torch.full_like(relative, mid - 1), relative.abs())
    scale = torch.log(torch.tensor((max_position - 1) / mid, dtype=torch.float32))
    log_pos = torch.ceil(torch.log(abs_pos.float() / mid) / scale * (mid - 1)) + mid
    return torch.where(abs_pos <= mid, relative.float(), log_pos * torch.sign(relative)).long()


class RelativePositions(NamedTuple):
    buckets: torch.Tensor  # (T, T) bucketed i - j
    c2p: torch.Tensor  # (T, T) row of the R reachable table rows for query i, key j
    p2c: torch.Tensor  # (T, T) [j, i]: row of -δ(j, i) for key j; after the transpose, c2p's row
    rows: slice  # the R rows of the 2S-row table that length T reaches


def relative_positions(T: int, span: int, buckets: int, max_position: int) -> RelativePositions:
    """Bucketed relative positions and table indices for length T, on the CPU (depends on T only).

    The table row of distance d is ``clamp(d + S, 0, 2S - 1)``; distances beyond the table share its
    first/last row. Only rows [lo, hi) can occur, so indices are shifted to that slice.
    """
    ids = torch.arange(T)
    rel = ids[:, None] - ids[None, :]  # (T, T)
    if buckets > 0:
        rel = log_bucket(rel, buckets, max_position)
    c2p = (rel + span).clamp(0, 2 * span - 1)
    p2c = (-rel + span).clamp(0, 2 * span - 1)  # buckets are odd in d, so same rows as c2p
    lo, hi = int(c2p.min()), int(c2p.max()) + 1
    return RelativePositions(rel, c2p - lo, p2c - lo, slice(lo, hi))


# ---------------------------------------------------------------------------------------------------
# Embeddings


class Embeddings(nn.Module):
    def __init__(self, cfg: DebertaV2Config):
        super().__init__()
        E, C = cfg.embedding_size, cfg.hidden_size
        self.tok = nn.Embedding(cfg.vocab_size, E)
        self.pos = nn.Embedding(cfg.max_position_embeddings, E) if cfg.position_biased_input else None
        self.segment = nn.Embedding(cfg.type_vocab_size, E) if cfg.type_vocab_size else None
        self.proj = nn.Linear(E, C, bias=False) if E != C else None  # no bias, as in transformers
        self.ln = nn.LayerNorm(C, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        B, T = input_ids.shape
        x = self.tok(input_ids)  # (B, T, E)
        if self.pos is not None:
            x = x + self.pos.weight[:T]  # absolute positions 0..T-1, no offset
        if self.segment is not None:
            x = x + self.segment.weight[0]  # single segment: token type 0
        if self.proj is not None:
            x = self.proj(x)  # (B, T, C)
        return self.drop(self.ln(x) * attention_mask[:, :, None].to(x.dtype))  # pads become exact zeros


# ---------------------------------------------------------------------------------------------------
# Disentangled attention


class DisentangledAttention(nn.Module):
    def __init__(self, cfg: DebertaV2Config):
        super().__init__()
        C, self.n_head, self.head_dim = cfg.hidden_size, cfg.num_attention_heads, cfg.attention_head_size
        self.terms = cfg.pos_att_type
        self.scale = math.sqrt(self.head_dim * (1 + len(self.terms)))
        self.query = nn.Linear(C, C)
        self.key = nn.Linear(C, C)
        self.value = nn.Linear(C, C)
        # Positions get their own projections unless share_att_key (kf-deberta shares q/k).
        self.pos_key = nn.Linear(C, C) if "c2p" in self.terms and not cfg.share_att_key else None
        self.pos_query = nn.Linear(C, C) if "p2c" in self.terms and not cfg.share_att_key else None
        self.out = nn.Linear(C, C)
        self.pos_drop = nn.Dropout(cfg.hidden_dropout_prob)  # each block drops its own copy of the table
        self.attn_drop = nn.Dropout(cfg.attention_probs_dropout_prob)
        self.drop = nn.Dropout(cfg.hidden_dropout_prob)

    def position_projections(self, rel: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(2S, C) relative embeddings -> position keys for c2p and queries for p2c, each (H, 2S, D)."""
        rel = self.pos_drop(rel)  # identity in eval mode

        def heads(linear: nn.Linear) -> torch.Tensor:
            return linear(rel).view(-1, self.n_head, self.head_dim).transpose(0, 1)  # (H, 2S, D)

        pos_k = heads(self.pos_key or self.key) if "c2p" in self.terms else None
        pos_q = heads(self.pos_query or self.query) if "p2c" in self.terms else None
        return pos_k, pos_q

    def forward(self, x: torch.Tensor, mask: torch.Tensor, rp: RelativePositions,
                pos_k: torch.Tensor | None, pos_q: torch.Tensor | None, record: dict | None = None) -> torch.Tensor:
        B, T, C = x.shape
        H, D = self.n_head, self.head_dim
        q = self.query(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = self.key(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        v = self.value(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        terms = {"c2c": q @ (k / self.scale).transpose(-1, -2)}  # (B, H, T, T); k scaled first, as upstream
        if pos_k is not None:
            # c2p[i, j] = q_i . Kr[row δ(i, j)], δ = bucket(i - j): all R rows per query, then pick.
            c2p = q @ pos_k.transpose(-1, -2)  # (B, H, T, R)
            terms["c2p"] = c2p.gather(-1, rp.c2p.expand(B, H, T, T)) / self.scale
        if pos_q is not None:
            # p2c[i, j] = k_j . Qr[row δ(i, j)]: gathered per key j at row -δ(j, i), then transposed.
            p2c = k @ pos_q.transpose(-1, -2)  # (B, H, T, R), rows indexed by the key
            terms["p2c"] = p2c.gather(-1, rp.p2c.expand(B, H, T, T)).transpose(-1, -2) / self.scale
        scores = terms["c2c"]
        if self.terms:  # summed as transformers does, c2c + (c2p + p2c), so the rounding matches
            scores = scores + sum((terms[t] for t in self.terms[1:]), terms[self.terms[0]])
        probs = scores.masked_fill(~mask, torch.finfo(scores.dtype).min).softmax(dim=-1)  # (B, H, T, T)
        if record is not None:
            for name, term in terms.items():
                record.setdefault(name, []).append(term)
            record.setdefault("attentions", []).append(probs)
        y = (self.attn_drop(probs) @ v).transpose(1, 2).reshape(B, T, C)  # (B, H, T, D) -> (B, T, C)
        return self.drop(self.out(y))


# ---------------------------------------------------------------------------------------------------
# Block, convolution and model


class Block(nn.Module):
    def __init__(self, cfg: DebertaV2Config):
        super().__init__()
        self.attn = DisentangledAttention(cfg)
        self.attn_ln = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.ffn = FeedForward(cfg)
        self.ffn_ln = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, rp: RelativePositions, pos_k: torch.Tensor | None,
                pos_q: torch.Tensor | None, record: dict | None = None) -> torch.Tensor:
        x = self.attn_ln(x + self.attn(x, mask, rp, pos_k, pos_q, record))  # post-LN, as BERT
        x = self.ffn_ln(x + self.ffn(x))
        return x


class ConvLayer(nn.Module):
    """``y = LN(block_0(x) + act(conv(x)))`` on the embedding output x, pads zeroed (deberta-v2-xlarge)."""

    def __init__(self, cfg: DebertaV2Config):
        super().__init__()
        k = cfg.conv_kernel_size
        self.conv = nn.Conv1d(cfg.hidden_size, cfg.hidden_size, k, padding=(k - 1) // 2, groups=cfg.conv_groups)
        self.act = CONV_ACTIVATIONS[cfg.conv_act]
        self.ln = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, embedded: torch.Tensor, block_out: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        keep = attention_mask[:, :, None].bool()  # (B, T, 1)
        y = self.conv(embedded.transpose(1, 2)).transpose(1, 2)  # (B, T, C), convolved along T
        y = self.act(self.drop(y.masked_fill(~keep, 0)))  # pads zeroed, dropout, activation: as upstream
        return self.ln(block_out + y) * keep.to(y.dtype)


class DebertaV2Model(nn.Module):
    """Token ids (B, T) and a 1/0 attention mask (B, T) -> last hidden states (B, T, C)."""

    def __init__(self, cfg: DebertaV2Config):
        super().__init__()
        self.config = cfg
        self.embed = Embeddings(cfg)
        self.rel_embed = nn.Embedding(2 * cfg.att_span, cfg.hidden_size)  # rows for distances -S .. S-1
        norm = cfg.norm_rel_ebd == "layer_norm"
        self.rel_ln = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps) if norm else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.conv = ConvLayer(cfg) if cfg.conv_kernel_size else None

    def position_projections(self) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
        """Each block's (pos_k, pos_q), (H, 2S, D) each: the relative table seen through its projections."""
        rel = self.rel_embed.weight  # (2S, C)
        if self.rel_ln is not None:
            rel = self.rel_ln(rel)
        return [block.attn.position_projections(rel) for block in self.blocks]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                record: dict | None = None) -> torch.Tensor:
        """``record``: pass a dict to collect ``hidden_states`` (embeddings + every block),
        ``attentions``, the scaled score terms ``c2c``/``c2p``/``p2c`` (each (B, H, T, T); they sum to
        the logits before masking) and ``rel_buckets`` (T, T)."""
        B, T = input_ids.shape
        cfg = self.config
        x = self.embed(input_ids, attention_mask)  # (B, T, C)
        keep = attention_mask.bool()
        mask = keep[:, None, :, None] & keep[:, None, None, :]  # (B, 1, T, T): both tokens real
        rp = relative_positions(T, cfg.att_span, cfg.position_buckets, cfg.max_relative)
        rp = RelativePositions(*(t.to(x.device) for t in rp[:3]), rp.rows)
        if record is not None:
            record["rel_buckets"] = rp.buckets
            record.setdefault("hidden_states", []).append(x)
        embedded = x
        for i, (block, (pos_k, pos_q)) in enumerate(zip(self.blocks, self.position_projections())):
            # Only the R table rows this length reaches: (H, 2S, D) -> (H, R, D).
            pos_k = pos_k[:, rp.rows] if pos_k is not None else None
            pos_q = pos_q[:, rp.rows] if pos_q is not None else None
            x = block(x, mask, rp, pos_k, pos_q, record)
            if i == 0 and self.conv is not None:
                x = self.conv(embedded, x, attention_mask)
            if record is not None:
                record["hidden_states"].append(x)
        return x


# ---------------------------------------------------------------------------------------------------
# Checkpoint names: Hugging Face key (after the "deberta." prefix is removed) -> our parameter name.

PREFIXES = ("deberta.",)

_LAYER = {
    "attention.self.query_proj": "attn.query", "attention.self.key_proj": "attn.key",
    "attention.self.value_proj": "attn.value", "attention.self.pos_key_proj": "attn.pos_key",
    "attention.self.pos_query_proj": "attn.pos_query", "attention.output.dense": "attn.out",
    "attention.output.LayerNorm": "attn_ln", "intermediate.dense": "ffn.up", "output.dense": "ffn.down",
    "output.LayerNorm": "ffn_ln",
}
CHECKPOINT_NAMES = {
    "embeddings.word_embeddings.weight": "embed.tok.weight",
    "embeddings.position_embeddings.weight": "embed.pos.weight",
    "embeddings.token_type_embeddings.weight": "embed.segment.weight",
    "embeddings.embed_proj.weight": "embed.proj.weight",
    "embeddings.LayerNorm.weight": "embed.ln.weight",
    "embeddings.LayerNorm.bias": "embed.ln.bias",
    "encoder.rel_embeddings.weight": "rel_embed.weight",
    "encoder.LayerNorm.weight": "rel_ln.weight",
    "encoder.LayerNorm.bias": "rel_ln.bias",
    **{f"encoder.layer.{{i}}.{hf}.{p}": f"blocks.{{i}}.{ours}.{p}"
       for hf, ours in _LAYER.items() for p in ("weight", "bias")},
    "encoder.conv.conv.weight": "conv.conv.weight",
    "encoder.conv.conv.bias": "conv.conv.bias",
    "encoder.conv.LayerNorm.weight": "conv.ln.weight",
    "encoder.conv.LayerNorm.bias": "conv.ln.bias",
}

# Masked-LM heads (legacy ``cls.``, ``lm_predictions.``, RTD ``mask_predictions.``), the pooler, and
# stale position-id buffers are deliberately not loaded.
IGNORED_KEYS = (
    r"(deberta\.)?pooler\..*",
    r"cls\..*",
    r"lm_predictions\..*",
    r"mask_predictions\..*",
    r"(deberta\.)?embeddings\.position_ids",
)
CARRIED_KEYS = ()  # DebertaV2Model has no pooler (its ContextPooler belongs to the classification heads)


def build(hf_config: dict) -> DebertaV2Model:
    """The model in eval mode (no dropout); training turns train mode on explicitly."""
    return DebertaV2Model(DebertaV2Config.from_hf(hf_config)).eval()


def max_tokens(cfg: DebertaV2Config) -> int:
    """Positions are relative, but sentence-transformers still caps at max_position_embeddings."""
    return cfg.max_position_embeddings
