"""The VQGAN image tokenizer of Chameleon and Liquid: taming-transformers' VQModel on mmfast's VQ ops.

Module and parameter names are taming's (CompVis/taming-transformers:taming/models/vqgan.py,
taming/modules/diffusionmodules/model.py; Meta's copy is facebookresearch/chameleon:
chameleon/inference/vqgan.py, Liquid's FoundationVision/Liquid:evaluation/chameleon/inference/
vqgan.py), so their state dicts load with strict=True. Differences from the originals, none of
which changes an fp32 result beyond rounding: the nearest-code search is mmfast's fused
`vq_quantize` (no N x K distance matrix; it accumulates in fp32 where a bf16 original or one
under autocast computes its distances in bf16, so there codes differ for a few percent of the
vectors, mmfast's the nearer), the code lookup `vq_dequantize` writes channels-first directly;
the encoder and decoder (taming.py) run attention through `F.scaled_dot_product_attention` and
normalise fp16/bf16 activations in fp32. Chameleon's and Liquid's tokenizers run in fp32.

    model = VQGAN.from_pretrained("vqgan.safetensors")           # Chameleon config by default
    codes = model.encode(preprocess(pil_image))                  # (1, 32, 32) int64 in [0, 8192)
    images = model.decode(codes)                                 # (1, 3, 512, 512) in [-1, 1]
    pixels = postprocess(images)                                 # (1, 512, 512, 3) uint8
"""
from __future__ import annotations

import logging
import math
import os
from typing import Callable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ...nn.vector_quantizer import VectorQuantizer
from ...ops._checks import check_dtype_argument
from .._checkpoint_files import read_safetensors
from ...ops.vq import vq_codebook_sqnorm
from .taming import Decoder, Encoder, VQGANConfig

__all__ = ["VQGAN", "VQGANConfig", "VQGANCheckpointError", "load_taming_state_dict", "preprocess", "postprocess"]

logger = logging.getLogger(__name__)
TRAINING_ONLY_PREFIXES = ("loss.",)  # taming's VQLPIPSWithDiscriminator (LPIPS net, discriminator)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
DEFAULT_BATCH_SIZE = 8  # images per encode / decode pass: a large batch goes through in slices, under a bar


class VQGANCheckpointError(ValueError):
    """A checkpoint file that mmfast will not read, or whose keys or shapes do not fit the config.
    architecture_mismatch: True for the latter (the file was read; another config may fit)."""

    def __init__(self, message: str, *, architecture_mismatch: bool = False):
        super().__init__(message)
        self.architecture_mismatch = architecture_mismatch


# --- the model ----------------------------------------------------------------------------


