"""Prompts, as sentence-transformers applies them: which text ``encode`` prepends, how many tokens it
takes (what pooling skips under ``include_prompt: false``), and the prompt ``encode_query`` /
``encode_document`` choose."""

from __future__ import annotations

import logging

log = logging.getLogger("minisbert")

DOCUMENT_PROMPTS = ("document", "passage", "corpus")  # encode_document's choice, first found


def resolve_prompt(prompts: dict[str, str], default_prompt_name: str | None, prompt: str | None = None,
                   prompt_name: str | None = None) -> str:
    """``prompt`` if given, else ``prompts[prompt_name]``, else the default prompt's, else none."""
    if prompt is not None:
        if prompt_name is not None:
            log.warning("both prompt and prompt_name given; prompt_name %r is ignored", prompt_name)
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        return prompt
    name = prompt_name if prompt_name is not None else default_prompt_name
    if name is None:
        return ""
    if name not in prompts:
        raise ValueError(f"prompt name {name!r} is not one of the model's prompts {list(prompts)}")
    return prompts[name]


def prompt_length(tokenizer, prompt: str) -> int:
    """The tokens of ``prompt`` at the start of every prompted text: [CLS] and the prompt's own (its
    trailing [SEP] not counted), as sentence-transformers counts what ``include_prompt: false`` skips."""
    ids = tokenizer.encode_ids([prompt])[0]
    return len(ids) - (1 if ids and ids[-1] in tokenizer.special_ids else 0)


def given(kwargs: dict) -> bool:
    """Whether ``encode``'s keywords name a prompt already."""
    return kwargs.get("prompt") is not None or kwargs.get("prompt_name") is not None


def query_keywords(prompts: dict[str, str], kwargs: dict) -> dict:
    """``encode_query``'s keywords for ``encode``: the ``"query"`` prompt unless one is given."""
    if not given(kwargs) and "query" in prompts:
        kwargs = dict(kwargs, prompt_name="query")
    return kwargs


def document_keywords(prompts: dict[str, str], kwargs: dict) -> dict:
    """``encode_document``'s keywords for ``encode``: the first of ``DOCUMENT_PROMPTS`` the model has,
    unless a prompt is given."""
    if not given(kwargs):
        kwargs = dict(kwargs, prompt_name=next((n for n in DOCUMENT_PROMPTS if n in prompts), None))
    return kwargs
