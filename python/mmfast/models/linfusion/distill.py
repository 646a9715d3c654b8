"""LinFusion distillation: the original UNet is the teacher, LinFusion-mounted UNet the student.

loss = MSE(eps_student, target) + 0.5 * MSE(eps_student, eps_teacher)
       + 0.5 * mean over attn1 layers of MSE(attn_student, attn_teacher)
(LinFusion's distill.py; target=None drops the first term, for inputs whose noise is not the
answer, such as DiffDIS's x_T of pure noise at inference.)
One UNet serves as both: the teacher pass runs with the original attn1 modules put
back (LinFusion.unmounted()), so no second copy of the UNet is held in memory.
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn


@contextlib.contextmanager
def capture_outputs(modules: Sequence[nn.Module]):
    """Yields one list per module; each forward call of module i appends its output to list i."""
    captured: List[list] = [[] for _ in modules]
    handles = [
        module.register_forward_hook(lambda _module, _args, output, store=store: store.append(output))
        for module, store in zip(modules, captured)
    ]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(a.float(), b.float())


def distillation_loss(student_pred: torch.Tensor, target: Optional[torch.Tensor], teacher_pred: torch.Tensor,
                      student_attn: Sequence[torch.Tensor], teacher_attn: Sequence[torch.Tensor],
                      teacher_weight: float = 0.5, feature_weight: float = 0.5) -> Tuple[torch.Tensor, Dict]:
    """Returns (total loss, {"denoise", "teacher", "feature"} detached parts); fp32 math.
    target None: no denoising term (parts["denoise"] is None)."""
    if len(student_attn) != len(teacher_attn) or not student_attn:
        raise ValueError(
            f"distillation_loss: need the same non-zero number of student and teacher attn1 outputs, "
            f"got {len(student_attn)} and {len(teacher_attn)}"
        )
    for name, other in (("target", target), ("teacher_pred", teacher_pred)):
        if other is not None and other.shape != student_pred.shape:  # F.mse_loss would broadcast, warning only
            raise ValueError(f"distillation_loss: {name} must have the prediction's shape "
                             f"{tuple(student_pred.shape)}, got {tuple(other.shape)}")
    teacher = _mse(student_pred, teacher_pred)
    feature = torch.stack([_mse(s, t) for s, t in zip(student_attn, teacher_attn)]).mean()
    total = teacher_weight * teacher + feature_weight * feature
    denoise = None if target is None else _mse(student_pred, target)
    if denoise is not None:
        total = denoise + total
    parts = {"denoise": None if denoise is None else denoise.detach(), "teacher": teacher.detach(),
             "feature": feature.detach()}
    return total, parts


def _one_output_each(captured: List[list], who: str) -> List[torch.Tensor]:
    counts = [len(outputs) for outputs in captured]
    if any(count != 1 for count in counts):
        raise RuntimeError(f"LinFusionDistiller: expected one {who} attn1 call per layer per step, got {counts}")
    return [outputs[0] for outputs in captured]


class LinFusionDistiller:
    """Computes the LinFusion distillation loss for a UNet with LinFusion mounted.

    Freezes every UNet parameter and makes every LinFusion parameter trainable, so the
    optimizer should be given `linfusion.parameters()`.
    """

    def __init__(self, unet: nn.Module, linfusion, teacher_weight: float = 0.5, feature_weight: float = 0.5):
        if not linfusion.is_mounted:
            raise RuntimeError("LinFusionDistiller: mount LinFusion on the UNet first (linfusion.mount_to(unet))")
        self.unet, self.linfusion = unet, linfusion
        self.teacher_weight, self.feature_weight = teacher_weight, feature_weight
        unet.requires_grad_(False)
        linfusion.requires_grad_(True)

    def _predict(self, modules, noisy_latents, timesteps, encoder_hidden_states, unet_kwargs, who):
        with capture_outputs(modules) as captured:
            pred = self.unet(noisy_latents, timesteps, encoder_hidden_states, **unet_kwargs).sample
        return pred, _one_output_each(captured, who)

    def __call__(self, noisy_latents, timesteps, encoder_hidden_states, target, **unet_kwargs):
        """target: the denoising target (the noise added to clean latents, for epsilon-prediction),
        or None where the inputs hold no known answer (DiffDIS's x_T of pure noise: the student
        then learns the teacher's prediction and attn1 features only). Returns (loss, parts)."""
        teacher_modules = self.linfusion.original_attention_modules()
        with torch.no_grad(), self.linfusion.unmounted():
            teacher_pred, teacher_attn = self._predict(
                teacher_modules, noisy_latents, timesteps, encoder_hidden_states, unet_kwargs, "teacher")
        student_pred, student_attn = self._predict(
            self.linfusion.attention_modules(), noisy_latents, timesteps, encoder_hidden_states, unet_kwargs,
            "student")
        return distillation_loss(student_pred, target, teacher_pred, student_attn, teacher_attn,
                                 self.teacher_weight, self.feature_weight)
