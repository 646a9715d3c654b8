"""LinFusion with diffusers' adapters, on tiny random pipelines: ControlNet and IP-Adapter.

LinFusion (arXiv 2409.02097) claims both work without adaptation: it replaces the UNet's
self-attention (attn1) only, a ControlNet is a separate model adding residuals to the UNet,
and an IP-Adapter replaces the cross-attention (attn2) processors. These tests check that
the mounting touches nothing else, that generation runs with each adapter, and that the
adapter is live (its input changes the image) while LinFusion is mounted.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from mmfast.models.linfusion import GeneralizedLinearAttention, LinFusion, LinFusionAttnProcessor  # noqa: E402
from mmfast.testing.tiny_diffusers import (  # noqa: E402
    tiny_controlnet_pipeline,
    tiny_pipeline,
    write_tiny_ip_adapter,
)

SIZE = 16  # pixels; the tiny VAE downsamples by 2, so 8x8 latents (the tiny UNet's sample size)


def generate(pipe, **kwargs) -> np.ndarray:
    """A 2-step generation with a fixed seed; fails on any LinFusion warning (e.g. ignored kwargs)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = pipe("a photo of a cat", num_inference_steps=2, height=SIZE, width=SIZE, output_type="np",
                      generator=torch.Generator().manual_seed(0), **kwargs).images
    linfusion_warnings = [str(w.message) for w in caught if "GeneralizedLinearAttention" in str(w.message)]
    assert not linfusion_warnings, linfusion_warnings
    assert images.shape == (1, SIZE, SIZE, 3)
    assert np.isfinite(images).all()
    assert images.std() > 1e-3  # not a constant (e.g. fully clipped) image
    return images


def assert_differ(a: np.ndarray, b: np.ndarray, what: str) -> None:
    assert np.abs(a - b).max() > 1e-3, f"{what} does not change the image"


def random_image(seed: int, size: int = SIZE):
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def attn1_names(unet):
    return [name for name, module in unet.named_modules() if name.endswith("attn1")]


def assert_only_attn1_replaced(unet, original_modules: dict, linfusion: LinFusion) -> None:
    """Every module of the UNet but attn1 (and what was inside it) is the very same object."""
    mounted = dict(zip([spec.module_name for spec in linfusion.specs], linfusion.attention_modules()))
    for name, original in original_modules.items():
        owner = next((n for n in mounted if name == n or name.startswith(n + ".")), None)
        if owner is None:
            assert unet.get_submodule(name) is original, name
        elif name == owner:
            assert unet.get_submodule(name) is mounted[name], name


# --- ControlNet --------------------------------------------------------------------------


def test_controlnet_pipeline_with_linfusion():
    from diffusers import StableDiffusionPipeline
    from diffusers.models.attention_processor import Attention

    pipe = tiny_controlnet_pipeline(seed=0)
    unet, controlnet = pipe.unet, pipe.controlnet
    # The same components without the ControlNet (one shared UNet: mounting covers both).
    plain = StableDiffusionPipeline(**{k: v for k, v in pipe.components.items() if k != "controlnet"},
                                    requires_safety_checker=False)
    condition_a, condition_b = random_image(1), random_image(2)
    unet_modules, controlnet_modules = dict(unet.named_modules()), dict(controlnet.named_modules())
    unet_processors, controlnet_processors = unet.attn_processors, controlnet.attn_processors
    assert any(name.endswith("attn1") for name in controlnet_modules)  # the ControlNet has its own attn1s
    softmax_image = generate(pipe, image=condition_a)

    linfusion = LinFusion.construct_for(pipe, load_pretrained=False)
    try:
        assert [spec.module_name for spec in linfusion.specs] == attn1_names(unet)
        assert_only_attn1_replaced(unet, unet_modules, linfusion)
        for name, processor in unet.attn_processors.items():
            if name.endswith("attn1.processor"):
                assert isinstance(processor, LinFusionAttnProcessor), name
            else:
                assert processor is unet_processors[name], name
        # The ControlNet is untouched: same modules (softmax attn1 included), same processors.
        assert dict(controlnet.named_modules()).keys() == controlnet_modules.keys()
        assert all(controlnet.get_submodule(n) is m for n, m in controlnet_modules.items())
        assert all(type(m) is Attention for n, m in controlnet_modules.items() if n.endswith("attn1"))
        assert all(p is controlnet_processors[n] for n, p in controlnet.attn_processors.items())

        image_a = generate(pipe, image=condition_a)
        assert_differ(image_a, softmax_image, "mounting LinFusion")
        assert_differ(generate(pipe, image=condition_b), image_a, "another conditioning image")
        # Scale 0 removes exactly the ControlNet's residuals: the plain pipeline's image.
        unconditioned = generate(pipe, image=condition_a, controlnet_conditioning_scale=0.0)
        np.testing.assert_allclose(unconditioned, generate(plain), atol=1e-6, rtol=0)
        assert_differ(image_a, unconditioned, "the ControlNet conditioning")
        assert_differ(generate(pipe, image=condition_a, controlnet_conditioning_scale=0.5), image_a,
                      "the conditioning scale")
    finally:
        linfusion.unmount()
    assert dict(unet.named_modules()).keys() == unet_modules.keys()
    assert all(unet.get_submodule(n) is m for n, m in unet_modules.items())
    assert all(p is unet_processors[n] for n, p in unet.attn_processors.items())
    np.testing.assert_allclose(generate(pipe, image=condition_a), softmax_image, atol=1e-6, rtol=0)


