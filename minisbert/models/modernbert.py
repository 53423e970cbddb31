"""ModernBERT encoder (Warner et al., 2024, "Smarter, Better, Faster, Longer").

What differs from BERT (``bert.py``), in the order the data flows:
- embeddings are the token embedding alone (no position or segment table), then a LayerNorm;
- positions enter inside attention, as rotary embeddings (RoPE, Su et al.) on queries and keys, with
  two bases: ``global_rope_theta`` (160,000) in global layers, ``local_rope_theta`` (10,000) in local ones;
- attention alternates: every ``global_attn_every_n_layers``-th layer (0, 3, 6, ... by default) is
  global, the others attend only to keys at most ``local_attention // 2`` tokens away (a sliding
  window, 128 tokens wide in the released models), which is what makes 8,192 tokens affordable;
- blocks are pre-norm: ``x = x + attn(LN(x))``, ``x = x + mlp(LN(x))``; block 0 has no attention norm
  (the embeddings' LayerNorm precedes it), and a final LayerNorm follows the last block;
- the feed-forward is a GeGLU: one linear C -> 2F split into input and gate, ``act(input) * gate``, F -> C;
- no biases by default: linears (``attention_bias``, ``mlp_bias``) and LayerNorms (``norm_bias``);
- dropout, in train mode only, at transformers' places: after the embeddings' norm (``embedding_dropout``),
  on the attention probabilities and on the attention output (``attention_dropout``), and between the
  GeGLU and its down-projection (``mlp_dropout``).

Mirrors transformers' ``modeling_modernbert.py`` (ModernBertEmbeddings, ModernBertAttention with its sdpa
interface, ModernBertMLP, ModernBertEncoderLayer, ModernBertModel) numerically:
https://github.com/huggingface/transformers/blob/main/src/transformers/models/modernbert/modeling_modernbert.py

Shape legend: B batch, T tokens, C hidden, H heads, D head dim (C = H * D), F intermediate width.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from minisbert.errors import ConfigError
from minisbert.models.bert import ACTIVATIONS as BERT_ACTIVATIONS
from minisbert.models.bert import padding_bias, refuse_unsupported, require_positive

# hidden_activation values we implement (transformers' ACT2FN names); everything else is refused.
ACTIVATIONS = dict(BERT_ACTIVATIONS, silu=F.silu, swish=F.silu)
LAYER_TYPES = ("full_attention", "sliding_attention")  # global, local


@dataclass(frozen=True)
class ModernBertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    pad_token_id: int
    layer_types: tuple[str, ...]  # per layer: "full_attention" (global) or "sliding_attention" (local)
    local_attention: int = 128  # window width: a local layer's query sees keys up to local_attention // 2 away
    global_rope_theta: float = 160_000.0
    local_rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    norm_bias: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_activation: str = "gelu"
    embedding_dropout: float = 0.0  # transformers' defaults; only train mode reads them
    attention_dropout: float = 0.0
    mlp_dropout: float = 0.0

    @property
    def hidden_act(self) -> str:  # the name the fast path and ``inspect`` read for every architecture
        return self.hidden_activation

    @property
    def window(self) -> int:
        """How far a local layer looks each way: keys with |i - j| <= window."""
        return self.local_attention // 2

    def is_global(self, layer: int) -> bool:
        return self.layer_types[layer] == "full_attention"

    def rope_theta(self, layer: int) -> float:
        return self.global_rope_theta if self.is_global(layer) else self.local_rope_theta

    @classmethod
    def from_hf(cls, hf: dict) -> "ModernBertConfig":
        """Build from a Hugging Face ``config.json`` dict (transformers 4's keys or 5's ``layer_types`` and
        ``rope_parameters``), refusing what this file does not implement."""
        refuse_unsupported(hf, {"rope_scaling": (None,), "is_decoder": (False, None), "is_causal": (False, None),
                                "position_embedding_type": ("absolute", "rope", None)})
        layers = hf.get("num_hidden_layers")
        every = hf.get("global_attn_every_n_layers", 3)
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ConfigError(f"config.json: global_attn_every_n_layers={every!r} must be an integer >= 1")
        derived = tuple("sliding_attention" if i % every else "full_attention" for i in range(layers)) \
            if isinstance(layers, int) else ()
        layer_types = hf.get("layer_types")
        if layer_types is None:
            layer_types = derived
        elif not isinstance(layer_types, list) or any(t not in LAYER_TYPES for t in layer_types):
            raise ConfigError(f"config.json: layer_types={layer_types!r} is not implemented (supported: a list "
                              f"of {' / '.join(LAYER_TYPES)})")
        thetas = {"full_attention": hf.get("global_rope_theta", 160_000.0),
                  "sliding_attention": hf.get("local_rope_theta", 10_000.0)}
        if thetas["sliding_attention"] is None:  # transformers 4: local layers then use the global base
            thetas["sliding_attention"] = thetas["full_attention"]
        for kind, rope in (hf.get("rope_parameters") or {}).items():
            if kind not in LAYER_TYPES or not isinstance(rope, dict) or rope.get("rope_type", "default") != "default":
                raise ConfigError(f"config.json: rope_parameters[{kind!r}]={rope!r} is not implemented (supported: "
                                  f"rope_type 'default' for {' / '.join(LAYER_TYPES)})")
            thetas[kind] = rope.get("rope_theta", thetas[kind])
        defaults = {f.name: f.default for f in fields(cls) if f.default is not MISSING}
        values = {f.name: hf.get(f.name, defaults.get(f.name)) for f in fields(cls)}
        values.update(layer_types=tuple(layer_types), global_rope_theta=thetas["full_attention"],
                      local_rope_theta=thetas["sliding_attention"])
        if values["pad_token_id"] is None:
            values["pad_token_id"] = 50283  # transformers' default (the released tokenizer's [PAD])
        cfg = cls(**values)
        head_dim = hf.get("head_dim")
        if head_dim is not None and cfg.num_attention_heads and head_dim * cfg.num_attention_heads != cfg.hidden_size:
            raise ConfigError(f"config.json: head_dim={head_dim!r} is not implemented (supported: hidden_size / "
                              f"num_attention_heads = {cfg.hidden_size // max(cfg.num_attention_heads, 1)})")
        cfg.validate()
        return cfg

    def validate(self) -> None:
        require_positive(self, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                         "intermediate_size", "max_position_embeddings", "local_attention")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"config.json: hidden_size={self.hidden_size} is not divisible by "
                              f"num_attention_heads={self.num_attention_heads}")
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ConfigError(f"config.json: head size {self.hidden_size // self.num_attention_heads} is odd; "
                              f"rotary embeddings turn pairs of dimensions")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(f"config.json: layer_types has {len(self.layer_types)} entries for "
                              f"num_hidden_layers={self.num_hidden_layers}")
        if self.hidden_activation not in ACTIVATIONS:
            raise ConfigError(f"config.json: hidden_activation={self.hidden_activation!r} is not implemented "
                              f"(supported: {sorted(ACTIVATIONS)})")
        for name in ("global_rope_theta", "local_rope_theta"):
            theta = getattr(self, name)
            if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 1:
                raise ConfigError(f"config.json: {name}={theta!r} must be a number > 1")
        if not (isinstance(self.norm_eps, (int, float)) and 0 < self.norm_eps < 1):
            raise ConfigError(f"config.json: norm_eps={self.norm_eps!r} must be in (0, 1)")
        for name in ("norm_bias", "attention_bias", "mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"config.json: {name}={getattr(self, name)!r} must be true or false")
        if not isinstance(self.pad_token_id, int) or not 0 <= self.pad_token_id < self.vocab_size:
            raise ConfigError(f"config.json: pad_token_id={self.pad_token_id!r} is outside the vocabulary "
                              f"(vocab_size={self.vocab_size})")
        for name in ("embedding_dropout", "attention_dropout", "mlp_dropout"):
            p = getattr(self, name)
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
                raise ConfigError(f"config.json: {name}={p!r} must be a probability in [0, 1)")


# ---------------------------------------------------------------------------------------------------
# Rotary position embeddings


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(...,) integer positions -> cos, sin (..., D) in ``dtype``: dimension pair (k, k + D/2) turns by
    position * theta^(-2k/D). Computed in float32 as transformers does, whatever the model's dtype."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))  # (D/2,)
    freqs = positions[..., None].float() * inv_freq.to(positions.device)  # (..., D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (..., D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Turn queries or keys (..., T, D) by their positions' angles, in float32, back in x's dtype."""
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


