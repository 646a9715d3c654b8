"""One UNet pass over a batch of prompts routed to different APTP experts (mmfast.models.aptp).

    python examples/aptp_mixed_batch.py                       # --tiny: random tiny experts, seconds
    python examples/aptp_mixed_batch.py --tiny --save-tiny /tmp/aptp_experts   # also write them as dirs
    python examples/aptp_mixed_batch.py --experts /tmp/aptp_experts/expert0 /tmp/aptp_experts/expert1 ...

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
or explicit --codes. Text-encoder states and latents are random too. Nothing is downloaded.

--experts DIR ...: code k = the k-th DIR, a local diffusers UNet directory of a physically sliced
expert: config.json (the DENSE base UNet config), diffusion_pytorch_model.safetensors (the
sliced weights) and architecture.safetensors (mmfast's ArchitectureCode: bool kept-group vectors
keyed by diffusers module names, "depth/<block>" for depth gates), as written by
mmfast.models.aptp.save_expert. diffusers' from_pretrained cannot load sliced weights into the
dense config (shape mismatch), so the skeleton is built with prune_unet on the meta device and the
weights assigned. The official arch vectors of rezashkv/diffusion_pruning (arch*/.../arch_vector.pt)
convert with ArchitectureCode.from_arch_vector(torch.load(path, weights_only=True), dense_unet)
(layout read from the official code; not checked on a released file). NOT IMPLEMENTED: loading
the released experts' fine-tuned weight files (saved from APTP's own pruned UNet class): write
mmfast expert directories with save_expert instead.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import mmfast
from mmfast.models.aptp import AptpUNet, Router, dense_skeleton, load_expert, run_per_expert, save_expert
from mmfast.ops import keep_packed_weights, pruned_weight_cache

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--tiny", action="store_true", help="random tiny experts (the default)")
    source.add_argument("--experts", nargs="+", metavar="DIR",
                        help="local expert directories written by save_expert (see above); code k = the k-th "
                             "DIR. The released APTP experts' weight files have no loader yet")
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
                             "CPU SD-2.1-sized experts need about half their stacked weights, on CUDA about all)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--backend", default=None, help="mmfast backend: native, triton or reference")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


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

    experts = [load_expert(directory) for directory in args.experts]
    config = dense_skeleton(args.experts[0]).config
    torch.manual_seed(args.seed)
    return UNet2DConditionModel.from_config(config).eval(), experts


def route(args, base, num_codes, prompts):
    if args.codes:
        if len(args.codes) != prompts:
            raise SystemExit(f"--codes: {len(args.codes)} codes for --batch {prompts}")
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
        print(f"expert {k}: {arch.summary()}")

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

    mixed_pass = lambda: model(sample, timestep, text, codes)  # noqa: E731
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
        print(f"  with keep_packed_weights:  {t_planned * 1e3:9.2f} ms (nothing kept: no packed kernel for "
              f"{args.dtype} on {device.type} with this backend, the same calls as above)")
    else:
        print(f"  with keep_packed_weights:  {t_planned * 1e3:9.2f} ms (packed weights kept: {kept['entries']} "
              f"entries, {kept['bytes'] / 2**20:.1f} MiB of {kept['budget_mb']} MiB; as over a sampling run)")
    print(f"one pass per code ({len(torch.unique(codes))} x sliced expert): {t_split * 1e3:9.2f} ms")
    print(f"dense base UNet, whole batch:    {t_dense * 1e3:9.2f} ms"
          f"{' (random weights, timing only)' if args.experts else ''}")


if __name__ == "__main__":
    main()
