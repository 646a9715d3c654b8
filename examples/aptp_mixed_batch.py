"""One UNet pass over a batch of prompts routed to different APTP experts (mmfast.models.aptp).

    python examples/aptp_mixed_batch.py                       # --tiny: random tiny experts, seconds
    python examples/aptp_mixed_batch.py --tiny --save-tiny /tmp/aptp_experts   # also write them as dirs
    python examples/aptp_mixed_batch.py --experts /tmp/aptp_experts/expert0 /tmp/aptp_experts/expert1 ...
    python examples/aptp_mixed_batch.py --experts ~/APTP-Base-CC3M --codes 0 3 3 7 11 0 15 3  # released experts

APTP (ICLR 2025) prunes SD 2.1 per prompt: a router maps each prompt to one of K architecture
codes, and each code is a physically sliced, separately fine-tuned UNet ("expert"). The official
code runs one expert at a time. Here AptpUNet stacks the K experts (per-code weights, pruned
channels masked) and runs a mixed-code batch in one pass; the example checks it against one pass
per code on the sliced experts (max difference printed) and times the mixed pass, the per-code
passes and the dense base UNet. With the compiled extension the mixed pass is timed once more
inside mmfast.ops.keep_packed_weights() (each code's packed weights kept across calls, as a
sampling run would use it; checked to give the same result; on CUDA for fp16 / bf16 on sm_80+,
the dtypes of the packed kernel).

Prompts are stand-ins: random 768-d "sentence embeddings" through a randomly initialised Router
(the user supplies a real sentence encoder, APTP uses all-mpnet-base-v2, and a trained router),
or explicit --codes. Text-encoder states and latents are random too. Nothing is downloaded, and
nothing is written but the experts of --save-tiny DIR: the results are the printed lines.

--experts DIR ...: code k = the k-th expert, each DIR one of
  - a released APTP expert (Hugging Face rezashkv/APTP: APTP-Base-CC3M/arch11, or one checkpoint
    inside it): arch_vector.pt and unet/diffusion_pytorch_model.safetensors, as the official
    code's generate_fid_images.py (GitHub rezashkv/diffusion_pruning) reads them;
  - a released model folder (APTP-Base-CC3M): its arch0, arch1, ... folders in index order;
  - an mmfast expert directory written by save_expert (--save-tiny): config.json (the dense
    config), diffusion_pytorch_model.safetensors (sliced weights), architecture.safetensors.
Released experts take the dense config from the config.json saved beside their weights, or from
--base-config (the SD-2.1 unet/ folder) where there is none. The released layout is read as the
official code writes it; no released file was available offline to check it against. The dense
base UNet is timed with random weights. --dtype float16/bfloat16 casts the experts as they load
(the stacked form holds K dense-sized weight sets: 16 SD-2.1 experts are about 28 GB in bf16).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from tqdm import tqdm

import mmfast
from mmfast import cli
from mmfast.models.aptp import (AptpUNet, Router, dense_skeleton, load_expert, released_expert_dirs, run_per_expert,
                                save_expert)
from mmfast.ops import keep_packed_weights, pruned_weight_cache

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--tiny", action="store_true", help="random tiny experts (the default)")
    source.add_argument("--experts", nargs="+", metavar="DIR",
                        help="local expert directories: released APTP experts (arch<k> folders or their parent) "
                             "or mmfast's (save_expert); code k = the k-th expert (see above)")
    parser.add_argument("--base-config", metavar="DIR",
                        help="--experts: the dense UNet folder (config.json) released experts were pruned from, "
                             "where none is saved beside their weights")
    parser.add_argument("--num-codes", type=int, default=4, help="--tiny: number of experts K (default 4)")
    parser.add_argument("--batch", type=int, default=8, help="prompts per batch (default 8)")
    parser.add_argument("--codes", type=int, nargs="+", help="explicit code per prompt (default: the router's)")
    parser.add_argument("--cfg", action="store_true", help="classifier-free guidance: 2 rows per prompt, one code")
    parser.add_argument("--latent-size", type=int, default=None, help="latent side (default: the config's)")
    parser.add_argument("--text-tokens", type=int, default=None, help="encoder states length (default 8 tiny, 77)")
    parser.add_argument("--save-tiny", metavar="DIR", help="--tiny: also write the experts as DIR/expert<k>")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (median printed)")
    parser.add_argument("--plan-budget-mb", type=int, default=4096,
                        help="MiB of packed per-code weights the static plan may keep (default 4096; on the "
                             "CPU SD-2.1-sized experts need about half their stacked weights, on CUDA about all; "
                             "0 times the plan with nothing kept)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="model dtype (default float32)")
    cli.add_device_arguments(parser)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.experts:
        cli.refuse_options(parser, ("save_tiny", "num_codes"), "go with --tiny, not --experts (the experts given "
                           "are the codes)")
    else:
        cli.refuse_options(parser, ("base_config",), "goes with --experts (--tiny builds its own base UNet)")
    cli.require_positive(parser, num_codes=args.num_codes, batch=args.batch, repeats=args.repeats,
                         latent_size=args.latent_size, text_tokens=args.text_tokens, threads=args.threads)
    if args.plan_budget_mb < 0:
        parser.error(f"--plan-budget-mb must be >= 0 MiB, got {args.plan_budget_mb}")
    for path in args.experts or ():
        cli.require_local_dir(parser, "--experts", path, "the APTP experts (rezashkv/APTP)")
    cli.require_local_dir(parser, "--base-config", args.base_config, "the SD-2.1 unet/ folder")
    if args.codes:
        if len(args.codes) != args.batch:
            parser.error(f"--codes: {len(args.codes)} codes for --batch {args.batch} (one code per prompt)")
        if not args.experts:  # --tiny; with --experts the count is known once they are found
            problem = codes_problem(args.codes, args.num_codes)
            if problem:
                parser.error(problem)
    cli.check_device(parser, args.device, args.backend)
    return args


def codes_problem(codes, num_codes):
    """What is wrong with --codes for num_codes experts, or None."""
    if any(not 0 <= code < num_codes for code in codes):
        return f"--codes must be in [0, {num_codes}) for {num_codes} experts, got {codes}"
    return None


def tiny_models(args):
    """(dense base UNet, [(expert, arch)]) of random tiny experts."""
    from mmfast.testing.tiny_aptp import tiny_experts

    base, experts = tiny_experts(args.num_codes, torch.Generator().manual_seed(args.seed))
    if args.save_tiny:
        for k, (expert, arch) in enumerate(experts):
            save_expert(os.path.join(args.save_tiny, f"expert{k}"), expert, arch, base)
        print(f"wrote {len(experts)} expert directories under {args.save_tiny}")
    return base, experts


def checkpoint_models(args):
    """(dense UNet with random weights: structure and timing only, [(expert, arch)]) from local dirs."""
    from diffusers import UNet2DConditionModel

    directories = [d for path in args.experts for d in expert_dirs(path)]
    dtype = None if args.dtype == "float32" else DTYPES[args.dtype]
    try:
        experts = [load_expert(d, base_config=args.base_config, dtype=dtype) for d in tqdm(directories, desc="experts")]
    except (FileNotFoundError, ValueError) as error:  # one line, not a traceback: a folder that holds no expert
        sys.exit(f"aptp_mixed_batch.py: error: {error}\n(--experts takes each expert's folder, e.g. "
                 f"DIR/expert0 DIR/expert1 ..., or a released model's folder of arch<k> folders)")
    config = dense_skeleton(directories[0], base_config=args.base_config).config
    args.sources = directories
    torch.manual_seed(args.seed)
    return UNet2DConditionModel.from_config(config).eval(), experts


def expert_dirs(path):
    """A released model folder (arch0, arch1, ...) expands to its experts, in index order (a
    partial download keeps its order; the folders are printed with their codes); any other
    folder is one expert."""
    if not os.path.isdir(path):
        return [path]  # load_expert says it does not exist
    try:
        return released_expert_dirs(path, allow_gaps=True)
    except FileNotFoundError:  # no arch<k> folders: one expert
        return [path]


def route(args, base, num_codes, prompts):
    if args.codes:
        problem = codes_problem(args.codes, num_codes)
        if problem:
            raise SystemExit(f"error: {problem}")
        return torch.tensor(args.codes)
    torch.manual_seed(args.seed)
    router = Router.for_unet(base, num_codes, embed_dim=768)
    embeddings = torch.randn(prompts, 768)  # stand-ins for mean-pooled sentence embeddings
    return router(embeddings)


def timed(fn, repeats, device):
    """(result, median seconds) after one warm-up call."""
    result = fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    base, experts = checkpoint_models(args) if args.experts else tiny_models(args)
    model = AptpUNet.from_experts(base, experts).to(device, dtype)
    if (device.type, dtype) != ("cpu", torch.float32):  # diffusers warns on any .to(dtype)
        base = base.to(device, dtype)
        experts = [(expert.to(device, dtype), arch) for expert, arch in experts]
    for k, (_, arch) in enumerate(experts):
        print(f"expert {k}: {arch.summary()}" + (f" ({args.sources[k]})" if args.experts else ""))

    codes = route(args, base, len(experts), args.batch).to(device)
    rows = 2 * args.batch if args.cfg else args.batch
    row_codes = codes.repeat(2) if args.cfg else codes  # CFG doubles rows, not codes
    config = base.config
    size = args.latent_size or config.sample_size
    tokens = args.text_tokens or (8 if not args.experts else 77)
    g = torch.Generator().manual_seed(args.seed)
    sample = torch.randn(rows, config.in_channels, size, size, generator=g).to(device, dtype)
    text = torch.randn(rows, tokens, config.cross_attention_dim, generator=g).to(device, dtype)
    timestep = torch.tensor(500, device=device)
    print(f"codes per prompt: {codes.tolist()} ({len(torch.unique(codes))} distinct of {len(experts)}), "
          f"{rows} rows{' (CFG)' if args.cfg else ''}, latents {tuple(sample.shape)}")

    mixed_pass = lambda: model(sample, timestep, text, codes).sample  # noqa: E731
    with torch.inference_mode(), mmfast.use_backend(args.backend or mmfast.get_backend()):
        mixed, t_mixed = timed(mixed_pass, args.repeats, device)
        t_planned = kept = None
        if mmfast._extension.loaded():  # the static plan, as over a sampling run's steps
            with keep_packed_weights(budget_mb=args.plan_budget_mb):
                planned, t_planned = timed(mixed_pass, args.repeats, device)
                kept = pruned_weight_cache()
            if not torch.equal(planned, mixed):
                raise SystemExit("the static plan changed the result: please report this")
        split, t_split = timed(lambda: run_per_expert(experts, sample, timestep, text, row_codes), args.repeats, device)
        _, t_dense = timed(lambda: base(sample, timestep, text).sample, args.repeats, device)
    scale = split.abs().max().item()
    print(f"max |mixed - per-expert| = {(mixed - split).abs().max().item():.3g} (output scale {scale:.3g})")
    print(f"mixed-code pass (AptpUNet): {t_mixed * 1e3:9.2f} ms")
    if kept is None:
        print("  keep_packed_weights: not timed (no compiled extension)")
    elif kept["entries"] == 0:
        why = ("--plan-budget-mb 0" if args.plan_budget_mb == 0 else
               f"no packed kernel for {args.dtype} on {device.type} with this backend")
        print(f"  with keep_packed_weights:  {t_planned * 1e3:9.2f} ms (nothing kept: {why}, the same calls as above)")
    else:
        print(f"  with keep_packed_weights:  {t_planned * 1e3:9.2f} ms (packed weights kept: {kept['entries']} "
              f"entries, {kept['bytes'] / 2**20:.1f} MiB of {kept['budget_mb']} MiB; as over a sampling run)")
    print(f"one pass per code ({len(torch.unique(codes))} x sliced expert): {t_split * 1e3:9.2f} ms")
    print(f"dense base UNet, whole batch:    {t_dense * 1e3:9.2f} ms"
          f"{' (random weights, timing only)' if args.experts else ''}")


if __name__ == "__main__":
    main()
