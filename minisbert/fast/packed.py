"""The packed forward: the reference models' math on the real tokens only.

The reference forward (``minisbert/models/*.py``) runs every row of a padded (B, T) batch through every
linear layer. Here embeddings, every linear, GELU, LayerNorm and the residuals run on (N, C) with N the
number of real tokens in the batch; only attention needs a padded layout, so q/k/v are gathered into
padded (b, T) buffers for ``scaled_dot_product_attention`` (pads copy a real token; the same padding
bias as the reference masks them) and gathered back (``packing.Packing``). A batch may hold several
groups of texts, each padded to its own length: the linears see all their tokens at once, attention
runs per group; a group without pads is a view of the packed tokens, not a gather. Each block runs
one fused q/k/v linear (C -> 3C) instead of three, so four GEMMs of good shape (``linear.Linear``).
The sentence embedding is pooled straight from the packed tokens (``kernels.packed_mean``).

On CUDA the same packed forward runs in the model's dtype (fp16/bf16); nothing here is required on
the CPU-only machines the tests run on. DeBERTa-v2's attention is in ``fast/deberta_v2.py``.

Shape legend: B batch, T tokens (padded), N real tokens in the batch, C hidden, H heads, D head dim.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F
from torch import nn

from minisbert.checks import check_quantize
from minisbert.fast.cpu import CpuKind, cpu_kind
from minisbert.fast.heap import raise_mmap_threshold
from minisbert.fast.int8 import ROTATION, STATIC_LINEARS, RangeObserver, keeps_static
from minisbert.fast.linear import ROWS, Linear, default_linear_backend, native_half
from minisbert.fast.packing import Batch, Packing
from minisbert.models.bert import padding_bias
from minisbert.modules import kernels
from minisbert.modules.pooling import pool
from minisbert.runner import to_device

log = logging.getLogger("minisbert")

# The CPU's FFN row chunk. In-process A/B (256 texts, 4 repetitions, bitwise the same embeddings): 1024
# rows made BERT base 4.5-7.7% faster and DeBERTa-v2 base 2.5%; 512 gave 3%, 768 and 2048 nothing
# (``python scripts/tune_fast.py --model random-bert --n 256 --ffn-rows 0,512,768,1024,2048``). A multiple
# of ``linear.ROWS``, so chunk and tail shapes stay few.
FFN_ROWS = 1024


class PackedBlock:
    """One post-LN block (BERT's or DeBERTa-v2's) on packed tokens. Weights are the reference's tensors,
    except the fused q/k/v weight and bias, which are concatenated copies made here.

    Attention is the only step that needs a padded layout; ``attend(g, q, k, v)`` is the architecture's
    part for group ``g`` of the ``Packing``: each (b, H, T, D) in, (b, H, T, D) out. ``ffn_rows``: the
    FFN's row chunk on the CPU (0: one pass); ``rotation_block``: int8's Hadamard block (``Linear``);
    ``ranges``: static int8's calibrated input range of each linear (``STATIC_LINEARS`` -> (min, max)).
    """

    def __init__(self, block: nn.Module, backend: str, hidden_act: str, ffn_rows: int = FFN_ROWS,
                 rotation_block: int = ROTATION, ranges: dict | None = None):
        attn = block.attn
        qkv_w = torch.cat([attn.query.weight, attn.key.weight, attn.value.weight])  # (3C, C)
        qkv_b = torch.cat([attn.query.bias, attn.key.bias, attn.value.bias])  # (3C,)
        self.n_head = attn.n_head
        # int8: the inputs with outlier channels (LayerNorm and activation outputs) are rotated; the
        # attention output feeding ``out`` has none (its quantization alone: cosine 0.99985 to fp32).
        r = ranges or {}
        self.qkv = Linear(qkv_w, qkv_b, backend, rotate_input=True, rotation_block=rotation_block,
                          input_range=r.get("qkv"))
        self.out = Linear(attn.out.weight, attn.out.bias, backend, input_range=r.get("out"))
        # oneDNN fuses only exact GELU; other activations run after the GEMM. Static int8 with exact GELU:
        # the up-projection writes the down-projection's uint8 input itself.
        fuse = hidden_act == "gelu" and (backend == "mkldnn" or ranges is not None)
        uint8_ffn = fuse and "up" in r and "down" in r
        self.up = Linear(block.ffn.up.weight, block.ffn.up.bias, backend, act="gelu" if fuse else hidden_act,
                         rotate_input=True, rotation_block=rotation_block, input_range=r.get("up"),
                         output_range=r.get("down") if uint8_ffn else None)
        self.down = Linear(block.ffn.down.weight, block.ffn.down.bias, backend, rotate_input=True,
                           rotation_block=rotation_block, input_range=r.get("down"))
        self.attn_ln, self.ffn_ln = block.attn_ln, block.ffn_ln
        self.ffn_rows = ffn_rows

    def __call__(self, x: torch.Tensor, layout: "Packing", attend) -> torch.Tensor:
        N, C = x.shape
        H, D = self.n_head, C // self.n_head
        heads = []
        # One q/k/v GEMM over every group's tokens; attention per group, in its own padded length.
        for g, qkv in enumerate(layout.pad(self.qkv(x))):  # each (b, T, 3C)
            b, T, _ = qkv.shape
            q, k, v = qkv.view(b, T, 3, H, D).permute(2, 0, 3, 1, 4)  # each (b, H, T, D)
            heads.append(attend(g, q, k, v).transpose(1, 2).reshape(b, T, C))
        y = layout.unpad(heads)  # (rows, C): N real tokens, then filler rows
        x = self.attn_ln(self.out.add(y, x))  # post-LN, as the reference block: LN(x + out(y))
        step = self.ffn_rows if x.device.type == "cpu" else 0
        if not step or x.shape[0] <= step:
            return self.ffn_ln(self.down.add(self.up(x), x))
        # On the CPU the FFN runs on chunks of rows, so each chunk's (rows, 4C) intermediate is read back
        # by the down-projection from cache, not memory; the residual sum lands in place (add's out=).
        if self.down.backend == "int8-static":  # x is this block's own: the down-projection adds into it
            for s in range(0, x.shape[0], step):
                self.down.add_(self.up(x[s: s + step]), x[s: s + step])
            return self.ffn_ln(x)
        h = torch.empty_like(x)
        for s in range(0, x.shape[0], step):
            torch.add(x[s: s + step], self.down(self.up(x[s: s + step])), out=h[s: s + step])
        return self.ffn_ln(h)


class FastEncoder:
    """Packed-token forward of a reference model: ``__call__`` gives states, ``embed`` pooled vectors.

    Both take a list of groups, each a right-padded (b, T) ``input_ids`` and ``attention_mask``.
    The tuned settings are keywords with their measured defaults, so a test or ``scripts/tune_fast.py``
    builds the variant it compares: ``ffn_rows`` and ``rotation_block`` (``PackedBlock``),
    ``rows_multiple`` (the packed layout's row multiple; None: ``linear.ROWS`` for oneDNN's backends,
    else 1), ``cpu`` (the CPU the bf16 warning judges; None: this one); ``ranges``: with
    ``quantize="int8"``, static int8 from calibrated input ranges (one dict per block, see ``observe``)
    instead of per-token dynamic scales."""

    def __init__(self, model: nn.Module, backend: str | None = None, quantize: str | None = None, *,
                 ffn_rows: int = FFN_ROWS, rotation_block: int = ROTATION, rows_multiple: int | None = None,
                 cpu: CpuKind | None = None, ranges: list[dict] | None = None):
        p = next(model.parameters())
        self.model = model
        self.device = p.device
        self.quantize = check_quantize(quantize, p.device, p.dtype)
        self.backend = "int8" if quantize else backend or default_linear_backend(p.device, p.dtype)
        cpu = cpu or cpu_kind()
        if p.device.type == "cpu" and p.dtype in (torch.bfloat16, torch.float16) and not native_half(p.dtype, cpu):
            log.warning("%s on this CPU has no native kernels (%s): expect it to be several times slower "
                        "than float32; for speed beyond float32 use int8 (inexact: quantize='int8', or --quantize "
                        "int8)", p.dtype,
                        cpu.describe())
        self._block_options = (ffn_rows, rotation_block)
        self.use_ranges(ranges)
        if p.device.type == "cpu":
            raise_mmap_threshold()
        # oneDNN: every GEMM's row count a multiple of linear.ROWS, padded once per forward.
        if rows_multiple is None:
            rows_multiple = ROWS if self.backend in ("mkldnn", "int8") else 1
        self.rows_multiple = rows_multiple

    def use_ranges(self, ranges: list[dict] | None) -> None:
        """(Re)build the blocks: static int8 from ``ranges`` (``observe``'s, or ``int8.load_ranges``'), or
        with None the backend's own linears (dynamic int8 where ``quantize="int8"``)."""
        if ranges is not None and (not self.quantize or len(ranges) != len(self.model.blocks)):
            raise ValueError(f"ranges (static int8) need quantize='int8' and one entry per block "
                             f"({len(self.model.blocks)}), got {len(ranges)}")
        self.ranges = ranges
        self.blocks = self.make_blocks(self.model, *self._block_options, ranges)

    def make_blocks(self, model: nn.Module, ffn_rows: int, rotation_block: int, ranges: list[dict] | None) -> list:
        """The packed blocks, one per reference block (post-LN ``PackedBlock``s unless overridden)."""
        return [PackedBlock(b, self.backend, model.config.hidden_act, ffn_rows, rotation_block,
                            ranges[i] if ranges else None) for i, b in enumerate(model.blocks)]

    @contextlib.contextmanager
    def observe(self, ratio: float | None = None):
        """Records every block's linear inputs' (min, max) while on: calibration for static int8 (run it on
        an exact fp32 forward). Yields the list it fills on exit, one ``{name: [min, max]}`` per block, for
        the linears that keep their accuracy static (``int8.keeps_static``, ``ratio``; 0: none, inf: all);
        the others stay dynamic."""
        if not all(isinstance(b, PackedBlock) for b in self.blocks):
            raise ValueError(f"static int8 calibration is implemented for BERT-family blocks (BERT, RoBERTa, "
                             f"XLM-RoBERTa, DeBERTa-v2), not {type(self.model).__name__}: use dynamic int8")
        ranges: list[dict] = [{} for _ in self.blocks]
        observers = [{name: RangeObserver() for name in STATIC_LINEARS} for _ in self.blocks]
        for block, seen in zip(self.blocks, observers):
            for name, observer in seen.items():
                getattr(block, name).observe = observer
        try:
            yield ranges
        finally:
            for block, seen, out in zip(self.blocks, observers, ranges):
                for name, observer in seen.items():
                    getattr(block, name).observe = None
                    if observer.rows and keeps_static(observer, ratio):
                        out[name] = [observer.low, observer.high]

    def layout(self, groups: Batch) -> Packing:
        return Packing([mask for _, mask in groups], self.device, self.rows_multiple)

    def __call__(self, groups: Batch) -> tuple[torch.Tensor, Packing]:
        """Groups of (b, T) ids and mask (on the host or the model's device) -> packed last hidden
        states (N, C) and their layout."""
        x, layout = self.forward(groups)  # (rows, C)
        return x[: layout.n], layout

    def forward(self, groups: Batch) -> tuple[torch.Tensor, Packing]:
        """As ``__call__``, with the layout's filler rows still at the end: (rows, C)."""
        raise NotImplementedError

    def on_device(self, groups: Batch) -> Batch:
        return [(to_device(ids, self.device), to_device(mask, self.device)) for ids, mask in groups]

    def pool(self, groups: Batch, modes: tuple[str, ...]) -> torch.Tensor:
        """Groups of (b, T) ids and mask -> (sum of b, C * len(modes)) pooled embeddings, group after
        group, in the model's dtype."""
        x, layout = self(groups)  # (N, C)
        if modes == ("mean",):
            return kernels.packed_mean(x, layout.lengths)
        # Other modes are rare and cheap: pad back and use the reference pooling.
        return torch.cat([pool(states, mask, modes) for states, (_, mask) in zip(layout.pad(x), groups)])


class FastBert(FastEncoder):
    """``models.bert.BertModel`` and ``models.roberta.RobertaModel``."""

    def forward(self, groups: Batch) -> tuple[torch.Tensor, Packing]:
        layout = self.layout(groups)
        groups = self.on_device(groups)
        # Positions from the reference function on each padded group (RoBERTa's depend on the ids).
        positions = layout.unpad([self.model.position_ids(ids) for ids, _ in groups])  # (rows,)
        x = self.model.embed(layout.unpad([ids for ids, _ in groups]), positions)  # (rows, C)
        # each (b, 1, 1, T); none for a group without pads (adding its zeros would change nothing)
        biases = [None if full else padding_bias(mask, x.dtype) for (_, mask), full in zip(groups, layout.full)]

        def attend(g, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=biases[g])  # (b, H, T, D)

        for block in self.blocks:
            x = block(x, layout, attend)
        return x, layout