class VQGAN(nn.Module):
    """taming's VQModel (Chameleon's / Liquid's image tokenizer): encoder -> quant_conv -> quantize
    (codes) and codes -> quantize.embedding -> post_quant_conv -> decoder.

    Images are (B, in_channels, H, W) floats in [-1, 1] with H and W multiples of
    config.downsample_factor; codes are (B, H / f, W / f) int64 in [0, n_embed). Works in any
    float dtype (`model.to(torch.bfloat16)`); inputs are moved to the model's device and dtype.
    bf16 is meant for GPUs: on CPUs without bf16 instructions torch's bf16 convolutions run far
    slower than fp32 (about 170x on the 2-core AVX2 test machine).
    """

    def __init__(self, config: Optional[VQGANConfig] = None):
        super().__init__()
        self.config = cfg = config if config is not None else VQGANConfig()
        if not isinstance(cfg, VQGANConfig):
            raise TypeError(f"VQGAN: config must be a VQGANConfig, got {type(cfg).__name__}")
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim, beta=cfg.beta, legacy=cfg.legacy)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, kernel_size=1)

    @property
    def device(self) -> torch.device:
        return self.quantize.embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.quantize.embedding.weight.dtype

    def _check_images(self, images: torch.Tensor) -> None:
        cfg, f = self.config, self.config.downsample_factor
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"VQGAN: images must be a tensor, got {type(images).__name__} (see preprocess())")
        if not images.is_floating_point():
            raise TypeError(f"VQGAN: images must be float in [-1, 1], got {images.dtype} (preprocess() converts uint8)")
        if images.dim() != 4 or images.shape[1] != cfg.in_channels or images.shape[2] % f or images.shape[3] % f:
            raise ValueError(f"VQGAN: images must be (B, {cfg.in_channels}, H, W) with H and W multiples of {f}, "
                             f"got shape {tuple(images.shape)}")

    def _images_in(self, images: torch.Tensor) -> torch.Tensor:
        self._check_images(images)
        return images.to(device=self.device, dtype=self.dtype)

    def _codes_in(self, codes: torch.Tensor) -> torch.Tensor:
        if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.dtype == torch.bool:
            raise TypeError(f"VQGAN.decode: codes must be an integer tensor, got "
                            f"{codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__}")
        if codes.dim() == 2:  # (B, h*w) token rows, e.g. Liquid's 1024 codes per image: a square grid
            side = math.isqrt(codes.shape[1])
            if side * side != codes.shape[1]:
                raise ValueError(f"VQGAN.decode: (B, N) codes need a square N, got {tuple(codes.shape)}; "
                                 "pass (B, h, w)")
            codes = codes.reshape(codes.shape[0], side, side)
        if codes.dim() != 3:
            raise ValueError(f"VQGAN.decode: codes must be (B, h, w) or (B, h*w), got shape {tuple(codes.shape)}")
        return codes.to(self.device)

    def encode_to_latent(self, images: torch.Tensor) -> torch.Tensor:
        """Pre-quantisation latent quant_conv(encoder(images)): (B, embed_dim, H / f, W / f); differentiable."""
        return self.quant_conv(self.encoder(self._images_in(images)))

    def decode_latent(self, quant: torch.Tensor) -> torch.Tensor:
        """taming's VQModel.decode: decoder(post_quant_conv(quant)), (B, embed_dim, h, w) ->
        (B, out_ch, h * f, w * f), unclamped; differentiable."""
        return self.decoder(self.post_quant_conv(quant.to(self.dtype)))

    def forward(self, images: torch.Tensor):
        """taming's VQModel.forward: (reconstruction (B, out_ch, H, W), codebook + commitment loss)."""
        z_q, loss, _ = self.quantize(self.encode_to_latent(images))
        return self.decode_latent(z_q), loss

    @torch.no_grad()
    def encode(self, images: torch.Tensor, *, batch_size: Optional[int] = DEFAULT_BATCH_SIZE,
               progress: bool = True) -> torch.Tensor:
        """Codes of images: (B, C, H, W) floats in [-1, 1] -> (B, H / f, W / f) int64 on the model's
        device (Chameleon: 512 x 512 -> 32 x 32 = 1024 codes, `encode(x)[2][2]` of taming's VQModel
        reshaped). batch_size: images per forward pass (default 8, which bounds the activations' memory
        of a large batch; None: all at once); a tqdm bar runs over the batches when there is more
        than one and progress is True.
        Raises TypeError / ValueError for inputs of the wrong dtype or shape, ValueError for values
        outside [-1, 1] (a 0..255 or 0..1 image would give codes without a word) or not finite.
        """
        self._check_images(images)
        if images.numel():
            low, high = torch.aminmax(images.detach())
            if not (float(low) >= -1.001 and float(high) <= 1.001):  # also NaN; 1e-3 for rounding of [-1, 1] data
                raise ValueError(f"VQGAN.encode: images must hold values in [-1, 1] (preprocess() maps uint8 images "
                                 f"there), got values in [{float(low):.4g}, {float(high):.4g}]")
        sqnorm = vq_codebook_sqnorm(self.quantize.embedding.weight) if self.quantize.metric == "l2" else None
        return _batched(lambda x: self.quantize.codes(self.encode_to_latent(x), sqnorm), images, batch_size,
                        progress, "VQGAN encode")

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, *, batch_size: Optional[int] = DEFAULT_BATCH_SIZE, progress: bool = True,
               clamp: bool = True) -> torch.Tensor:
        """Images of codes: (B, h, w) (or (B, h*w) with a square h*w) integer codes -> (B, out_ch,
        h * f, w * f) in the model's dtype, clamped to [-1, 1] unless clamp=False (Chameleon's
        get_codebook_entry + VQModel.decode, batched). batch_size and progress as in encode.
        Raises TypeError / ValueError for codes of the wrong dtype or shape; IndexError for codes
        outside [0, n_embed) on the CPU (on CUDA such a code decodes from a NaN row, no sync).
        """
        codes = self._codes_in(codes)

        def run(chunk):
            images = self.decode_latent(self.quantize.embed_codes(chunk))
            return images.clamp_(-1.0, 1.0) if clamp else images

        return _batched(run, codes, batch_size, progress, "VQGAN decode")

    @classmethod
    def from_pretrained(cls, path, config: Optional[VQGANConfig] = None,
                        dtype: Optional[torch.dtype] = None) -> "VQGAN":
        """A VQGAN in eval mode from a local taming / Chameleon checkpoint (nothing is downloaded).

        path: a directory holding vqgan.safetensors or vqgan.ckpt (the layout of Liquid's demo
        space, chameleon/vqgan.ckpt), or a file: `.safetensors`, or `.ckpt` / `.pt` / `.pth` / `.bin` read with
        torch.load(weights_only=True) (never full unpickling). The state dict may be at the top
        level or under "state_dict"; training-only keys ("loss.*") are dropped. config: the
        architecture (default VQGANConfig(), Chameleon's); dtype: the parameters' dtype (default
        float32, as Chameleon loads it; on a CPU without native fp16 kernels, torch's fp16
        convolutions ran the tiny model 20-40x slower than fp32: use fp32 or bf16 there). Raises FileNotFoundError, VQGANCheckpointError (a
        ValueError) naming missing, unexpected or misshapen keys, or a file that needs unpickling.
        """
        check_dtype_argument("VQGAN.from_pretrained", "dtype", dtype)
        state = load_taming_state_dict(path)
        with torch.device("meta"):
            model = cls(config)
        _check_keys(model, state, path)
        model = model.to_empty(device="cpu")
        model.load_state_dict(state, strict=True)
        return (model if dtype is None else model.to(dtype)).eval()


