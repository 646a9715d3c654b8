"""Generate an image with LinFusion mounted on a Stable Diffusion pipeline.

    python examples/linfusion_highres.py --tiny --out tiny.png          # random tiny pipeline, seconds
    python examples/linfusion_highres.py --pipeline SD15_DIR --linfusion LINFUSION_DIR \\
        --height 2048 --width 2048 --device cuda --dtype float16 --out out.png

Both directories are local (e.g. `huggingface-cli download runwayml/stable-diffusion-v1-5 --local-dir SD15_DIR`
and `huggingface-cli download Yuanshi/LinFusion-1-5 --local-dir LINFUSION_DIR`); nothing is downloaded here.
Every attn1 (self-attention) of the UNet runs mmfast's linear attention; cross-attention stays softmax.
"""
from __future__ import annotations

import argparse
import time

import torch

import mmfast
from mmfast.models.linfusion import LinFusion

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tiny", action="store_true", help="a tiny random pipeline (no files needed)")
    source.add_argument("--pipeline", help="local diffusers StableDiffusionPipeline directory")
    parser.add_argument("--linfusion", default=None,
                        help="local LinFusion checkpoint directory (default: random LinFusion, for --tiny)")
    parser.add_argument("--prompt", default="a photo of an astronaut riding a horse on mars")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 25, 4 with --tiny)")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default float16 on CUDA, float32 on CPU")
    parser.add_argument("--backend", default=None, help="mmfast backend: native, triton or reference")
    parser.add_argument("--token-chunk", type=int, default=65536,
                        help="attn1 runs over chunks of this many tokens (exact; bounds peak memory at huge "
                             "sizes; only layers with more tokens are chunked); 0 disables")
    parser.add_argument("--out", default="linfusion.png")
    return parser.parse_args()


def load_pipeline(args, dtype):
    if args.tiny:
        from mmfast.testing.tiny_diffusers import tiny_pipeline

        pipe = tiny_pipeline(seed=args.seed)  # built in float32
        return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(args.pipeline, torch_dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False, local_files_only=True)


def main():
    args = parse_args()
    if args.backend:
        mmfast.set_backend(args.backend)
    if args.pipeline and not args.linfusion:
        raise SystemExit("--pipeline needs --linfusion DIR (a random LinFusion on a real model makes noise)")
    dtype = DTYPES[args.dtype or ("float16" if args.device.startswith("cuda") else "float32")]
    pipe = load_pipeline(args, dtype).to(args.device)
    linfusion = LinFusion.construct_for(pipe, pretrained=args.linfusion)
    linfusion.set_token_chunk_size(args.token_chunk or None)
    print(f"LinFusion mounted on {len(linfusion.specs)} attn1 layers "
          f"({'checkpoint ' + args.linfusion if args.linfusion else 'random weights'})")

    steps = args.steps or (4 if args.tiny else 25)
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    start = time.perf_counter()
    image = pipe(args.prompt, height=args.height, width=args.width, num_inference_steps=steps,
                 guidance_scale=args.guidance, generator=generator).images[0]
    elapsed = time.perf_counter() - start
    image.save(args.out)
    print(f"{image.width}x{image.height} image in {elapsed:.1f} s ({steps} steps) -> {args.out}")


if __name__ == "__main__":
    main()