# --- IP-Adapter --------------------------------------------------------------------------


def assert_linfusion_attn1(unet, linfusion: LinFusion) -> None:
    for spec, module in zip(linfusion.specs, linfusion.attention_modules()):
        mounted = unet.get_submodule(spec.module_name)
        assert mounted is module and isinstance(mounted, GeneralizedLinearAttention), spec.module_name
        assert isinstance(mounted.get_processor(), LinFusionAttnProcessor), spec.module_name
        assert isinstance(unet.attn_processors[spec.module_name + ".processor"], LinFusionAttnProcessor)


def attn2_processors(unet) -> dict:
    return {name: p for name, p in unet.attn_processors.items() if name.endswith("attn2.processor")}


@pytest.mark.parametrize("linfusion_first", [True, False], ids=["linfusion-then-ip-adapter",
                                                                 "ip-adapter-then-linfusion"])
def test_ip_adapter_with_linfusion(tmp_path, linfusion_first):
    from diffusers.models.attention_processor import IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0
    from safetensors.torch import load_file

    pipe = tiny_pipeline(seed=0)
    unet = pipe.unet
    subfolder, weight_name = write_tiny_ip_adapter(str(tmp_path), unet, seed=0)
    checkpoint = load_file(os.path.join(tmp_path, subfolder, weight_name))
    original_attn1 = {name: unet.get_submodule(name) for name in attn1_names(unet)}
    original_attn2_classes = {name: type(p) for name, p in attn2_processors(unet).items()}

    def load_ip_adapter():
        # Local files only: the image encoder comes from <dir>/models/image_encoder.
        pipe.load_ip_adapter(str(tmp_path), subfolder=subfolder, weight_name=weight_name, local_files_only=True)

    linfusion_only = None
    if linfusion_first:
        linfusion = LinFusion.construct_for(pipe, load_pretrained=False)
        linfusion_only = generate(pipe)
        load_ip_adapter()
    else:
        load_ip_adapter()
        ip_processors = attn2_processors(unet)
        linfusion = LinFusion.construct_for(pipe, load_pretrained=False)
        assert all(p is ip_processors[n] for n, p in attn2_processors(unet).items())  # mounting leaves attn2 alone
    try:
        assert pipe.image_encoder is not None and pipe.feature_extractor is not None
        assert_linfusion_attn1(unet, linfusion)
        processors = attn2_processors(unet)
        assert processors and all(isinstance(p, (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0))
                                  for p in processors.values())
        # The official keys landed where they belong: ip_adapter.{1,3,5,...} -> the attn2s in order.
        for j, processor in enumerate(processors.values()):
            for projection in ("to_k_ip", "to_v_ip"):
                torch.testing.assert_close(getattr(processor, projection)[0].weight,
                                           checkpoint[f"ip_adapter.{2 * j + 1}.{projection}.weight"])

        image = random_image(3, size=32)
        pipe.set_ip_adapter_scale(1.0)
        adapted = generate(pipe, ip_adapter_image=image)
        assert_differ(generate(pipe, ip_adapter_image=random_image(4, size=32)), adapted, "another IP-Adapter image")
        pipe.set_ip_adapter_scale(0.0)
        unadapted = generate(pipe, ip_adapter_image=image)
        assert_differ(adapted, unadapted, "the IP-Adapter scale")
        if linfusion_only is not None:  # scale 0 is LinFusion alone
            np.testing.assert_allclose(unadapted, linfusion_only, atol=1e-5, rtol=0)

        pipe.unload_ip_adapter()
        assert linfusion.is_mounted
        assert_linfusion_attn1(unet, linfusion)
        assert unet.encoder_hid_proj is None and pipe.image_encoder is None
        assert {name: type(p) for name, p in attn2_processors(unet).items()} == original_attn2_classes
        unloaded = generate(pipe)
        np.testing.assert_allclose(unloaded, unadapted, atol=1e-5, rtol=0)
    finally:
        linfusion.unmount()
    assert all(unet.get_submodule(name) is module for name, module in original_attn1.items())
    assert_differ(generate(pipe), unloaded, "unmounting LinFusion")
