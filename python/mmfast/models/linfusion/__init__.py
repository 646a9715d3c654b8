"""LinFusion (arXiv 2409.02097) on mmfast: linear self-attention for diffusers UNets.

    from mmfast.models.linfusion import LinFusion
    linfusion = LinFusion.construct_for(pipe, pretrained="/path/to/LinFusion-1-5")  # local dir
    image = pipe(prompt).images[0]
    linfusion.unmount()                                                    # back to SDPA
"""
from .attention import LINFUSION_EPS, GeneralizedLinearAttention, nonlinear_projection
from .distill import LinFusionDistiller, capture_outputs, distillation_loss
from .model import LinFusion, LinFusionMismatchError, ModuleSpec, unet_attn1_specs

__all__ = [
    "LINFUSION_EPS",
    "GeneralizedLinearAttention",
    "LinFusion",
    "LinFusionDistiller",
    "LinFusionMismatchError",
    "ModuleSpec",
    "capture_outputs",
    "distillation_loss",
    "nonlinear_projection",
    "unet_attn1_specs",
]
