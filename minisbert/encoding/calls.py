"""One ``encode`` call, as sentence-transformers makes it: its arguments checked and normalised once
(before any text is tokenized), run in this process or in worker processes, and the result converted
as sentence-transformers returns it."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from minisbert.checks import positive_int
from minisbert.encoding import workers
from minisbert.encoding.inference import run_here
from minisbert.quantize import PRECISIONS, to_numpy
from minisbert.text.tokenizer import check_texts

OUTPUT_VALUES = ("sentence_embedding", "token_embeddings", None)
MISSING = object()  # ``encode()`` without texts (they may come as ``inputs=``)


@dataclasses.dataclass(frozen=True)
class EncodeCall:
    """One ``encode`` call, checked: its texts and what to do with them."""

    texts: list[str]
    single: bool  # one text given (not a list): one vector returned
    prompt: str  # prepended to every text ("" for none)
    batch_size: int
    show_progress_bar: bool | None
    output_value: str | None
    precision: str | None
    convert_to_numpy: bool
    convert_to_tensor: bool
    normalize_embeddings: bool
    truncate_dim: int | None

    def inference(self) -> dict:
        """The keywords of ``inference.run_here`` (also what each worker of a pool receives)."""
        return dict(prompt=self.prompt, batch_size=self.batch_size, show_progress_bar=self.show_progress_bar,
                    output_value=self.output_value, normalize_embeddings=self.normalize_embeddings,
                    truncate_dim=self.truncate_dim)


def check_encode(encoder, sentences, kwargs: dict, *, prompt_name: str | None, prompt: str | None,
                 batch_size: int, show_progress_bar: bool | None, output_value: str | None,
                 precision: str | None, convert_to_numpy: bool, convert_to_tensor: bool,
                 normalize_embeddings: bool, truncate_dim: int | None) -> EncodeCall:
    """``encode``'s arguments as one ``EncodeCall``; ``kwargs`` are the keywords ``encode`` has no name for."""
    kwargs = dict(kwargs)
    if sentences is MISSING:  # sentence-transformers 6 names it ``inputs``
        if "inputs" not in kwargs:
            raise TypeError("encode() missing the texts to embed")
        sentences = kwargs.pop("inputs")
    kwargs.pop("task", None)  # sentence-transformers' Router task: these models have one route
    if kwargs:
        raise ValueError(f"SentenceEncoder.encode() has been called with additional keyword arguments that "
                         f"this model does not use: {list(kwargs)}.")
    if output_value not in OUTPUT_VALUES:
        raise ValueError(f"output_value={output_value!r} is not one of {OUTPUT_VALUES}")
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"Precision {precision!r} is not supported, must be one of {set(PRECISIONS)}")
    if precision not in (None, "float32") and output_value is None:
        raise ValueError(f"precision={precision!r} quantizes embeddings; output_value=None returns features")
    if convert_to_tensor:
        convert_to_numpy = False
    if output_value != "sentence_embedding":  # per-text tensors or dicts, as given
        convert_to_tensor = convert_to_numpy = False
    batch_size = positive_int(batch_size, "batch_size")
    single = isinstance(sentences, (str, dict))  # a dict is one multimodal input, as in sentence-transformers
    texts = check_texts([sentences] if single else sentences)
    truncate_dim = encoder.truncate_dim if truncate_dim is None else truncate_dim
    return EncodeCall(texts=texts, single=single, prompt=encoder.resolve_prompt(prompt, prompt_name),
                      batch_size=batch_size, show_progress_bar=show_progress_bar, output_value=output_value,
                      precision=precision, convert_to_numpy=convert_to_numpy, convert_to_tensor=convert_to_tensor,
                      normalize_embeddings=normalize_embeddings,
                      truncate_dim=None if truncate_dim is None else positive_int(truncate_dim, "truncate_dim"))


def run(encoder, texts: list[str], inference: dict, pool: dict | None, device, chunk_size: int | None):
    """``(out, device)``: ``run_here``'s result for ``texts``, and where an empty tensor result lies
    (the encoder's device, or the CPU where workers ran it)."""
    if pool is not None or (isinstance(device, list) and len(device) > 0):
        return workers.encode(encoder, texts, pool=pool, devices=device, chunk_size=chunk_size, **inference), "cpu"
    if device is not None and not isinstance(device, list):
        target = torch.empty(0, device=device).device  # canonical: "cpu:0" is "cpu"
        if target != encoder.device:
            encoder.to(target)
    return run_here(encoder, texts, **inference), encoder.device


def convert(out, call: EncodeCall, device: torch.device | str):
    """``out`` (an (N, D) tensor or array, an empty 1-D tensor, or a list) converted as ``call`` asks;
    ``device``: where an empty tensor result lies (the model's, or the CPU after worker processes)."""
    if call.convert_to_tensor:
        if isinstance(out, torch.Tensor) or len(out):
            out = torch.as_tensor(out)
        else:
            out = torch.tensor([], device=device)
    elif call.convert_to_numpy:
        if not len(out):
            out = np.array([])
        elif isinstance(out, torch.Tensor):
            out = to_numpy(out)
    else:
        out = list(torch.from_numpy(out) if isinstance(out, np.ndarray) else out)
    return out[0] if call.single else out
