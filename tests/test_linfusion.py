"""LinFusion model layer: mounting, official math and checkpoints, dtypes, autograd,
torch.compile, token-parallel linear attention. Tiny random diffusers UNets on CPU."""
from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmfast
from mmfast import ops
from mmfast.models._modules import swap_submodule

from mmfast.models.linfusion import (
    GeneralizedLinearAttention,
    LinFusion,
    LinFusionDistiller,
    LinFusionMismatchError,
)
from mmfast.models.linfusion.tiny import tiny_unet

# diffusers is imported only by the UNet fixtures, so the spawned distributed workers
# (which import this module) start fast.

BACKENDS = ["reference"] + (["native"] if ops.native_available(torch.device("cpu")) else [])


@pytest.fixture(params=BACKENDS)
def backend(request):
    with mmfast.use_backend(request.param):
        yield request.param


@pytest.fixture(scope="module")
def unet():
    """C = 32/64, 2 heads (D = 16/32); 4 attn1 layers."""
    pytest.importorskip("diffusers")
    return tiny_unet((32, 64), heads=2)


@pytest.fixture(scope="module")
def sd15_style_unet():
    """SD-1.5 head dims: D = 40 / 80 / 160 (C = 80/160/320 with 2 heads)."""
    pytest.importorskip("diffusers")
    return tiny_unet((80, 160, 320), heads=2, norm_num_groups=16)


def unet_inputs(unet, batch=2, tokens=7, seed=1):
    generator = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    latents = torch.randn(batch, 4, size, size, generator=generator)
    context = torch.randn(batch, tokens, unet.config.cross_attention_dim, generator=generator)
    return latents, torch.tensor([10, 500])[:batch], context


def run_unet(unet, inputs):
    with torch.no_grad():
        return unet(*inputs).sample


# --- an independent implementation of the official module (linfusion.md section 1) -----


class OfficialStyleAttention(nn.Module):
    """Official LinFusion math: (B*H, N, D) layout, k and v pre-scaled by N^-1/2, z from mean(k)."""

    def __init__(self, dim, heads, mid_dim=None):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
        mid = mid_dim or dim
        self.to_q_ = nn.Sequential(nn.Linear(dim, mid), nn.LayerNorm(mid), nn.LeakyReLU(0.01), nn.Linear(mid, dim))
        self.to_k_ = nn.Sequential(nn.Linear(dim, mid), nn.LayerNorm(mid), nn.LeakyReLU(0.01), nn.Linear(mid, dim))

    def head_to_batch_dim(self, x):
        b, n, c = x.shape
        return x.reshape(b, n, self.heads, c // self.heads).permute(0, 2, 1, 3).reshape(b * self.heads, n, -1)

    def forward(self, x, encoder_hidden_states=None, attention_mask=None, **kwargs):
        b, n, c = x.shape
        q = F.elu(self.head_to_batch_dim(self.to_q(x + self.to_q_(x)))) + 1.0
        k = F.elu(self.head_to_batch_dim(self.to_k(x + self.to_k_(x)))) + 1.0
        v = self.head_to_batch_dim(self.to_v(x))
        z = q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) + 1e-4
        kv = (k.transpose(-2, -1) * n**-0.5) @ (v * n**-0.5)
        out = (q @ kv / z).reshape(b, self.heads, n, -1).permute(0, 2, 1, 3).reshape(b, n, c)
        return self.to_out[1](self.to_out[0](out))


def official_copy(module: GeneralizedLinearAttention) -> OfficialStyleAttention:
    twin = OfficialStyleAttention(module.dim_n, module.heads, module.projection_mid_dim)
    twin.load_state_dict(module.state_dict())
    return twin


def random_module(dim=80, heads=2, mid_dim=None, seed=0):
    torch.manual_seed(seed)
    return GeneralizedLinearAttention(dim, heads, mid_dim).eval()


# --- the module ------------------------------------------------------------------------


@pytest.mark.parametrize("dim,heads,mid_dim", [(80, 2, None), (64, 1, 4), (96, 3, None)])
def test_module_matches_official_math(backend, dim, heads, mid_dim):
    module = random_module(dim, heads, mid_dim)
    x = torch.randn(2, 77, dim)
    with torch.no_grad():
        expected = official_copy(module)(x)
        actual = module(x)
    assert actual.shape == x.shape
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_module_accepts_image_layout_and_cross_context(backend):
    module = random_module(40, 2)
    image = torch.randn(2, 40, 5, 6)
    context = torch.randn(2, 9, 40)
    with torch.no_grad():
        tokens = image.flatten(2).transpose(1, 2)
        from_image = module(image)
        torch.testing.assert_close(from_image, module(tokens).transpose(1, 2).reshape(image.shape))
        cross = module(tokens, encoder_hidden_states=context)
        q, k, v = module._query(tokens), module._key(context), module._value(context)
        expected = mmfast.reference.linear_attention_apply_ref(q, *mmfast.reference.linear_attention_state_ref(k, v))
        torch.testing.assert_close(cross, module.to_out[0](expected.reshape(2, 30, 40)), rtol=1e-5, atol=1e-5)


