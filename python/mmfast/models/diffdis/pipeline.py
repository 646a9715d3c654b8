"""DiffDIS inference: one denoising step from noise to mask (and edge) at 1024 px.

Per view (DiffDIS core/diffdis_pipeline.py, run_inference.py):
  image -> bilinear resize to resolution x resolution (antialiased like PIL's, which DiffDIS uses), [-1, 1]
  z_rgb = VAE-encode mean * scaling_factor; the same at 1/2, 1/4, 1/8 image size for SWCI
  x_T ~ N(0, I), shared by the mask and edge halves; t = 999 (1 step, "trailing" spacing)
  eps = UNet(cat([z_rgb, x_T]), t, empty-prompt embedding, BDE, SWCI latents)
  x0 = (x_T - sqrt(1 - abar_t) eps) / sqrt(abar_t)   (DDPMScheduler.step at t = 999; clipped to
       [-clip_sample_range, clip_sample_range] only when the scheduler config sets clip_sample:
       sd-turbo's sets it false, and the official step matches the unclipped formula exactly)
  map = mean over RGB of VAE-decode(x0 / scaling_factor), clip to [-1, 1], -> [0, 1], per-map min-max
then (optional 6-view TTA: hflip x scales 0.75/1/1.25, de-augmented and averaged) resized back
to the input size. The text encoder is not needed at run time: the empty-prompt embedding is
computed once at load (or loaded from a file).
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ...ops._checks import check_dtype_argument, is_integer
from .._checkpoint_files import read_safetensors
from .unet import DiffDISUNet

EMPTY_TEXT_EMBEDDING_NAME = "empty_text_embedding.safetensors"
TTA_SCALES = (0.75, 1.0, 1.25)   # the official protocol: ttach HorizontalFlip x Scale
RESOLUTION_MULTIPLE = 64         # 3 UNet downsamplings of the 1/8 latent


@dataclass
class DiffDISOutput:
    """masks (and edges unless mask_only): one (H, W) float32 CPU tensor in [0, 1] per input image."""

    masks: List[torch.Tensor]
    edges: Optional[List[torch.Tensor]]


class UNetInputs(NamedTuple):
    """Everything DiffDISUNet.forward takes for one view, plus the noise x_T it starts from."""

    sample: torch.Tensor               # (2b, 8, h, w)
    timestep: torch.Tensor             # (), 999
    encoder_hidden_states: torch.Tensor  # (2b, L, C)
    rgb_latents: List[torch.Tensor]    # 3 x (b, 4, h / 2^k, w / 2^k)
    noise: torch.Tensor                # (b, 4, h, w) x_T, fp32


def one_step_x0(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar: float,
                clip_sample_range: Optional[float] = None) -> torch.Tensor:
    """x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar), in fp32 (epsilon prediction; DDPM eq. 15),
    clipped to [-clip_sample_range, clip_sample_range] when given (DDPMScheduler's clip_sample).
    From the final step (previous abar = 1) this is exactly DDPMScheduler.step's prev_sample.
    """
    alpha_bar = torch.as_tensor(alpha_bar, dtype=torch.float64)
    x0 = (x_t.float() - (1 - alpha_bar).sqrt().item() * eps.float()) / alpha_bar.sqrt().item()
    return x0 if clip_sample_range is None else x0.clamp(-clip_sample_range, clip_sample_range)


# --- input images ----------------------------------------------------------------------------


_IMAGE_DTYPES = "must be uint8 (0..255), uint16 (0..65535) or floating point in [0, 1]"


def _from_numpy(array) -> torch.Tensor:
    import numpy as np

    if array.dtype not in (np.uint8, np.uint16) and array.dtype.kind != "f":  # said in numpy's terms
        raise ValueError(f"DiffDIS: numpy images {_IMAGE_DTYPES}, got {array.dtype}")

    # A copy where torch cannot share the memory: negative strides (image[..., ::-1], np.fliplr) or
    # a read-only array (np.asarray of a PIL image).
    tensor = torch.from_numpy(np.require(array, requirements=["C", "W"]))
    if tensor.dim() not in (3, 4) or tensor.shape[-1] != 3:  # named before the channels move first
        raise ValueError(f"DiffDIS: a numpy image must be (H, W, 3) or (B, H, W, 3) RGB, got shape {array.shape}; "
                         "convert grayscale or RGBA images first (PIL: image.convert('RGB'))")
    return tensor.movedim(-1, -3)


def _check_image_tensor(image: torch.Tensor) -> torch.Tensor:
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"DiffDIS: expected an RGB image with 3 channels, (3, H, W) / (B, 3, H, W) tensors or "
                         f"(H, W, 3) arrays, got shape {tuple(image.shape)}; convert grayscale or RGBA images "
                         "first (PIL: image.convert('RGB'))")
    if image.shape[1] == 0 or image.shape[2] == 0:
        raise ValueError(f"DiffDIS: images must have at least 1 x 1 pixels, got (3, H, W) = {tuple(image.shape)}")
    if image.dtype == torch.uint8:
        return image.float() / 255
    if image.dtype == torch.uint16:
        return image.float() / 65535
    if not image.is_floating_point():
        raise ValueError(f"DiffDIS: image tensors {_IMAGE_DTYPES}, got {image.dtype}")
    if (image.min() < 0 or image.max() > 1 or not torch.isfinite(image).all()):
        raise ValueError("DiffDIS: floating-point images must hold values in [0, 1]")
    return image.float()


def as_rgb_images(images) -> List[torch.Tensor]:
    """PIL images, (H, W, 3) / (B, H, W, 3) numpy arrays, (3, H, W) / (B, 3, H, W) tensors, or a list
    of them -> list of (3, H, W) float32 tensors in [0, 1]. PIL images are converted to RGB (as the
    official script does), 16-bit grayscale ones (mode I;16) by scaling 0..65535 to [0, 1] (PIL's
    convert clips them to 255); 32-bit modes (I, F) have no fixed range and raise ValueError.
    Arrays / tensors must be uint8, uint16 or floating point in [0, 1] with 3 channels.
    """
    return [_as_rgb(image) for image in _image_items(images)]


def _as_rgb(image) -> torch.Tensor:
    """One image (PIL, (H, W, 3) array, (3, H, W) tensor) -> (3, H, W) float32 in [0, 1]."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL.Image
        import numpy as np

        if image.mode.startswith("I;16"):
            gray = torch.from_numpy(np.array(image).astype(np.float32) / 65535)
            return _check_image_tensor(gray.expand(3, *gray.shape))
        if image.mode in ("I", "F"):  # Pillow before 10 also opens 16-bit grayscale PNGs as mode I
            raise ValueError(f"DiffDIS: a PIL image of mode {image.mode} (32-bit values) has no fixed range; pass "
                             "the pixels scaled to [0, 1], e.g. np.array(image) / 65535 for 16-bit data, or "
                             "convert the image to 8 bits")
        return _check_image_tensor(torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1))
    if not isinstance(image, torch.Tensor):
        if type(image).__module__ != "numpy":
            raise TypeError(f"DiffDIS: expected PIL images, numpy arrays or torch tensors, got {type(image).__name__}")
        image = _from_numpy(image)
    return _check_image_tensor(image)