def window_bias(attention_mask: torch.Tensor, window: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, T) 1/0 mask -> (B, 1, T, T) additive bias of a local layer: 0 where the key is a token at most
    ``window`` positions from the query, the dtype's minimum elsewhere."""
    T = attention_mask.shape[1]
    pos = torch.arange(T, device=attention_mask.device)
    near = (pos[:, None] - pos[None, :]).abs() <= window  # (T, T)
    keep = near[None, None] & attention_mask[:, None, None, :].bool()  # (B, 1, T, T)
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, torch.finfo(dtype).min)


# ---------------------------------------------------------------------------------------------------
# Blocks


class Norm(nn.LayerNorm):
    """ModernBERT's LayerNorm. Its checkpoint names are ``norm``, ``attn_norm``, ``mlp_norm`` and
    ``final_norm``, not ``LayerNorm``, so old_fit's weight-decay rule (which goes by names) decays it."""

    named_layer_norm = False


class Embeddings(nn.Module):
    def __init__(self, cfg: ModernBertConfig):
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.norm = Norm(cfg.hidden_size, eps=cfg.norm_eps, bias=cfg.norm_bias)
        self.drop = nn.Dropout(cfg.embedding_dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.drop(self.norm(self.tok(input_ids)))  # (B, T, C)


class Attention(nn.Module):
    def __init__(self, cfg: ModernBertConfig, layer: int):
        super().__init__()
        self.n_head = cfg.num_attention_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.attention_bias)
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.attention_bias)
        self.is_global = cfg.is_global(layer)
        self.p = cfg.attention_dropout  # on the probabilities (train mode) and on the output
        self.drop = nn.Dropout(cfg.attention_dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor,
                record: dict | None = None) -> torch.Tensor:
        B, T, C = x.shape
        H, D = self.n_head, C // self.n_head
        q, k, v = self.qkv(x).view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)  # each (B, H, T, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # cos, sin: (T, D)
        if record is None:
            p = self.p if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)  # (B, H, T, D)
        else:  # transformers' eager attention: the softmax in float32
            scores = (q @ k.transpose(-1, -2)) * D ** -0.5 + bias  # (B, H, T, T)
            probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
            record.setdefault("attentions", []).append(probs)
            y = F.dropout(probs, self.p, self.training) @ v  # (B, H, T, D)
        return self.drop(self.out(y.transpose(1, 2).reshape(B, T, C)))


