"""A whole LinFusion UNet forward split by latent rows over torch.distributed ranks, exact.

Each rank holds a horizontal band of the latent (all ranks the same number of rows, a
multiple of 2 ** (number of downsamplings)). Exactness needs, beyond the token-parallel
linear attention of mmfast.distributed: GroupNorm statistics over the whole image
(all-reduced sums), 3x3 convolutions that see their neighbours' boundary rows (halo
exchange), and bands that stay aligned through stride-2 downsampling (the even-row
requirement). Everything else in an SD UNet is per pixel or per token (1x1 convs,
LayerNorm, the feed-forward, cross-attention to the text, nearest upsampling, skip
concatenations). The parallelism is applied from outside the model: GroupNorms and convs
are swapped for row-parallel wrappers and each attn1 is given the token-parallel op.
Forward only: the collectives here do not carry gradients.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.distributed as dist

from ... import distributed
from ..._dtypes import accumulation_dtype
from .._modules import swap_submodule
from .attention import GeneralizedLinearAttention


def _world(group) -> tuple:
    return dist.get_rank(group), dist.get_world_size(group)


def _exchange_halo(x: torch.Tensor, rows: int, group):
    """(rows above, rows below) this rank's band, from its neighbours; zeros at the image edges."""
    rank, world = _world(group)
    edges = torch.cat([x[:, :, :rows], x[:, :, -rows:]], dim=2).contiguous()
    gathered = [torch.empty_like(edges) for _ in range(world)]
    dist.all_gather(gathered, edges, group=group)
    zeros = x.new_zeros(x.shape[0], x.shape[1], rows, x.shape[3])
    above = gathered[rank - 1][:, :, rows:] if rank > 0 else zeros
    below = gathered[rank + 1][:, :, :rows] if rank < world - 1 else zeros
    return above, below


class RowParallelConv2d(torch.nn.Module):
    """A zero-padded Conv2d on a band of rows: neighbours' rows replace the vertical padding."""

    def __init__(self, conv: torch.nn.Conv2d, group):
        super().__init__()
        if isinstance(conv.padding, str):
            raise ValueError(f"RowParallelConv2d: needs numeric padding, got {conv}")
        kernel_h, pad_h = conv.kernel_size[0], conv.padding[0]
        if conv.padding_mode != "zeros" or conv.dilation != (1, 1) or kernel_h != 2 * pad_h + 1:
            raise ValueError(f"RowParallelConv2d: needs zero 'same' vertical padding and no dilation, got {conv}")
        self.conv, self.group, self.halo = conv, group, pad_h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stride_h = self.conv.stride[0]
        if x.shape[2] % stride_h != 0 or x.shape[2] < self.halo:
            raise ValueError(f"RowParallelConv2d: a band of {x.shape[2]} rows does not fit stride {stride_h} "
                             f"and halo {self.halo}; give each rank a multiple of 2**levels rows")
        if self.halo:
            above, below = _exchange_halo(x, self.halo, self.group)
            x = torch.cat([above, x, below], dim=2)
        conv = self.conv
        return torch.nn.functional.conv2d(x, conv.weight, conv.bias, conv.stride, (0, conv.padding[1]),
                                          conv.dilation, conv.groups)


class RowParallelGroupNorm(torch.nn.Module):
    """GroupNorm whose mean and variance cover every rank's rows (two fp32 all-reduces)."""

    def __init__(self, norm: torch.nn.GroupNorm, group):
        super().__init__()
        self.norm, self.group = norm, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.norm
        b, c = x.shape[:2]
        grouped = x.to(accumulation_dtype(x.dtype)).reshape(b, norm.num_groups, -1)
        sums = torch.cat([grouped.sum(-1).reshape(-1), grouped.new_full((1,), float(grouped.shape[-1]))])
        sums = distributed.all_reduce_sum(sums, self.group)
        mean = (sums[:-1] / sums[-1]).view(b, norm.num_groups, 1)
        centered = grouped - mean  # second pass on centred values: no E[x^2] - E[x]^2 cancellation
        variance = distributed.all_reduce_sum((centered * centered).sum(-1), self.group) / sums[-1]
        y = (centered * torch.rsqrt(variance.unsqueeze(-1) + norm.eps)).view(x.shape)
        if norm.affine:
            shape = (1, c) + (1,) * (x.dim() - 2)
            y = y * norm.weight.to(y.dtype).view(shape) + norm.bias.to(y.dtype).view(shape)
        return y.to(x.dtype)


def _row_parallel_replacements(unet, group):
    replacements = []
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.GroupNorm):
            replacements.append((name, RowParallelGroupNorm(module, group)))
        elif isinstance(module, torch.nn.Conv2d) and module.kernel_size[0] > 1:
            replacements.append((name, RowParallelConv2d(module, group)))
        elif name.rsplit(".", 1)[-1] == "attn1" and not isinstance(module, GeneralizedLinearAttention):
            raise ValueError(f"row_parallel_unet: {name} is softmax self-attention, which a row split cannot "
                             "compute exactly without gathering every token; mount LinFusion first")
    return replacements


@contextlib.contextmanager
def row_parallel_unet(unet, group=None):
    """Inside, `unet(band, t, text)` takes and returns this rank's band of latent rows, exactly.

    Requires LinFusion mounted (its attn1 modules then all-reduce their states) and the
    same band height on every rank, a multiple of 2 ** (number of downsamplings).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("row_parallel_unet: torch.distributed is not initialized")
    replacements = _row_parallel_replacements(unet, group)
    attention = [m for m in unet.modules() if isinstance(m, GeneralizedLinearAttention)]
    originals = [(name, swap_submodule(unet, name, module)) for name, module in replacements]
    token_parallel = functools.partial(distributed.linear_attention, group=group)
    previous_ops = [module.attention_op for module in attention]
    for module in attention:
        module.attention_op = token_parallel
    try:
        yield unet
    finally:
        for module, op in zip(attention, previous_ops):
            module.attention_op = op
        for name, module in reversed(originals):
            swap_submodule(unet, name, module)


def split_rows(x: torch.Tensor, group=None) -> torch.Tensor:
    """This rank's equal band of rows of a (B, C, H, W) tensor."""
    rank, world = _world(group)
    if x.shape[2] % world != 0:
        raise ValueError(f"split_rows: {x.shape[2]} rows do not split evenly over {world} ranks")
    return x.chunk(world, dim=2)[rank].contiguous()


def gather_rows(band: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank's band, concatenated back into the full (B, C, H, W) tensor."""
    _, world = _world(group)
    bands = [torch.empty_like(band) for _ in range(world)]
    dist.all_gather(bands, band.contiguous(), group=group)
    return torch.cat(bands, dim=2)
