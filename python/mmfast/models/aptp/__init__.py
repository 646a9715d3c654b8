"""APTP (prompt-based pruning, Ganjdanesh et al., ICLR 2025) on mmfast: K physically pruned
experts of a diffusers UNet served as one model for batches that mix architecture codes.

    from mmfast.models.aptp import AptpUNet, Router, load_expert
    experts = [load_expert(d) for d in expert_dirs]            # (sliced UNet, ArchitectureCode)
    # released experts: [load_expert(d) for d in released_expert_dirs("APTP-Base-CC3M")]
    model = AptpUNet.from_experts(base_unet, experts)          # base: structure only
    codes = router(prompt_embeddings)                          # (B,) from a sentence encoder
    noise = model(latents, t, text_states, codes).sample       # each row runs its own expert
"""
from .architecture import (FF_GROUPS, ArchitectureCode, DepthSkip, arch_vector_layout, depth_gates, prune_unet,
                           random_architecture, to_masks, width_gates)
from .checkpoints import (ARCH_FILE, RELEASED_ARCH_FILE, dense_skeleton, load_expert, load_released_expert,
                          released_expert_dirs, save_expert)
from .router import Router, contrastive_loss, sinkhorn
from .unet import (AptpUNet, CodedConv2d, CodedDepthGate, CodedGroupNorm, CodedLayerNorm, CodedLinear, CodeState,
                   run_per_expert, stack_expert_weights)

__all__ = [
    "ARCH_FILE",
    "RELEASED_ARCH_FILE",
    "AptpUNet",
    "ArchitectureCode",
    "arch_vector_layout",
    "CodeState",
    "CodedConv2d",
    "CodedDepthGate",
    "CodedGroupNorm",
    "CodedLayerNorm",
    "CodedLinear",
    "DepthSkip",
    "FF_GROUPS",
    "Router",
    "contrastive_loss",
    "dense_skeleton",
    "depth_gates",
    "load_expert",
    "load_released_expert",
    "prune_unet",
    "random_architecture",
    "released_expert_dirs",
    "run_per_expert",
    "save_expert",
    "sinkhorn",
    "stack_expert_weights",
    "to_masks",
    "width_gates",
]
