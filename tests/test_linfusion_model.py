"""LinFusion model layer: the module against the official math, mounting on tiny random
diffusers UNets, dtypes, training, torch.compile. (Checkpoints and distributed runs have
their own files.)"""
from __future__ import annotations

import pytest
import torch

import mmfast
from mmfast.models._modules import swap_submodule
from mmfast.models.linfusion import GeneralizedLinearAttention, LinFusion, LinFusionDistiller
from mmfast.models.linfusion.official import OfficialLinearAttention

from _utils import LINFUSION_BACKENDS, run_unet, unet_inputs


def official_copy(module: GeneralizedLinearAttention) -> OfficialLinearAttention:
    return OfficialLinearAttention.from_module(module)


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


def test_module_matches_official_math_in_fp64():
    """The README's fidelity figure: within 1e-12 of the official forward in fp64 (measured ~1e-16)."""
    for dim, heads, mid_dim in [(80, 2, None), (64, 1, 4)]:
        module = random_module(dim, heads, mid_dim).double()
        x, context = torch.randn(2, 37, dim, dtype=torch.float64), torch.randn(2, 9, dim, dtype=torch.float64)
        official = official_copy(module).double()
        with torch.no_grad():
            torch.testing.assert_close(module(x), official(x), rtol=0, atol=1e-12)
            torch.testing.assert_close(module(x, encoder_hidden_states=context), official(x, context), rtol=0,
                                       atol=1e-12)


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
        expected = expected * (9 / 30)  # the official forward's K^T V / N_q with a mean over N_k keys
        torch.testing.assert_close(cross, module.to_out[0](expected.reshape(2, 30, 40)), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cross, official_copy(module)(tokens, context), rtol=1e-5, atol=1e-5)
        module.token_chunk_size = 4  # the chunked path scales alike
        torch.testing.assert_close(module(tokens, encoder_hidden_states=context), cross, rtol=1e-5, atol=1e-5)


def test_module_rejects_bad_inputs():
    module = random_module(40, 2)
    with pytest.raises(NotImplementedError, match="attention_mask"):
        module(torch.randn(1, 4, 40), attention_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match=r"hidden_states must be \(B, N, 40\)"):
        module(torch.randn(1, 4, 32))
    # found by a new-user trial: an image was reported by the tokens made of it, a context of another
    # batch by linear_attention_apply's state
    with pytest.raises(ValueError, match=r"must be \(B, N, 40\) or \(B, 40, H, W\), got shape \(2, 31, 4, 4\)"):
        module(torch.randn(2, 31, 4, 4))
    with pytest.raises(ValueError, match=r"encoder_hidden_states must have hidden_states' batch 2, got shape "
                       r"\(3, 5, 40\)"):
        module(torch.randn(2, 16, 40), torch.randn(3, 5, 40))
    with pytest.raises(ValueError, match=r"dim_n=42 must be a positive multiple of heads=4 >= 1"):
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
    linfusion = LinFusion.construct_for(unet, load_pretrained=False)
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


def test_construct_for_names_what_it_expected():
    """Found by a new-user trial: a tensor in the pipeline's place raised AttributeError 'parameters'."""
    with pytest.raises(TypeError, match="expected a diffusers pipeline with a .unet, or a UNet2DConditionModel, "
                       "got Tensor"):
        LinFusion.construct_for(torch.zeros(1), load_pretrained=False)
    with pytest.raises(TypeError, match="got Tensor"):  # before the missing checkpoint is named
        LinFusion.construct_for(torch.zeros(1))


def test_construct_for_without_a_local_checkpoint_says_which_to_fetch(unet):
    """The official construct_for downloads a checkpoint by default; mmfast refuses instead of
    mounting random modules silently, and names the checkpoint the official code would fetch."""
    from types import SimpleNamespace

    with pytest.raises(ValueError, match="load_pretrained=False") as error:
        LinFusion.construct_for(unet)  # an unnamed UNet: every official checkpoint is listed
    assert all(name in str(error.value) for name in ("LinFusion-1-5", "LinFusion-2-1", "LinFusion-XL"))
    assert not any(isinstance(m, GeneralizedLinearAttention) for m in unet.modules())  # nothing mounted
    for name, checkpoint in (("stabilityai/stable-diffusion-2-1", "Yuanshi/LinFusion-2-1"),
                             ("/models/Lykon/dreamshaper-8", "Yuanshi/LinFusion-1-5")):
        pipe = SimpleNamespace(unet=unet, config={"_name_or_path": name})
        with pytest.raises(ValueError, match=f"this pipeline \\({name}\\) gets {checkpoint}"):
            LinFusion.construct_for(pipe)
    with pytest.raises(ValueError, match="contradict"):
        LinFusion.construct_for(unet, pretrained="/nonexistent", load_pretrained=False)
    # the official notebook's call: a Hub id is not a local directory, and the error says how to get one
    with pytest.raises(FileNotFoundError, match="hf download Yuanshi"):
        LinFusion.construct_for(unet, pretrained_model_name_or_path="Yuanshi/LinFusion-1-5")


