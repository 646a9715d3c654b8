"""Generate an image with LinFusion mounted on a Stable Diffusion pipeline, optionally up to 16K.

    python examples/linfusion_highres.py --tiny --output tiny.png          # random tiny pipeline, seconds
    python examples/linfusion_highres.py --pipeline SD15_DIR --linfusion LINFUSION_DIR \\
        --height 2048 --width 2048 --device cuda --output out.png

    python examples/linfusion_highres.py --tiny --cascade --save-stages   # the whole cascade, seconds
    python examples/linfusion_highres.py --pipeline SD15_DIR --linfusion LINFUSION_DIR --cascade \\
        --height 8192 --width 16384 --memory-budget-gb 80 --device cuda --output 16k.png

Both directories are local (e.g. `hf download stable-diffusion-v1-5/stable-diffusion-v1-5 --local-dir SD15_DIR`
and `hf download Yuanshi/LinFusion-1-5 --local-dir LINFUSION_DIR`); nothing is downloaded here.
Every attn1 (self-attention) of the UNet runs mmfast's linear attention; cross-attention stays softmax.

--cascade runs LinFusion's ultra-high-resolution recipe (mmfast.models.linfusion.generate_highres):
text-to-image at the base size, then per --strengths entry a 2x bicubic upscale and an img2img
(SDEdit) pass denoising int(steps x strength) of --steps steps, up to --height x --width. The base
long side is max(height, width) / 2**len(strengths) (--base-size must equal it when given); every
stage's height and width must be multiples of the pipeline's size multiple (64 for SD-1.5) and of 8.
Defaults: --base-size the pipeline's native size (512 for SD-1.5) doubled once per strength, square;
with --tiny a 256x128 target (width x height, as every size this script prints; base 16x8 px)
and 10 steps, so every stage denoises at least one step.

Memory (cascade only): either explicit knobs (--cfg-batch-size, --token-chunk, --ff-chunk,
--vae-tiling, --vae-tile; all exact but --vae-tiling blend) applied to every stage, or
--memory-budget-gb, which picks per stage the lightest options whose predicted peak fits. The
memory model's per-stage prediction is printed before running, and after it each stage's size,
strength, denoising steps, seconds and measured peak next to the prediction. On the CPU the
measured peak is the process's peak resident set (interpreter and libraries included), so compare
the "stage" columns there: the growth above what was resident when the stage started.
--save-stages writes every stage's image next to --output as <out stem>_stage<i><out suffix>.
--plan-only prints the prediction (and the budget's plan) and exits, from a pipeline built without
its weights (mmfast.models.linfusion.empty_pipeline): a 16K plan for a GPU in seconds, anywhere:

    python examples/linfusion_highres.py --pipeline SD15_DIR --linfusion LINFUSION_DIR --cascade \\
        --height 8192 --width 16384 --memory-budget-gb 80 --device cuda --plan-only
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

import mmfast
from mmfast import cli
from mmfast.models.linfusion import LinFusion, recommended_dtype
from mmfast.models.linfusion.highres import cascade_sizes, check_strengths

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_TOKEN_CHUNK = 65536
TINY_CASCADE_SIZE = (128, 256)  # (height, width): base 16x8 px (width x height), multiples of 8 for diffusers
TINY_CASCADE_STEPS = 10  # int(10 x 0.1) = 1: every default strength denoises at least one step
CASCADE_STEPS = 50  # LinFusion's notebooks
VAE_TILING_CHOICES = ("none", "blend", "exact")
MEMORY_KNOBS = ("cfg_batch_size", "token_chunk", "ff_chunk", "vae_tiling", "vae_tile")
CASCADE_ONLY = ("strengths", "base_size", "cfg_batch_size", "ff_chunk", "vae_tiling", "vae_tile",
                "memory_budget_gb", "plan_only", "save_stages")


def _strengths(text: str):
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0.4,0.3,0.2,0.1, got {text!r}")
    if not values or any(not 0 < value <= 1 for value in values):
        raise argparse.ArgumentTypeError(f"expected one or more strengths in (0, 1], got {text!r}")
    return values


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tiny", action="store_true", help="a tiny random pipeline (no files needed)")
    source.add_argument("--pipeline", help="local diffusers StableDiffusionPipeline directory")
    parser.add_argument("--linfusion", default=None,
                        help="local LinFusion checkpoint directory (default: random LinFusion, for --tiny)")
    parser.add_argument("--prompt", default="a photo of an astronaut riding a horse on mars")
    parser.add_argument("--height", type=int, default=None,
                        help="image height, a multiple of 8 (with --cascade: the final, largest one); one side "
                             "alone gives a square (default: the pipeline's size)")
    parser.add_argument("--width", type=int, default=None, help="image width, as --height")
    parser.add_argument("--steps", type=int, default=None,
                        help="denoising steps (default 25, 4 with --tiny; with --cascade 50, 10 with --tiny)")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default float32 on CPU; on CUDA the model family's safe dtype (recommended_dtype: "
                             "float16 for SD-1.5/XL, bfloat16 for SD-2.1 and unrecognised UNets)")
    cli.add_device_arguments(parser)
    parser.add_argument("--token-chunk", type=int, default=None,
                        help=f"attn1 runs over chunks of this many tokens (exact; bounds peak memory at huge "
                             f"sizes; only layers with more tokens are chunked); 0 disables "
                             f"(default {DEFAULT_TOKEN_CHUNK}; with --memory-budget-gb the planner picks it)")
    cli.add_output_argument(parser, "linfusion.png", kind="image",
                            what="the image file to write; its folder is created when missing")

    cascade = parser.add_argument_group("high-resolution cascade (--cascade)")
    cascade.add_argument("--cascade", action="store_true",
                         help="base size -> --height x --width by 2x upscaling + img2img per strength")
    cascade.add_argument("--strengths", type=_strengths, default=None,
                         help="img2img strength per upscaling stage (default 0.4,0.3,0.2,0.1)")
    cascade.add_argument("--base-size", type=int, default=None,
                         help="the base stage's long side: max(height, width) / 2**len(strengths)")
    cascade.add_argument("--cfg-batch-size", type=_positive_int, default=None,
                         help="rows of the guidance batch (uncond, cond) per UNet call; 1 halves the activations")
    cascade.add_argument("--ff-chunk", type=_positive_int, default=None,
                         help="feed-forwards run over chunks of this many tokens (exact)")
    cascade.add_argument("--vae-tiling", choices=VAE_TILING_CHOICES, default=None,
                         help="VAE encode/decode: none (default), blend (diffusers' tiles, approximate) "
                              "or exact (bands, equal to untiled)")
    cascade.add_argument("--vae-tile", type=_positive_int, default=None,
                         help="VAE tile (blend) or band (exact) size in latent px (encode: the same region)")
    cascade.add_argument("--memory-budget-gb", type=float, default=None,
                         help="GiB (2**30 bytes) per stage: pick the lightest memory options predicted to fit "
                              "(excludes the explicit knobs above and --token-chunk)")
    cascade.add_argument("--plan-only", action="store_true",
                         help="print the memory model's prediction (and --memory-budget-gb's plan) and exit: the "
                              "pipeline is built without its weights (seconds at 16K), and --device is the device "
                              "planned for (its dtype), which need not be here")
    cascade.add_argument("--save-stages", action="store_true",
                         help="also write each stage's image next to --output (<stem>_stage<i><suffix>)")
    args = parser.parse_args(argv)
    _check_args(parser, args)
    return args


def _check_args(parser, args):
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    cli.require_local_dir(parser, "--pipeline", args.pipeline, "a Stable Diffusion pipeline (e.g. "
                          "stable-diffusion-v1-5/stable-diffusion-v1-5)")
    cli.require_local_dir(parser, "--linfusion", args.linfusion, "Yuanshi/LinFusion-1-5")
    if args.pipeline and not args.linfusion:
        parser.error("--pipeline needs --linfusion DIR (a random LinFusion on a real model makes noise)")
    if args.token_chunk is not None and args.token_chunk < 0:
        parser.error(f"--token-chunk must be >= 0, got {args.token_chunk}")
    cli.require_positive(parser, steps=args.steps, height=args.height, width=args.width)
    if args.plan_only:  # a plan for a GPU can be made where there is none: the name is checked only
        _check_device_name(parser, args.device)
    else:
        cli.check_device(parser, args.device, args.backend)
    args.output = cli.check_output(parser, args.output, kind="image")
    if not args.cascade:
        given = [flag(name) for name in CASCADE_ONLY if getattr(args, name) not in (None, False)]
        if given:
            parser.error(f"{', '.join(given)} need{'' if len(given) > 1 else 's'} --cascade")
        if (args.height is None) != (args.width is None):  # one side given: square, as the cascade does
            args.height = args.width = args.height or args.width
        for name in ("height", "width"):
            value = getattr(args, name)
            if value is not None and value % 8:
                parser.error(f"--{name} {value}: must be a multiple of 8 (diffusers' pipelines need it), e.g. "
                             f"{value // 8 * 8 or 8}")
        return
    if args.memory_budget_gb is not None:
        knobs = [flag(name) for name in MEMORY_KNOBS if getattr(args, name) is not None]
        if knobs:
            parser.error(f"--memory-budget-gb picks the memory options itself; drop {', '.join(knobs)} "
                         "(or drop --memory-budget-gb to set them explicitly)")
        if args.memory_budget_gb <= 0:
            parser.error(f"--memory-budget-gb must be > 0, got {args.memory_budget_gb:g}")
    if args.vae_tile is not None and args.vae_tiling in (None, "none"):
        parser.error("--vae-tile needs --vae-tiling blend or exact")
    args.strengths = args.strengths or (0.4, 0.3, 0.2, 0.1)
    args.steps = args.steps or (TINY_CASCADE_STEPS if args.tiny else CASCADE_STEPS)
    try:
        check_strengths(args.strengths, args.steps)
    except ValueError as error:
        parser.error(str(error).replace("generate_highres: ", "").replace("use steps", "use --steps"))
    _check_cascade_sizes(parser, args)


def _check_device_name(parser, device: str) -> None:
    try:
        if torch.device(device).type not in ("cpu", "cuda"):
            parser.error(f"--device {device}: --plan-only plans for cpu or cuda")
    except RuntimeError as error:
        parser.error(f"--device {device!r}: {error}")


def _check_cascade_sizes(parser, args):
    """What the arguments alone decide, by the cascade's own rule (cascade_sizes) with the
    multiple every pipeline needs, 8 px: the pipeline's own multiple is checked once it is loaded."""
    if args.height is None and args.width is None and args.base_size is None:
        return  # the pipeline's (or --tiny's) native size
    stages = len(args.strengths)
    side = args.base_size * 2 ** stages if args.base_size else None
    height, width = args.height or args.width or side, args.width or args.height or side
    try:
        cascade_sizes(height, width, stages, args.base_size, multiple=8)
    except ValueError as error:
        parser.error(str(error).replace("generate_highres: ", "").replace("base_size", "--base-size")
                     .replace("pick height and width", "pick --height and --width"))


