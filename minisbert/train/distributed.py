"""Data-parallel training on ``torch.distributed``: who this process is, its shard of a global batch,
the gradient all-reduce, and the all-gather with gradients that gathered in-batch negatives need.

    torchrun --nproc_per_node 2 -m minisbert train --model M --recipe R --output OUT

``torchrun`` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; ``init`` joins the group
(gloo on a CPU, NCCL on CUDA). With one process nothing here communicates: every function is the
identity, so the single-process loop runs the same lines.

Why no ``DistributedDataParallel`` wrapper: training embeds through the encoder's reference runner, not
through ``model.forward``, which DDP's hooks need; and a gradient-cached loss runs several backward
passes per step. One all-reduce of the flattened gradients after the step's backward (``average_gradients``)
is what DDP's buckets compute, for any number of backward passes.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init(device: torch.device) -> torch.device:
    """Join the process group ``torchrun`` describes (WORLD_SIZE > 1 in the environment); the device this
    rank trains on (``cuda:LOCAL_RANK`` on GPUs). Without torchrun: nothing, the device as given."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def shard(batch: list, rank: int, size: int) -> list:
    """Rank ``rank``'s slice of a global batch of ``size`` ranks' examples: consecutive, equal parts, so the
    gathered embeddings are the global batch's in order (rank r holds rows r*B .. r*B+B-1)."""
    per = len(batch) // size
    return batch[rank * per: (rank + 1) * per]


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Every rank's gradients replaced by their mean over the ranks (one flat all-reduce)."""
    rank, size = world()
    if size == 1:
        return
    # A parameter the loss never reached has no gradient on any rank (the same graph everywhere): it
    # stays without one, so AdamW skips it as in one process.
    params = [p for p in params if p.grad is not None]
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= size
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset: offset + n].view_as(p))
        offset += n


def mean_across(value: float) -> float:
    """A per-rank number (the step's loss) averaged over the ranks, for the log."""
    rank, size = world()
    if size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return (t / size).item()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each rank the sum, over all ranks, of the gradients that reached
    its own rows: rank r's loss depends on rank s's embeddings through the gathered copy, and that
    gradient has to come home to rank s for its backward pass (an all-reduce, then this rank's slice).
    Written out rather than ``torch.distributed.nn.all_gather`` so it runs on gloo as on NCCL."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, size = world()
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = rank, x.shape[0]
        return torch.cat(parts)  # (size * B, D), rank r's rows at r * B

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows: (ctx.rank + 1) * ctx.rows]


def gather(x: torch.Tensor, with_grad: bool = True) -> tuple[torch.Tensor, int]:
    """(every rank's rows of ``x`` stacked in rank order, the offset of this rank's rows). ``with_grad``:
    gradients flow back to their rank (an embedding); False: a constant (a guide model's embedding).
    One process: ``(x, 0)``."""
    rank, size = world()
    if size == 1:
        return x, 0
    if with_grad:
        return _GatherWithGrad.apply(x), rank * x.shape[0]
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts), rank * x.shape[0]