def test_construct_for_takes_the_official_keywords(unet):
    """The official signature is construct_for(pipeline=None, unet=None, load_pretrained=True,
    pretrained_model_name_or_path=None, pipe_name_path=None): its distillation script's
    construct_for(unet=unet, load_pretrained=False) and a pipe_name_path naming the checkpoint port."""
    from types import SimpleNamespace

    linfusion = LinFusion.construct_for(unet=unet, load_pretrained=False)
    assert linfusion.is_mounted and any(isinstance(m, GeneralizedLinearAttention) for m in unet.modules())
    linfusion.unmount()
    pipe = SimpleNamespace(unet=unet, config={"_name_or_path": "/local/copy"})
    linfusion = LinFusion.construct_for(pipeline=pipe, load_pretrained=False)
    assert linfusion.is_mounted
    linfusion.unmount()
    with pytest.raises(ValueError, match=r"this pipeline \(stabilityai/stable-diffusion-2-1\) gets Yuanshi/LinFusion-2-1"):
        LinFusion.construct_for(pipeline=pipe, pipe_name_path="stabilityai/stable-diffusion-2-1")
    with pytest.raises(ValueError, match="positionally or as pipeline= / unet=, not both"):
        LinFusion.construct_for(unet, unet=unet, load_pretrained=False)
    with pytest.raises(ValueError, match="no pipeline or UNet given"):
        LinFusion.construct_for(load_pretrained=False)
    with pytest.raises(TypeError, match="pass the UNet as unet=unet"):  # the official positional order
        LinFusion.construct_for(None, unet, load_pretrained=False)
    named_unet = SimpleNamespace(config={"_name_or_path": "runwayml/stable-diffusion-v1-5"}, **vars(unet))
    with pytest.raises(ValueError, match="gets Yuanshi/LinFusion-1-5"):  # the UNet's own name, as positionally
        LinFusion.construct_for(unet=named_unet)
    assert not any(isinstance(m, GeneralizedLinearAttention) for m in unet.modules())  # errors mount nothing


def test_unmount_after_the_unet_was_cast_restores_matching_modules():
    """unet.to(...) while mounted does not reach the kept attn1 modules: unmount (and unmounted())
    moves them to the UNet's dtype, so the restored UNet runs instead of failing on mixed dtypes."""
    from mmfast.testing.tiny_diffusers import tiny_unet

    unet = tiny_unet(seed=3)
    linfusion = LinFusion.construct_for(unet, load_pretrained=False)
    unet.to(torch.float64)
    with linfusion.unmounted():
        assert {p.dtype for p in unet.parameters()} == {torch.float64}
    linfusion.unmount()
    assert {p.dtype for p in unet.parameters()} == {torch.float64}
    latents, timesteps, context = unet_inputs(unet)
    assert run_unet(unet, (latents.double(), timesteps, context.double())).dtype == torch.float64


def test_mounted_unet_matches_official_modules(sd15_style_unet, backend):
    unet = sd15_style_unet
    inputs = unet_inputs(unet)
    linfusion = LinFusion.construct_for(unet, load_pretrained=False)
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


# --- training --------------------------------------------------------------------------


def test_distillation_gradients_reach_linfusion_only(unet, backend):
    linfusion = LinFusion.construct_for(unet, load_pretrained=False)
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
        with pytest.raises(ValueError, match="target must have the prediction's shape"):  # not a broadcast
            distiller(latents, timesteps, context, target=latents[:1])
    finally:
        linfusion.unmount()
        unet.requires_grad_(True)


# --- torch.compile ---------------------------------------------------------------------


DEFAULT_BACKEND = LINFUSION_BACKENDS[-1]  # native when built, else reference


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
    linfusion = LinFusion.construct_for(unet, load_pretrained=False)
    try:
        with mmfast.use_backend(DEFAULT_BACKEND):
            expected = run_unet(unet, inputs)
        compiled = torch.compile(unet, backend="aot_eager", fullgraph=True)
        with torch.no_grad(), mmfast.use_backend(DEFAULT_BACKEND):
            actual = compiled(*inputs).sample
    finally:
        linfusion.unmount()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


# --- dtypes and diffusers' processor API ----------------------------------------------------


@pytest.mark.parametrize("chunk", [None, 16])
def test_bf16_autocast_gives_the_same_dtype_with_and_without_token_chunking(backend, chunk):
    module = random_module(40, 2)
    module.token_chunk_size = chunk
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(torch.randn(1, 50, 40))
    assert out.dtype == torch.bfloat16


