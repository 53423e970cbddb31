"""minisbert in other frameworks' embedding interfaces, one small module per framework, each behind its
own optional extra (import the module you need: ``from minisbert.integrations.langchain import ...``):

- ``langchain``: ``MinisbertEmbeddings`` (``langchain_core.embeddings.Embeddings``)
- ``llama_index``: ``MinisbertEmbedding`` (``llama_index.core.embeddings.BaseEmbedding``)
- ``chroma``: ``MinisbertEmbeddingFunction`` (``chromadb``'s ``EmbeddingFunction``, registered as "minisbert")
- ``haystack``: ``MinisbertTextEmbedder``, ``MinisbertDocumentEmbedder`` (Haystack components)
- ``mteb``: ``MinisbertMTEB`` (``mteb``'s encoder protocol) and ``model_meta``

Queries get the model's ``query`` prompt and documents its document prompt where the model has them
(``SentenceEncoder.encode_query`` / ``encode_document``). docs/integrations.md shows each in use.
"""

from __future__ import annotations

import os

from minisbert.encoder import SentenceEncoder


def load(model: str | os.PathLike | SentenceEncoder, **kwargs) -> SentenceEncoder:
    """``model`` itself if it is an encoder, else ``SentenceEncoder(model, **kwargs)``."""
    return model if isinstance(model, SentenceEncoder) else SentenceEncoder(model, **kwargs)
