"""LinFusion (arXiv 2409.02097) on mmfast: linear self-attention for diffusers UNets.

    from mmfast.models.linfusion import LinFusion
    linfusion = LinFusion.construct_for(pipe, pretrained="/path/to/LinFusion-1-5")  # local dir
    image = pipe(prompt).images[0]
    linfusion.unmount()                                                    # back to SDPA
"""
from .attention import LINFUSION_EPS, GeneralizedLinearAttention, LinFusionAttnProcessor, nonlinear_projection
from .distill import LinFusionDistiller, capture_outputs, distillation_loss
from .highres import DEFAULT_STRENGTHS, HighResOutput, HighResStage, MemoryOptions, generate_highres
from .highres_memory import (StageMemory, empty_pipeline, estimate_highres_memory, plan_highres_memory,
                             plan_memory_options)
from .model import LinFusion, LinFusionMismatchError, ModuleSpec, recommended_dtype, unet_attn1_specs, unet_family
from .row_parallel import gather_rows, row_parallel_unet, split_rows

__all__ = [
    "DEFAULT_STRENGTHS",
    "HighResOutput",
    "HighResStage",
    "MemoryOptions",
    "StageMemory",
    "empty_pipeline",
    "estimate_highres_memory",
    "generate_highres",
    "plan_highres_memory",
    "plan_memory_options",
    "recommended_dtype",
    "unet_family",
    "LINFUSION_EPS",
    "GeneralizedLinearAttention",
    "LinFusion",
    "LinFusionAttnProcessor",
    "LinFusionDistiller",
    "LinFusionMismatchError",
    "ModuleSpec",
    "capture_outputs",
    "distillation_loss",
    "gather_rows",
    "nonlinear_projection",
    "row_parallel_unet",
    "split_rows",
    "unet_attn1_specs",
]
