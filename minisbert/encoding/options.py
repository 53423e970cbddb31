"""What an encoder is set to: ``SentenceEncoder(name, **kwargs)``'s keywords (sentence-transformers'
names included), the settings sentence-transformers keeps on a model (prompts, default prompt, similarity
function, ``truncate_dim``, ``max_seq_length``: checked when set, overridden by ``from_pretrained``'s
keywords), and prompts as sentence-transformers applies them."""

from __future__ import annotations

import contextlib
import logging

from minisbert.checks import positive_int, unknown_keys
from minisbert.io.folder import SIMILARITY_FUNCTIONS, check_length

# ``SentenceEncoder.from_pretrained``'s keywords (a test holds this to its signature).
FROM_PRETRAINED = ("device", "dtype", "revision", "token", "cache_dir", "fast", "quantize", "prompts",
                   "default_prompt_name", "similarity_fn_name", "truncate_dim")
MODEL_KWARGS = ("torch_dtype", "dtype")  # transformers' old and new names for the dtype


def from_pretrained_keywords(kwargs: dict) -> dict:
    """``SentenceEncoder(...)``'s keywords as ``from_pretrained``'s; a ValueError names any it lacks."""
    unknown_keys(kwargs, FROM_PRETRAINED + ("cache_folder", "model_kwargs"), "SentenceEncoder()", error=ValueError)
    keywords = {k: v for k, v in kwargs.items() if k in FROM_PRETRAINED}
    if keywords.get("device", "cpu") is None:  # sentence-transformers' default: ours is the CPU
        del keywords["device"]
    merge(keywords, "cache_dir", kwargs.get("cache_folder"), "cache_folder")
    model_kwargs = kwargs.get("model_kwargs") or {}
    unknown_keys(model_kwargs, MODEL_KWARGS, "SentenceEncoder(model_kwargs=...)", error=ValueError)
    for key in MODEL_KWARGS:
        merge(keywords, "dtype", model_kwargs.get(key), f"model_kwargs[{key!r}]")
    return keywords


def merge(keywords: dict, name: str, value, given_as: str) -> None:
    """Set ``keywords[name]`` from a keyword of another name, refusing two that disagree."""
    if value is None:
        return
    if keywords.get(name) is not None and keywords[name] != value:
        raise ValueError(f"SentenceEncoder(): {given_as}={value!r} and {name}={keywords[name]!r} disagree")
    keywords[name] = value


def override_settings(encoder, prompts: dict[str, str] | None, default_prompt_name: str | None,
                      similarity_fn_name: str | None, truncate_dim: int | None) -> None:
    """The settings of ``config_sentence_transformers.json`` replaced by keywords, as sentence-transformers'
    constructor does: given prompts replace saved ones of the same name (the others are kept)."""
    if prompts is not None:
        if not (isinstance(prompts, dict) and all(isinstance(v, str) for v in prompts.values())):
            raise TypeError(f"prompts must map prompt names to strings, got {prompts!r}")
        encoder.prompts.update(prompts)
    if default_prompt_name is not None:
        encoder.default_prompt_name = default_prompt_name
    if encoder.default_prompt_name is not None and encoder.default_prompt_name not in encoder.prompts:
        raise ValueError(f"Default prompt name '{encoder.default_prompt_name}' not found in the configured "
                         f"prompts dictionary with keys {list(encoder.prompts)!r}.")
    if similarity_fn_name is not None:
        encoder.similarity_fn_name = similarity_fn_name  # checked by the encoder's setter
    if truncate_dim is not None:
        encoder.truncate_dim = positive_int(truncate_dim, "truncate_dim")


def check_max_seq_length(value, max_tokens: int) -> int:
    """``max_seq_length`` as an int within the ``max_tokens`` positions the model has; else a ValueError."""
    value = check_length(value, "max_seq_length")
    if value > max_tokens:
        raise ValueError(f"max_seq_length={value} exceeds the {max_tokens} positions this model has")
    return value


def check_similarity_fn_name(value) -> str:
    """A similarity function's name (or sentence-transformers' ``SimilarityFunction`` enum) as its name."""
    value = getattr(value, "value", value)
    if value not in SIMILARITY_FUNCTIONS:
        raise ValueError(f"SentenceEncoder only supports similarity_fn_name in {SIMILARITY_FUNCTIONS}, "
                         f"got {value!r}.")
    return value


@contextlib.contextmanager
def truncated(encoder, truncate_dim: int | None):
    """Within the block, ``encoder.truncate_dim`` is ``truncate_dim`` (None: no cut); then what it was."""
    original = encoder.truncate_dim
    try:
        encoder.truncate_dim = None if truncate_dim is None else positive_int(truncate_dim, "truncate_dim")
        yield
    finally:
        encoder.truncate_dim = original


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