def default_dtype(args) -> torch.dtype:
    """fp32 on CPU; on GPUs the model family's safe dtype (bf16 for SD-2.1, see recommended_dtype)."""
    if not args.device.startswith("cuda"):
        return torch.float32
    if args.tiny:
        return torch.bfloat16
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(args.pipeline, subfolder="unet", local_files_only=True)
    return recommended_dtype(config, args.device)


def load_pipeline(args, dtype):
    if args.plan_only:
        return empty_pipeline(args, dtype)
    if args.tiny:
        from mmfast.testing.tiny_diffusers import tiny_pipeline

        pipe = tiny_pipeline(seed=args.seed)  # built in float32
        return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
    from diffusers import AutoPipelineForText2Image  # SD-1.5 / 2.1 / XL directories alike

    return AutoPipelineForText2Image.from_pretrained(args.pipeline, torch_dtype=dtype, safety_checker=None,
                                                     requires_safety_checker=False, local_files_only=True)


def empty_pipeline(args, dtype):
    """The pipeline without its weights (on the meta device): what the memory model needs."""
    if args.tiny:
        from accelerate import init_empty_weights

        from mmfast.testing.tiny_diffusers import tiny_pipeline

        with init_empty_weights():
            pipe = tiny_pipeline(seed=args.seed)
        for component in pipe.components.values():  # (ModelMixin.to would warn that it is not from_pretrained)
            if isinstance(component, torch.nn.Module):
                torch.nn.Module.to(component, dtype)
        return pipe
    from mmfast.models.linfusion import empty_pipeline as build_empty

    return build_empty(args.pipeline, torch_dtype=dtype)


