"""DeBERTa-v2's disentangled attention on the packed path.

The c2p/p2c terms are folded into the additive attention bias of the same
``scaled_dot_product_attention`` call; where every distance keeps its own table row (short texts)
they are strided views of the relative-score GEMMs' outputs, not gathers (``diagonals``).

Shape legend: H heads, b texts in a group, T tokens, D head dim, R relative table rows read.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from minisbert.fast.packed import FastEncoder
from minisbert.fast.packing import Batch, Packing
from minisbert.models.bert import padding_bias
from minisbert.models.deberta_v2 import RelativePositions, relative_positions
from minisbert.runner import to_device

log = logging.getLogger("minisbert")


# On the CPU, attention runs on chunks of texts whose (H, b*T, R) relative-score GEMM output stays
# within a few MiB, so the pick of its scores reads them from cache instead of memory: 4.9% faster for
# DeBERTa-v2 base in an in-process A/B (8.39 vs 8.80 s for 256 texts, 5 repetitions; 16-32 MiB gained
# less), bitwise the same embeddings (``python scripts/tune_fast.py --model random-deberta --n 256
# --chunk-mib 4,8,16,32,inf``). On CUDA the whole group is one launch.
CHUNK_BYTES = 8 << 20
# The relative-score GEMMs take a multiple of this many table rows: MKL's batched GEMM with K = 64 ran
# 1.3-1.6x faster at such widths (T = 8-128, in isolation), 16% less time in these GEMMs in place (256
# texts), the same embeddings bit for bit (``python scripts/tune_fast.py --model random-deberta --n 256
# --round-to 1,8,16,32``).
ROUND = 16


class FastDebertaV2(FastEncoder):
    """``models.deberta_v2.DebertaV2Model``: the c2p/p2c terms and the padding become one additive
    bias for ``scaled_dot_product_attention``, whose own scale is DeBERTa's 1/sqrt(D * (1 + terms)).

    ``round_to`` and ``chunk_bytes``: see ROUND and CHUNK_BYTES; ``relative_shift=False`` always
    gathers the c2p/p2c scores instead of taking strided views (``diagonals``), the path they replace.
    Other keywords as ``FastEncoder``'s."""

    def __init__(self, model: nn.Module, backend: str | None = None, quantize: str | None = None, *,
                 round_to: int = ROUND, chunk_bytes: int = CHUNK_BYTES, relative_shift: bool = True, **options):
        super().__init__(model, backend, quantize, **options)
        self.round_to, self.chunk_bytes, self.relative_shift = round_to, chunk_bytes, relative_shift
        self._relative = {}  # T -> (RelativePositions on the model's device, whether they are a shift)
        self._positions: tuple[tuple, list] | None = None  # (parameter versions, per-block (pos_k, pos_q))

    @property
    def positions_cached(self) -> bool:
        """Whether ``position_projections`` has computed and kept the projections."""
        return self._positions is not None

    def relative(self, T: int) -> tuple[RelativePositions, bool]:
        """The relative positions of padded length ``T`` on the model's device, and whether they are a
        shift (``is_shift``: then c2p/p2c are strided views), kept for the 16 lengths used last."""
        if T not in self._relative:
            if len(self._relative) >= 16:  # (T, T) int64 tables: bound the memory as the CPU cache does
                self._relative.clear()
            cfg = self.model.config
            with torch.inference_mode(False):  # usable outside inference mode too
                rp = relative_positions(T, cfg.att_span, cfg.position_buckets, cfg.max_relative)
                self._relative[T] = (RelativePositions(*(to_device(t, self.device) for t in rp[:3]), rp.rows),
                                     self.relative_shift and is_shift(rp))
        return self._relative[T]

    def position_projections(self) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
        """The model's per-block (pos_k, pos_q), (H, 2S, D) each: input-independent, so computed once
        and kept until a parameter they read changes (in place, or by a device or dtype move)."""
        model = self.model
        modules = [model.rel_embed, model.rel_ln, *(b.attn for b in model.blocks)]
        key = tuple((p.device, p.dtype, p.data_ptr(), p._version) for m in modules if m is not None
                    for p in m.parameters())
        if self._positions is None or self._positions[0] != key:
            with torch.inference_mode(False), torch.no_grad():  # cached tensors must outlive inference mode
                self._positions = (key, model.position_projections())
        return self._positions[1]

    def forward(self, groups: Batch) -> tuple[torch.Tensor, Packing]:
        model = self.model
        layout = self.layout(groups)
        groups = self.on_device(groups)
        # The reference embedding on each padded group (cheap: a lookup and a LayerNorm), then packed.
        x = layout.unpad([model.embed(ids, mask) for ids, mask in groups])  # (rows, C)
        rel = [self.relative(ids.shape[1]) for ids, _ in groups]  # per group: its length's buckets
        # Pad keys get the dtype's minimum, as the reference's masked_fill; pad query rows are dropped.
        pad_keys = [padding_bias(mask, x.dtype) for _, mask in groups]  # each (b, 1, 1, T)
        for block, ref, (pos_k, pos_q) in zip(self.blocks, model.blocks, self.position_projections()):
            # DeBERTa divides each relative term by the same scale; dividing the (H, 2S, D) position
            # tables once instead saves a pass over every (H, b, T, T) term.
            scale = ref.attn.scale
            pos_k = pos_k / scale if pos_k is not None else None
            pos_q = pos_q / scale if pos_q is not None else None
            # c2p reads the key table bottom up when the relative positions are a shift (see ``diagonals``).
            pos_k_rev = pos_k.flip(1) if pos_k is not None and any(shift for _, shift in rel) else None

            def heads(q, k, v, pad, rp, shift, cols, pos_k=pos_k, pos_k_rev=pos_k_rev, pos_q=pos_q, scale=scale):
                # Heads first: (H, b, T, D) views. Then the relative terms are one batched (b*T, D) @
                # (D, R) GEMM over the heads, and sdpa takes (H, b) as its batch dims; a (b, H, T, D) @
                # (H, D, R) broadcast would copy the position table once per text.
                q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
                H, b, T, D = q.shape
                bias = pad.view(1, b, 1, T)

                def pick(scores, index):  # (H, bT, ≥R) scores against the table -> (H, b, T, T) at index
                    if shift:
                        return diagonals(scores, b, T)  # a view
                    return scores.view(H, b, T, -1).gather(-1, index.expand(H, b, T, T))

                if pos_k is not None:  # c2p[i, j] = q_i . Kr[row(i - j)] / scale
                    if shift:  # the table's rows upside down, so that each row's keys run left to right
                        top = pos_k_rev.shape[1] - rp.rows.stop  # the reachable rows' last one, upside down
                        table = pos_k_rev[:, top: top + cols.stop - cols.start]
                    else:
                        table = pos_k[:, cols]
                    c2p = torch.matmul(q.reshape(H, b * T, D), table.transpose(-1, -2))  # (H, bT, ≥R)
                    bias = pick(c2p, rp.c2p) + bias  # (H, b, T, T)
                if pos_q is not None:  # p2c[i, j] = k_j . Qr[row(j - i)] / scale, transposed to (i, j)
                    p2c = torch.matmul(k.reshape(H, b * T, D), pos_q[:, cols].transpose(-1, -2))  # (H, bT, ≥R)
                    p2c = pick(p2c, rp.p2c).transpose(-1, -2)  # [j, i] -> [i, j]
                    bias = bias.add_(p2c) if pos_k is not None else p2c + bias
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1 / scale)  # (H, b, T, D)
                return out.transpose(0, 1)  # (b, H, T, D)

            def attend(g, q, k, v):
                b, H, T, _ = q.shape
                rp, shift = rel[g]
                # The relative-score GEMMs take the R = 2T - 1 reachable table rows and the next ones up
                # to a multiple of ``round_to`` (never read; the table's end may cut them short; ROUND).
                R = -(-(rp.rows.stop - rp.rows.start) // self.round_to) * self.round_to
                cols = slice(rp.rows.start, rp.rows.start + R)
                step = max(1, self.chunk_bytes // (H * T * R * q.element_size())) if q.device.type == "cpu" else b
                if step >= b:
                    return heads(q, k, v, pad_keys[g], rp, shift, cols)
                return torch.cat([heads(q[s: s + step], k[s: s + step], v[s: s + step], pad_keys[g][s: s + step],
                                        rp, shift, cols) for s in range(0, b, step)])

            x = block(x, layout, attend)
        return x, layout


def is_shift(rp) -> bool:
    """Whether every (i, j) reads the table row of its plain distance: c2p[i, j] = i - j + T - 1 and
    p2c[j, i] the same, no two distances in one bucket, none clamped. DeBERTa's log buckets start
    beyond position_buckets / 2: this holds for T <= 132 with kf-deberta's 256 buckets, for any T up to
    the table's size without buckets."""
    T = rp.c2p.shape[0]
    d = torch.arange(T)
    plain = d[:, None] - d[None, :] + T - 1  # (T, T)
    return torch.equal(rp.c2p.cpu(), plain) and torch.equal(rp.p2c.cpu(), plain.T)


def diagonals(scores: torch.Tensor, b: int, T: int) -> torch.Tensor:
    """(H, b*T, W) scores of each row against consecutive table rows -> the (H, b, T, T) view whose
    [i, j] is row i's column T - 1 - i + j, with no copy (Transformer-XL's "relative shift").

    For plain distances each query row needs T consecutive columns, one column further left per row:
    with row stride W, element [i, j] sits at i * (W - 1) + j + T - 1, a strided view. c2p scores
    against the table upside down are such (row i = query i, its keys j left to right); p2c scores
    against the table as it is are such too with the roles swapped (row = key j, then transposed).
    """
    H, _, W = scores.shape
    assert scores.is_contiguous() and W >= 2 * T - 1
    return scores.as_strided((H, b, T, T), (b * T * W, T * W, W - 1, 1), scores.storage_offset() + T - 1)
