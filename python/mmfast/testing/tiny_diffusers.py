"""Tiny random diffusers models for tests and examples; built locally, nothing downloaded."""
from __future__ import annotations

import json
import os
import string
import tempfile
from typing import Sequence

import torch


def tiny_unet(block_out_channels: Sequence[int] = (32, 64), heads=2, layers_per_block: int = 1,
              cross_attention_dim: int = 32, norm_num_groups: int = 8, sample_size: int = 8, seed: int = 0):
    """A random SD-style UNet2DConditionModel: cross-attention at every level but the last down.

    heads is per level (int or tuple); diffusers calls it attention_head_dim for SD-1.5-era UNets.
    """
    from diffusers import UNet2DConditionModel

    levels = len(block_out_channels)
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=heads,
        norm_num_groups=norm_num_groups,
    ).eval()


def _write_tiny_tokenizer(directory: str) -> None:
    """A character-level CLIP BPE vocabulary (no merges): enough to tokenize any ASCII prompt."""
    symbols = list(string.ascii_lowercase + string.digits + ".,!?'-")
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with open(os.path.join(directory, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(directory, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 77}, f)


def tiny_pipeline(seed: int = 0, block_out_channels: Sequence[int] = (32, 64)):
    """A random StableDiffusionPipeline (tiny UNet, VAE, CLIP text encoder and tokenizer)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with tempfile.TemporaryDirectory() as directory:
        _write_tiny_tokenizer(directory)
        tokenizer = CLIPTokenizer.from_pretrained(directory)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), latent_channels=4,
        norm_num_groups=8, sample_size=32,
    ).eval()
    unet = tiny_unet(block_out_channels, cross_attention_dim=32, seed=seed)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def tiny_sdxl_unet(block_out_channels: Sequence[int] = (32, 64), heads=(2, 4), layers_per_block: int = 1,
                   transformer_layers_per_block=(1, 2), cross_attention_dim: int = 80, pooled_dim: int = 24,
                   addition_time_embed_dim: int = 8, norm_num_groups: int = 8, sample_size: int = 8, seed: int = 0):
    """A random SD-XL-style UNet2DConditionModel.

    As SD-XL: no cross-attention at the first level, linear projections in the transformers,
    several transformer layers per block at the deeper level, and the "text_time" added
    conditioning (the pooled text embedding, `pooled_dim`, plus 6 size/crop ids, each embedded
    in addition_time_embed_dim channels). cross_attention_dim is the two text encoders' hidden
    sizes together. heads is per level (diffusers' attention_head_dim, which SD-XL uses as heads).
    """
    from diffusers import UNet2DConditionModel

    levels = len(block_out_channels)
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        transformer_layers_per_block=tuple(transformer_layers_per_block),
        attention_head_dim=heads,
        use_linear_projection=True,
        cross_attention_dim=cross_attention_dim,
        addition_embed_type="text_time",
        addition_time_embed_dim=addition_time_embed_dim,
        projection_class_embeddings_input_dim=6 * addition_time_embed_dim + pooled_dim,
        norm_num_groups=norm_num_groups,
    ).eval()


def tiny_sdxl_pipeline(seed: int = 0, block_out_channels: Sequence[int] = (32, 64)):
    """A random StableDiffusionXLPipeline (tiny UNet, fp32 VAE with force_upcast, two CLIP text encoders).

    The two text encoders differ as SD-XL's do (CLIP ViT-L, then OpenCLIP bigG with a text
    projection): hidden sizes 32 and 48, the second projecting its pooled output to 24, so the
    UNet's cross_attention_dim is 32 + 48 = 80 and its projection_class_embeddings_input_dim
    6 * 8 + 24 = 72. Both tokenizers are the character-level one. The VAE has SD-XL's
    scaling_factor and force_upcast=True (convert it to float16 to get the upcast path); the
    scheduler is SD-XL's EulerDiscreteScheduler configuration. No watermarker.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    with tempfile.TemporaryDirectory() as directory:
        _write_tiny_tokenizer(directory)
        tokenizer = CLIPTokenizer.from_pretrained(directory)
        tokenizer_2 = CLIPTokenizer.from_pretrained(directory)

    def text_config(hidden_size, **extra):
        return CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **extra,
        )

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(text_config(32)).eval()
    text_encoder_2 = CLIPTextModelWithProjection(text_config(48, projection_dim=24)).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), latent_channels=4,
        norm_num_groups=8, sample_size=32, scaling_factor=0.13025, force_upcast=True,
    ).eval()
    unet = tiny_sdxl_unet(block_out_channels, cross_attention_dim=32 + 48, pooled_dim=24, seed=seed)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        timestep_spacing="leading", interpolation_type="linear", prediction_type="epsilon", use_karras_sigmas=False,
    )
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, image_encoder=None, feature_extractor=None,
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )


