"""ModernBERT on the packed path: pre-LN blocks, rotary angles per packed token, and sliding-window
attention that costs O(T * window) instead of O(T^2).

The reference (``models/modernbert.py``) runs a local layer as full attention under a (B, 1, T, T)
band mask, as transformers does on a CPU: at 8,192 tokens that is 67M scores per head, almost all of
them masked. Here a local layer's queries run in blocks of ``local_block`` rows, each against only
the keys its window can reach (``block + 2 * window`` of them), so neither time nor memory grows with
T^2; the masked keys it leaves out have exactly zero probability in the reference too. Global layers
run ``scaled_dot_product_attention`` over the whole text, whose CPU kernel works in key blocks and
never holds the (T, T) scores either.

Shape legend: N real tokens (rows: N plus filler), b texts in a group, T tokens (padded), C hidden,
H heads, D head dim, F intermediate width, Q a query block, K the keys it reads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minisbert.fast.int8 import ROTATION
from minisbert.fast.linear import Linear
from minisbert.fast.packed import FFN_ROWS, FastEncoder
from minisbert.fast.packing import Batch, Packing
from minisbert.models.bert import padding_bias
from minisbert.models.modernbert import ACTIVATIONS, apply_rotary, rotary_cos_sin

# Query rows per block of a local layer. With the released window (64 each way), 64-row blocks read 192
# keys: two thirds of the scores computed are inside the band, against 1.6% at 8,192 tokens unblocked.
# In-process A/B on a base-size ModernBERT (2 shared cores, best of 2): 64 rows 4% faster than 128 at 512
# and 2,048 tokens, 256 rows 1% slower (the masked keys weigh exactly 0, so only the grouping of sums moves).
LOCAL_BLOCK = 64
# The GeGLU runs on all rows at once (``ffn_rows`` 0), unlike BERT's FFN: with its two epilogue-fused
# GEMMs there is no intermediate pass to keep in cache, and the chunks' concatenation cost more.
# In-process A/B (best of 3, bitwise the same embeddings): 7% faster at 512 tokens, 1% at 2,048 than
# 1,024-row chunks (``ffn_rows`` on ``FastModernBert``).
FFN_ROWS_MODERN = 0


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor | None, window: int,
                    block: int) -> torch.Tensor:
    """Sliding-window attention: each query i sees keys j with |i - j| <= ``window`` that are tokens.

    q, k, v (b, H, T, D); ``keys`` (b, T) bool, True for tokens (None: no pads) -> (b, H, T, D), a view of
    a (b, T, H, D) tensor: each block's output lands where the heads are merged next, one copy in all."""
    b, H, T, D = q.shape
    out = q.new_empty((b, T, H, D))
    pos = torch.arange(T, device=q.device)
    lowest = torch.finfo(q.dtype).min
    for s in range(0, T, block):
        e = min(T, s + block)
        ks, ke = max(0, s - window), min(T, e + window)
        keep = (pos[s:e, None] - pos[None, ks:ke]).abs() <= window  # (Q, K)
        keep = keep[None, None] if keys is None else keep[None, None] & keys[:, None, None, ks:ke]  # (b|1, 1, Q, K)
        # Pad queries may see no token at all: ``where`` keeps their rows finite (they are dropped anyway).
        bias = torch.where(keep, 0.0, lowest).to(q.dtype)
        y = F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, ks:ke], v[:, :, ks:ke], attn_mask=bias)
        out[:, s:e] = y.transpose(1, 2)  # (b, Q, H, D)
    return out.transpose(1, 2)


