"""Salient-object segmentation with DiffDIS (ICLR 2025): one diffusion step from noise to mask.

    python examples/diffdis_segment.py --tiny                             # random tiny model, seconds
    python examples/diffdis_segment.py --checkpoint /models/diffdis --input photos/ --output out/
    python examples/diffdis_segment.py --checkpoint /models/diffdis --input cat.jpg --tta --mask-only

--checkpoint is a local copy of the released weights in diffusers layout (HF qianyu1217/diffdis):
unet/, vae/, scheduler/, and either text_encoder/ + tokenizer/ or empty_text_embedding.safetensors
(the embedding of the empty prompt, the only text DiffDIS uses). Without that file the text
encoder runs once at load; --save-embedding PATH writes the embedding so later loads skip it
(write it as CHECKPOINT/empty_text_embedding.safetensors and it is picked up automatically), and
--embedding PATH loads it from elsewhere. Nothing is ever downloaded.

--input is an image file or a folder of images (png, jpg, jpeg, bmp, tif, tiff, webp; sorted by
name, not recursive). Without it, three photographs bundled with scikit-image (astronaut, chelsea,
coffee) are segmented and written to the output folder as <name>.png too.

Every image is resized (bilinear, aspect ratio not kept, as DiffDIS does) to --resolution squared
(default 1024, DiffDIS's; 128 with --tiny), segmented, and the maps resized back. For each input
<stem>, OUTPUT gets:
    <stem>_mask.png     the salient-object mask, 8-bit gray, at the input's size
    <stem>_edge.png     the object's edge map (not with --mask-only)
    <stem>_overlay.png  the photo with the mask in semi-transparent red
Each map is min-max normalised by DiffDIS, so a photo without a salient object still gets a mask
spanning 0..255. x_T is drawn from a CPU torch.Generator seeded with --seed for every
segment call (one image, or one --batch-size chunk), so a run is reproducible, on any device,
and an image's mask does not depend on the images before it (with --batch-size 1).

--dtype: bfloat16 on CUDA, float32 on the CPU by default. float16 is not offered: the SD-2 family
(DiffDIS is an sd-turbo fine-tune) overflows to NaN in float16.
--tta: DiffDIS's 6-view test-time augmentation (hflip x 0.75/1/1.25 scale): 6x the compute.
--linear-attention LEVELS: replaces the softmax self-attention of the top LEVELS UNet levels by
LinFusion-style linear attention (faster at high resolution). Without --linear-attention-weights
(a distilled LinFusion directory) the swapped layers are UNDISTILLED and the masks are NOT
DiffDIS's: a speed demonstration only.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from typing import List, Tuple

import numpy as np
import torch

import mmfast
from mmfast import cli
from mmfast.models.diffdis import DiffDISPipeline, as_rgb_images

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
SKIMAGE_SAMPLES = ("astronaut", "chelsea", "coffee")
OUTPUT_SUFFIXES = ("_mask", "_edge", "_overlay")
OVERLAY_COLOR = np.array([255, 0, 0], dtype=np.float32)
OVERLAY_ALPHA = 0.5


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--tiny", action="store_true",
                        help="a random tiny DiffDIS (no files needed; the masks are meaningless)")
    source.add_argument("--checkpoint", metavar="DIR", help="local DiffDIS directory (HF qianyu1217/diffdis layout)")
    parser.add_argument("--embedding", metavar="PATH",
                        help="empty-prompt embedding file (default: CHECKPOINT/empty_text_embedding.safetensors, "
                             "else computed with CHECKPOINT's text encoder)")
    parser.add_argument("--save-embedding", metavar="PATH",
                        help="write the empty-prompt embedding (float32 safetensors) to PATH after loading")
    parser.add_argument("--input", metavar="PATH",
                        help="an image file or a folder of images (default: scikit-image's astronaut, chelsea, coffee)")
    cli.add_output_argument(parser, "diffdis_out", kind="folder",
                            what="folder for <stem>_mask.png, <stem>_edge.png and <stem>_overlay.png")
    parser.add_argument("--resolution", type=int, default=None,
                        help="processing size, a multiple of 64 (default 1024; 128 with --tiny)")
    parser.add_argument("--mask-only", action="store_true", help="skip the edge map (about 37%% fewer FLOPs)")
    parser.add_argument("--tta", action="store_true", help="DiffDIS's 6-view test-time augmentation (6x compute)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="compute dtype (default bfloat16 on CUDA, float32 on the CPU; float16 is NaN-prone "
                             "in this model family and not offered)")
    cli.add_device_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the x_T noise (default 0)")
    parser.add_argument("--batch-size", type=int, default=1, help="images per UNet call (default 1)")
    parser.add_argument("--linear-attention", type=int, metavar="LEVELS", default=None,
                        help="swap the self-attention of the top LEVELS UNet levels for linear attention; "
                             "UNDISTILLED (no --linear-attention-weights) it changes the masks")
    parser.add_argument("--linear-attention-weights", metavar="DIR",
                        help="a distilled LinFusion directory for --linear-attention (LinFusion.save_pretrained)")
    args = parser.parse_args(argv)
    if not args.tiny and not args.checkpoint:
        parser.error("say which model to run: --tiny (random tiny weights, no files) or --checkpoint DIR "
                     "(a local copy of qianyu1217/diffdis)")
    if args.tiny and (args.embedding or args.save_embedding):
        parser.error("--embedding / --save-embedding go with --checkpoint")
    if args.resolution is None:
        args.resolution = 128 if args.tiny else 1024
    if args.resolution < 64 or args.resolution % 64:
        parser.error(f"--resolution must be a positive multiple of 64, got {args.resolution}")
    cli.require_positive(parser, batch_size=args.batch_size)
    if args.linear_attention_weights and args.linear_attention is None:
        parser.error("--linear-attention-weights needs --linear-attention LEVELS")
    if args.linear_attention is not None and args.linear_attention < 1:
        parser.error(f"--linear-attention LEVELS must be >= 1, got {args.linear_attention}")
    cli.require_local_dir(parser, "--checkpoint", args.checkpoint, "qianyu1217/diffdis")
    cli.require_local_dir(parser, "--linear-attention-weights", args.linear_attention_weights,
                          "a distilled LinFusion (LinFusion.save_pretrained)")
    cli.require_file(parser, "--embedding", args.embedding)
    cli.check_device(parser, args.device, args.backend)
    args.output = cli.check_output(parser, args.output, kind="folder")
    return args


# --- inputs ---------------------------------------------------------------------------------


def list_inputs(path: str, output_dir: str) -> List[str]:
    """The image files to segment: `path` itself, or the images of the folder `path`, sorted."""
    if not os.path.exists(path):
        sys.exit(f"error: --input {path!r} does not exist")
    if os.path.isfile(path):
        return [path]
    same_as_output = os.path.realpath(path) == os.path.realpath(output_dir)
    files = []
    for name in sorted(os.listdir(path)):
        stem, extension = os.path.splitext(name)
        if name.startswith(".") or extension.lower() not in IMAGE_EXTENSIONS:
            continue
        if same_as_output and stem.endswith(OUTPUT_SUFFIXES):
            continue  # this script's own outputs from an earlier run
        if os.path.isfile(os.path.join(path, name)):
            files.append(os.path.join(path, name))
    if not files:
        sys.exit(f"error: no images in the folder {path!r} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return files


def read_image(path: str) -> torch.Tensor:
    """The image as the pipeline reads it, (3, H, W) float in [0, 1] (EXIF orientation applied
    as OpenCV's imread does; 16-bit grayscale scaled, where PIL's convert("RGB") clips it to
    white: as_rgb_images), or exit naming the file."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            return as_rgb_images(ImageOps.exif_transpose(image))[0]
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        sys.exit(f"error: cannot read the image {path!r}: {error}")


