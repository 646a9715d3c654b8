"""Tokenize a photograph with Liquid's / Chameleon's VQGAN and decode it back.

    python examples/vq_tokenize.py --tiny --output /tmp/vq                 # random tiny VQGAN, seconds
    python examples/vq_tokenize.py --checkpoint vqgan.safetensors --config chameleon \\
        --input photo.jpg --device cuda --dtype bfloat16 --output /tmp/vq

The checkpoint is a local file (taming / Chameleon format: .safetensors, or a .ckpt that
torch.load(weights_only=True) reads; Liquid's demo space ships `chameleon/vqgan.ckpt`). The
default image is scikit-image's astronaut (shipped with scikit-image; pip install scikit-image). Writes
OUT/reconstruction.png (input | reconstruction) and OUT/code_histogram.png, and prints the
number of distinct codes, the timings and the PSNR. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

import mmfast
from mmfast import cli
from mmfast.models.liquid import VQGAN, VQGANCheckpointError, VQGANConfig, codes_to_token_ids, postprocess, preprocess

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _tiny_config():
    from mmfast.testing.tiny_vqgan import tiny_vqgan_config

    return tiny_vqgan_config()


CONFIGS = {"chameleon": VQGANConfig, "tiny": _tiny_config}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tiny", action="store_true", help="a random tiny VQGAN (no files needed)")
    source.add_argument("--checkpoint", help="local taming/Chameleon VQGAN checkpoint (.safetensors or .ckpt)")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="chameleon",
                        help="architecture of --checkpoint (default chameleon: 8192 codes, 16x downsampling; "
                             "tiny: mmfast.testing.tiny_vqgan's)")
    parser.add_argument("--input", "--image", default=None, metavar="FILE",
                        help="image file (default: scikit-image's astronaut photograph)")
    parser.add_argument("--resolution", type=int, default=None,
                        help="image side in pixels, a multiple of the VQGAN's downsampling factor (default 512; "
                             "128 with --tiny or --config tiny)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="model dtype (default float32; float16 on a CPU runs torch's slow fp16 convolutions)")
    cli.add_device_arguments(parser)
    cli.add_output_argument(parser, "vq_tokenize", kind="folder",
                            what="folder for reconstruction.png and code_histogram.png")
    args = parser.parse_args()
    if args.tiny:
        cli.refuse_options(parser, ("config",), "goes with --checkpoint (--tiny makes its own random VQGAN)")
    cli.require_path(parser, "--checkpoint", args.checkpoint, "a checkpoint file, or a folder holding vqgan.ckpt / "
                     "vqgan.safetensors")
    cli.require_file(parser, "--input", args.input)
    cli.require_positive(parser, resolution=args.resolution)
    tiny_model = args.tiny or args.config == "tiny"
    args.resolution = args.resolution or (128 if tiny_model else 512)  # the tiny VQGAN's attention is quadratic
    factor = CONFIGS["tiny" if args.tiny else args.config]().downsample_factor
    if args.resolution % factor:
        parser.error(f"--resolution {args.resolution}: must be a multiple of the VQGAN's downsampling factor "
                     f"{factor} (e.g. {args.resolution // factor * factor or factor})")
    cli.check_device(parser, args.device, args.backend)
    args.output = cli.check_output(parser, args.output, kind="folder")
    return args


def load_image(path):
    if path is None:
        try:
            from skimage import data
        except ImportError:
            sys.exit("error: without --input the sample photograph comes from scikit-image, which is not installed: "
                     "pass --input FILE or pip install scikit-image")

        return data.astronaut()
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:  # upright as a viewer shows it: a phone photo's EXIF orientation applied
        return ImageOps.exif_transpose(Image.open(path))
    except UnidentifiedImageError:
        sys.exit(f"error: --input {path!r} is not an image file Pillow can read")


def load_model(args) -> VQGAN:
    if args.tiny:
        from mmfast.testing.tiny_vqgan import tiny_vqgan

        return tiny_vqgan(seed=0)
    try:
        return VQGAN.from_pretrained(args.checkpoint, CONFIGS[args.config]())
    except VQGANCheckpointError as error:
        cli.exit_on_vqgan_checkpoint_error("vq_tokenize.py", error, "--config", args.config)


def timed(fn, device):
    """(result, seconds) of fn(), synchronising CUDA around it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (peak 255)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def save_outputs(out_dir, original, reconstruction, codes, n_embed):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    os.makedirs(out_dir, exist_ok=True)
    side_by_side = np.concatenate([original, reconstruction], axis=1)
    Image.fromarray(side_by_side).save(os.path.join(out_dir, "reconstruction.png"))
    counts = np.bincount(codes.reshape(-1), minlength=n_embed)
    fig, ax = plt.subplots(figsize=(8, 3))
    ax.bar(np.arange(n_embed), counts, width=1.0)
    ax.set_xlabel("code")
    ax.set_ylabel("uses")
    ax.set_title(f"code usage: {int((counts > 0).sum())} of {n_embed} codes, {codes.size} tokens")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "code_histogram.png"), dpi=100)
    plt.close(fig)


def main():
    args = parse_args()
    if args.backend:
        mmfast.set_backend(args.backend)
    device = torch.device(args.device)
    model = load_model(args).to(device=device, dtype=DTYPES[args.dtype])
    resolution = args.resolution
    images = preprocess(load_image(args.input), resolution=resolution)
    model.encode(images)  # warm-up (first-call kernel selection, allocator)
    codes, encode_s = timed(lambda: model.encode(images), device)
    decoded, decode_s = timed(lambda: model.decode(codes), device)

    original, reconstruction = postprocess(images)[0], postprocess(decoded)[0]
    codes_np = codes.cpu().numpy()
    save_outputs(args.output, original, reconstruction, codes_np, model.config.n_embed)
    token_ids = codes_to_token_ids(codes.flatten(1))
    print(f"{'random tiny VQGAN' if args.tiny else args.checkpoint} on {device} ({args.dtype}), "
          f"{resolution}x{resolution} image -> {tuple(codes.shape[1:])} codes")
    print(f"distinct codes: {np.unique(codes_np).size} of {model.config.n_embed} "
          f"(Liquid token ids {int(token_ids.min())}..{int(token_ids.max())})")
    print(f"encode {encode_s * 1e3:.1f} ms, decode {decode_s * 1e3:.1f} ms")
    print(f"PSNR {psnr(original, reconstruction):.2f} dB"
          + (" (random weights: expect noise)" if args.tiny else ""))
    written = [os.path.join(args.output, name) for name in ("reconstruction.png", "code_histogram.png")]
    print(f"wrote {written[0]} and {written[1]}")


if __name__ == "__main__":
    main()
