"""Text to image with Liquid: prompt -> LM image tokens (CFG) -> VQGAN decode -> PNG grid.

    python examples/liquid_generate.py --tiny --output /tmp/liquid          # random tiny models, seconds
    python examples/liquid_generate.py --model /models/Liquid_V1_7B --vqgan /models/chameleon \\
        --prompt "a red fox in the snow" --device cuda --dtype bfloat16 --seed 0 --output /tmp/liquid

--model is a local transformers directory (config.json, model*.safetensors, the tokenizer
files; Junfeng5/Liquid_V1_7B's layout), --vqgan a local VQGAN checkpoint file or a directory
holding vqgan.safetensors / vqgan.ckpt (Liquid's demo space ships chameleon/vqgan.ckpt).
Nothing is downloaded. The prompt follows Liquid's template (evaluation/inference_t2i.py):
prompt + " Generate an image based on this description.<boi>", unconditional rows
"<unconditional><boi>", image code c = token len(tokenizer) + c (256000 + c). Writes
OUT/grid.png and prints the timings.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np
import torch

import mmfast
from mmfast import cli
from mmfast.models.liquid import (LIQUID_PROMPT_SUFFIX, LIQUID_UNCONDITIONAL_PROMPT, VQGAN, LiquidLM, VQGANCheckpointError,
                                  VQGANConfig, check_image_generation, generate_images, postprocess)
from mmfast.testing.tiny_liquid import tiny_liquid_lm

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# the files AutoTokenizer reads the prompt's tokenizer from (Liquid's release ships them beside the weights)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
TINY_TEXT_VOCAB = 256  # the tiny model's "tokenizer": one token per byte


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tiny", action="store_true", help="a random tiny LiquidLM + tiny VQGAN (no files needed)")
    source.add_argument("--model", help="local Liquid LM directory (transformers layout, with the tokenizer)")
    parser.add_argument("--vqgan", help="local VQGAN checkpoint file or directory (with --model)")
    parser.add_argument("--vqgan-config", choices=("chameleon", "tiny"), default="chameleon",
                        help="architecture of --vqgan (default chameleon: 8192 codes, 16x downsampling; tiny: "
                             "mmfast.testing.tiny_vqgan's, for checking this script on tiny local files)")
    parser.add_argument("--prompt", default="A photo of a red fox sitting in fresh snow, golden hour.")
    parser.add_argument("--num-images", type=int, default=4)
    parser.add_argument("--image-tokens", type=int, default=None, help="default 1024 (32 x 32); 256 with --tiny")
    # Liquid's evaluation settings (evaluation/inference_t2i.py); its demo: --temperature 0.9 --top-p 0.99
    parser.add_argument("--cfg-scale", type=float, default=7.0)
    parser.add_argument("--temperature", type=float, default=0.99)
    parser.add_argument("--top-k", type=int, default=4096)
    parser.add_argument("--top-p", type=float, default=0.96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="LM dtype (default bfloat16 on CUDA, float32 on the CPU); the VQGAN runs in float32")
    cli.add_device_arguments(parser)
    cli.add_output_argument(parser, "liquid_generate", kind="folder", what="folder for grid.png")
    args = parser.parse_args()
    if args.model and not args.vqgan:
        parser.error("--model needs --vqgan")
    if args.tiny:
        cli.refuse_options(parser, ("vqgan", "vqgan_config"), "go with --model (--tiny makes its own random VQGAN)")
    cli.require_local_dir(parser, "--model", args.model, "Junfeng5/Liquid_V1_7B")
    if args.model and not any(os.path.isfile(os.path.join(args.model, name)) for name in TOKENIZER_FILES):
        parser.error(f"--model {args.model!r} holds no tokenizer ({', '.join(TOKENIZER_FILES)}): the prompt is "
                     "tokenized with the checkpoint's own, which Liquid's release ships beside the weights")
    cli.require_path(parser, "--vqgan", args.vqgan, "a checkpoint file, or a folder holding vqgan.ckpt / "
                     "vqgan.safetensors")
    if args.image_tokens is None:
        args.image_tokens = 256 if args.tiny else 1024
    try:
        check_image_generation(image_tokens=args.image_tokens, num_images=args.num_images,
                               temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    except ValueError as error:
        parser.error(f"{error} (--image-tokens, --num-images, --temperature, --top-k, --top-p)")
    cli.check_device(parser, args.device, args.backend)
    args.output = cli.check_output(parser, args.output, kind="folder")
    return args


def vqgan_config(name: str) -> VQGANConfig:
    if name == "tiny":
        from mmfast.testing.tiny_vqgan import tiny_vqgan_config

        return tiny_vqgan_config()
    return VQGANConfig()


def load_tiny(args, device, dtype):
    """(LM, VQGAN, prompt ids, unconditional ids, image vocab start) of random tiny models."""
    from mmfast.testing.tiny_vqgan import tiny_vqgan

    vqgan = tiny_vqgan(seed=0)
    codes = vqgan.config.n_embed
    lm = tiny_liquid_lm("gemma", vocab_size=TINY_TEXT_VOCAB + codes, seed=0).to(device=device, dtype=dtype)
    bos, boi, uncond = 1, 4, 5  # stand-ins for <bos>, <boi>, <unconditional>
    prompt_bytes = list(args.prompt.encode("utf-8"))[:64]  # a byte "tokenizer"
    return lm, vqgan, [bos, *prompt_bytes, boi], [bos, uncond, boi], TINY_TEXT_VOCAB


def load_liquid(args, device, dtype):
    """(LM, VQGAN, prompt ids, unconditional ids, image vocab start) of a local Liquid checkpoint."""
    from transformers import AutoTokenizer

    try:  # first: the small VQGAN fails in seconds, not after the 7B LM has loaded
        vqgan = VQGAN.from_pretrained(args.vqgan, vqgan_config(args.vqgan_config))
    except VQGANCheckpointError as error:
        cli.exit_on_vqgan_checkpoint_error("liquid_generate.py", error, "--vqgan-config", args.vqgan_config)
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    try:
        lm = LiquidLM.from_pretrained(args.model, dtype=dtype, device=device)
    except (FileNotFoundError, ValueError) as error:  # LiquidLMCheckpointError too: the message names the file
        sys.exit(f"liquid_generate.py: error: {error}")
    prompt_ids = tokenizer(args.prompt + LIQUID_PROMPT_SUFFIX).input_ids
    uncond_ids = tokenizer(LIQUID_UNCONDITIONAL_PROMPT).input_ids
    return lm, vqgan, prompt_ids, uncond_ids, len(tokenizer)  # Liquid: image code c is len(tokenizer) + c


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def save_grid(path: str, pixels: np.ndarray) -> None:
    """(N, H, W, 3) uint8 -> one PNG, ceil(sqrt(N)) images per row."""
    from PIL import Image

    n, h, w, _ = pixels.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * h, cols * w, 3), 255, dtype=np.uint8)
    for i, image in enumerate(pixels):
        grid[(i // cols) * h:(i // cols + 1) * h, (i % cols) * w:(i % cols + 1) * w] = image
    Image.fromarray(grid).save(path)


def main():
    args = parse_args()
    if args.backend:
        mmfast.set_backend(args.backend)
    device = torch.device(args.device)
    if args.tiny and device.type == "cpu":
        torch.set_num_threads(1)  # tiny matrices: threads only add synchronisation (slow on a busy machine)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    lm, vqgan, prompt_ids, uncond_ids, image_start = (load_tiny(args, device, dtype) if args.tiny
                                                      else load_liquid(args, device, dtype))
    vqgan = vqgan.to(device)
    image_tokens = args.image_tokens
    codes, generate_s = timed(lambda: generate_images(
        lm, prompt_ids, uncond_ids=uncond_ids, cfg_scale=args.cfg_scale, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, num_images=args.num_images, image_tokens=image_tokens, seed=args.seed,
        image_vocab_start=image_start, image_vocab_size=vqgan.config.n_embed), device)
    images, decode_s = timed(lambda: vqgan.decode(codes), device)

    os.makedirs(args.output, exist_ok=True)
    path = os.path.join(args.output, "grid.png")
    save_grid(path, postprocess(images))
    what = "random tiny LiquidLM + VQGAN" if args.tiny else args.model
    print(f"{what} on {device} ({dtype}): {args.num_images} images x {image_tokens} tokens "
          f"({tuple(codes.shape[1:])} codes), prompt {len(prompt_ids)} tokens, unconditional {len(uncond_ids)}")
    print(f"generate {generate_s:.2f} s ({generate_s / image_tokens * 1e3:.1f} ms / step), "
          f"VQGAN decode {decode_s * 1e3:.0f} ms")
    print(f"wrote {path}" + (" (random weights: expect noise)" if args.tiny else ""))


if __name__ == "__main__":
    main()
