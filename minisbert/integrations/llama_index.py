"""LlamaIndex: ``MinisbertEmbedding`` is a ``llama_index.core.embeddings.BaseEmbedding`` (``pip install
'minisbert[llama-index]'``): queries with the model's ``query`` prompt, texts with its document prompt,
where the model has them; LlamaIndex batches texts by ``embed_batch_size``."""

from __future__ import annotations

import asyncio

from llama_index.core.embeddings import BaseEmbedding
from pydantic import PrivateAttr

from minisbert.integrations import load


class MinisbertEmbedding(BaseEmbedding):
    normalize: bool = False
    _encoder = PrivateAttr()

    def __init__(self, model, normalize: bool = False, embed_batch_size: int = 32, **kwargs):
        """``model``: a ``SentenceEncoder``, or what ``SentenceEncoder(...)`` opens."""
        encoder = load(model)
        super().__init__(model_name=kwargs.pop("model_name", encoder.source), normalize=normalize,
                         embed_batch_size=embed_batch_size, **kwargs)
        self._encoder = encoder

    @classmethod
    def class_name(cls) -> str:
        return "MinisbertEmbedding"

    @property
    def encoder(self):
        return self._encoder

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._encoder.encode_query(query, normalize_embeddings=self.normalize).tolist()

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._get_text_embeddings([text])[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return self._encoder.encode_document(list(texts), batch_size=self.embed_batch_size,
                                             normalize_embeddings=self.normalize).tolist()

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return await asyncio.to_thread(self._get_query_embedding, query)

    async def _aget_text_embedding(self, text: str) -> list[float]:
        return await asyncio.to_thread(self._get_text_embedding, text)

    async def _aget_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return await asyncio.to_thread(self._get_text_embeddings, texts)
