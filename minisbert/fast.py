"""Fast inference paths, kept beside the reference models and tested against them.

The reference forward (``minisbert/models/*.py``) runs every row of a padded (B, T) batch through every
linear layer. The fast path here runs the same math on the real tokens only:

- **unpadded (packed) tokens**: embeddings, every linear, GELU, LayerNorm and the residuals run on
  (N, C) with N = the number of real tokens in the batch; only attention needs the (B, T) layout, so
  q/k/v are scattered into a zero-padded buffer for ``scaled_dot_product_attention`` (with the same
  padding bias as the reference) and gathered back. A row's result cannot depend on its neighbours'
  lengths beyond attention's padded keys, which get exactly zero probability, as in the reference;
- **one fused q/k/v linear** (C -> 3C) instead of three, so each block runs four GEMMs of good shape;
- **linears**: ``F.linear`` (MKL sgemm) by default, the faster one on the development machine (AVX2
  only); ``MINISBERT_LINEAR=mkldnn`` switches to oneDNN with pre-packed weights
  (``torch.ops.mkldnn._linear_pointwise``, exact GELU fused into the up-projection);
- DeBERTa-v2's c2p/p2c terms are folded into the additive attention bias of the same
  ``scaled_dot_product_attention`` call;
- the sentence embedding is pooled straight from the packed tokens (``kernels.packed_mean_pool``);
- ``token_batches``: longest first by token count, batches filled to a token budget.

On CUDA the same packed forward runs in the model's dtype (fp16/bf16) with a torch.compile'd pooling
kernel; nothing here is required on the CPU-only machines the tests run on.

Shape legend: B batch, T tokens (padded), N real tokens in the batch, C hidden, H heads, D head dim.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from minisbert import kernels
from minisbert.models.bert import ACTIVATIONS, padding_bias
from minisbert.pooling import pool

log = logging.getLogger("minisbert")


_FORK_GUARD = []


def guard_forked_children() -> None:
    """Make a forked child run torch single-threaded (once per process; idempotent).

    GNU OpenMP's thread pool does not survive ``fork``: a child that enters a parallel region the
    parent had used (LayerNorm, oneDNN's weight reorder, any GEMM) waits forever for threads that were
    not copied. PyTorch's DataLoader avoids it the same way, with one thread in its workers.
    """
    if not _FORK_GUARD and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=lambda: torch.set_num_threads(1))
        _FORK_GUARD.append(True)


def token_batches(ids: list[list[int]], batch_size: int, max_seq_length: int) -> list[list[int]]:
    """Indices of the texts in batches for the packed path: longest first by token count, each batch
    holding at most ``batch_size * max_seq_length`` tokens, the most a padded batch of ``batch_size``
    could hold, so memory stays bounded as on the reference path.

    Unpadded linears cost the same per token whatever the batch, but bigger GEMMs and fewer calls run
    faster (BERT base, 2 shared cores: 4% with OMP_WAIT_POLICY=PASSIVE, 15% with the default policy;
    notes/issue4.md), so short texts share bigger batches. ``MINISBERT_TOKEN_BUDGET=0`` turns it off.
    """
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    if os.environ.get("MINISBERT_TOKEN_BUDGET", "1") == "0":  # plain batches of batch_size, for A/B runs
        return [order[s: s + batch_size] for s in range(0, len(order), batch_size)]
    budget = batch_size * max_seq_length
    batches, current, longest = [], [], 0
    for i in order:
        longest = max(longest, len(ids[i]))
        # The padded attention buffer is (rows x longest), so count the batch as that rectangle.
        if current and (len(current) + 1) * longest > budget:
            batches.append(current)
            current, longest = [], len(ids[i])
        current.append(i)
    if current:
        batches.append(current)
    return batches


def mkldnn_usable(dtype: torch.dtype = torch.float32) -> bool:
    """Whether oneDNN's prepacked linear runs for ``dtype`` on this CPU (bf16 needs AVX-512 or AMX)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.zeros(8, 8, dtype=dtype))
        torch.ops.mkldnn._linear_pointwise(torch.zeros(2, 8, dtype=dtype), w, None, "none", [], "")
    except (RuntimeError, AttributeError):
        return False
    return True


def default_linear_backend(device: torch.device, dtype: torch.dtype) -> str:
    """``aten`` (F.linear) or ``mkldnn``; env ``MINISBERT_LINEAR`` overrides the measured default."""
    choice = os.environ.get("MINISBERT_LINEAR", "").strip().lower()
    if device.type != "cpu":
        return "aten"
    if choice in ("aten", "mkldnn"):
        return choice if choice == "aten" or mkldnn_usable(dtype) else "aten"
    # Measured on the development machine (AMD EPYC, AVX2 only, 2 cores; notes/issue4.md): oneDNN's
    # prepacked fp32 linear was 10-20% slower than MKL's sgemm behind F.linear at every BERT shape,
    # and oneDNN refuses bf16 without AVX-512. So MKL unless asked otherwise.
    return "aten"


class Linear:
    """y = x W^T + b with the weight prepared once for the chosen backend; ``act`` is fused if it can be."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, backend: str, act: str | None = None):
        self.backend = backend
        self.act = act
        self.bias = bias
        if backend == "mkldnn":
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())
        else:
            self.weight = weight.contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        N = x.shape[0]
        if N < 12 and N not in (4, 8):
            # MKL picks another kernel (other rounding) for a few rows: 1-3, 5-7, 9-11 rows differ from
            # the same rows inside a larger GEMM. Zero rows up to 8 or 16 keep a text's embedding the
            # same whatever else shares its batch.
            x = torch.cat([x, x.new_zeros(8 - N if N < 8 else 16 - N, x.shape[1])])
            return self(x)[:N]
        if self.backend == "mkldnn":
            if self.act == "gelu":
                # oneDNN's gelu_erf post-op: exact GELU, the same function as F.gelu's default.
                return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "gelu", [], "none")
            y = torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        else:
            y = F.linear(x, self.weight, self.bias)
        return ACTIVATIONS[self.act](y) if self.act else y


class PackedBlock:
    """One post-LN block (BERT's or DeBERTa-v2's) on packed tokens. Weights are the reference's tensors,
    except the fused q/k/v weight and bias, which are concatenated copies made here.

    Attention is the only step that needs the padded layout; ``attend(q, k, v)`` is the architecture's
    part: each (B, H, T, D) in, (B, H, T, D) out.
    """

    def __init__(self, block: nn.Module, backend: str, hidden_act: str):
        attn = block.attn
        qkv_w = torch.cat([attn.query.weight, attn.key.weight, attn.value.weight])  # (3C, C)
        qkv_b = torch.cat([attn.query.bias, attn.key.bias, attn.value.bias])  # (3C,)
        self.n_head = attn.n_head
        self.qkv = Linear(qkv_w, qkv_b, backend)
        self.out = Linear(attn.out.weight, attn.out.bias, backend)
        # oneDNN fuses only exact GELU; other activations run after the GEMM.
        fuse = hidden_act == "gelu" and backend == "mkldnn"
        self.up = Linear(block.ffn.up.weight, block.ffn.up.bias, backend, act="gelu" if fuse else hidden_act)
        self.down = Linear(block.ffn.down.weight, block.ffn.down.bias, backend)
        self.attn_ln, self.ffn_ln = block.attn_ln, block.ffn_ln

    def __call__(self, x: torch.Tensor, layout: "Packing", attend) -> torch.Tensor:
        N, C = x.shape
        H, D = self.n_head, C // self.n_head
        B, T = layout.shape
        qkv = layout.pad(self.qkv(x))  # (B, T, 3C), pads zero
        q, k, v = qkv.view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)  # each (B, H, T, D)
        y = layout.unpad(attend(q, k, v).transpose(1, 2).reshape(B, T, C))  # (N, C)
        x = self.attn_ln(x + self.out(y))  # post-LN, as the reference block
        x = self.ffn_ln(x + self.down(self.up(x)))
        return x


class Packing:
    """Where the N real tokens of a right-padded (B, T) batch sit: ``pad``/``unpad`` move between layouts."""

    def __init__(self, attention_mask: torch.Tensor):
        self.shape = tuple(attention_mask.shape)
        self.mask = attention_mask.bool()  # (B, T)
        self.index = self.mask.flatten().nonzero().squeeze(1)  # (N,) positions in the flattened batch
        self.lengths = attention_mask.sum(dim=1)  # (B,)

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (N, ...)."""
        return x.flatten(0, 1).index_select(0, self.index)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ...) -> (B, T, ...) with zeros at the pads."""
        B, T = self.shape
        out = x.new_zeros((B * T,) + tuple(x.shape[1:]))
        out.index_copy_(0, self.index, x)
        return out.view((B, T) + tuple(x.shape[1:]))


class FastEncoder:
    """Packed-token forward of a reference model: ``__call__`` gives states, ``embed`` pooled vectors."""

    def __init__(self, model: nn.Module, backend: str | None = None):
        p = next(model.parameters())
        self.model = model
        self.backend = backend or default_linear_backend(p.device, p.dtype)
        if p.device.type == "cpu" and p.dtype in (torch.bfloat16, torch.float16) and not mkldnn_usable(p.dtype):
            log.warning("%s on this CPU has no native kernels (oneDNN needs AVX-512 or AMX for it): "
                        "expect it to be several times slower than float32", p.dtype)
        self.blocks = [PackedBlock(b, self.backend, model.config.hidden_act) for b in model.blocks]

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, Packing]:
        """(B, T) ids and mask -> packed last hidden states (N, C) and their layout."""
        raise NotImplementedError

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, modes: tuple[str, ...]) -> torch.Tensor:
        """(B, T) ids and mask -> (B, C * len(modes)) pooled embeddings, in the model's dtype."""
        x, layout = self(input_ids, attention_mask)  # (N, C)
        if modes == ("mean",):
            return kernels.packed_mean(x, layout.lengths)
        # Other modes are rare and cheap: pad back and use the reference pooling.
        return pool(layout.pad(x), attention_mask, modes)


