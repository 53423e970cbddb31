"""sentence-transformers' ``Dense`` module: a linear layer and an activation applied to the pooled
embedding, between ``Pooling`` and ``Normalize`` (LaBSE: CLS pooling, then 768 -> 768 with tanh).

A module folder holds ``config.json`` (``in_features``, ``out_features``, ``bias``,
``activation_function`` as the activation's class path, ``use_residual``) and its weights
(``model.safetensors``, or a legacy ``pytorch_model.bin`` through the safe loader). Loading is as
strict as the encoder's: every key mapped, every shape checked, anything not implemented refused.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from minisbert import checkpoint
from minisbert.errors import ConfigError

# The class paths sentence-transformers saves for an activation (``util.fullname``) -> the function.
ACTIVATIONS = {
    "torch.nn.modules.activation.Tanh": torch.tanh,
    "torch.nn.modules.linear.Identity": lambda x: x,
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
    def from_file(cls, path: Path) -> "DenseConfig":
        from minisbert.encoder import _read_json

        raw = _read_json(path, "Dense config")
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        raw = dict(raw)
        for key in ("module_input_name", "module_output_name"):  # the features a Dense reads and writes
            value = raw.pop(key, None)
            if value not in (None, "sentence_embedding"):
                raise ConfigError(f"{path}: {key}={value!r}: only a Dense on the sentence embedding is implemented")
        unknown = sorted(set(raw) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"{path}: Dense config key(s) {unknown} are not implemented")
        for key in ("in_features", "out_features"):
            if not (type(raw.get(key)) is int and raw[key] >= 1):
                raise ConfigError(f"{path}: {key}={raw.get(key)!r} must be a positive integer")
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


def load_dense(folder: Path, in_features: int, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> Dense:
    """The Dense module of ``folder``, whose input must be ``in_features`` wide (the previous module's
    output), built on the meta device and filled strictly from its weights file."""
    config = DenseConfig.from_file(folder / "config.json")
    if config.in_features != in_features:
        raise ConfigError(f"{folder / 'config.json'}: in_features={config.in_features}, but the module "
                          f"before it gives {in_features}")
    weights = checkpoint.find_weights(folder)
    with torch.device("meta"):
        module = Dense(config)
    state = checkpoint.map_state_dict(checkpoint.read_state_dict(weights), NAMES, module, str(weights))
    module.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, strict=True,
                           assign=True)
    return module.eval().requires_grad_(False)
