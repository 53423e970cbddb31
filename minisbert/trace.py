"""Looking inside the encoder: per-layer states, attention maps and DeBERTa's score terms, per sentence.

``trace(encoder, sentences)`` runs the model's reference (unfused) path with a ``record`` dict, the
protocol every architecture in ``minisbert.models`` follows: the model appends the embedding output
and each block's output to ``record["hidden_states"]`` and each block's softmax probabilities to
``record["attentions"]``; DeBERTa-v2 also appends its pre-softmax score terms ``record["c2c"]``,
``record["c2p"]``, ``record["p2c"]`` (only the terms the config selects, already scaled) and stores the
relative-position buckets in ``record["rel_buckets"]`` once. Batches are padded on the right, so each
sentence's rows are the first ``T`` positions: everything is cut to them and returned on the CPU.

Shape legend: L layers, H heads, T this sentence's tokens ([CLS]/[SEP] included), C hidden, D
sentence-embedding width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minisbert.modules.pooling import pool
from minisbert.text.tokenizer import check_texts

TERMS = ("c2c", "c2p", "p2c")  # DeBERTa-v2's disentangled attention: content/position pairs


@dataclass(repr=False)
class Trace:
    """What one sentence went through, without padding.

    ``hidden_states`` is one stacked tensor (index 0 is the embedding output, index ``l + 1`` the
    output of block ``l``), so ``trace.hidden_states[-1]`` is the last layer and
    ``trace.hidden_states[:, i]`` follows token ``i`` through the network. ``attentions[l]`` is block
    ``l``'s (H, T, T) probability map, rows are queries, columns keys, every row sums to 1.
    The DeBERTa-v2 fields are ``None`` for other architectures, and a term the config does not
    select (``pos_att_type``) is ``None`` too.
    """

    text: str
    tokens: list[str]  # the tokenizer's strings, e.g. "[CLS]", "한국", "##어"
    input_ids: torch.Tensor  # (T,)
    hidden_states: torch.Tensor  # (L + 1, T, C)
    attentions: torch.Tensor  # (L, H, T, T)
    sentence_embedding: torch.Tensor  # (D,) pooled (then Dense, Normalize as the model says), float32
    c2c: torch.Tensor | None = None  # (L, H, T, T) content->content scores, scaled, before softmax
    c2p: torch.Tensor | None = None  # (L, H, T, T) content->position
    p2c: torch.Tensor | None = None  # (L, H, T, T) position->content
    rel_buckets: torch.Tensor | None = None  # (T, T) bucketed relative position of key j seen from query i

    @property
    def embeddings(self) -> torch.Tensor:
        """The embedding output (T, C), i.e. ``hidden_states[0]``."""
        return self.hidden_states[0]

    @property
    def num_layers(self) -> int:
        return self.attentions.shape[0]

    def __repr__(self) -> str:
        L, H, T, _ = self.attentions.shape
        terms = [name for name in TERMS if getattr(self, name) is not None]
        extra = f", terms={terms}" if terms else ""
        return f"Trace(text={self.text[:30]!r}, T={T}, layers={L}, heads={H}, C={self.hidden_states.shape[-1]}{extra})"


def _own(t: torch.Tensor) -> torch.Tensor:
    # A compact CPU copy: a view would keep the whole padded batch (B x L x H x T x T) alive.
    return t.detach().to("cpu").clone(memory_format=torch.contiguous_format)


def _id_to_token(tokenizer):
    # TextTokenizer wraps a tokenizers.Tokenizer; KoBERT's tokenizer keeps vocab.txt as a dict.
    if hasattr(tokenizer, "tokenizer"):
        return tokenizer.tokenizer.id_to_token
    return {i: token for token, i in tokenizer.vocab.items()}.get


@torch.no_grad()  # not inference_mode: callers may want to modify or differentiate the copies
def trace(encoder, sentences: str | list[str], batch_size: int = 8,
          normalize_embeddings: bool = False) -> list[Trace]:
    """Run ``encoder`` (a ``SentenceEncoder``) on ``sentences`` and return one ``Trace`` per sentence,
    in input order. Sentences are batched longest first; ``batch_size`` bounds the memory of the
    recorded maps (L x B x H x T x T floats per batch)."""
    texts = [sentences] if isinstance(sentences, str) else check_texts(sentences)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    ids = encoder.tokenizer.encode_ids(texts)
    id_to_token = _id_to_token(encoder.tokenizer)
    order = sorted(range(len(texts)), key=lambda i: -len(ids[i]))
    traces: list[Trace | None] = [None] * len(texts)
    for start in range(0, len(texts), batch_size):
        index = order[start: start + batch_size]
        input_ids, attention_mask = encoder.tokenizer.pad([ids[i] for i in index], encoder.device)  # (B, T)
        record: dict = {}
        states = encoder.model(input_ids, attention_mask, record=record)  # (B, T, C)
        if encoder.layer_pooling_active:  # the token states Pooling sees: WeightedLayerPooling's
            states = encoder.layer_pooling(record["hidden_states"])
        emb = encoder.head(pool(states, attention_mask, encoder.folder.pooling.modes), normalize_embeddings)  # (B, D)
        hidden = torch.stack(record["hidden_states"], dim=1)  # (B, L + 1, T, C)
        attentions = torch.stack(record["attentions"], dim=1)  # (B, L, H, T, T)
        terms = {name: torch.stack(record[name], dim=1) for name in TERMS if name in record}  # (B, L, H, T, T)
        buckets = record.get("rel_buckets")
        if buckets is not None:
            buckets = buckets.reshape(buckets.shape[-2:])  # (T, T); depends on i - j only, so one serves all
        for b, i in enumerate(index):
            T = len(ids[i])
            traces[i] = Trace(
                text=texts[i],
                tokens=[id_to_token(t) for t in ids[i]],
                input_ids=_own(input_ids[b, :T]),
                hidden_states=_own(hidden[b, :, :T]),
                attentions=_own(attentions[b, :, :, :T, :T]),
                sentence_embedding=_own(emb[b]),
                **{name: _own(term[b, :, :, :T, :T]) for name, term in terms.items()},
                rel_buckets=None if buckets is None else _own(buckets[:T, :T]),
            )
    return traces