def test_module_rejects_bad_inputs():
    module = random_module(40, 2)
    with pytest.raises(NotImplementedError, match="attention_mask"):
        module(torch.randn(1, 4, 40), attention_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match=r"hidden_states must be \(B, N, 40\)"):
        module(torch.randn(1, 4, 32))
    with pytest.raises(ValueError, match="not divisible"):
        GeneralizedLinearAttention(42, 4)


def test_token_chunking_is_exact(backend):
    module = random_module(40, 2)
    x = torch.randn(1, 50, 40)
    with torch.no_grad():
        whole = module(x)
        module.token_chunk_size = 16
        chunked = module(x)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
def test_half_precision_forward(backend, dtype, tolerance):
    module = random_module(80, 2)
    x = torch.randn(2, 256, 80)
    with torch.no_grad():
        expected = module(x)
        actual = module.to(dtype)(x.to(dtype))
    assert actual.dtype == dtype
    assert torch.isfinite(actual).all()
    error = (actual.float() - expected).abs().max().item()
    assert error < tolerance * expected.abs().max().item(), error


# --- mounting --------------------------------------------------------------------------


def test_mount_unmount_round_trip(unet, backend):
    inputs = unet_inputs(unet)
    originals = {name: m for name, m in unet.named_modules() if name.endswith("attn1")}
    before = run_unet(unet, inputs)
    linfusion = LinFusion.construct_for(unet)
    try:
        assert [s.module_name for s in linfusion.specs] == list(originals)
        assert all(isinstance(unet.get_submodule(name), GeneralizedLinearAttention) for name in originals)
        mounted = run_unet(unet, inputs)
        assert not torch.allclose(mounted, before)
    finally:
        linfusion.unmount()
    assert all(unet.get_submodule(name) is module for name, module in originals.items())
    assert torch.equal(run_unet(unet, inputs), before)
    with pytest.raises(RuntimeError, match="not mounted"):
        linfusion.unmount()


def test_mounted_unet_matches_official_modules(sd15_style_unet, backend):
    unet = sd15_style_unet
    inputs = unet_inputs(unet)
    linfusion = LinFusion.construct_for(unet)
    try:
        assert {m.dim_head for m in linfusion.attention_modules()} == {40, 80, 160}
        ours = run_unet(unet, inputs)
        names = [spec.module_name for spec in linfusion.specs]
        twins = [official_copy(module) for module in linfusion.attention_modules()]
        previous = [swap_submodule(unet, name, twin) for name, twin in zip(names, twins)]
        try:
            official = run_unet(unet, inputs)
        finally:
            for name, module in zip(names, previous):
                swap_submodule(unet, name, module)
    finally:
        linfusion.unmount()
    torch.testing.assert_close(ours, official, rtol=1e-5, atol=1e-5)


def test_init_from_unet_copies_projections(unet):
    linfusion = LinFusion.from_unet(unet, init_from_unet=True)
    for spec, module in zip(linfusion.specs, linfusion.attention_modules()):
        source = unet.get_submodule(spec.module_name)
        for name in ("to_q", "to_k", "to_v"):
            assert torch.equal(getattr(module, name).weight, getattr(source, name).weight)
        assert torch.equal(module.to_out[0].bias, source.to_out[0].bias)


# --- checkpoints -----------------------------------------------------------------------


def expected_keys(count, with_mlp=True):
    keys = []
    for i in range(count):
        keys += [f"{i}.to_q.weight", f"{i}.to_k.weight", f"{i}.to_v.weight", f"{i}.to_out.0.weight", f"{i}.to_out.0.bias"]
        if with_mlp:
            keys += [f"{i}.{p}.{j}.{t}" for p in ("to_q_", "to_k_") for j in (0, 1, 3) for t in ("weight", "bias")]
    return set(keys)