class FastBert(FastEncoder):
    """``models.bert.BertModel`` and ``models.roberta.RobertaModel``."""

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, Packing]:
        layout = Packing(attention_mask)
        # Positions from the reference function on the padded batch (RoBERTa's depend on the ids).
        positions = layout.unpad(self.model.position_ids(input_ids))  # (N,)
        x = self.model.embed(layout.unpad(input_ids), positions)  # (N, C)
        bias = padding_bias(attention_mask, x.dtype)  # (B, 1, 1, T)

        def attend(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, H, T, D)

        for block in self.blocks:
            x = block(x, layout, attend)
        return x, layout


class FastDebertaV2(FastEncoder):
    """``models.deberta_v2.DebertaV2Model``: the c2p/p2c terms and the padding become one additive
    bias for ``scaled_dot_product_attention``, whose own scale is DeBERTa's 1/sqrt(D * (1 + terms))."""

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, Packing]:
        from minisbert.models.deberta_v2 import RelativePositions, relative_positions

        model, cfg = self.model, self.model.config
        B, T = input_ids.shape
        layout = Packing(attention_mask)
        # The reference embedding on the padded batch (cheap: a lookup and a LayerNorm), then packed.
        x = layout.unpad(model.embed(input_ids, attention_mask))  # (N, C)
        rp = relative_positions(T, cfg.att_span, cfg.position_buckets, cfg.max_relative)
        rp = RelativePositions(*(t.to(x.device) for t in rp[:3]), rp.rows)
        # Pad keys get the dtype's minimum, as the reference's masked_fill; pad query rows are dropped.
        pad_keys = padding_bias(attention_mask, x.dtype)  # (B, 1, 1, T)
        for block, ref, (pos_k, pos_q) in zip(self.blocks, model.blocks, model.position_projections()):
            scale = ref.attn.scale
            pos_k = pos_k[:, rp.rows] if pos_k is not None else None  # (H, R, D)
            pos_q = pos_q[:, rp.rows] if pos_q is not None else None

            def attend(q, k, v, pos_k=pos_k, pos_q=pos_q, scale=scale):
                Bq, H, Tq, _ = q.shape
                terms = []
                if pos_k is not None:  # c2p[i, j] = q_i . Kr[row(i - j)]
                    terms.append((q @ pos_k.transpose(-1, -2)).gather(-1, rp.c2p.expand(Bq, H, Tq, Tq)) / scale)
                if pos_q is not None:  # p2c[i, j] = k_j . Qr[row(j - i)], transposed to (i, j)
                    p2c = (k @ pos_q.transpose(-1, -2)).gather(-1, rp.p2c.expand(Bq, H, Tq, Tq))
                    terms.append(p2c.transpose(-1, -2) / scale)
                bias = pad_keys + sum(terms[1:], terms[0]) if terms else pad_keys  # (B, H, T, T)
                return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1 / scale)

            x = block(x, layout, attend)
        return x, layout


def fast_forward(model: nn.Module, backend: str | None = None) -> FastEncoder | None:
    """The packed runner for ``model`` (a reference model from ``minisbert.models``), or None if unsupported."""
    from minisbert.models.bert import BertModel

    if isinstance(model, BertModel):
        return FastBert(model, backend)
    try:
        from minisbert.models.deberta_v2 import DebertaV2Model
    except ImportError:
        return None
    cfg = getattr(model, "config", None)
    if isinstance(model, DebertaV2Model) and not cfg.conv_kernel_size and cfg.attention_head_size * \
            cfg.num_attention_heads == cfg.hidden_size:
        # The convolution after block 0 (deberta-v2-xlarge) stays on the reference path.
        return FastDebertaV2(model, backend)
    return None
