"""Chroma: ``MinisbertEmbeddingFunction`` is a ``chromadb`` ``EmbeddingFunction`` registered under the name
"minisbert" (``pip install 'minisbert[chroma]'``), so a persisted collection rebuilds it from its config
(``get_config`` / ``build_from_config``: the model folder or name, normalisation, batch size)."""

from __future__ import annotations

from typing import Any

import numpy as np
from chromadb.api.types import Documents, EmbeddingFunction, Embeddings
from chromadb.utils.embedding_functions import register_embedding_function

from minisbert.integrations import load


@register_embedding_function
class MinisbertEmbeddingFunction(EmbeddingFunction[Documents]):
    def __init__(self, model_name: str, normalize_embeddings: bool = False, batch_size: int = 32, encoder=None):
        """``model_name``: what ``SentenceEncoder(...)`` opens (kept in the collection's config);
        ``encoder``: an already loaded encoder of that model, to share one."""
        self.model_name, self.normalize_embeddings, self.batch_size = str(model_name), normalize_embeddings, batch_size
        self.encoder = load(encoder if encoder is not None else model_name)

    def __call__(self, input: Documents) -> Embeddings:
        rows = self.encoder.encode_document(list(input), batch_size=self.batch_size,
                                            normalize_embeddings=self.normalize_embeddings)
        return [np.asarray(row, dtype=np.float32) for row in rows]

    def embed_query(self, input: Documents) -> Embeddings:
        rows = self.encoder.encode_query(list(input), batch_size=self.batch_size,
                                         normalize_embeddings=self.normalize_embeddings)
        return [np.asarray(row, dtype=np.float32) for row in rows]

    @staticmethod
    def name() -> str:
        return "minisbert"

    def default_space(self) -> str:
        return {"dot": "ip", "euclidean": "l2"}.get(self.encoder.similarity_fn_name, "cosine")

    def supported_spaces(self) -> list[str]:
        return ["cosine", "l2", "ip"]

    def get_config(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "normalize_embeddings": self.normalize_embeddings,
                "batch_size": self.batch_size}

    @staticmethod
    def build_from_config(config: dict[str, Any]) -> "MinisbertEmbeddingFunction":
        return MinisbertEmbeddingFunction(config["model_name"], bool(config.get("normalize_embeddings", False)),
                                          int(config.get("batch_size", 32)))

    @staticmethod
    def validate_config(config: dict[str, Any]) -> None:
        if not isinstance(config.get("model_name"), str):
            raise ValueError(f"minisbert embedding function config needs a model_name string, got {config!r}")

    def validate_config_update(self, old_config: dict[str, Any], new_config: dict[str, Any]) -> None:
        if "model_name" in new_config and new_config["model_name"] != old_config.get("model_name"):
            raise ValueError("a collection's model cannot change: its stored embeddings came from the old one")
