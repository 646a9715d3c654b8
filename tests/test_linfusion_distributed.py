"""Token-parallel linear attention and the row-parallel LinFusion UNet over 2 gloo
processes, against one process."""
from __future__ import annotations

import os

import pytest
import torch

import mmfast
from mmfast.models.linfusion import LinFusion
from mmfast.testing.tiny_diffusers import tiny_unet

from _utils import LINFUSION_BACKENDS as BACKENDS
from _utils import rendezvous, run_unet, unet_inputs

# diffusers is imported only inside the UNet workers, so the spawned distributed workers
# (which import this module) start fast.


# --- token-parallel linear attention (2 processes, gloo) ---------------------------------


def _distributed_worker(rank, world_size, init_method, splits, result_dir):
    import torch.distributed as dist

    from mmfast import distributed

    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        inputs = _distributed_inputs(splits)
        start, stop = sum(splits[:rank]), sum(splits[: rank + 1])
        results = {}
        for backend in BACKENDS:
            q, k, v, grad = (t[:, start:stop].clone().requires_grad_(t is not inputs[3]) for t in inputs)
            out = distributed.linear_attention(q, k, v, backend=backend)
            (out * grad).sum().backward()
            results[backend] = [out.detach(), q.grad, k.grad, v.grad]
        torch.save(results, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _distributed_inputs(splits):
    generator = torch.Generator().manual_seed(3)
    n = sum(splits)
    q, k, v, grad = (torch.randn(2, n, 3, 40, generator=generator) for _ in range(4))
    return q, k, v, grad


@pytest.mark.parametrize("splits", [[23, 14], [37, 0]], ids=["unequal", "a rank without tokens"])
def test_distributed_linear_attention_equals_single_process(tmp_path, splits):
    """Unequal shards: the state must be token-weighted, not a plain average. A rank without
    tokens raised in the op (N = 0) while the other waited in the all-reduce until its timeout."""
    import torch.multiprocessing as mp

    mp.spawn(_distributed_worker, args=(2, rendezvous(tmp_path), splits, str(tmp_path)), nprocs=2, join=True)
    q, k, v, grad = _distributed_inputs(splits)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = mmfast.reference.linear_attention_ref(q, k, v)
    (out * grad).sum().backward()
    expected = [out.detach(), q.grad, k.grad, v.grad]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for backend in BACKENDS:
        for index, name in enumerate(["out", "dq", "dk", "dv"]):
            gathered = torch.cat([ranks[r][backend][index] for r in range(2)], dim=1)
            torch.testing.assert_close(gathered, expected[index], rtol=1e-5, atol=1e-5, msg=f"{backend} {name}")


def test_distributed_requires_process_group():
    from mmfast import distributed

    x = torch.randn(1, 4, 1, 8)
    with pytest.raises(RuntimeError, match="init_process_group"):
        distributed.linear_attention(x, x, x, backend="reference")


def _row_parallel_worker(rank, world_size, init_method, result_dir):
    import torch.distributed as dist

    from mmfast.models.linfusion import row_parallel

    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        unet = tiny_unet((32, 64), heads=2)
        LinFusion.construct_for(unet, load_pretrained=False)
        latents, timesteps, context = _row_parallel_inputs(unet)
        with row_parallel.row_parallel_unet(unet):
            band = run_unet(unet, (row_parallel.split_rows(latents), timesteps, context))
        full = row_parallel.gather_rows(band)
        # Control: the same bands run independently (no halos, local GroupNorm and attention).
        naive = row_parallel.gather_rows(run_unet(unet, (row_parallel.split_rows(latents), timesteps, context)))
        if rank == 0:
            single = run_unet(unet, (latents, timesteps, context))
            torch.save({"full": full, "naive": naive, "single": single},
                       os.path.join(result_dir, "row_parallel.pt"))
    finally:
        dist.destroy_process_group()


def _row_parallel_inputs(unet):
    latents, timesteps, context = unet_inputs(unet)
    return torch.cat([latents, latents.flip(2)], dim=2), timesteps, context  # 16 x 8: 8 rows per rank


def test_row_parallel_unet_equals_single_process(tmp_path):
    """A whole LinFusion UNet split by latent rows over 2 gloo ranks (GroupNorm statistics
    all-reduced, conv halos exchanged, attention states all-reduced) equals one process."""
    import torch.multiprocessing as mp

    pytest.importorskip("diffusers")
    mp.spawn(_row_parallel_worker, args=(2, rendezvous(tmp_path), str(tmp_path)), nprocs=2, join=True)
    result = torch.load(tmp_path / "row_parallel.pt", weights_only=True)
    assert result["full"].shape == (2, 4, 16, 8)
    torch.testing.assert_close(result["full"], result["single"], rtol=1e-5, atol=1e-5)
    assert (result["naive"] - result["single"]).abs().max() > 1e-2  # the split is not trivially exact