class GeGLU(nn.Module):
    def __init__(self, cfg: ModernBertConfig):
        super().__init__()
        self.wi = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.wo = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.act = ACTIVATIONS[cfg.hidden_activation]
        self.drop = nn.Dropout(cfg.mlp_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inp, gate = self.wi(x).chunk(2, dim=-1)  # each (B, T, F)
        return self.wo(self.drop(self.act(inp) * gate))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, cfg: ModernBertConfig, layer: int):
        super().__init__()
        # Block 0's input is the embeddings' LayerNorm output already: no second norm.
        self.attn_norm = Norm(cfg.hidden_size, eps=cfg.norm_eps, bias=cfg.norm_bias) if layer else nn.Identity()
        self.attn = Attention(cfg, layer)
        self.mlp_norm = Norm(cfg.hidden_size, eps=cfg.norm_eps, bias=cfg.norm_bias)
        self.mlp = GeGLU(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor,
                record: dict | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, bias, record)  # pre-LN: normalise the branch's input
        return x + self.mlp(self.mlp_norm(x))


class ModernBertModel(nn.Module):
    """Token ids (B, T) and a 1/0 attention mask (B, T) -> last hidden states (B, T, C), final norm applied."""

    def __init__(self, cfg: ModernBertConfig):
        super().__init__()
        self.config = cfg
        self.embed = Embeddings(cfg)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.final_norm = Norm(cfg.hidden_size, eps=cfg.norm_eps, bias=cfg.norm_bias)

    def rotary(self, positions: torch.Tensor, dtype: torch.dtype) -> dict[bool, tuple[torch.Tensor, torch.Tensor]]:
        """cos, sin for global (True) and local (False) layers at ``positions``."""
        cfg, D = self.config, self.config.hidden_size // self.config.num_attention_heads
        return {g: rotary_cos_sin(positions, D, cfg.global_rope_theta if g else cfg.local_rope_theta, dtype)
                for g in (True, False)}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                record: dict | None = None) -> torch.Tensor:
        """``record``: pass a dict to collect ``hidden_states`` (embeddings, every block; the last after the
        final norm, as transformers reports it) and ``attentions``; the default path stays fused."""
        T = input_ids.shape[1]
        x = self.embed(input_ids)  # (B, T, C)
        angles = self.rotary(torch.arange(T, device=x.device), x.dtype)  # each (T, D)
        biases = {True: padding_bias(attention_mask, x.dtype),  # (B, 1, 1, T)
                  False: window_bias(attention_mask, self.config.window, x.dtype)}  # (B, 1, T, T)
        if record is not None:
            record.setdefault("hidden_states", []).append(x)
        for block in self.blocks:
            g = block.attn.is_global
            x = block(x, *angles[g], biases[g], record)
            if record is not None:
                record["hidden_states"].append(x)
        x = self.final_norm(x)
        if record is not None:
            record["hidden_states"][-1] = x
        return x