def _resize(x: torch.Tensor, size, antialias: bool = False) -> torch.Tensor:
    """Bilinear, align_corners=False. antialias=True: PIL's bilinear filter (widened when shrinking),
    which DiffDIS applies to the input image and to the maps it resizes back; the SWCI and TTA
    resizes are F.interpolate without it, as in the official code."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=antialias)


def resize_input(image: torch.Tensor, resolution: int) -> torch.Tensor:
    """(3, H, W) float in [0, 1] -> (1, 3, resolution, resolution) in [-1, 1]: DiffDIS's input
    (run_inference.py: PIL bilinear resize to a square, then rgb / 255 * 2 - 1), within PIL's
    uint8 rounding of its resize (1 / 255)."""
    return _resize(image[None], (resolution, resolution), antialias=True) * 2 - 1


def _check_unet_images(images) -> None:
    """prepare_unet_inputs' batch: a floating (b, 3, R, R) tensor in [-1, 1], R a multiple of 64."""
    how = ("torch.cat([resize_input(image, R) for image in as_rgb_images(images)]) makes one from PIL "
           "images, arrays or [0, 1] tensors")
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        got = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
        raise TypeError(f"DiffDISPipeline.prepare_unet_inputs: images must be a floating (b, 3, R, R) tensor in "
                        f"[-1, 1], got {got}; {how}")
    if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3] or \
            images.shape[2] % RESOLUTION_MULTIPLE or images.shape[2] == 0 or images.shape[0] == 0:
        raise ValueError(f"DiffDISPipeline.prepare_unet_inputs: images must be (b, 3, R, R) with R a positive "
                         f"multiple of {RESOLUTION_MULTIPLE}, got shape {tuple(images.shape)}; {how}")
    low, high = torch.stack(images.detach().aminmax()).tolist()  # one device sync
    if not (low >= -1.001 and high <= 1.001):  # (NaN fails too)
        raise ValueError(f"DiffDISPipeline.prepare_unet_inputs: images must be in [-1, 1] (DiffDIS's rgb / 255 * 2 "
                         f"- 1), got values in [{low:.4g}, {high:.4g}]; {how}")