def check_readable(paths: List[str]) -> None:
    """Opens every file's header up front, so a bad file fails the run before any compute."""
    from PIL import Image

    for path in paths:
        try:
            with Image.open(path):
                pass
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            sys.exit(f"error: cannot read the image {path!r}: {error}")


def require_skimage() -> None:
    try:
        import skimage.data  # noqa: F401
    except ImportError:
        sys.exit("error: without --input the sample photographs come from scikit-image, which is not installed: "
                 "pass --input PATH or pip install scikit-image")


def sample_inputs(output_dir: str) -> List[str]:
    """scikit-image's bundled photographs, written to output_dir as <name>.png; their paths."""
    from PIL import Image

    require_skimage()
    from skimage import data

    paths = []
    for name in SKIMAGE_SAMPLES:
        path = os.path.join(output_dir, f"{name}.png")
        Image.fromarray(getattr(data, name)()).convert("RGB").save(path)
        paths.append(path)
    return paths


def output_stems(paths: List[str]) -> List[str]:
    """File stems, with the extension kept where two inputs share a stem (a.png and a.jpg)."""
    stems = [os.path.splitext(os.path.basename(path))[0] for path in paths]
    return [os.path.basename(path).replace(".", "_") if stems.count(stem) > 1 else stem
            for path, stem in zip(paths, stems)]