def interleave_halves(weight: torch.Tensor, bias: torch.Tensor | None, n_head: int) -> tuple:
    """The fused q/k/v projection with the q and k rows of each head reordered from halves (x1 | x2, what
    ``rotate_half`` pairs) to pairs side by side (x1_0, x2_0, x1_1, x2_1, ...). Scores are dot products
    over a head's dimensions, so the same order in q and k changes nothing, and each rotary pair becomes
    one complex number: the rotation is one in-place complex multiply (v keeps its order)."""
    C = weight.shape[1]
    D = C // n_head
    order = torch.arange(D).view(2, D // 2).t().reshape(D)  # 0, D/2, 1, D/2 + 1, ...
    rows = [part * C + h * D + order for part in (0, 1) for h in range(n_head)] + [torch.arange(2 * C, 3 * C)]
    rows = torch.cat(rows)  # (3C,): q's heads, k's heads, then v as it was
    return weight[rows], None if bias is None else bias[rows]


class PackedModernBlock:
    """One pre-LN ModernBERT block on packed tokens: ``x + attn(LN(x))``, then ``x + GeGLU(LN(x))``.

    In float32 the q/k rows are interleaved (``interleave_halves``) and rotary is a complex multiply;
    the GeGLU's up-projection is two GEMMs, the input's with its activation fused where oneDNN can, the
    gate's multiplying it in the epilogue (``Linear.mul``): no pass over (rows, F) of their own."""

    def __init__(self, block: nn.Module, backend: str, hidden_act: str, ffn_rows: int = FFN_ROWS,
                 rotation_block: int = ROTATION):
        attn, mlp = block.attn, block.mlp
        self.n_head, self.is_global = attn.n_head, attn.is_global
        weight, bias = attn.qkv.weight, attn.qkv.bias
        self.complex = weight.dtype == torch.float32
        if self.complex:
            weight, bias = interleave_halves(weight, bias, self.n_head)
        self.qkv = Linear(weight, bias, backend, rotate_input=True, rotation_block=rotation_block)
        self.out = Linear(attn.out.weight, attn.out.bias, backend)
        F_ = mlp.wo.weight.shape[1]
        wi, bi = mlp.wi.weight, mlp.wi.bias
        fuse = hidden_act == "gelu" and backend == "mkldnn"  # oneDNN fuses only exact GELU
        self.act = None if fuse else ACTIVATIONS[hidden_act]
        self.wi_input = Linear(wi[:F_], None if bi is None else bi[:F_], backend, act="gelu" if fuse else None,
                               rotate_input=True, rotation_block=rotation_block)
        self.wi_gate = Linear(wi[F_:], None if bi is None else bi[F_:], backend, rotate_input=True,
                              rotation_block=rotation_block)
        self.wo = Linear(mlp.wo.weight, mlp.wo.bias, backend, rotate_input=True, rotation_block=rotation_block)
        self.attn_norm, self.mlp_norm = block.attn_norm, block.mlp_norm
        self.ffn_rows = ffn_rows

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        """x + GeGLU(LN(x)) on (rows, C)."""
        h = self.mlp_norm(x)
        inp = self.wi_input(h)  # (rows, F), activated when fused
        if self.act is not None:
            inp = self.act(inp)
        return self.wo.add(self.wi_gate.mul(h, inp), x)

    def __call__(self, x: torch.Tensor, layout: Packing, cos: torch.Tensor, sin: torch.Tensor, attend) -> torch.Tensor:
        rows, C = x.shape
        H, D = self.n_head, C // self.n_head
        qkv = self.qkv(self.attn_norm(x)).view(rows, 3, H, D)
        # Rotary angles per packed token (cos, sin: (rows, D)); q and k turned in place in the fused output.
        if self.complex:
            turn = torch.complex(cos[:, : D // 2], sin[:, : D // 2])[:, None, None]  # (rows, 1, 1, D/2)
            torch.view_as_complex(qkv[:, :2].view(rows, 2, H, D // 2, 2)).mul_(turn)
        else:
            qkv[:, :2] = apply_rotary(qkv[:, :2], cos[:, None, None], sin[:, None, None])
        heads = []
        for g, group in enumerate(layout.pad(qkv)):  # each (b, T, 3, H, D)
            b, T = group.shape[:2]
            q, k, v = group.permute(2, 0, 3, 1, 4)  # each (b, H, T, D)
            heads.append(attend(g, q, k, v).transpose(1, 2).reshape(b, T, C))
        x = self.out.add(layout.unpad(heads), x)  # (rows, C)
        step = self.ffn_rows if x.device.type == "cpu" else 0
        if not step or rows <= step:
            return self.mlp(x)
        # With ``ffn_rows`` set, the GeGLU runs on chunks of rows on the CPU (as PackedBlock's FFN).
        return torch.cat([self.mlp(x[s: s + step]) for s in range(0, rows, step)])


class FastModernBert(FastEncoder):
    """``models.modernbert.ModernBertModel``. ``local_block``: see LOCAL_BLOCK; ``ffn_rows``: see
    FFN_ROWS_MODERN; other keywords as ``FastEncoder``'s."""

    def __init__(self, model: nn.Module, backend: str | None = None, quantize: str | None = None, *,
                 local_block: int = LOCAL_BLOCK, ffn_rows: int = FFN_ROWS_MODERN, **options):
        super().__init__(model, backend, quantize, ffn_rows=ffn_rows, **options)
        self.local_block = local_block

    def make_blocks(self, model: nn.Module, ffn_rows: int, rotation_block: int, ranges: list[dict] | None) -> list:
        if ranges is not None:
            raise ValueError("static int8 (calibrated ranges) is implemented for BERT-family blocks, not "
                             "ModernBERT's: use dynamic int8 (quantize='int8' without ranges)")
        return [PackedModernBlock(b, self.backend, model.config.hidden_activation, ffn_rows, rotation_block)
                for b in model.blocks]

    def forward(self, groups: Batch) -> tuple[torch.Tensor, Packing]:
        model, cfg = self.model, self.model.config
        layout = self.layout(groups)
        groups = self.on_device(groups)
        x = model.embed(layout.unpad([ids for ids, _ in groups]))  # (rows, C): a lookup and a norm per token
        # Each token's position in its text: rotary angles per packed row, for both bases.
        positions = layout.unpad([torch.arange(ids.shape[1], device=self.device).expand(ids.shape)
                                  for ids, _ in groups])  # (rows,)
        D = cfg.hidden_size // cfg.num_attention_heads
        angles = {g: rotary_cos_sin(positions, D, cfg.global_rope_theta if g else cfg.local_rope_theta, x.dtype)
                  for g in (True, False)}  # each (rows, D) twice
        biases = [None if full else padding_bias(mask, x.dtype) for (_, mask), full in zip(groups, layout.full)]
        keys = [None if full else mask.bool() for (_, mask), full in zip(groups, layout.full)]

        def attend_global(g, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=biases[g])  # (b, H, T, D)

        def attend_local(g, q, k, v):
            if q.shape[2] - 1 <= cfg.window:  # every pair is within the window: plain padded attention
                return attend_global(g, q, k, v)
            return local_attention(q, k, v, keys[g], cfg.window, self.local_block)

        for block in self.blocks:
            g = block.is_global
            x = block(x, layout, *angles[g], attend_global if g else attend_local)
        return model.final_norm(x), layout
