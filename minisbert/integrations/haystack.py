"""Haystack: ``MinisbertTextEmbedder`` (a query -> ``embedding``) and ``MinisbertDocumentEmbedder``
(documents -> the same documents with ``embedding`` set) as Haystack components (``pip install
'minisbert[haystack]'``). The model loads in ``warm_up`` (a pipeline calls it), or on the first run;
``to_dict`` / ``from_dict`` keep the model name and settings."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from haystack import Document, component, default_from_dict, default_to_dict

from minisbert.integrations import load


class _Embedder:
    def __init__(self, model: str, normalize_embeddings: bool = False, batch_size: int = 32,
                 prompt_name: str | None = None):
        """``prompt_name``: one of the model's prompts (default: the query prompt for the text embedder,
        the document prompt for the document embedder, where the model has them)."""
        self.model, self.normalize_embeddings, self.batch_size = str(model), normalize_embeddings, batch_size
        self.prompt_name = prompt_name
        self.encoder = None

    def warm_up(self) -> None:
        if self.encoder is None:
            self.encoder = load(self.model)

    def keywords(self) -> dict:
        given = {"prompt_name": self.prompt_name} if self.prompt_name is not None else {}
        return dict(given, batch_size=self.batch_size, normalize_embeddings=self.normalize_embeddings)

    def to_dict(self) -> dict[str, Any]:
        return default_to_dict(self, model=self.model, normalize_embeddings=self.normalize_embeddings,
                               batch_size=self.batch_size, prompt_name=self.prompt_name)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        return default_from_dict(cls, data)


@component
class MinisbertTextEmbedder(_Embedder):
    @component.output_types(embedding=list[float])
    def run(self, text: str) -> dict[str, Any]:
        if not isinstance(text, str):
            raise TypeError(f"MinisbertTextEmbedder embeds one string; got {type(text).__name__} "
                            f"(use MinisbertDocumentEmbedder for documents)")
        self.warm_up()
        return {"embedding": self.encoder.encode_query(text, **self.keywords()).tolist()}


@component
class MinisbertDocumentEmbedder(_Embedder):
    @component.output_types(documents=list[Document])
    def run(self, documents: list[Document]) -> dict[str, Any]:
        if not isinstance(documents, list) or not all(isinstance(d, Document) for d in documents):
            raise TypeError("MinisbertDocumentEmbedder embeds a list of Documents (use MinisbertTextEmbedder for "
                            "a string)")
        self.warm_up()
        rows = self.encoder.encode_document([d.content or "" for d in documents], **self.keywords())
        return {"documents": [replace(d, embedding=row.tolist()) for d, row in zip(documents, rows)]}