@pytest.mark.parametrize("style", ["sd15", "sdxl"])
def test_checkpoint_round_trip_official_format(style, sd15_style_unet, tmp_path):
    from safetensors import safe_open

    if style == "sd15":
        unet, mid_dim_scale = sd15_style_unet, None
    else:  # SD-XL: D = 64 and MLP width C / 16
        unet, mid_dim_scale = tiny_unet((64, 128), heads=(1, 2), norm_num_groups=16), 16
    saved = LinFusion.from_unet(unet, mid_dim_scale=mid_dim_scale)
    saved.save_pretrained(str(tmp_path))

    config = json.loads((tmp_path / "config.json").read_text())
    names = [name for name, _ in unet.named_modules() if name.endswith("attn1")]
    assert [entry["module_name"] for entry in config["modules_list"]] == names
    for entry, module in zip(config["modules_list"], saved.attention_modules()):
        assert set(entry) == {"module_name", "dim_n", "heads", "projection_mid_dim"}
        assert (entry["dim_n"], entry["heads"]) == (module.dim_n, module.heads)
        expected_mid = None if mid_dim_scale is None else module.dim_n // 16
        assert entry["projection_mid_dim"] == expected_mid
    with safe_open(str(tmp_path / "diffusion_pytorch_model.safetensors"), "pt") as f:
        keys = set(f.keys())
        if mid_dim_scale:
            assert f.get_tensor("0.to_q_.0.weight").shape == (config["modules_list"][0]["dim_n"] // 16,
                                                               config["modules_list"][0]["dim_n"])
    assert keys == expected_keys(len(names))

    loaded = LinFusion.from_pretrained(str(tmp_path))
    for key, value in saved.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    inputs = unet_inputs(unet)
    outputs = []
    for model in (saved, loaded):
        model.mount_to(unet)
        try:
            outputs.append(run_unet(unet, inputs))
        finally:
            model.unmount()
    assert torch.equal(outputs[0], outputs[1])


def test_checkpoint_without_mlps(unet, tmp_path):
    specs = [dict(spec.__dict__, projection_mid_dim=-1) for spec in LinFusion.from_unet(unet).specs]
    LinFusion(specs).save_pretrained(str(tmp_path))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert set(f.keys()) == expected_keys(len(specs), with_mlp=False)
    loaded = LinFusion.from_pretrained(str(tmp_path))
    assert isinstance(loaded.attention_modules()[0].to_q_, nn.Identity)


def test_checkpoint_for_another_unet_names_first_mismatch(unet, tmp_path):
    LinFusion.from_unet(tiny_unet((32, 48), heads=2)).save_pretrained(str(tmp_path))
    originals = {name: m for name, m in unet.named_modules() if name.endswith("attn1")}
    # attn1 order is down, up, mid: the 32-channel layers match, the mid block (64 vs 48) is first to differ.
    with pytest.raises(LinFusionMismatchError) as error:
        LinFusion.construct_for(unet, pretrained=str(tmp_path))
    assert str(error.value) == (
        "LinFusion: module 3 'mid_block.attentions.0.transformer_blocks.0.attn1' does not match the UNet: "
        "the UNet expects dim_n=64, heads=2, the LinFusion checkpoint has dim_n=48, heads=2"
    )
    assert all(unet.get_submodule(name) is module for name, module in originals.items())


def test_checkpoint_tensor_mismatch_and_missing_dir(unet, tmp_path):
    from safetensors.torch import load_file, save_file

    LinFusion.from_unet(unet).save_pretrained(str(tmp_path))
    path = str(tmp_path / "diffusion_pytorch_model.safetensors")
    state = load_file(path)
    state["1.to_k_.0.weight"] = torch.zeros(7, state["1.to_k_.0.weight"].shape[1])
    save_file(state, path)
    with pytest.raises(LinFusionMismatchError, match=r"module 1 'up_blocks\.1\.attentions\.0\.transformer_blocks\.0"
                       r"\.attn1' \(dim_n=32, heads=2\): 1\.to_k_\.0\.weight has shape \(7, 32\), config\.json implies \(32, 32\)"):
        LinFusion.from_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="download the checkpoint first"):
        LinFusion.from_pretrained(str(tmp_path / "Yuanshi" / "LinFusion-1-5"))


def test_half_precision_checkpoint_loads_into_fp32_unet(unet, tmp_path):
    """The published checkpoints are stored in fp16; mounting casts to the UNet's dtype."""
    saved = LinFusion.from_unet(unet).half()
    saved.save_pretrained(str(tmp_path))
    loaded = LinFusion.from_pretrained(str(tmp_path))
    assert {p.dtype for p in loaded.parameters()} == {torch.float16}
    loaded = LinFusion.construct_for(unet, pretrained=str(tmp_path))
    try:
        assert {p.dtype for p in loaded.parameters()} == {torch.float32}
        assert torch.equal(loaded.attention_modules()[0].to_q.weight, saved.attention_modules()[0].to_q.weight.float())
    finally:
        loaded.unmount()


