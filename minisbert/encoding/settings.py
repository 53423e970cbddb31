"""The settings sentence-transformers keeps on a model (``config_sentence_transformers.json``'s prompts,
default prompt, similarity function, ``truncate_dim``; ``max_seq_length``): checked when set, overridden
by ``from_pretrained``'s keywords, cut for a block (``truncate_sentence_embeddings``)."""

from __future__ import annotations

import contextlib

from minisbert.checks import positive_int
from minisbert.io.folder import SIMILARITY_FUNCTIONS, check_length


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
