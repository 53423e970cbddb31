"""``encode`` in this process, before quantizing and converting: texts -> (N, D) sentence embeddings in
the model's dtype on its device, or per-text token embeddings / feature dicts (``features``). Each
worker of a pool (``minisbert.encoding.workers``) runs ``run_here`` on its chunk."""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from minisbert.modules.pooling import pool as pool_states
from minisbert.runner import to_device
from minisbert.text.tokenizer import clean_text, pad_ids

# Texts whose token counts are planned into batches at once (the packed path sorts them by tokens).
PLAN_CHUNK = 4096


def run_here(encoder, texts: list[str], prompt: str, batch_size: int, show_progress_bar: bool | None,
             output_value: str | None, normalize_embeddings: bool, truncate_dim: int | None):
    """(N, D) embeddings (an empty 1-D tensor for no text), or a list of per-text token embeddings or
    feature dicts for another ``output_value``."""
    # Surrogates -> U+FFFD here too, for tokenizers that are not ours (KoBERT's SentencePiece).
    prompted = [clean_text(prompt + t) for t in texts]
    skip = encoder.prompt_length(prompt) if prompt and not encoder.pooling.include_prompt else 0
    if output_value != "sentence_embedding":
        return token_features(encoder, texts, prompted, prompt, batch_size, output_value, truncate_dim, skip)
    if not texts:
        return torch.tensor([], device=encoder.device)
    return sentence_embeddings(encoder, prompted, batch_size, show_progress_bar, normalize_embeddings,
                               truncate_dim, skip)


def sentence_embeddings(encoder, prompted: list[str], batch_size: int, show_progress_bar: bool | None,
                        normalize: bool, truncate_dim: int | None, skip: int) -> torch.Tensor:
    """Prompted texts -> (N, width) embeddings, ``width`` the embedding cut to ``truncate_dim``, cut after
    the model's own modules and then normalised if asked. ``skip``: pool without each text's first
    ``skip`` tokens (a prompt under ``include_prompt: false``; only the reference runner does that)."""
    width = min(encoder.embedding_dim, truncate_dim or encoder.embedding_dim)
    out = torch.empty((len(prompted), width), dtype=encoder.dtype, device=encoder.device)
    # Longest first, like sentence-transformers: similar lengths share a batch, less padding (a prompt
    # adds the same length to every text, so the order is the texts' own).
    order = sorted(range(len(prompted)), key=lambda i: -len(prompted[i]))
    if show_progress_bar is None:
        show_progress_bar = len(prompted) >= 32 * batch_size and sys.stderr.isatty()
    progress = tqdm(total=len(prompted), desc="Batches", unit="text") if show_progress_bar else None
    runner = encoder._reference if skip else encoder.runner
    # Tokenized one chunk of the longest-first order at a time, so that only one chunk's token ids
    # exist at once (all 100k texts' ids cost ~200 MB of Python lists); a whole number of batches.
    step = -(-PLAN_CHUNK // batch_size) * batch_size
    for start in range(0, len(order), step):
        chunk = order[start: start + step]
        ids = encoder.tokenizer.encode_ids([prompted[i] for i in chunk])
        batches = runner.batches(ids, batch_size, encoder.max_seq_length)
        parts = []  # written into ``out`` once per chunk: on CUDA each indexed write waits for the GPU
        for batch in batches:
            if width == encoder.embedding_dim:
                parts.append(encoder.embed_ids([ids[i] for i in batch], normalize, skip))
            else:  # cut after the model's own modules, then normalise the cut vectors if asked
                part = encoder.embed_ids([ids[i] for i in batch], skip=skip)[:, :width]
                parts.append(F.normalize(part, p=2, dim=1) if normalize else part)
            if progress is not None:
                progress.update(len(batch))
        rows = torch.tensor([chunk[i] for batch in batches for i in batch])
        out.index_copy_(0, to_device(rows, encoder.device), torch.cat(parts))
    if progress is not None:
        progress.close()
    return out


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
