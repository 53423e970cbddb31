"""MTEB: ``MinisbertMTEB`` follows ``mteb``'s encoder protocol (``pip install 'minisbert[mteb]'``), so
``mteb.evaluate(MinisbertMTEB(model), tasks)`` runs any MTEB task on a minisbert encoder.

``encode`` takes mteb's DataLoader of text batches with ``task_metadata`` and ``prompt_type``: the prompt
is the one mteb's own sentence-transformers wrapper would choose from the model's prompts (task name
and type, then ``query`` / ``document``); without one, queries and documents go through
``encode_query`` / ``encode_document``. ``similarity`` / ``similarity_pairwise`` are the model's own
(its ``similarity_fn_name``)."""

from __future__ import annotations

import numpy as np
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta
from mteb.types import PromptType

from minisbert.integrations import load


def model_meta(encoder, name: str | None = None, revision: str | None = None) -> ModelMeta:
    """What mteb records about the model: name, size, width, token limit; unknown fields None."""
    return ModelMeta(
        loader=None, name=name or f"minisbert/{encoder.folder.root.name}", revision=revision, release_date=None,
        languages=None, n_parameters=sum(p.numel() for p in encoder.parameters()), memory_usage_mb=None,
        max_tokens=encoder.max_seq_length, embed_dim=encoder.get_sentence_embedding_dimension(), license=None,
        open_weights=True, public_training_code=None, public_training_data=None, framework=["PyTorch"],
        similarity_fn_name=None,  # None: mteb calls this wrapper's similarity, i.e. the model's own
        use_instructions=bool(encoder.prompts), training_datasets=None)


class MinisbertMTEB(AbsEncoder):
    def __init__(self, model, revision: str | None = None, *, device: str | None = None, name: str | None = None,
                 batch_size: int = 32, **kwargs):
        """``model``: a ``SentenceEncoder``, or what ``SentenceEncoder(...)`` opens (mteb's loader signature)."""
        self.model = load(model, **(dict(kwargs, device=device) if device else kwargs))
        self.model_prompts = dict(self.model.prompts) or None
        self.batch_size = batch_size
        self.mteb_model_meta = model_meta(self.model, name, revision)

    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str, prompt_type: PromptType | None = None,
               **kwargs) -> np.ndarray:
        texts = [text for batch in inputs for text in batch["text"]]
        prompt_name = self.get_prompt_name(task_metadata, prompt_type)
        keywords = {"batch_size": kwargs.get("batch_size", self.batch_size)}
        if prompt_name is not None:
            return self.model.encode(texts, prompt_name=prompt_name, **keywords)
        if prompt_type == PromptType.query:
            return self.model.encode_query(texts, **keywords)
        if prompt_type == PromptType.document:
            return self.model.encode_document(texts, **keywords)
        return self.model.encode(texts, **keywords)

    def similarity(self, embeddings1, embeddings2):
        return self.model.similarity(embeddings1, embeddings2)

    def similarity_pairwise(self, embeddings1, embeddings2):
        return self.model.similarity_pairwise(embeddings1, embeddings2)