def _batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: Optional[int],
             progress: bool, desc: str) -> torch.Tensor:
    """fn over batch_size-sized slices of x along dim 0, concatenated; a tqdm bar for > 1 slice."""
    if batch_size is None:
        return fn(x)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"VQGAN: batch_size must be a positive int or None, got {batch_size!r}")
    chunks = x.split(batch_size)
    if len(chunks) <= 1:
        return fn(x)
    return torch.cat([fn(chunk) for chunk in tqdm(chunks, desc=desc, unit="batch", disable=not progress)])


# --- checkpoints ----------------------------------------------------------------------------


CHECKPOINT_NAMES = ("vqgan.safetensors", "vqgan.ckpt")  # looked for inside a directory, in this order


def checkpoint_file(path) -> str:
    """`path` if it is a file, else the first of CHECKPOINT_NAMES inside the directory `path`.
    Raises FileNotFoundError naming what was looked for."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        for name in CHECKPOINT_NAMES:
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise FileNotFoundError(f"VQGAN: the directory {path!r} holds none of {', '.join(CHECKPOINT_NAMES)}")
    raise FileNotFoundError(f"VQGAN: no checkpoint file {path!r} (a local .safetensors or .ckpt/.pt file, or a "
                            f"directory with {' or '.join(CHECKPOINT_NAMES)}; nothing is downloaded)")


def load_taming_state_dict(path) -> dict:
    """The tensors of a taming / Chameleon VQGAN checkpoint (a file, or a directory as in
    checkpoint_file), "loss.*" keys dropped.

    Raises FileNotFoundError, ValueError for an unknown suffix or a file that is no state dict,
    VQGANCheckpointError for a pickle that torch.load(weights_only=True) refuses.
    """
    path = checkpoint_file(path)
    if path.endswith(".safetensors"):
        state = read_safetensors(path, "VQGAN", error=VQGANCheckpointError)
    elif path.endswith(PICKLE_SUFFIXES):
        state = _torch_load_weights_only(path)
    else:
        raise ValueError(f"VQGAN: checkpoint must end in .safetensors or one of {PICKLE_SUFFIXES}, got {path!r}")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"VQGAN: {path!r} holds no state dict (name -> tensor) at the top level or under "
                         "'state_dict'")
    dropped = [k for k in state if k.startswith(TRAINING_ONLY_PREFIXES)]
    if dropped:
        logger.info("VQGAN: dropped %d training-only keys (%s) from %s", len(dropped),
                    ", ".join(TRAINING_ONLY_PREFIXES), path)
    return {k: v for k, v in state.items() if not k.startswith(TRAINING_ONLY_PREFIXES)}


def _torch_load_weights_only(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # garbage makes torch.load raise about anything (EOFError, KeyError, RuntimeError)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights only load failed" not in reason.lower():  # truncated, empty or no checkpoint at all
            raise VQGANCheckpointError(f"VQGAN: {path!r} is not a readable torch checkpoint (truncated, empty or "
                                       f"another kind of file): {type(err).__name__}: {reason}") from err
        raise VQGANCheckpointError(
            f"VQGAN: {path!r} is a pickle that torch.load(weights_only=True) refuses ({reason}). mmfast will not "
            "unpickle arbitrary objects (unpickling runs code from the file). Convert it to safetensors once, in an "
            "environment where you trust the file:\n"
            "    import torch, safetensors.torch\n"
            f"    sd = torch.load({path!r}, map_location='cpu', weights_only=False)\n"
            "    sd = sd.get('state_dict', sd)\n"
            "    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, 'vqgan.safetensors')") from err


def _check_keys(model: nn.Module, state: dict, path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshapen = [f"{k}: file {tuple(state[k].shape)}, model {tuple(expected[k].shape)}"
                 for k in expected if k in state and state[k].shape != expected[k].shape]
    # load_state_dict would cast integer or complex tensors into the float weights without a word
    not_real = [f"{k}: {state[k].dtype}" for k in expected
                if k in state and expected[k].is_floating_point() and not state[k].is_floating_point()]
    if not (missing or unexpected or misshapen or not_real):
        return
    parts = [f"{name} ({len(items)}): {', '.join(items[:8])}{', ...' if len(items) > 8 else ''}"
             for name, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", misshapen),
                                 ("not floating point", not_real))
             if items]
    architecture = bool(missing or unexpected or misshapen)
    hint = (". Check the config (ch, ch_mult, num_res_blocks, attn_resolutions, sizes)." if architecture else
            ": a corrupted or converted checkpoint?")
    raise VQGANCheckpointError(f"VQGAN: {os.fspath(path)!r} does not fit {model.config}: " + "; ".join(parts) + hint,
                               architecture_mismatch=architecture)


# --- images ---------------------------------------------------------------------------------


def _to_rgb_pil(image):
    """PIL image or uint8 array (H, W), (H, W, 3), (H, W, 4) -> RGB PIL image; transparency is
    blended onto white (Chameleon's ImageTokenizer._whiten_transparency)."""
    import numpy as np
    from PIL import Image

    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise TypeError(f"preprocess: arrays must be uint8 (H, W), (H, W, 3) or (H, W, 4), got {image.dtype} "
                            f"{image.shape}")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"preprocess: expected a PIL image or a uint8 numpy array, got {type(image).__name__}")
    if image.mode.startswith("I;16"):  # 16-bit grayscale: to 8 bits (PIL's convert would clip at 255)
        image = Image.fromarray(np.round(np.array(image) / 257.0).astype(np.uint8))
    elif image.mode in ("I", "F"):  # Pillow before 10 also opens 16-bit grayscale PNGs as mode I
        raise ValueError(f"preprocess: a PIL image of mode {image.mode} (32-bit values) has no fixed range; "
                         "convert it to 8 bits first (for 16-bit data: np.array(image) / 257 as uint8)")
    if image.mode == "RGB":
        return image
    rgba = np.array(image.convert("RGBA"))
    if not (rgba[:, :, 3] < 255).any():
        return image.convert("RGB")
    alpha = rgba[:, :, 3:] / 255.0
    return Image.fromarray(((1 - alpha) * 255 + alpha * rgba[:, :, :3]).astype(np.uint8), "RGB")


