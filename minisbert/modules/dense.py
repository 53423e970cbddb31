"""sentence-transformers' ``Dense`` module: a linear layer and an activation applied to the pooled
embedding, between ``Pooling`` and ``Normalize`` (LaBSE: CLS pooling, then 768 -> 768 with tanh).

A module folder holds ``config.json`` (``in_features``, ``out_features``, ``bias``,
``activation_function`` as the activation's class path, ``use_residual``) and its weights
(``model.safetensors``, or a legacy ``pytorch_model.bin`` through the safe loader), which
``minisbert.loading`` fills through the same strict path as the transformer's (``NAMES`` is the
checkpoint-name table). Anything not implemented is refused.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minisbert.checks import integer, unknown_keys
from minisbert.errors import ConfigError


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


# The class paths sentence-transformers saves for an activation (``util.fullname``) -> the function
# (module-level functions, no lambdas: a Dense module pickles).
ACTIVATIONS = {
    "torch.nn.modules.activation.Tanh": torch.tanh,
    "torch.nn.modules.linear.Identity": identity,
    "torch.nn.modules.activation.ReLU": F.relu,
    "torch.nn.modules.activation.GELU": F.gelu,
    "torch.nn.modules.activation.Sigmoid": torch.sigmoid,
    "torch.nn.modules.activation.SiLU": F.silu,
}

# The module's own state-dict names are ours too: one table, nothing to rename.
NAMES = types.SimpleNamespace(
    PREFIXES=(), IGNORED_KEYS=(),
    CHECKPOINT_NAMES={"linear.weight": "linear.weight", "linear.bias": "linear.bias",
                      "residual.weight": "residual.weight"})


@dataclass(frozen=True)
class DenseConfig:
    in_features: int
    out_features: int
    bias: bool = True
    activation_function: str = "torch.nn.modules.activation.Tanh"  # sentence-transformers' default
    use_residual: bool = False

    @classmethod
    def from_dict(cls, raw: dict, path: str) -> "DenseConfig":
        """The Dense module's ``config.json``, checked; ``path`` names the file in errors."""
        raw = dict(raw)
        for key in ("module_input_name", "module_output_name"):  # the features a Dense reads and writes
            value = raw.pop(key, None)
            if value not in (None, "sentence_embedding"):
                raise ConfigError(f"{path}: {key}={value!r}: only a Dense on the sentence embedding is implemented")
        unknown_keys(raw, cls.__dataclass_fields__, "Dense config", where=path)
        for key in ("in_features", "out_features"):
            integer(raw.get(key), key, where=path, error=ConfigError)
        for key in ("bias", "use_residual"):
            if not isinstance(raw.get(key, False), bool):
                raise ConfigError(f"{path}: {key}={raw[key]!r} must be true or false")
        act = raw.get("activation_function", cls.activation_function)
        if act not in ACTIVATIONS:
            raise ConfigError(f"{path}: activation_function={act!r} is not implemented "
                              f"(implemented: {', '.join(ACTIVATIONS)})")
        return cls(**raw)


class Dense(nn.Module):
    def __init__(self, config: DenseConfig):
        super().__init__()
        self.config = config
        self.linear = nn.Linear(config.in_features, config.out_features, bias=config.bias)
        # A residual across a change of width goes through its own bias-free projection.
        self.residual = (nn.Linear(config.in_features, config.out_features, bias=False)
                         if config.use_residual and config.in_features != config.out_features else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_features) -> (B, out_features)."""
        out = ACTIVATIONS[self.config.activation_function](self.linear(x))
        if self.config.use_residual:
            out = out + (x if self.residual is None else self.residual(x))
        return out