# --- model ----------------------------------------------------------------------------------


def load_pipeline(args, device: torch.device, dtype: torch.dtype) -> DiffDISPipeline:
    if args.tiny:
        from mmfast.testing.tiny_diffdis import tiny_diffdis_pipeline

        return tiny_diffdis_pipeline(seed=0).to(device=device, dtype=dtype)
    # With --save-embedding, load in float32 so the saved embedding is not rounded to bfloat16.
    load_dtype = torch.float32 if args.save_embedding else dtype
    try:
        pipe = DiffDISPipeline.from_pretrained(args.checkpoint, torch_dtype=load_dtype, device=device,
                                               empty_text_embedding=args.embedding)
    except (FileNotFoundError, ValueError) as error:  # a missing or malformed file: the message names it
        sys.exit(f"error: {error}")
    if args.save_embedding:
        folder = os.path.dirname(os.path.abspath(args.save_embedding))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            sys.exit(f"error: cannot write --save-embedding {args.save_embedding!r}: {folder!r} is not a writable "
                     "folder (pick another PATH and pass it as --embedding later)")
        pipe.save_empty_text_embedding(args.save_embedding)
        print(f"wrote the empty-prompt embedding to {args.save_embedding}"
              + ("" if os.path.basename(args.save_embedding) == "empty_text_embedding.safetensors"
                 and os.path.samefile(folder, args.checkpoint)
                 else f" (pass --embedding {args.save_embedding} next time)"))
        pipe.to(dtype=dtype)
    return pipe


def mount_linear_attention(pipe: DiffDISPipeline, levels: int, weights) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "not distilled": said louder below
        try:
            linfusion = pipe.enable_linear_attention(levels, pretrained=weights)
        except ValueError as error:  # levels out of range, or weights for other layers: an argument error
            print(f"diffdis_segment.py: error: --linear-attention: {error}", file=sys.stderr)
            raise SystemExit(2) from None
    print(f"linear attention on {len(linfusion.specs)} self-attention layers (top {levels} UNet level(s))"
          + (f" from {weights}" if weights else ""))
    if weights is None:
        print("!" * 100)
        print(f"!! --linear-attention {levels}: the swapped attention layers are UNDISTILLED (random LinFusion MLPs).\n"
              "!! The masks are NOT DiffDIS's: this only demonstrates the speed. Distill them first\n"
              "!! (mmfast.models.linfusion.LinFusionDistiller) and pass --linear-attention-weights DIR.")
        print("!" * 100)


# --- outputs --------------------------------------------------------------------------------


def to_uint8(map_: torch.Tensor) -> np.ndarray:
    return (map_.clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)


