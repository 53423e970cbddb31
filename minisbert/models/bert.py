"""BERT encoder (Devlin et al., 2018), post-LayerNorm.

What makes it BERT, in the order the data flows:
- embeddings = word + absolute position + token type, then LayerNorm (eps from the config, 1e-12 in
  klue/bert-base and MiniLM);
- each block is post-LN: ``x = LN(x + attn(x))`` then ``x = LN(x + ffn(x))``;
- the feed-forward uses exact (erf) GELU, not the tanh approximation;
- padded key positions get ``finfo(dtype).min`` added to the scores, as Hugging Face does, so a pad
  gets exactly zero probability after softmax;
- dropout, in train mode only, at transformers' four places: the embeddings' output, the attention
  probabilities, and the attention and feed-forward outputs before their residual sums
  (``hidden_dropout_prob``, ``attention_probs_dropout_prob``); in eval mode each is the identity.

Mirrors transformers' ``modeling_bert.py`` (BertEmbeddings, BertSelfAttention, BertLayer) numerically:
https://github.com/huggingface/transformers/blob/v4.44.0/src/transformers/models/bert/modeling_bert.py

Shape legend: B batch, T tokens, C hidden, H heads, D head dim (C = H * D), F feed-forward width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from minisbert.checks import integer
from minisbert.errors import ConfigError


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU: what every target checkpoint uses."""
    return F.gelu(x)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation (``gelu_new``, ``gelu_pytorch_tanh``)."""
    return F.gelu(x, approximate="tanh")


# hidden_act values we implement; everything else is refused by the config. Module-level functions,
# not lambdas, so that a model (and an encoder holding it) pickles and deep-copies.
ACTIVATIONS = {
    "gelu": gelu,
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "relu": F.relu,
}


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    pad_token_id: int
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1  # transformers' defaults; only train mode reads them
    attention_probs_dropout_prob: float = 0.1

    @classmethod
    def from_hf(cls, hf: dict) -> "BertConfig":
        """Build from a Hugging Face ``config.json`` dict, refusing what this file does not implement."""
        refuse_unsupported(hf, {
            "position_embedding_type": ("absolute", None),
            "is_decoder": (False, None),
            "add_cross_attention": (False, None),
        })
        defaults = {"type_vocab_size": 2, "layer_norm_eps": 1e-12, "pad_token_id": 0, "hidden_act": "gelu",
                    "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}
        cfg = cls(**{f.name: hf.get(f.name, defaults.get(f.name)) for f in fields(cls)})
        cfg.validate()
        return cfg

    def validate(self) -> None:
        require_positive(self, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                         "intermediate_size", "max_position_embeddings")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"config.json: hidden_size={self.hidden_size} is not divisible by "
                              f"num_attention_heads={self.num_attention_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"config.json: hidden_act={self.hidden_act!r} is not implemented "
                              f"(supported: {sorted(ACTIVATIONS)})")
        if not isinstance(self.type_vocab_size, int) or self.type_vocab_size < 0:
            raise ConfigError(f"config.json: type_vocab_size={self.type_vocab_size!r} must be an integer >= 0")
        if not (isinstance(self.layer_norm_eps, (int, float)) and 0 < self.layer_norm_eps < 1):
            raise ConfigError(f"config.json: layer_norm_eps={self.layer_norm_eps!r} must be in (0, 1)")
        if not isinstance(self.pad_token_id, int) or not 0 <= self.pad_token_id < self.vocab_size:
            raise ConfigError(f"config.json: pad_token_id={self.pad_token_id!r} is outside the vocabulary "
                              f"(vocab_size={self.vocab_size})")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            p = getattr(self, name)
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
                raise ConfigError(f"config.json: {name}={p!r} must be a probability in [0, 1)")


def refuse_unsupported(hf: dict, allowed: dict[str, tuple]) -> None:
    """Raise ConfigError for a config key whose value asks for something we do not implement."""
    for key, ok in allowed.items():
        if key in hf and hf[key] not in ok:
            raise ConfigError(f"config.json: {key}={hf[key]!r} is not implemented (supported: {ok[0]!r})")


def require_positive(cfg, *names: str) -> None:
    for name in names:
        integer(getattr(cfg, name), name, where="config.json", error=ConfigError)


# ---------------------------------------------------------------------------------------------------
# Embeddings


class Embeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.pos = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        # type_vocab_size 0 (never in BERT itself, but allowed by the config) means no segment table.
        self.segment = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size) if cfg.type_vocab_size else None
        self.ln = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(input_ids)  # (B, T, C)
        if self.segment is not None:
            # Sentence embedding encodes single segments: token type 0 everywhere.
            x = x + self.segment.weight[0]
        x = x + self.pos(position_ids)  # added after the type, in transformers' order (same rounding)
        return self.drop(self.ln(x))


def bert_position_ids(input_ids: torch.Tensor) -> torch.Tensor:
    """Absolute positions 0..T-1 for every row; pads get positions too, they are masked later."""
    B, T = input_ids.shape
    return torch.arange(T, device=input_ids.device).expand(B, T)


# ---------------------------------------------------------------------------------------------------
# Attention


def padding_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, T) 1/0 mask -> (B, 1, 1, T) additive bias: 0 for tokens, the dtype's minimum for pads.

    The minimum (not -inf) is what transformers adds; softmax then gives pads exactly 0 and a row can
    never become NaN.
    """
    bias = (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
    return bias


class SelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.n_head = cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.attn_drop = nn.Dropout(cfg.attention_probs_dropout_prob)  # on the probabilities
        self.drop = nn.Dropout(cfg.hidden_dropout_prob)  # on the output, before the residual sum

    def forward(self, x: torch.Tensor, bias: torch.Tensor, record: dict | None = None) -> torch.Tensor:
        B, T, C = x.shape
        H, D = self.n_head, C // self.n_head
        q = self.query(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = self.key(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        v = self.value(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        if record is None:
            # Fused kernel; same math as below: dropout(softmax(q k^T / sqrt(D) + bias)) v, as
            # transformers' sdpa attention passes its dropout probability in train mode only.
            p = self.attn_drop.p if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)  # (B, H, T, D)
        else:
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(D) + bias  # (B, H, T, T)
            probs = scores.softmax(dim=-1)
            record.setdefault("attentions", []).append(probs)
            y = self.attn_drop(probs) @ v  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.drop(self.out(y))


# ---------------------------------------------------------------------------------------------------
# Feed-forward and block


class FeedForward(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.up = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.drop = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.down(self.act(self.up(x))))  # (B, T, C) -> (B, T, F) -> (B, T, C)


class Block(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.attn_ln = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.ffn = FeedForward(cfg)
        self.ffn_ln = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, record: dict | None = None) -> torch.Tensor:
        x = self.attn_ln(x + self.attn(x, bias, record))  # post-LN: normalise after the residual
        x = self.ffn_ln(x + self.ffn(x))
        return x


# ---------------------------------------------------------------------------------------------------
# Model


class BertModel(nn.Module):
    """Token ids (B, T) and a 1/0 attention mask (B, T) -> last hidden states (B, T, C)."""

    position_ids = staticmethod(bert_position_ids)

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.embed = Embeddings(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                record: dict | None = None) -> torch.Tensor:
        """``record``: pass a dict to collect ``hidden_states`` (embeddings + every block) and
        ``attentions`` (every block's probabilities); the default path stays fused."""
        x = self.embed(input_ids, self.position_ids(input_ids))  # (B, T, C)
        bias = padding_bias(attention_mask, x.dtype)  # (B, 1, 1, T)
        if record is not None:
            record.setdefault("hidden_states", []).append(x)
        for block in self.blocks:
            x = block(x, bias, record)
            if record is not None:
                record["hidden_states"].append(x)
        return x


# ---------------------------------------------------------------------------------------------------
# Checkpoint names: Hugging Face key (after the "bert." prefix is removed) -> our parameter name.

PREFIXES = ("bert.",)

CHECKPOINT_NAMES = {
    "embeddings.word_embeddings.weight": "embed.tok.weight",
    "embeddings.position_embeddings.weight": "embed.pos.weight",
    "embeddings.token_type_embeddings.weight": "embed.segment.weight",
    "embeddings.LayerNorm.weight": "embed.ln.weight",
    "embeddings.LayerNorm.bias": "embed.ln.bias",
    "encoder.layer.{i}.attention.self.query.weight": "blocks.{i}.attn.query.weight",
    "encoder.layer.{i}.attention.self.query.bias": "blocks.{i}.attn.query.bias",
    "encoder.layer.{i}.attention.self.key.weight": "blocks.{i}.attn.key.weight",
    "encoder.layer.{i}.attention.self.key.bias": "blocks.{i}.attn.key.bias",
    "encoder.layer.{i}.attention.self.value.weight": "blocks.{i}.attn.value.weight",
    "encoder.layer.{i}.attention.self.value.bias": "blocks.{i}.attn.value.bias",
    "encoder.layer.{i}.attention.output.dense.weight": "blocks.{i}.attn.out.weight",
    "encoder.layer.{i}.attention.output.dense.bias": "blocks.{i}.attn.out.bias",
    "encoder.layer.{i}.attention.output.LayerNorm.weight": "blocks.{i}.attn_ln.weight",
    "encoder.layer.{i}.attention.output.LayerNorm.bias": "blocks.{i}.attn_ln.bias",
    "encoder.layer.{i}.intermediate.dense.weight": "blocks.{i}.ffn.up.weight",
    "encoder.layer.{i}.intermediate.dense.bias": "blocks.{i}.ffn.up.bias",
    "encoder.layer.{i}.output.dense.weight": "blocks.{i}.ffn.down.weight",
    "encoder.layer.{i}.output.dense.bias": "blocks.{i}.ffn.down.bias",
    "encoder.layer.{i}.output.LayerNorm.weight": "blocks.{i}.ffn_ln.weight",
    "encoder.layer.{i}.output.LayerNorm.bias": "blocks.{i}.ffn_ln.bias",
}

# Keys a checkpoint may carry that a sentence encoder deliberately does not use (regular expressions,
# matched against the full key): the NSP pooler, pre-training heads, and stale position-id buffers.
IGNORED_KEYS = (
    r"(bert\.)?pooler\..*",
    r"cls\..*",
    r"(bert\.)?embeddings\.position_ids",
)
# Ignored keys that ``save`` writes back unchanged (without the prefix): transformers' BertModel has a
# pooler, so a folder without it loads with a "newly initialised" report in sentence-transformers.
CARRIED_KEYS = (r"pooler\..*",)


def build(hf_config: dict) -> BertModel:
    """The model in eval mode (no dropout); training turns train mode on explicitly."""
    return BertModel(BertConfig.from_hf(hf_config)).eval()


def max_tokens(cfg: BertConfig) -> int:
    """Longest sequence the position table can hold."""
    return cfg.max_position_embeddings
