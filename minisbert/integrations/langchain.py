"""LangChain: ``MinisbertEmbeddings`` is a ``langchain_core.embeddings.Embeddings`` (``pip install
'minisbert[langchain]'``). ``embed_query`` uses the model's ``query`` prompt, ``embed_documents`` its
document prompt, where the model has them; the async variants run in a worker thread."""

from __future__ import annotations

import asyncio

from langchain_core.embeddings import Embeddings

from minisbert.integrations import load


class MinisbertEmbeddings(Embeddings):
    def __init__(self, model, normalize: bool = False, batch_size: int = 32, **encoder_kwargs):
        """``model``: a ``SentenceEncoder``, or what ``SentenceEncoder(...)`` opens (with ``encoder_kwargs``)."""
        self.encoder = load(model, **encoder_kwargs)
        self.normalize, self.batch_size = normalize, batch_size

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.encoder.encode_document(list(texts), batch_size=self.batch_size,
                                            normalize_embeddings=self.normalize).tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.encoder.encode_query(text, normalize_embeddings=self.normalize).tolist()

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        return await asyncio.to_thread(self.embed_documents, texts)

    async def aembed_query(self, text: str) -> list[float]:
        return await asyncio.to_thread(self.embed_query, text)