# --- the cascade ---------------------------------------------------------------------------


def cascade_target(args, pipe):
    """(height, width, base_size) of the cascade from the arguments and the pipeline's native size."""
    scale = 2 ** len(args.strengths)
    if args.height is None and args.width is None:
        if args.tiny and args.base_size is None:
            return TINY_CASCADE_SIZE + (None,)
        native = args.base_size or pipe.unet.config.sample_size * pipe.vae_scale_factor
        return native * scale, native * scale, args.base_size
    height = args.height if args.height is not None else args.width
    width = args.width if args.width is not None else args.height
    return height, width, args.base_size


def memory_options(args):
    """(MemoryOptions or None, budget bytes or None) from the memory arguments."""
    from mmfast.models.linfusion import MemoryOptions

    if args.memory_budget_gb is not None:
        return None, int(args.memory_budget_gb * 2**30)
    chunk = DEFAULT_TOKEN_CHUNK if args.token_chunk is None else args.token_chunk
    return MemoryOptions(cfg_batch_size=args.cfg_batch_size, token_chunk_size=chunk or None,
                         ff_chunk_size=args.ff_chunk, vae_tiling=args.vae_tiling or "none",
                         vae_tile_size=args.vae_tile), None


def describe_options(options) -> str:
    parts = []
    if options.cfg_batch_size is not None:
        parts.append(f"cfg_batch={options.cfg_batch_size}")
    if options.token_chunk_size is not None:
        parts.append(f"token_chunk={options.token_chunk_size}")
    if options.ff_chunk_size is not None:
        parts.append(f"ff_chunk={options.ff_chunk_size}")
    if options.vae_tiling != "none":
        tile = "" if options.vae_tile_size is None else f"/{options.vae_tile_size}"
        parts.append(f"vae={options.vae_tiling}{tile}")
    return " ".join(parts) or "unchunked, untiled"