def overlay(image: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """The photo ((3, H, W) in [0, 1]) with the mask blended in red, alpha = OVERLAY_ALPHA * mask."""
    rgb = image.permute(1, 2, 0).numpy() * 255
    alpha = OVERLAY_ALPHA * mask.clamp(0, 1).numpy()[..., None]
    return (rgb * (1 - alpha) + OVERLAY_COLOR * alpha + 0.5).astype(np.uint8)


def save_outputs(output_dir: str, stem: str, image, mask: torch.Tensor, edge) -> List[str]:
    from PIL import Image

    written = [(f"{stem}_mask.png", Image.fromarray(to_uint8(mask)))]
    if edge is not None:
        written.append((f"{stem}_edge.png", Image.fromarray(to_uint8(edge))))
    written.append((f"{stem}_overlay.png", Image.fromarray(overlay(image, mask))))
    for name, picture in written:
        picture.save(os.path.join(output_dir, name))
    return [name for name, _ in written]


# --- main -----------------------------------------------------------------------------------


def main(argv=None) -> List[Tuple[str, float]]:
    """Runs the example; returns (input path, seconds) per image."""
    from tqdm.auto import tqdm

    args = parse_args(argv)
    if args.backend:
        mmfast.set_backend(args.backend)
    device = torch.device(args.device)  # checked by parse_args
    if args.tiny and device.type == "cpu":
        torch.set_num_threads(1)  # tiny tensors: threads only add synchronisation (slow on a busy machine)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)

    # Every check before any file is written: the inputs, then the model and its options.
    if args.input is None:
        require_skimage()
    else:
        paths = list_inputs(args.input, args.output)
        check_readable(paths)
    start = time.perf_counter()
    pipe = load_pipeline(args, device, dtype)
    if args.linear_attention is not None:
        mount_linear_attention(pipe, args.linear_attention, args.linear_attention_weights)
    load_s = time.perf_counter() - start
    os.makedirs(args.output, exist_ok=True)
    if args.input is None:
        paths = sample_inputs(args.output)
        print(f"no --input: segmenting scikit-image's {', '.join(SKIMAGE_SAMPLES)} (copied to {args.output})")
    stems = output_stems(paths)
    what = "random tiny DiffDIS" if args.tiny else args.checkpoint
    print(f"{what} on {device} ({str(dtype).replace('torch.', '')}), loaded in {load_s:.1f} s; "
          f"{len(paths)} image(s) at {args.resolution}x{args.resolution}"
          + (", mask only" if args.mask_only else "") + (", 6-view TTA" if args.tta else ""))
    if args.tiny:
        print("NOTE: --tiny weights are random, so the masks are meaningless: this run demonstrates the plumbing "
              "(loading, resizing, saving), not DiffDIS's quality.")

    timings = []
    bar = tqdm(total=len(paths), unit="image", desc="DiffDIS", disable=len(paths) < 2)
    for first in range(0, len(paths), args.batch_size):
        chunk = range(first, min(first + args.batch_size, len(paths)))
        images = [read_image(paths[i]) for i in chunk]
        generator = torch.Generator("cpu").manual_seed(args.seed)
        tick = time.perf_counter()
        out = pipe.segment(images, resolution=args.resolution, mask_only=args.mask_only, tta=args.tta,
                           generator=generator, batch_size=len(images), progress=False)
        seconds = (time.perf_counter() - tick) / len(images)  # the maps come back on the CPU: synchronised
        for k, i in enumerate(chunk):
            edge = None if out.edges is None else out.edges[k]
            names = save_outputs(args.output, stems[i], images[k], out.masks[k], edge)
            timings.append((paths[i], seconds))
            height, width = images[k].shape[1:]
            bar.write(f"{os.path.basename(paths[i])} ({width}x{height}): {seconds:.2f} s"
                      + (" (per image of a batch)" if len(images) > 1 else "") + f" -> {', '.join(names)}")
        bar.update(len(images))
    bar.close()

    total = sum(seconds for _, seconds in timings)
    print(f"segmented {len(timings)} image(s) in {total:.2f} s ({total / len(timings):.2f} s per image"
          + ("; the first includes warm-up" if len(timings) > 1 else "") + f"); outputs in {args.output}")
    if args.tiny:
        print("(random tiny weights: the masks are meaningless)")
    return timings


if __name__ == "__main__":
    main()
