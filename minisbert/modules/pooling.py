"""Pooling token states (B, T, C) into sentence embeddings, as sentence-transformers' ``Pooling`` does.

All six modes sentence-transformers defines are here. Mean pooling, the one every target checkpoint
uses, is ``kernels.masked_mean`` (the fused masked mean, the same function the fast path's packed
pooling is tested against); the others are in the reference form (mask multiply, sum, divide). Sums
accumulate in float32 when the states are half precision, as sentence-transformers does. Denominators
are clamped at 1e-9, sentence-transformers' guard against an all-pad row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minisbert.errors import ConfigError
from minisbert.modules.kernels import mean_pool

# The legacy boolean keys, in the order sentence-transformers concatenates the modes.
LEGACY_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
MODES = tuple(LEGACY_KEYS.values())


@dataclass(frozen=True)
class PoolingConfig:
    modes: tuple[str, ...] = ("mean",)
    # False: a prompt's tokens ([CLS] and the prompt's own) are left out of the pooling (INSTRUCTOR-style
    # models); ``encode`` passes their count to ``pool`` as ``skip``.
    include_prompt: bool = True

    @classmethod
    def from_dict(cls, raw: dict, source: str) -> "PoolingConfig":
        """The pooling module's ``config.json``, checked; ``source`` names the file in errors."""
        if "pooling_mode" in raw:
            modes = raw["pooling_mode"]
            modes = (modes,) if isinstance(modes, str) else tuple(modes) if isinstance(modes, list) else None
            if modes is None:
                raise ConfigError(f"{source}: pooling_mode={raw['pooling_mode']!r} must be a mode name or a list")
        else:
            modes = tuple(mode for key, mode in LEGACY_KEYS.items() if raw.get(key, False)) or ("mean",)
        bad = [m for m in modes if m not in MODES]
        if bad or not modes:
            raise ConfigError(f"{source}: pooling mode {bad or modes!r} is not one of {MODES}")
        include_prompt = raw.get("include_prompt", True)
        if not isinstance(include_prompt, bool):
            raise ConfigError(f"{source}: include_prompt={include_prompt!r} must be true or false")
        return cls(modes, include_prompt)


def pool(x: torch.Tensor, attention_mask: torch.Tensor, modes: tuple[str, ...], skip: int = 0,
         compile: bool | None = None) -> torch.Tensor:
    """Apply each mode and concatenate, in the order given: (B, T, C) -> (B, C * len(modes)).

    ``skip``: leave each row's first ``skip`` positions out (a prompt's tokens with ``include_prompt:
    false``; rows are right-padded), as sentence-transformers does: by zeroing them in the mask, so
    ``weightedmean`` keeps the other tokens' position weights and ``cls`` takes the first token left.
    ``compile``: mean pooling's kernel through torch.compile (default: on CUDA; training runs it eagerly)."""
    B, T, C = x.shape
    acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    original_mask = attention_mask
    if skip:
        attention_mask = attention_mask.clone()
        attention_mask[:, :skip] = 0
    outputs = []
    for mode in modes:
        if mode == "cls":
            # The first real token (index 0 with right padding).
            first = attention_mask.int().argmax(dim=1)  # (B,)
            outputs.append(x[torch.arange(B, device=x.device), first])
        elif mode == "max":
            outputs.append(x.masked_fill(attention_mask.unsqueeze(-1) == 0, float("-inf")).max(dim=1).values)
        elif mode == "mean":
            outputs.append(mean_pool(x, attention_mask, compile))
        elif mode == "mean_sqrt_len_tokens":
            mask = attention_mask.unsqueeze(-1).to(x.dtype)
            total = (x * mask).sum(dim=1, dtype=acc)
            outputs.append((total / mask.sum(dim=1, dtype=acc).clamp(min=1e-9).sqrt()).to(x.dtype))
        elif mode == "weightedmean":
            # Weights 1, 2, 3, ... counted from the first real token.
            mask = attention_mask.unsqueeze(-1).to(acc)  # (B, T, 1)
            weights = torch.arange(1, T + 1, device=x.device, dtype=acc).view(1, T, 1)
            weights = weights - original_mask.int().argmax(dim=1).view(B, 1, 1)
            weighted = mask * weights  # (B, T, 1)
            total = (x * weighted).sum(dim=1)
            outputs.append((total / weighted.sum(dim=1).clamp(min=1e-9)).to(x.dtype))
        elif mode == "lasttoken":
            # The last real token; with right padding that is index (length - 1).
            values, flipped = attention_mask.flip(1).max(dim=1)
            flipped = torch.where(values == 0, T - 1, flipped)
            last = T - flipped - 1  # (B,)
            masked = x * attention_mask.unsqueeze(-1).to(x.dtype)
            outputs.append(masked[torch.arange(B, device=x.device), last])
        else:
            raise ConfigError(f"pooling mode {mode!r} is not one of {MODES}")
    return torch.cat(outputs, dim=-1)