def tiny_controlnet(unet, seed: int = 0):
    """A random ControlNetModel for `unet` (ControlNetModel.from_unet) whose output is live.

    The conditioning embedding downsamples by 2, as tiny_pipeline's VAE does, so a
    conditioning image of the generated image's size fits the latents. diffusers zero-inits
    the conditioning embedding's last conv and the residual convs, so a fresh ControlNet adds
    nothing to the UNet; they get random weights here so the conditioning counts: std 0.1 for
    the residual convs, std 1 for the embedding's last conv (with less, the conditioning
    image's content barely shows in the generated image of the random models).
    """
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16)).eval()
    zero_initialized = [(controlnet.controlnet_cond_embedding.conv_out, 1.0), (controlnet.controlnet_mid_block, 0.1)]
    zero_initialized += [(block, 0.1) for block in controlnet.controlnet_down_blocks]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module, std in zero_initialized:
            for parameter in module.parameters():
                parameter.copy_(std * torch.randn(parameter.shape, generator=generator))
    return controlnet


def tiny_controlnet_pipeline(seed: int = 0, block_out_channels: Sequence[int] = (32, 64)):
    """A random StableDiffusionControlNetPipeline: tiny_pipeline's components + tiny_controlnet."""
    from diffusers import StableDiffusionControlNetPipeline

    components = tiny_pipeline(seed, block_out_channels).components
    controlnet = tiny_controlnet(components["unet"], seed=seed)
    return StableDiffusionControlNetPipeline(**components, controlnet=controlnet, requires_safety_checker=False)


def tiny_image_encoder(seed: int = 0, projection_dim: int = 32, image_size: int = 32):
    """A random CLIPVisionModelWithProjection (the IP-Adapter image encoder)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=image_size, patch_size=8, projection_dim=projection_dim,
    )).eval()


IP_ADAPTER_SUBFOLDER = "models"
IP_ADAPTER_WEIGHT_NAME = "ip-adapter_sd15.safetensors"


def write_tiny_ip_adapter(directory: str, unet, seed: int = 0, num_tokens: int = 4):
    """Writes a random IP-Adapter for `unet` in the official h94/IP-Adapter layout.

    directory/models/ip-adapter_sd15.safetensors holds `image_proj.proj.{weight,bias}`
    (embeds -> num_tokens context tokens), `image_proj.norm.{weight,bias}` and
    `ip_adapter.{i}.to_k_ip.weight` / `ip_adapter.{i}.to_v_ip.weight`, i = 1, 3, 5, ... the
    index of each attn2 among the UNet's attention processors (the official ModuleList of
    all processors, attn1 ones empty); directory/models/image_encoder holds the image encoder
    (tiny_image_encoder). Returns (subfolder, weight_name) for pipe.load_ip_adapter.
    """
    from safetensors.torch import save_file

    cross_dim = unet.config.cross_attention_dim
    encoder = tiny_image_encoder(seed)
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, std=0.1):
        return (std * torch.randn(shape, generator=generator)).contiguous()

    tensors = {
        "image_proj.proj.weight": randn(num_tokens * cross_dim, encoder.config.projection_dim),
        "image_proj.proj.bias": randn(num_tokens * cross_dim),
        "image_proj.norm.weight": 1 + randn(cross_dim),
        "image_proj.norm.bias": randn(cross_dim),
    }
    cross_names = [name for name in unet.attn_processors if not name.endswith("attn1.processor")]
    if not cross_names:
        raise ValueError("write_tiny_ip_adapter: the UNet has no cross-attention layer")
    for j, name in enumerate(cross_names):
        attn2 = unet.get_submodule(name[: -len(".processor")])
        for projection in ("to_k", "to_v"):
            std = getattr(attn2, projection).weight.std().item()
            tensors[f"ip_adapter.{2 * j + 1}.{projection}_ip.weight"] = randn(
                *getattr(attn2, projection).weight.shape, std=std)
    folder = os.path.join(directory, IP_ADAPTER_SUBFOLDER)
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, IP_ADAPTER_WEIGHT_NAME), metadata={"format": "pt"})
    encoder.save_pretrained(os.path.join(folder, "image_encoder"))
    return IP_ADAPTER_SUBFOLDER, IP_ADAPTER_WEIGHT_NAME
