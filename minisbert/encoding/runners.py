"""Which runner ``encode`` uses: the packed fast path (``minisbert/fast/``) when it is on and supported,
else the reference forward (``minisbert.runner``)."""

from __future__ import annotations

import logging
import os

import torch

from minisbert.fast.runner import PackedRunner, fast_forward
from minisbert.modules.layers import LayerPooled
from minisbert.runner import ReferenceRunner

log = logging.getLogger("minisbert")


def reference_runner(folder, loaded) -> ReferenceRunner:
    """The reference forward of a read folder's loaded modules: the transformer, under WeightedLayerPooling
    where the folder turns it on (``layer_pooling_active``)."""
    transformer = LayerPooled(loaded.model, loaded.layer_pooling) if layer_pooling_active(folder, loaded) \
        else loaded.model
    return ReferenceRunner(transformer, loaded.tokenizer.pad_id, folder.pooling.modes, loaded.max_tokens)


def layer_pooling_active(folder, loaded) -> bool:
    """sentence-transformers' Transformer hands the hidden states on (and WeightedLayerPooling acts on
    them) only when config.json says output_hidden_states; otherwise the module passes through."""
    return loaded.layer_pooling is not None and folder.config.get("output_hidden_states") is True


def packed_runner(encoder, fast: bool | None) -> PackedRunner | None:
    """The packed runner built from the encoder's current weights, or None where ``fast`` is off or the
    model has no fast path. ``fast=None``: on unless ``MINISBERT_FAST=0`` (always with int8, which runs
    only there). A ValueError where int8 is asked for but the fast path cannot run."""
    quantize = encoder.quantize
    if fast is None:
        fast = quantize is not None or os.environ.get("MINISBERT_FAST", "1").strip() not in ("0", "false", "no", "off")
    # WeightedLayerPooling needs every layer's states, which only the reference forward records.
    forward = fast_forward(encoder.model, quantize=quantize) if fast and not encoder.layer_pooling_active else None
    if forward is None and quantize:
        why = "fast=False turns off" if not fast else \
            "WeightedLayerPooling turns off" if encoder.layer_pooling_active else \
            f"this model ({type(encoder.model).__name__}) lacks"
        raise ValueError(f"quantize={quantize!r} runs on the fast path, which {why}")
    return None if forward is None else \
        PackedRunner(forward, encoder.tokenizer.pad_id, encoder.pooling.modes, encoder.max_tokens)


def current_runner(encoder) -> ReferenceRunner | PackedRunner:
    """The packed runner when it is on, the reference one when it is off or any hook is attached (hooks
    see the reference modules, which the packed path does not call)."""
    packed = encoder._packed
    if packed is None or has_hooks(encoder.model):
        if packed is not None and encoder.quantize and not encoder._said_hooks:
            log.warning("forward hooks are attached: encode runs the exact float32 reference path, "
                        "not quantize=%r, while they are", encoder.quantize)
            encoder._said_hooks = True  # once per encoder
        return encoder._reference
    return packed


def has_hooks(model: torch.nn.Module) -> bool:
    """Whether any forward hook or pre-hook is registered on the model's modules."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