# ---------------------------------------------------------------------------------------------------
# Checkpoint names: Hugging Face key (after the "model." prefix is removed) -> our parameter name. The
# bias entries match only in checkpoints whose config turns biases on (the model has them then).

PREFIXES = ("model.",)

CHECKPOINT_NAMES = {
    "embeddings.tok_embeddings.weight": "embed.tok.weight",
    "embeddings.norm.weight": "embed.norm.weight",
    "embeddings.norm.bias": "embed.norm.bias",
    "layers.{i}.attn_norm.weight": "blocks.{i}.attn_norm.weight",
    "layers.{i}.attn_norm.bias": "blocks.{i}.attn_norm.bias",
    "layers.{i}.attn.Wqkv.weight": "blocks.{i}.attn.qkv.weight",
    "layers.{i}.attn.Wqkv.bias": "blocks.{i}.attn.qkv.bias",
    "layers.{i}.attn.Wo.weight": "blocks.{i}.attn.out.weight",
    "layers.{i}.attn.Wo.bias": "blocks.{i}.attn.out.bias",
    "layers.{i}.mlp_norm.weight": "blocks.{i}.mlp_norm.weight",
    "layers.{i}.mlp_norm.bias": "blocks.{i}.mlp_norm.bias",
    "layers.{i}.mlp.Wi.weight": "blocks.{i}.mlp.wi.weight",
    "layers.{i}.mlp.Wi.bias": "blocks.{i}.mlp.wi.bias",
    "layers.{i}.mlp.Wo.weight": "blocks.{i}.mlp.wo.weight",
    "layers.{i}.mlp.Wo.bias": "blocks.{i}.mlp.wo.bias",
    "final_norm.weight": "final_norm.weight",
    "final_norm.bias": "final_norm.bias",
}

# The masked-language-model head (ModernBertForMaskedLM) and classifier heads are not an encoder's.
IGNORED_KEYS = (r"head\..*", r"decoder\..*", r"classifier\..*", r"drop\..*")
CARRIED_KEYS = ()  # transformers' ModernBertModel has no pooler


def build(hf_config: dict) -> ModernBertModel:
    """The model in eval mode (no dropout); training turns train mode on explicitly."""
    return ModernBertModel(ModernBertConfig.from_hf(hf_config)).eval()


def max_tokens(cfg: ModernBertConfig) -> int:
    """Rotary positions have no table, but the model was trained up to ``max_position_embeddings``."""
    return cfg.max_position_embeddings
