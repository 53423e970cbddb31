"""``SentenceEncoder(name, **kwargs)`` takes ``SentenceTransformer(name, **kwargs)``'s keywords: they become
``from_pretrained``'s (which applies the settings some of them override: ``encoding.settings``).

sentence-transformers' names that differ from ours: ``cache_folder`` is ``cache_dir``, and ``model_kwargs``
may carry the dtype (``{"torch_dtype": ...}`` or ``{"dtype": ...}``). Any other keyword (``backend``,
``trust_remote_code``, ``modules``, ...) is refused with a ValueError naming it: ignored silently, it would
give embeddings other than the ones the caller asked for.
"""

from __future__ import annotations

from minisbert.checks import unknown_keys

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