def format_bytes(count) -> str:
    if count is None:
        return "n/a"
    if abs(count) >= 2**30:
        return f"{count / 2**30:.2f} GiB"
    return f"{count / 2**20:.1f} MiB"


def predict(pipe, args, height, width, base_size, options, budget):
    """The memory model's StageMemory and MemoryOptions per stage (the budget's plan, or fixed options)."""
    from mmfast.models.linfusion import estimate_highres_memory, plan_highres_memory
    from mmfast.models.linfusion.highres import cascade_sizes, size_multiple
    from mmfast.models.linfusion.highres_memory import estimate_stage_memory

    if budget is None:
        stages = estimate_highres_memory(pipe, height=height, width=width, base_size=base_size,
                                         strengths=args.strengths, options=options, guidance_scale=args.guidance)
        return stages, [options] * len(stages)
    plans = plan_highres_memory(pipe, height=height, width=width, budget_bytes=budget, base_size=base_size,
                                strengths=args.strengths, guidance_scale=args.guidance)
    sizes = cascade_sizes(height, width, len(args.strengths), base_size, size_multiple(pipe))
    stages = [estimate_stage_memory(pipe, index=index, height=h, width=w, options=plan, guidance_scale=args.guidance)
              for index, ((h, w), plan) in enumerate(zip(sizes, plans))]
    return stages, plans


def _strength(strength) -> str:
    return "t2i" if strength is None else f"{strength:g}"


def _row(cells, widths=(5, 11, 8), tail="") -> str:
    """Right-aligned cells (the first ones `widths` wide, the rest 10), then `tail` as is."""
    padded = [f"{cell:>{widths[i] if i < len(widths) else 10}}" for i, cell in enumerate(cells)]
    return "  " + "  ".join(padded + ([tail] if tail else []))


def print_prediction(predicted, plans, strengths):
    print("memory model, predicted per stage (weights + carried image + the largest phase):")
    print(_row(["stage", "size", "strength", "weights", "encode", "denoise", "decode", "peak"], tail="options"))
    for stage, plan, strength in zip(predicted, plans, (None,) + tuple(strengths)):
        cells = [str(stage.index), f"{stage.width}x{stage.height}", _strength(strength)]
        cells += [format_bytes(stage.weights_bytes), format_bytes(stage.encode_bytes) if stage.index else "-"]
        cells += [format_bytes(stage.denoise_bytes), format_bytes(stage.decode_bytes), format_bytes(stage.peak_bytes)]
        print(_row(cells, tail=describe_options(plan)))