def test_token_chunk_size_must_be_a_positive_int(unet):
    linfusion = LinFusion.construct_for(unet, load_pretrained=False)
    try:
        for bad in (0, 1.5, True):
            with pytest.raises(ValueError, match="token chunk size must be an int >= 1 or None"):
                linfusion.set_token_chunk_size(bad)
        linfusion.set_token_chunk_size(64)
        assert all(module.token_chunk_size == 64 for module in linfusion.attention_modules())
    finally:
        linfusion.unmount()


def test_mounted_layers_take_part_in_the_processor_api(unet):
    from mmfast.models.linfusion import LinFusionAttnProcessor

    before = dict(unet.attn_processors)
    linfusion = LinFusion.construct_for(unet, load_pretrained=False)
    try:
        mounted = unet.attn_processors
        assert mounted.keys() == before.keys()  # all 8 layers, attn1 included
        attn1 = [name for name in mounted if name.endswith("attn1.processor")]
        assert attn1 and all(isinstance(mounted[name], LinFusionAttnProcessor) for name in attn1)
        unet.set_attn_processor(dict(mounted))  # a dict taken while mounted fits
        # diffusers' loaders re-create each layer's current processor class (IP-Adapter does):
        unet.set_attn_processor({name: type(p)() for name, p in mounted.items()})
        with pytest.raises(ValueError, match="cannot run AttnProcessor2_0. Unmount LinFusion"):
            unet.set_attn_processor(dict(before))  # softmax processors for attn1
        assert all(isinstance(unet.get_submodule(n[: -len(".processor")]), GeneralizedLinearAttention) for n in attn1)
    finally:
        linfusion.unmount()
    assert unet.attn_processors.keys() == before.keys()


def test_a_processor_dict_taken_while_mounted_refuses_the_softmax_layers_after_unmount(unet):
    """Restoring that dict after unmount put LinFusionAttnProcessor on diffusers' attn1, whose
    call then called the processor again: RecursionError. Now a ValueError saying what happened."""
    inputs = unet_inputs(unet)
    before = dict(unet.attn_processors)
    linfusion = LinFusion.construct_for(unet, load_pretrained=False)
    saved = dict(unet.attn_processors)
    linfusion.unmount()
    unet.set_attn_processor(saved)
    try:
        with pytest.raises(ValueError, match="runs mounted LinFusion layers only, not a diffusers Attention"):
            run_unet(unet, inputs)
    finally:
        unet.set_attn_processor(before)


def test_wrapped_unets_mount_under_their_plain_names(unet):
    """pipe.unet = torch.compile(pipe.unet) (diffusers' recipe) and DDP prefix module names with
    `_orig_mod.` / `module.`: an official checkpoint did not mount, and a distilled one was saved
    under names no plain UNet has."""
    compiled = torch.compile(unet)  # nothing compiles until it is called
    linfusion = LinFusion.construct_for(compiled, load_pretrained=False)
    try:
        names = [spec.module_name for spec in linfusion.specs]
        assert names and all(name.startswith(("down_blocks.", "mid_block.", "up_blocks.")) for name in names)
        assert all(isinstance(unet.get_submodule(name), GeneralizedLinearAttention) for name in names)
    finally:
        linfusion.unmount()
    assert not any(isinstance(m, GeneralizedLinearAttention) for m in unet.modules())


def test_sequential_cpu_offload_is_refused_rather_than_dropping_weights(unet):
    """Under accelerate's sequential CPU offload the UNet's weights sit on meta: mounting moved
    LinFusion's there too, and unmounting moved the original attn1's there (lost for good)."""
    from accelerate import cpu_offload
    from accelerate.hooks import remove_hook_from_module

    from mmfast.testing.tiny_diffusers import tiny_unet

    linfusion = LinFusion.construct_for(unet, load_pretrained=False)
    cpu_offload(unet, execution_device="cpu")
    try:
        with pytest.raises(ValueError, match="remove the offload hooks first"):
            linfusion.unmount()
        with pytest.raises(ValueError, match="remove the offload hooks first"):
            with linfusion.unmounted():
                pass
        assert linfusion.is_mounted and not any(p.is_meta for m in linfusion.original_attention_modules()
                                                for p in m.parameters())
    finally:
        remove_hook_from_module(unet, recurse=True)
    assert not any(p.is_meta for p in unet.parameters())
    linfusion.unmount()
    fresh = tiny_unet((32, 64), heads=2)
    cpu_offload(fresh, execution_device="cpu")
    with pytest.raises(ValueError, match="mount LinFusion first, then enable the offload"):
        LinFusion.construct_for(fresh, load_pretrained=False)


def test_ip_adapter_masks_are_ignored_quietly_as_diffusers_does():
    """diffusers passes ip_adapter_masks to every attention and its processors stay silent; the
    warning broke torch.compile(fullgraph=True) under IP-Adapter masking."""
    import warnings

    module = random_module()
    x = torch.randn(1, 6, module.dim_n)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module(x, ip_adapter_masks=[torch.ones(1, 1, 2, 3)])