def preprocess(image, resolution: int = 512) -> torch.Tensor:
    """Chameleon's ImageTokenizer input, as Liquid's evaluation uses it
    (evaluation/chameleon/inference/image_tokenizer.py): resize the short side to `resolution`
    (LANCZOS, the long side rounded), centre-crop a square, scale to [-1, 1]. Liquid's training
    data went through data_process/vqgan/image_tokenizer.py instead (torchvision's Resize, which
    truncates the long side, a rounded crop offset, only RGBA images whitened): a non-square
    image can come out one pixel shifted there, so its codes can differ from the ones Liquid
    trained on. image: PIL image (16-bit grayscale ones
    rounded to 8 bits first; 32-bit modes I and F raise ValueError) or uint8 array.
    Returns (1, 3, resolution, resolution) float32. Raises TypeError for other inputs, ValueError
    for a resolution that is not an int >= 1."""
    import numpy as np
    from PIL import Image

    if isinstance(resolution, bool) or not hasattr(type(resolution), "__index__") or resolution < 1:
        raise ValueError(f"preprocess: resolution must be an int >= 1 (pixels), got {resolution!r}")
    img = _to_rgb_pil(image)
    scale = resolution / min(img.size)
    img = img.resize((round(scale * img.size[0]), round(scale * img.size[1])), Image.LANCZOS)
    x0, y0 = (img.width - resolution) // 2, (img.height - resolution) // 2
    img = img.crop((x0, y0, x0 + resolution, y0 + resolution))
    pixels = np.array(img) / 255.0 * 2 - 1  # float64, as Chameleon, then float32
    return torch.from_numpy(pixels).permute(2, 0, 1).float().unsqueeze(0)


def postprocess(images: torch.Tensor):
    """(B, 3, H, W) or (3, H, W) in [-1, 1] -> uint8 numpy (B, H, W, 3) or (H, W, 3): clamp, map to
    [0, 255] and truncate, as Chameleon's _pil_from_chw_tensor. Raises ValueError for other shapes
    and FloatingPointError for NaN (Chameleon's cast turns it into an arbitrary byte, 0 here)."""
    if images.dim() not in (3, 4) or images.shape[-3] != 3:
        raise ValueError(f"postprocess: images must be (B, 3, H, W) or (3, H, W), got shape {tuple(images.shape)}")
    if torch.isnan(images).any():
        raise FloatingPointError(f"postprocess: the images hold NaN ({images.dtype}; decode in float32 or bfloat16 "
                                 "if float16 overflowed)")
    unit = (images.detach().float().cpu().clamp(-1.0, 1.0) + 1.0) / 2.0
    return (unit.movedim(-3, -1).numpy() * 255).astype("uint8")