def print_results(stages, predicted, device):
    print("cascade stages, measured (predicted):")
    widths = (5, 11, 8, 5, 8)
    print(_row(["stage", "size", "strength", "steps", "seconds", "peak", "predicted", "stage peak", "predicted"],
               widths))
    for stage, model in zip(stages, predicted):
        cells = [str(stage.index), f"{stage.width}x{stage.height}", _strength(stage.strength),
                 str(stage.denoising_steps), f"{stage.seconds:.2f}"]
        cells += [format_bytes(stage.peak_memory_bytes), format_bytes(model.peak_bytes)]
        cells += [format_bytes(stage.stage_memory_bytes), format_bytes(model.stage_bytes)]
        print(_row(cells, widths))
    if torch.device(device).type == "cpu":
        print("  (CPU: peak is the process's peak resident set, interpreter and libraries included; the stage "
              "columns are the growth above the start of the stage)")


def save_image(image, path: str) -> None:
    """Writes the image, making its folder first (--output was checked to be creatable)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image.save(path)


def stage_path(out: str, index: int) -> str:
    root, suffix = os.path.splitext(out)
    return f"{root}_stage{index}{suffix or '.png'}"


def run_cascade(args, pipe):
    """The notebook's protocol: every stage seeded anew with --seed."""
    from mmfast.models.linfusion import generate_highres

    height, width, base_size = cascade_target(args, pipe)
    options, budget = memory_options(args)
    memory = (f"budget {args.memory_budget_gb:g} GiB per stage" if budget is not None
              else describe_options(options))
    print(f"cascade to {width}x{height}: strengths {','.join(f'{s:g}' for s in args.strengths)} of {args.steps} "
          f"steps; memory: {memory}")
    tick = time.perf_counter()
    try:
        predicted, plans = predict(pipe, args, height, width, base_size, options, budget)
    except ValueError as error:  # sizes that do not halve, a base_size that does not match, a budget too small
        raise SystemExit(f"error: {error}")
    print_prediction(predicted, plans, args.strengths)
    print(f"  (predicted in {time.perf_counter() - tick:.1f} s)")
    if args.plan_only:
        return predicted, plans

    start = time.perf_counter()
    out = generate_highres(pipe, args.prompt, height=height, width=width, base_size=base_size,
                           strengths=args.strengths, steps=args.steps, guidance_scale=args.guidance,
                           seed=args.seed, memory=plans, return_stages=True)  # the plan printed above
    elapsed = time.perf_counter() - start
    print_results(out.stages, predicted, pipe.unet.device)
    save_image(out.image, args.output)
    if args.save_stages:
        for stage in out.stages:
            stage.image.save(stage_path(args.output, stage.index))
        print(f"stage images -> {', '.join(stage_path(args.output, s.index) for s in out.stages)}")
    print(f"{out.image.width}x{out.image.height} image in {elapsed:.1f} s ({len(out.stages)} stages) -> {args.output}")
    return out


def main(argv=None):
    args = parse_args(argv)
    if args.backend:
        mmfast.set_backend(args.backend)
    dtype = DTYPES[args.dtype] if args.dtype else default_dtype(args)
    if args.tiny and args.device == "cpu":
        torch.set_num_threads(1)  # tiny tensors: threads only add synchronisation (slow on a busy machine)
    pipe = load_pipeline(args, dtype)
    if not args.plan_only:
        pipe = pipe.to(args.device)
    try:
        linfusion = LinFusion.construct_for(pipe, pretrained=args.linfusion, load_pretrained=bool(args.linfusion))
    except (FileNotFoundError, ValueError) as error:  # a missing, malformed or mismatched file: the message names it
        sys.exit(f"linfusion_highres.py: error: {error}")
    chunk = DEFAULT_TOKEN_CHUNK if args.token_chunk is None else args.token_chunk
    linfusion.set_token_chunk_size(chunk or None)  # the cascade sets it per stage from its MemoryOptions
    print(f"LinFusion mounted on {len(linfusion.specs)} attn1 layers "
          f"({'checkpoint ' + args.linfusion if args.linfusion else 'random weights'})")

    if args.cascade:
        return run_cascade(args, pipe)
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    steps = args.steps or (4 if args.tiny else 25)
    start = time.perf_counter()
    image = pipe(args.prompt, height=args.height, width=args.width, num_inference_steps=steps,
                 guidance_scale=args.guidance, generator=generator).images[0]
    elapsed = time.perf_counter() - start
    save_image(image, args.output)
    print(f"{image.width}x{image.height} image in {elapsed:.1f} s ({steps} steps) -> {args.output}")
    return image


if __name__ == "__main__":
    main()
