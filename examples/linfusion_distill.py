"""Distil LinFusion from a UNet's own softmax self-attention (the official recipe's loss).

    python examples/linfusion_distill.py --tiny                  # random tiny UNet, CPU, seconds
    python examples/linfusion_distill.py --tiny --no-denoise     # the distillation terms alone
    python examples/linfusion_distill.py --unet DIR --steps 200 --output OUT

Only the LinFusion modules train; the UNet is frozen and is its own teacher:
loss = MSE(eps, noise) + 0.5 MSE(eps, eps_teacher) + 0.5 mean_l MSE(attn1_l, attn1_l_teacher)
(--no-denoise drops the first term: LinFusionDistiller(..., target=None)). With a random tiny
UNet the denoising term dominates and the student may drift from the teacher while the total
falls; --no-denoise shows the student approaching the teacher, and then every term must fall.
The data here is synthetic (random latents and text embeddings, a fixed small set), which is
enough to check the training loop; real distillation feeds VAE latents of images and the text
encoder's embeddings of their captions.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
from tqdm.auto import tqdm

import mmfast
from mmfast import cli
from mmfast.models.linfusion import LinFusion, LinFusionDistiller


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tiny", action="store_true", help="a tiny random UNet (no files needed)")
    source.add_argument("--unet", help="local diffusers UNet2DConditionModel directory")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps (default 20)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    parser.add_argument("--batch-size", "--batch", type=int, default=2, help="samples per step (default 2)")
    parser.add_argument("--batches", type=int, default=1, help="size of the fixed synthetic data set, in batches")
    parser.add_argument("--mid-dim-scale", type=int, default=None, help="MLP width C // s (16 for SD-XL)")
    parser.add_argument("--init-from-unet", action="store_true", help="start q/k/v/out from the UNet's attn1")
    parser.add_argument("--no-denoise", action="store_true",
                        help="drop the denoising term: teacher and attn1 terms only (target=None)")
    cli.add_device_arguments(parser, default="cpu")
    parser.add_argument("--output", "--save", default=None, metavar="DIR",
                        help="folder for the trained LinFusion checkpoint (save_pretrained; default: not saved)")
    parser.add_argument("--seed", type=int, default=0, help="torch seed of the weights and data (default 0)")
    args = parser.parse_args()
    cli.require_local_dir(parser, "--unet", args.unet, "a diffusers UNet2DConditionModel")
    cli.require_positive(parser, steps=args.steps, lr=args.lr, batch_size=args.batch_size, batches=args.batches,
                         mid_dim_scale=args.mid_dim_scale)
    cli.check_device(parser, args.device, args.backend)
    args.output = cli.check_output(parser, args.output, kind="folder")
    return args


def load_unet(args):
    if args.tiny:
        from mmfast.testing.tiny_diffusers import tiny_unet

        return tiny_unet(seed=args.seed)
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(args.unet)


def synthetic_batches(unet, args, scheduler):
    """A fixed set of (noisy latents, timesteps, text embeddings, noise, UNet keyword arguments)
    batches; an SD-XL UNet also gets its added conditions (pooled text embeddings and the size /
    crop time ids of an uncropped image at the UNet's native size)."""
    generator = torch.Generator().manual_seed(args.seed)
    size, channels = unet.config.sample_size, unet.config.in_channels
    batches = []
    for _ in range(args.batches):
        latents = torch.randn(args.batch_size, channels, size, size, generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch_size,), generator=generator)
        text = torch.randn(args.batch_size, 77, unet.config.cross_attention_dim, generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        extra = {}
        if unet.config.get("addition_embed_type") == "text_time":  # SD-XL
            pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
            pixels = size * 8  # the VAE's factor
            extra["added_cond_kwargs"] = {
                "text_embeds": torch.randn(args.batch_size, pooled, generator=generator).to(args.device),
                "time_ids": torch.tensor([[pixels, pixels, 0, 0, pixels, pixels]] * args.batch_size,
                                         dtype=torch.float32).to(args.device)}
        batches.append(tuple(t.to(args.device) for t in (noisy, timesteps, text, noise)) + (extra,))
    return batches


def describe_backend(device) -> str:
    backend = mmfast.get_backend()
    if backend == "auto":
        native = mmfast._backend.native_available("linear_attention", torch.device(device))
        return "auto (native)" if native else "auto (no kernel)"
    return backend


def main():
    args = parse_args()
    if args.backend:
        mmfast.set_backend(args.backend)
    from diffusers import DDPMScheduler

    torch.manual_seed(args.seed)
    unet = load_unet(args).to(args.device)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                              beta_start=0.00085, beta_end=0.012)
    try:
        linfusion = LinFusion.construct_for(unet, mid_dim_scale=args.mid_dim_scale,
                                            init_from_unet=args.init_from_unet, load_pretrained=False)
    except ValueError as error:  # e.g. a --mid-dim-scale that does not divide the UNet's channels
        print(f"linfusion_distill.py: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None  # an argument error: argparse's status
    distiller = LinFusionDistiller(unet, linfusion)
    optimizer = torch.optim.AdamW(linfusion.parameters(), lr=args.lr, weight_decay=0.0)
    batches = synthetic_batches(unet, args, scheduler)
    print(f"LinFusion: {len(linfusion.specs)} attn1 layers, "
          f"{sum(p.numel() for p in linfusion.parameters()) / 1e6:.3f} M trainable parameters, "
          f"mmfast backend {describe_backend(args.device)}")

    history, part_history = [], []
    start = time.perf_counter()
    bar = tqdm(range(args.steps), desc="distilling", unit="step")
    for step in bar:
        noisy, timesteps, text, noise, extra = batches[step % len(batches)]
        loss, parts = distiller(noisy, timesteps, text, target=None if args.no_denoise else noise, **extra)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append(loss.item())
        part_history.append({name: float(value) for name, value in parts.items() if value is not None})
        bar.set_postfix(loss=f"{loss.item():.5f}", **{"attn1" if name == "feature" else name: f"{value:.5f}"
                                                       for name, value in part_history[-1].items()})
    elapsed = time.perf_counter() - start

    window = max(1, min(5, len(history) // 2))
    first, last = sum(history[:window]) / window, sum(history[-window:]) / window
    steps = f"{window} step" + ("s" if window > 1 else "")
    print(f"mean loss of the first {steps} {first:.5f} -> last {steps} {last:.5f} "
          f"({elapsed:.1f} s, {elapsed / max(1, args.steps) * 1e3:.0f} ms/step)")
    moves = {name: (sum(p[name] for p in part_history[:window]) / window,
                    sum(p[name] for p in part_history[-window:]) / window) for name in part_history[0]}
    print("  per term: " + ", ".join(f"{'attn1' if name == 'feature' else name} {a:.5f} -> {b:.5f}"
                                     for name, (a, b) in moves.items()))
    rose = [("attn1" if name == "feature" else name) for name, (a, b) in moves.items() if name != "denoise" and b > a]
    if rose and not args.no_denoise:
        print(f"  ({', '.join(rose)} rose while the total fell: the denoising term dominates the total, and with a "
              "random tiny teacher\n   the student fits the noise better by drifting from the teacher; "
              "--no-denoise trains on the distillation terms alone)")
    if args.output:
        linfusion.save_pretrained(args.output)
        print(f"saved LinFusion checkpoint to {args.output}")
    else:
        print("the trained LinFusion was not saved (no --output DIR)")
    if args.steps < 2:
        print("one step: no later loss to compare it with")
    elif not last < first:
        raise SystemExit("the loss did not decrease")
    elif rose and args.no_denoise:
        raise SystemExit(f"distillation term(s) {', '.join(rose)} did not decrease")


if __name__ == "__main__":
    main()