def test_tiny_pipeline_generates_with_linfusion(backend, tmp_path):
    pytest.importorskip("transformers")
    from diffusers.models.attention_processor import Attention

    from mmfast.models.linfusion.tiny import tiny_pipeline

    pipe = tiny_pipeline()
    LinFusion.from_unet(pipe.unet).save_pretrained(str(tmp_path))
    linfusion = LinFusion.construct_for(pipe, pretrained=str(tmp_path))
    attn2 = [m for name, m in pipe.unet.named_modules() if name.endswith("attn2")]
    assert attn2 and all(isinstance(m, Attention) for m in attn2)  # cross-attention stays softmax
    images = pipe("a photo of a cat", num_inference_steps=2, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    linfusion.unmount()
    assert images.shape == (1, 16, 16, 3) and bool((images >= 0).all() and (images <= 1).all())


# --- training --------------------------------------------------------------------------


def test_distillation_gradients_reach_linfusion_only(unet, backend):
    linfusion = LinFusion.construct_for(unet)
    try:
        distiller = LinFusionDistiller(unet, linfusion)
        latents, timesteps, context = unet_inputs(unet)
        loss, parts = distiller(latents, timesteps, context, target=torch.randn_like(latents))
        loss.backward()
        assert set(parts) == {"denoise", "teacher", "feature"} and parts["feature"] > 0
        ours = {id(p) for p in linfusion.parameters()}
        for name, parameter in linfusion.named_parameters():
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        for name, parameter in unet.named_parameters():
            if id(parameter) not in ours:
                assert parameter.grad is None, name
        with linfusion.unmounted():
            assert all(p.grad is None for p in unet.parameters())
    finally:
        linfusion.unmount()
        unet.requires_grad_(True)


# --- torch.compile ---------------------------------------------------------------------


DEFAULT_BACKEND = BACKENDS[-1]  # native when built, else reference


def test_compiled_module_inductor(backend):
    torch._dynamo.reset()
    module = random_module(80, 2)
    x = torch.randn(2, 64, 80)
    with torch.no_grad():
        expected = module(x)
        compiled = torch.compile(module, fullgraph=True, backend="inductor")
        torch.testing.assert_close(compiled(x), expected, rtol=1e-4, atol=1e-5)


def test_compiled_mounted_unet(unet):
    """The whole mounted UNet as one graph (dynamo + AOT autograd). Default backend only:
    tracing the UNet costs ~10 s on CPU, and inductor codegen of it minutes."""
    torch._dynamo.reset()
    inputs = unet_inputs(unet)
    linfusion = LinFusion.construct_for(unet)
    try:
        with mmfast.use_backend(DEFAULT_BACKEND):
            expected = run_unet(unet, inputs)
        compiled = torch.compile(unet, backend="aot_eager", fullgraph=True)
        with torch.no_grad(), mmfast.use_backend(DEFAULT_BACKEND):
            actual = compiled(*inputs).sample
    finally:
        linfusion.unmount()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


# --- token-parallel linear attention (2 processes, gloo) ---------------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_worker(rank, world_size, port, splits, result_dir):
    import torch.distributed as dist

    from mmfast import distributed

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
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


def test_distributed_linear_attention_equals_single_process(tmp_path):
    import torch.multiprocessing as mp

    splits = [23, 14]  # unequal shards: the state must be token-weighted, not a plain average
    mp.spawn(_distributed_worker, args=(2, _free_port(), splits, str(tmp_path)), nprocs=2, join=True)
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


def _row_parallel_worker(rank, world_size, port, result_dir):
    import torch.distributed as dist

    from mmfast import distributed

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        unet = tiny_unet((32, 64), heads=2)
        LinFusion.construct_for(unet)
        latents, timesteps, context = _row_parallel_inputs(unet)
        with distributed.row_parallel_unet(unet):
            band = run_unet(unet, (distributed.split_rows(latents), timesteps, context))
        full = distributed.gather_rows(band)
        # Control: the same bands run independently (no halos, local GroupNorm and attention).
        naive = distributed.gather_rows(run_unet(unet, (distributed.split_rows(latents), timesteps, context)))
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
    mp.spawn(_row_parallel_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    result = torch.load(tmp_path / "row_parallel.pt", weights_only=True)
    assert result["full"].shape == (2, 4, 16, 8)
    torch.testing.assert_close(result["full"], result["single"], rtol=1e-5, atol=1e-5)
    assert (result["naive"] - result["single"]).abs().max() > 1e-2  # the split is not trivially exact
