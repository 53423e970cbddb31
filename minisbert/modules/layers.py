"""sentence-transformers' small modules besides Pooling and Dense, as that package computes them.

- ``LayerNorm`` (after Pooling): ``nn.LayerNorm(dimension)`` (eps 1e-5, torch's default) on the sentence
  embedding. Folder: ``config.json`` ``{"dimension": D}``, weights ``norm.weight``/``norm.bias``.
- ``Normalize`` (after Pooling): unit length, ``F.normalize(x, p=2, dim=-1)``. No config, no weights.
- ``WeightedLayerPooling`` (between the Transformer and Pooling): token states become a weighted mean
  of the hidden states of layers ``layer_start`` .. L (index 0 is the embeddings), with one learned
  weight per layer: ``sum_l w_l * h_l / sum_l w_l``. Folder: ``config.json`` ``{"embedding_dimension"
  (or "word_embedding_dimension"), "num_hidden_layers", "layer_start"}``, weights ``layer_weights``.
  sentence-transformers applies it only when the transformer's ``config.json`` says
  ``output_hidden_states: true`` (its Transformer hands on the hidden states only then); otherwise the
  module passes the token states through unchanged, and so does the encoder here.

Each config is a frozen dataclass checked on load (a key minisbert does not implement is refused);
``NAMES`` tables let ``loading.fill`` load each module's weights strictly, as Dense's.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minisbert.checks import integer, unknown_keys
from minisbert.errors import ConfigError


def positive(raw: dict, key: str, path: str, minimum: int = 1) -> int:
    return integer(raw.get(key), key, minimum, where=path, error=ConfigError)


def refuse_unknown(raw: dict, known: set[str], path: str, what: str) -> None:
    unknown_keys(raw, known, f"{what} config", where=path)


@dataclass(frozen=True)
class LayerNormConfig:
    dimension: int

    @classmethod
    def from_dict(cls, raw: dict, path: str) -> "LayerNormConfig":
        refuse_unknown(raw, {"dimension"}, path, "LayerNorm")
        return cls(positive(raw, "dimension", path))


class LayerNorm(nn.Module):
    def __init__(self, config: LayerNormConfig):
        super().__init__()
        self.config = config
        self.norm = nn.LayerNorm(config.dimension)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, D)."""
        return self.norm(x)


class Normalize(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, D) of unit L2 norm (a zero vector stays zero: F.normalize's eps)."""
        return F.normalize(x, p=2, dim=-1)


@dataclass(frozen=True)
class WeightedLayerPoolingConfig:
    embedding_dimension: int
    num_hidden_layers: int = 12
    layer_start: int = 4

    @classmethod
    def from_dict(cls, raw: dict, path: str) -> "WeightedLayerPoolingConfig":
        raw = dict(raw)
        if "word_embedding_dimension" in raw:  # the name before sentence-transformers 6
            raw.setdefault("embedding_dimension", raw.pop("word_embedding_dimension"))
        refuse_unknown(raw, {"embedding_dimension", "num_hidden_layers", "layer_start"}, path,
                       "WeightedLayerPooling")
        config = cls(positive(raw, "embedding_dimension", path), positive(raw, "num_hidden_layers", path),
                     positive(raw, "layer_start", path, minimum=0))
        if config.layer_start > config.num_hidden_layers:
            raise ConfigError(f"{path}: layer_start={config.layer_start} is past num_hidden_layers="
                              f"{config.num_hidden_layers}")
        return config


class WeightedLayerPooling(nn.Module):
    def __init__(self, config: WeightedLayerPoolingConfig):
        super().__init__()
        self.config = config
        self.layer_weights = nn.Parameter(torch.ones(config.num_hidden_layers + 1 - config.layer_start))

    def forward(self, hidden_states: list[torch.Tensor]) -> torch.Tensor:
        """L + 1 hidden states, each (B, T, C) (embeddings first) -> (B, T, C) token states."""
        layers = torch.stack(hidden_states)[self.config.layer_start:]  # (L + 1 - start, B, T, C)
        # sentence-transformers' operations in its order: expand, multiply, sum, divide.
        weights = self.layer_weights.unsqueeze(-1).unsqueeze(-1).unsqueeze(-1).expand(layers.size())
        return (weights * layers).sum(dim=0) / self.layer_weights.sum()


class LayerPooled(nn.Module):
    """A transformer whose token states are ``WeightedLayerPooling`` of its hidden states: the same
    call, ``(input_ids, attention_mask) -> (B, T, C)``, so the reference runner runs it unchanged."""

    def __init__(self, model: nn.Module, pooling: WeightedLayerPooling):
        super().__init__()
        self.model, self.pooling = model, pooling

    @property
    def config(self):
        return self.model.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        record: dict = {}
        self.model(input_ids, attention_mask, record)
        return self.pooling(record["hidden_states"])


# The modules' own state-dict names are the checkpoint's: nothing to rename.
LAYER_NORM_NAMES = types.SimpleNamespace(PREFIXES=(), IGNORED_KEYS=(), CHECKPOINT_NAMES={
    "norm.weight": "norm.weight", "norm.bias": "norm.bias"})
LAYER_POOLING_NAMES = types.SimpleNamespace(PREFIXES=(), IGNORED_KEYS=(), CHECKPOINT_NAMES={
    "layer_weights": "layer_weights"})