def _view_size(resolution: int, scale: float) -> int:
    """TTA scale applied to the processing resolution, to the nearest multiple of 64 (the UNet's),
    a tie away from the resolution (down below 1, up above): 768 / 1024 / 1280 at 1024 as
    ttach's Scale gives, 640 / 832 / 1024 at 832; at 128 three distinct sizes, 64 / 128 / 192
    (round-half-even made them all 128)."""
    steps = resolution * scale / RESOLUTION_MULTIPLE
    lower = math.floor(steps)
    if steps - lower == 0.5:
        steps = lower if scale < 1 else lower + 1
    else:
        steps = round(steps)
    return max(RESOLUTION_MULTIPLE, steps * RESOLUTION_MULTIPLE)


def _min_max(maps: torch.Tensor) -> torch.Tensor:
    """Per-map min-max to [0, 1]; a constant map becomes 0 (the official code divides by zero)."""
    flat = maps.flatten(1)
    low, high = flat.min(dim=1).values, flat.max(dim=1).values
    scale = (high - low).clamp_min(torch.finfo(maps.dtype).tiny)
    return (maps - low.view(-1, 1, 1, 1)) / scale.view(-1, 1, 1, 1)


class DiffDISPipeline:
    """DiffDIS segmentation with mmfast's DiffDISUNet on stock diffusers.

    Holds the UNet, the VAE (diffusers AutoencoderKL), the one-step timestep and its abar, and
    the empty-prompt embedding (1, L, cross_attention_dim); no text encoder.

    memory_format: the layout the UNet's and VAE's convolution weights are converted to, in
      place (a VAE shared with another pipeline changes too), and so of their activations;
      None keeps the modules' current layout. channels_last (the default) is what oneDNN's CPU
      convolutions run natively: on a 2-core Xeon (scaled config, 1024 px, A/B in
      benchmarks/results/2026-12-01-cpu-intel-xeon-2core-avx512-diffdis.md) it makes a mask_only
      view 1.08x faster in fp32 and 1.64x in bf16 than torch.contiguous_format (NCHW, what the
      released code runs), whose batch-1 bf16 convolutions are slow; the maps agree to 2.4e-5 in
      fp32. On a GPU it is not measured yet (bench_diffdis.py's official-style NCHW row against
      the full path times it there). diffusers' save_pretrained and torch.save handle the
      converted weights; safetensors' save_file needs `.contiguous()` on each.
    """

    def __init__(self, unet: DiffDISUNet, vae, scheduler, empty_text_embedding: torch.Tensor, *,
                 memory_format: Optional[torch.memory_format] = torch.channels_last):
        if not isinstance(unet, DiffDISUNet):
            raise TypeError(f"DiffDISPipeline: unet must be a DiffDISUNet, got {type(unet).__name__}")
        self.unet, self.vae = unet.eval(), vae.eval()
        scheduler.set_timesteps(1)
        self.timestep = int(scheduler.timesteps[0])
        last = scheduler.config.num_train_timesteps - 1
        if self.timestep != last:  # e.g. "leading" spacing (diffusers' default) gives t = 0 or 1: no denoising
            raise ValueError(f"DiffDISPipeline: one step of this scheduler runs at t = {self.timestep}; DiffDIS is "
                             f"trained at t = {last} only: use timestep_spacing='trailing' (sd-turbo's "
                             "scheduler_config.json)")
        self.alpha_bar = float(scheduler.alphas_cumprod[self.timestep])
        config = scheduler.config
        if config.get("prediction_type", "epsilon") != "epsilon" or config.get("thresholding", False):
            raise ValueError("DiffDISPipeline: the scheduler must predict epsilon without dynamic thresholding "
                             "(DiffDIS: DDPMScheduler from sd-turbo's scheduler_config.json)")
        self.clip_sample_range = config.clip_sample_range if config.get("clip_sample", False) else None
        if empty_text_embedding.dim() == 2:
            empty_text_embedding = empty_text_embedding[None]
        want = unet.config.cross_attention_dim
        if empty_text_embedding.dim() != 3 or empty_text_embedding.shape[0] != 1 or empty_text_embedding.shape[-1] != want:
            raise ValueError(f"DiffDISPipeline: empty_text_embedding must be (1, L, {want}), "
                             f"got {tuple(empty_text_embedding.shape)}")
        # Kept in fp32 (cast where used), so save_empty_text_embedding never writes rounded values.
        self.empty_text_embedding = empty_text_embedding.detach().float()
        self.linear_attention = None
        self._warned_fp16 = False
        self.memory_format = None
        self.to(memory_format=memory_format)

    # --- loading -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, directory: str, *, torch_dtype: torch.dtype = torch.float32,
                        device: Union[str, torch.device] = "cpu",
                        empty_text_embedding: Optional[str] = None,
                        memory_format: Optional[torch.memory_format] = torch.channels_last) -> "DiffDISPipeline":
        """Loads a local DiffDIS directory in the released diffusers layout (HF qianyu1217/diffdis):
        unet/ (config.json + diffusion_pytorch_model.safetensors), vae/, scheduler/, and either
        empty_text_embedding.safetensors (written by save_empty_text_embedding) or text_encoder/ +
        tokenizer/ (used once for the empty prompt, then freed). `empty_text_embedding` overrides
        the file's path; `memory_format` as in the class docstring. Safetensors only; nothing is
        downloaded.
        """
        from diffusers import AutoencoderKL, DDPMScheduler

        if torch_dtype is None:  # a dtype is required here: the default is float32
            raise TypeError("DiffDISPipeline.from_pretrained: torch_dtype must be a torch.dtype, got None")
        check_dtype_argument("DiffDISPipeline.from_pretrained", "torch_dtype", torch_dtype)
        _require_dir(directory, None)
        unet = DiffDISUNet.from_pretrained(_require_dir(directory, "unet"), torch_dtype=torch_dtype, device=device)
        # local_files_only: a folder diffusers cannot find locally must not turn into a Hub request.
        vae_dir = _require_dir(directory, "vae")
        try:
            vae = AutoencoderKL.from_pretrained(vae_dir, torch_dtype=torch_dtype, use_safetensors=True,
                                                local_files_only=True).to(device)
        except OSError as error:  # e.g. weights only as .bin: diffusers' OSError, a FileNotFoundError here
            weights = os.path.join(vae_dir, "diffusion_pytorch_model.safetensors")
            if os.path.isfile(weights) and os.path.isfile(os.path.join(vae_dir, "config.json")):
                read_safetensors(weights, "DiffDISPipeline")  # a truncated or foreign file: name it
            raise FileNotFoundError(f"DiffDISPipeline: cannot load the VAE from {vae_dir!r} (config.json and "
                                    f"diffusion_pytorch_model.safetensors expected): {error}") from None
        scheduler_config = os.path.join(_require_dir(directory, "scheduler"), "scheduler_config.json")
        if not os.path.isfile(scheduler_config):
            raise FileNotFoundError(f"DiffDISPipeline: {scheduler_config!r} is missing (the released layout's "
                                    "scheduler/scheduler_config.json, sd-turbo's DDPMScheduler)")
        with open(scheduler_config) as f:
            scheduler = DDPMScheduler.from_config(json.load(f))
        embedding = _load_empty_text_embedding(directory, empty_text_embedding)
        return cls(unet, vae, scheduler, embedding.to(device=device), memory_format=memory_format)

    def save_empty_text_embedding(self, path: str) -> None:
        """Writes the empty-prompt embedding (safetensors) so later loads skip the text encoder."""
        from safetensors.torch import save_file

        save_file({"empty_text_embedding": self.empty_text_embedding.float().cpu().contiguous()}, path)

    # --- device and dtype ----------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def to(self, device=None, dtype: Optional[torch.dtype] = None,
           memory_format: Optional[torch.memory_format] = None) -> "DiffDISPipeline":
        """Moves/casts the UNet and VAE (in place); memory_format: torch.channels_last or
        torch.contiguous_format for their convolution weights (None keeps the current one).
        self.memory_format records the last layout set here (None: never set)."""
        if memory_format not in (None, torch.channels_last, torch.contiguous_format):
            raise ValueError("DiffDISPipeline: memory_format must be torch.channels_last or torch.contiguous_format, "
                             f"got {memory_format}")
        for module in (self.unet, self.vae):
            # nn.Module.to: diffusers' ModelMixin.to warns about fp32-kept modules these models lack.
            # Module.to keeps each weight's layout unless memory_format is given.
            torch.nn.Module.to(module, device=device, dtype=dtype)
            if memory_format is not None:
                torch.nn.Module.to(module, memory_format=memory_format)
        if memory_format is not None:
            self.memory_format = memory_format
        self.empty_text_embedding = self.empty_text_embedding.to(device=device)
        return self

    def _use_dtype(self, dtype: Optional[torch.dtype]) -> torch.dtype:
        check_dtype_argument("DiffDISPipeline", "dtype", dtype)
        if dtype is None or dtype == self.dtype:
            return self.dtype
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"DiffDISPipeline: dtype must be float32, bfloat16 or float16, got {dtype}")
        if self.dtype != torch.float32 and dtype == torch.float32:
            warnings.warn(f"DiffDISPipeline: casting the weights from {self.dtype} back to float32 does not restore "
                          "their float32 values (loading in it, an earlier call or .to() rounded them); reload the "
                          "pipeline in float32 for full-precision results", stacklevel=3)
        if dtype == torch.float16 and not self._warned_fp16:
            self._warned_fp16 = True
            warnings.warn("DiffDISPipeline: float16 is known to overflow to NaN in SD-2-family perception models; "
                          "bfloat16 is the safe half precision", stacklevel=3)
        self.to(dtype=dtype)
        return dtype

    # --- linear attention ----------------------------------------------------------------

    def enable_linear_attention(self, levels: int = 1, pretrained: Optional[str] = None):
        """Replaces the attn1 layers of the top `levels` UNet level(s) by LinFusion's linear attention
        (mmfast.ops.linear_attention); see mmfast.models.diffdis.linear_attention. Returns the LinFusion.
        """
        from .linear_attention import mount_linear_attention

        if self.linear_attention is not None:
            raise RuntimeError("DiffDISPipeline: linear attention is already enabled; disable_linear_attention() first")
        self.linear_attention = mount_linear_attention(self.unet, levels=levels, pretrained=pretrained)
        return self.linear_attention

    def disable_linear_attention(self) -> None:
        """Puts DiffDIS's softmax attn1 layers back."""
        if self.linear_attention is None:
            raise RuntimeError("DiffDISPipeline: linear attention is not enabled")
        self.linear_attention.unmount()
        self.linear_attention = None

    # --- the model calls -----------------------------------------------------------------

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(b, 3, H, W) in [-1, 1] -> (b, 4, H/8, W/8) latent mean * scaling_factor (no sampling)."""
        return self.vae.encode(images).latent_dist.mean * self.vae.config.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(n, 4, h, w) -> (n, 1, 8h, 8w) maps in [0, 1]: RGB mean, clip, [0, 1], per-map min-max."""
        rgb = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        maps = rgb.float().mean(dim=1, keepdim=True).clamp(-1, 1)
        return _min_max((maps + 1) / 2)

    @torch.no_grad()
    def prepare_unet_inputs(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> UNetInputs:
        """(b, 3, R, R) in [-1, 1] (R a multiple of 64) -> the UNet inputs of one view, for
        segmenting and for distilling (LinFusionDistiller(unet, ...)(sample, timestep,
        encoder_hidden_states, None, rgb_latents=rgb_latents): x_T here is pure noise, whose
        noise is not the answer, so no denoising target; with ground-truth masks, DiffDIS's
        training input add_noise(mask / edge latents, noise, 999) with the noise as target).
        No gradient: the VAE is frozen in DiffDIS, so the inputs of a batch can be reused.
        Raises TypeError / ValueError for anything else (make the batch with resize_input from
        images in [0, 1], e.g. those of as_rgb_images); it is moved to the pipeline's device and dtype.
        """
        from diffusers.utils.torch_utils import randn_tensor

        _check_unet_images(images)
        images = images.to(device=self.device, dtype=self.dtype)
        rgb_latent = self.encode(images)
        size = images.shape[-1]
        rgb_latents = [self.encode(_resize(images, (size >> k, size >> k))) for k in (1, 2, 3)]
        noise = randn_tensor(rgb_latent.shape, generator=generator, device=rgb_latent.device, dtype=torch.float32)
        sample = torch.cat([rgb_latent, noise.to(rgb_latent.dtype)], dim=1).repeat(2, 1, 1, 1)
        context = self.empty_text_embedding.to(rgb_latent).expand(sample.shape[0], -1, -1)
        timestep = torch.tensor(self.timestep, device=sample.device)
        return UNetInputs(sample, timestep, context, rgb_latents, noise)

    def _one_view(self, images: torch.Tensor, mask_only: bool, generator) -> torch.Tensor:
        """(b, 3, R, R) in [-1, 1] -> (b or 2b, 1, R, R) maps: mask rows, then edge rows."""
        inputs = self.prepare_unet_inputs(images, generator)
        eps = self.unet(inputs.sample, inputs.timestep, inputs.encoder_hidden_states,
                        rgb_latents=inputs.rgb_latents, mask_only=mask_only).sample
        x_t = inputs.noise.repeat(eps.shape[0] // inputs.noise.shape[0], 1, 1, 1)
        x0 = one_step_x0(x_t, eps, self.alpha_bar, self.clip_sample_range)
        return self.decode(x0.to(self.dtype))

    def _views(self, images: torch.Tensor, resolution: int, mask_only: bool, tta: bool, generator) -> torch.Tensor:
        """Runs every view of a (b, 3, R, R) batch and returns the de-augmented mean maps."""
        views = [(flip, scale) for flip in (False, True) for scale in TTA_SCALES] if tta else [(False, 1.0)]
        total = 0
        for flip, scale in views:
            size = _view_size(resolution, scale)
            view = _resize(images.flip(-1) if flip else images, (size, size))
            maps = _resize(self._one_view(view, mask_only, generator), (resolution, resolution))
            total = total + (maps.flip(-1) if flip else maps)
        return total / len(views)

    @torch.no_grad()
    def segment(self, images, *, resolution: int = 1024, mask_only: bool = False, tta: bool = False,
                dtype: Optional[torch.dtype] = None, generator: Optional[torch.Generator] = None,
                batch_size: int = 1, progress: Optional[bool] = None) -> DiffDISOutput:
        """Segments the salient object of each image (DiffDIS, one denoising step).

        images: PIL image(s), (H, W, 3) / (B, H, W, 3) numpy arrays or (3, H, W) / (B, 3, H, W)
          tensors, uint8, uint16 or float in [0, 1] (see as_rgb_images); any size: every image is resized
          (bilinear, antialiased when shrinking, aspect ratio not kept: DiffDIS's PIL resize) to
          resolution x resolution, and each map back to its image's size the same way.
        resolution: processing size in pixels, a multiple of 64 (DiffDIS: 1024).
        mask_only: skip the edge half's up path and VAE decode (37% of the FLOPs at 1024 px); the
          masks equal the full call's up to floating-point rounding (the up path and decode run at
          half the batch, so kernels block differently; x0's x14.6 and the min-max stretch amplify
          it: 3e-5 at 512 px, 2e-4 at 1024 px in fp32 on the scaled benchmark config).
        tta: DiffDIS's 6-view protocol (hflip x 0.75/1/1.25 resolution, rounded to multiples of 64),
          each view min-max normalised, de-augmented and averaged: the official run_inference.py
          always runs it, so tta=True reproduces its maps (and reported metrics) at 6x the cost,
          up to its 8-bit output (it truncates each map to uint8 with ToPILImage before PIL's
          bilinear resize back and the PNG; mmfast resizes the float map: up to about 1/255
          apart); the default is one view.
        dtype: compute dtype (None: the modules' dtype); another dtype casts the modules in place, as
          pipe.to(dtype=...) does. bfloat16 is the safe half precision (float16 warns: NaN-prone).
        generator: the x_T noise's generator (DiffDIS draws one x_T per image, shared by mask and edge),
          consumed batch by batch and view by view, so an image's noise depends on its position;
          a list of batch_size generators (diffusers' randn_tensor) gives one per image of a batch.
        Returns DiffDISOutput: (H, W) float32 CPU maps at each input's size, in [0, 1]. Each view's
          map is min-max normalised at the processing resolution (as DiffDIS does), so values are
          relative, not calibrated probabilities: an image without an object still gets a map
          spanning [0, 1] there; the resize back to the input size (bilinear) can then narrow
          the range a little (a 50 x 70 input at resolution 64 came back within [0.08, 0.75]).
        Raises ValueError for bad images or resolution, FloatingPointError if a map is not finite.
        """
        if not is_integer(resolution) or resolution < RESOLUTION_MULTIPLE or resolution % RESOLUTION_MULTIPLE:
            raise ValueError(f"DiffDISPipeline: resolution must be a positive multiple of {RESOLUTION_MULTIPLE} "
                             f"(the UNet halves the 1/8 latent 3 times), got {resolution!r}")
        if not is_integer(batch_size) or batch_size < 1:
            raise ValueError(f"DiffDISPipeline: batch_size must be an int >= 1, got {batch_size!r}")
        if isinstance(generator, (list, tuple)) and len(generator) != batch_size:  # others would go unused
            raise ValueError(f"DiffDISPipeline: a list of generators needs one per image of a batch, batch_size = "
                             f"{batch_size}, got {len(generator)}")
        items = _image_items(images)
        for item in items:  # every image checked before any compute, one float copy at a time
            _as_rgb(item)
        dtype = self._use_dtype(dtype)
        masks, edges = [], None if mask_only else []
        batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
        for batch_items in _progress(batches, progress, "DiffDIS"):
            batch = as_rgb_images(batch_items)  # per batch: a list of large photos is never all float32 at once
            x = torch.cat([resize_input(image, resolution) for image in batch]).to(device=self.device, dtype=dtype)
            maps = self._views(x, resolution, mask_only, tta, generator)
            if not torch.isfinite(maps).all():
                raise FloatingPointError(f"DiffDISPipeline: non-finite maps in {dtype} (float16 overflows in this "
                                         "model family; use bfloat16 or float32)")
            for index, image in enumerate(batch):
                size = tuple(image.shape[-2:])
                masks.append(_resize(maps[index:index + 1].float(), size, antialias=True)[0, 0].cpu())
                if edges is not None:
                    edge = maps[len(batch) + index:len(batch) + index + 1].float()
                    edges.append(_resize(edge, size, antialias=True)[0, 0].cpu())
        return DiffDISOutput(masks, edges)

    __call__ = segment


def _image_items(images) -> list:
    """The images of `images` one by one, as given (PIL images, arrays, tensors; a 4-D batch
    split into views): converted to float later, batch by batch."""
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in _image_items(item)]
    if getattr(images, "ndim", None) == 4 and (isinstance(images, torch.Tensor) or type(images).__module__ == "numpy"):
        return list(images)
    return [images]


def _progress(items: Sequence, enabled: Optional[bool], description: str):
    """A tqdm bar over items; by default only when there is more than one."""
    if enabled is None:
        enabled = len(items) > 1
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=description, unit="batch")


