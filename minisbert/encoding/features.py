"""The model's inputs and its per-token outputs, as sentence-transformers gives them: ``tokenize``'s
feature dict, and ``encode``'s ``output_value="token_embeddings"`` (per text a (tokens, C) tensor, pads
removed) and ``output_value=None`` (per text a dict of every feature)."""

from __future__ import annotations

import numpy as np
import torch

from minisbert.modules.pooling import pool as pool_states
from minisbert.text.tokenizer import pad_ids

# Tokenizer classes whose inputs have no token_type_ids (transformers' ``model_input_names``).
NO_TOKEN_TYPES = ("Roberta", "XLMRoberta", "Camembert", "Bart", "GPT2", "MPNet", "DistilBert", "Longformer")


def uses_token_type_ids(tokenizer_config: dict, model_type: str) -> bool:
    """Whether the inputs include ``token_type_ids``, as transformers' tokenizer class for the folder
    (``tokenizer_config.json``) returns them."""
    names = tokenizer_config.get("model_input_names")
    if isinstance(names, list):
        return "token_type_ids" in names
    cls = tokenizer_config.get("tokenizer_class")
    if isinstance(cls, str):
        return cls.removesuffix("Fast").removesuffix("Tokenizer") not in NO_TOKEN_TYPES
    return model_type != "roberta"


def input_features(encoder, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
    """(B, T) padded ids and mask -> sentence-transformers' feature dict: ``input_ids``,
    ``token_type_ids`` (where the tokenizer makes them), ``attention_mask``, ``modality``."""
    features = {"input_ids": input_ids}
    if encoder.uses_token_type_ids:
        features["token_type_ids"] = torch.zeros_like(input_ids)  # one segment
    features.update(attention_mask=attention_mask, modality="text")
    return features


def tokenize(encoder, texts: list[str]) -> dict:
    """``texts`` (at least one) padded to the longest, truncated at ``max_seq_length``: (B, T) int64 features."""
    return input_features(encoder, *pad_ids(encoder.tokenizer.encode_ids(texts), encoder.tokenizer.pad_id))


def token_features(encoder, texts: list[str], prompted: list[str], prompt: str, batch_size: int,
                   output_value: str | None, truncate_dim: int | None, skip: int) -> list:
    """``output_value="token_embeddings"`` or ``None``: the reference forward on sentence-transformers'
    own batches (its order, each padded to its longest text), so that every per-text feature, the
    padded ones included, has the shape sentence-transformers gives. In input order."""
    order = np.argsort([-len(t) for t in texts])  # the same call as sentence-transformers' (not stable)
    transformer = encoder._reference.model  # the model, or the model under WeightedLayerPooling
    prompt_length = encoder.prompt_length(prompt) if prompt else None
    results = []
    for start in range(0, len(order), batch_size):
        batch = order[start: start + batch_size]
        ids = encoder.tokenizer.encode_ids([prompted[i] for i in batch])
        input_ids, attention_mask = (t.to(encoder.device) for t in pad_ids(ids, encoder.tokenizer.pad_id))
        states = transformer(input_ids, attention_mask)  # (b, T, C)
        emb = encoder.head(pool_states(states, attention_mask, encoder.pooling.modes, skip))  # (b, D)
        if truncate_dim is not None:
            emb = emb[:, :truncate_dim]
        for b, row in enumerate(ids):
            if output_value == "token_embeddings":
                results.append(states[b, :len(row)])
                continue
            item = input_features(encoder, input_ids[b], attention_mask[b])
            if prompt_length is not None:
                item["prompt_length"] = prompt_length
            item.update(token_embeddings=states[b], sentence_embedding=emb[b])
            results.append(item)
    return [results[k] for k in np.argsort(order)]
