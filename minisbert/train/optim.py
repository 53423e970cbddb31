"""old_fit's optimizer and learning-rate schedules: AdamW with weight decay on all but biases and
LayerNorms, and transformers' warmup schedules by the names the cards print."""

from __future__ import annotations

import math

import torch
from torch import nn

from minisbert.train.recipe import FitParams


def no_decay(name: str, module: nn.Module) -> bool:
    """old_fit's rule, ``any(nd in name for nd in ["bias", "LayerNorm.bias", "LayerNorm.weight"])`` on
    Hugging Face names: biases and every LayerNorm parameter (DeBERTa's relative-table LayerNorm too),
    but not a LayerNorm whose checkpoint name says otherwise (ModernBERT's ``*norm``: ``named_layer_norm``)."""
    return name == "bias" or (isinstance(module, nn.LayerNorm) and getattr(module, "named_layer_norm", True))


def adamw(modules: list[nn.Module], fit: FitParams) -> torch.optim.AdamW:
    """AdamW over every parameter of ``modules``: group 0 decays, group 1 (``no_decay``) does not."""
    decay, plain = [], []
    for m in modules:
        for sub in m.modules():
            for name, p in sub.named_parameters(recurse=False):
                (plain if no_decay(name, sub) else decay).append(p)
    groups = [{"params": decay, "weight_decay": fit.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, **fit.optimizer_params)


def lr_factor(kind: str, step: int, warmup: int, total: int) -> float:
    """The learning rate's multiplier at ``step``: transformers' schedules, which old_fit names."""
    if kind == "constantlr":
        return 1.0
    if step < warmup:  # every other schedule warms up linearly from 0
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "warmupconstant":
        return 1.0
    if kind == "warmuplinear":  # down to 0 at ``total``, written as transformers does (same rounding)
        return max(0.0, (total - step) / max(1, total - warmup))
    if kind == "warmupcosine":  # half a cosine wave down to 0
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))
    if progress >= 1.0:  # warmupcosinewithhardrestarts, with one cycle
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * (progress % 1.0))))


def schedule(optimizer: torch.optim.Optimizer, fit: FitParams, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """``fit.scheduler`` over ``total`` steps with ``fit.warmup_steps`` of warmup."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(fit.scheduler, step, fit.warmup_steps, total))