def _require_dir(directory: str, name: Optional[str]) -> str:
    """directory/name, FileNotFoundError (naming it) when it is not a local folder."""
    path = directory if name is None else os.path.join(directory, name)
    if not os.path.isdir(path):
        what = "a local DiffDIS directory" if name is None else f"the {name}/ folder of the DiffDIS directory"
        raise FileNotFoundError(f"DiffDISPipeline: {path!r} is not a directory; expected {what} in the released "
                                "diffusers layout (mmfast never downloads: fetch qianyu1217/diffdis first)")
    return path


def _load_empty_text_embedding(directory: str, path: Optional[str]) -> torch.Tensor:
    if path is not None and not os.path.isfile(path):
        raise FileNotFoundError(f"DiffDISPipeline: empty_text_embedding file {path!r} does not exist")
    path = path or os.path.join(directory, EMPTY_TEXT_EMBEDDING_NAME)
    if os.path.isfile(path):
        tensors = read_safetensors(path, "DiffDISPipeline")
        if "empty_text_embedding" not in tensors:
            raise KeyError(f"DiffDISPipeline: {path} holds {sorted(tensors)}, not 'empty_text_embedding' (the file "
                           "save_empty_text_embedding writes)")
        return tensors["empty_text_embedding"]
    if not os.path.isdir(os.path.join(directory, "text_encoder")):
        raise FileNotFoundError(f"DiffDISPipeline: neither {path} nor {directory}/text_encoder exists: the empty-prompt "
                                "embedding needs one of them")
    return encode_empty_prompt(directory)


@torch.no_grad()
def encode_empty_prompt(directory: str) -> torch.Tensor:
    """The empty prompt "" through the local text encoder, unpadded (BOS, EOS): (1, 2, C).

    As DiffDIS (and Marigold): tokenizer("", padding="do_not_pad"), text_encoder(ids)[0].
    """
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(_require_dir(directory, "tokenizer"), local_files_only=True)
    encoder = CLIPTextModel.from_pretrained(_require_dir(directory, "text_encoder"), use_safetensors=True,
                                            local_files_only=True).eval()
    ids = tokenizer("", padding="do_not_pad", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return encoder(ids)[0].float()
