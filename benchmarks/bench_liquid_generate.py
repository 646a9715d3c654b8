"""Whole decode steps of Liquid's LM: mmfast (LiquidLM on the decode ops, static cache) vs
transformers' generate with its dynamic cache (the target's baseline) and its static cache
(cache_implementation="static", eager), with the same weights,
greedy, measured in the same run; and the step's bandwidth floor.

CPU (2 cores): a ~138M-parameter Llama (hidden 768, 12 layers, 12 heads, FFN 3072, vocabulary
32,000, tied head) in fp32 at batch 1 and 8, prompts of 32 tokens. GPU: Liquid-7B's shape
(Gemma-7B: 28 layers, hidden 3072, 16 heads of 256, FFN 24,576) with random bf16 weights at
batch 8 (4 images with CFG), image-head logits only.

mmfast runs its decode step through torch.compile (generate_text(compile=True), gpt-fast's
recipe; the compilation is excluded as a warm-up) and also eagerly (column mmfast_eager).
Time per step = (time of N2 new tokens - time of N1) / (N2 - N1): prefill cancels out. The
floor of one step is the bytes it must read (weights, the head, the KV cache up to the step) over
the measured copy bandwidth (CPU) or the datasheet HBM bandwidth (GPU). The CPU batch-1 target
is judged paired: the median over 39 pairs of (one decode step's time / the time of reading the
floor's bytes right after it, on transparent huge pages as LiquidLM.from_pretrained puts the
weights of 2 MiB and more), because
this VM's bandwidth drifts by tens of percent between a floor measured once and the step.
"""
from __future__ import annotations

import statistics
import time

import pytest
import torch

from mmfast.memory import huge_page_empty, huge_pages_enabled
from mmfast.models.liquid import VQGAN, DecodeStep, LiquidLM, LiquidLMConfig, VQGANConfig, generate_images, generate_text

from _utils import bench_device, is_h200, median_ms, peak_bandwidth, record_metrics, synchronize

DEVICE = bench_device()
ON_GPU = DEVICE.type == "cuda"
PROMPT = 32
STEPS = (8, 40) if not ON_GPU else (16, 144)
CPU_FLOOR_TARGET = 1.25   # batch-1 step within 1.25x of its bandwidth floor
CPU_BATCH8_TARGET = 2.0   # batch-8 tokens/s over transformers generate
GPU_FLOOR_TARGET = 1.25   # Liquid-7B step at batch 8 under a CUDA graph
GPU_END_TO_END_TARGET_S = 5.0  # 4 images at 512 px: prompt -> 1024 image tokens each (CFG) -> VQGAN decode


def llama_138m():
    """The issue's "~134M-parameter" Llama config (hidden 768, 12 layers): 138M parameters as built."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                      num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=2048,
                                      tie_word_embeddings=True, attn_implementation="sdpa", pad_token_id=0,
                                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # spread the logits so greedy tokens are not near-ties
        model.model.embed_tokens.weight.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    if ON_GPU:
        pytest.skip("the GPU benchmark times Liquid-7B's shape (test_liquid_7b_step)")
    hf = llama_138m()
    directory = tmp_path_factory.mktemp("llama138m")
    hf.save_pretrained(directory, safe_serialization=True)
    return hf, LiquidLM.from_pretrained(str(directory))


def _seconds(fn) -> float:
    synchronize(DEVICE)
    start = time.perf_counter()
    result = fn()
    synchronize(DEVICE)
    return time.perf_counter() - start, result


def step_ms(generate, repeats=3):
    """(median ms per decode step, tokens of the longer run) from runs of STEPS[0] and STEPS[1] new
    tokens, after one warm-up run of each (compilation, recompilation, first-touch allocations:
    a slow untimed run once pulled two of three short runs past the long ones, a negative step).
    Raises AssertionError when the step still comes out <= 0 (a disturbed run, not a result)."""
    generate(STEPS[0]), generate(STEPS[1])
    short, long_ = [], []
    tokens = None
    for _ in range(repeats):
        short.append(_seconds(lambda: generate(STEPS[0]))[0])
        seconds, tokens = _seconds(lambda: generate(STEPS[1]))
        long_.append(seconds)
    short.sort(), long_.sort()
    ms = 1e3 * (long_[repeats // 2] - short[repeats // 2]) / (STEPS[1] - STEPS[0])
    assert ms > 0, (f"a decode step came out at {ms:.2f} ms: runs of {STEPS[0]} new tokens took {short} s, "
                    f"of {STEPS[1]} {long_} s; the machine was too busy to time this (rerun)")
    return ms, tokens


def weight_bytes(model: torch.nn.Module, head_rows: int) -> int:
    """Bytes a step reads: every matrix but the embedding table, plus the head's rows."""
    total = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if "embed_tokens" not in name)
    embed = model.model.embed_tokens.weight
    return total + head_rows * embed.shape[1] * embed.element_size()


@pytest.mark.parametrize("batch", [1, 8])
def test_generate_step(benchmark, models, batch):
    hf, lm = models
    generator = torch.Generator().manual_seed(batch)
    prompts = torch.randint(3, 32000, (batch, PROMPT), generator=generator)
    mask = torch.ones_like(prompts)
    lm.setup_caches(batch, PROMPT + STEPS[1] + 1)

    def mmfast_generate(n, compile=True):
        return generate_text(lm, prompts, attention_mask=mask, max_new_tokens=n, compile=compile)

    def hf_generate(n, **cache):
        out = hf.generate(prompts, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          pad_token_id=0, **cache)
        return out[:, PROMPT:]

    with torch.no_grad():
        mmfast_ms, mmfast_tokens = step_ms(mmfast_generate)  # its warm-up compiles the step
        eager_ms, _ = step_ms(lambda n: mmfast_generate(n, compile=False))
        hf_ms, hf_tokens = step_ms(hf_generate)
        static_ms, static_tokens = step_ms(lambda n: hf_generate(n, cache_implementation="static"))
    benchmark.pedantic(lambda: mmfast_generate(STEPS[0]), rounds=1, iterations=1)
    identical = torch.equal(mmfast_tokens, hf_tokens) and torch.equal(mmfast_tokens, static_tokens)
    config = lm.config
    kv_bytes = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4 * batch * (
        PROMPT + sum(STEPS) // 2)
    floor_bytes = weight_bytes(hf, config.vocab_size) + kv_bytes
    bandwidth, _ = peak_bandwidth(DEVICE)
    floor_ms = 1e3 * floor_bytes / bandwidth
    extra = {}
    if batch == 1:
        with torch.no_grad():  # in the cache set up above (PROMPT + STEPS[1] + 1 tokens): no recompilation
            ratio, ratios, paired_step_ms = paired_floor_ratio(lm, prompts, floor_bytes, pairs=STEPS[1] - 1)
        target = f"<= {CPU_FLOOR_TARGET}x the floor, paired ({floor_ms:.1f} ms unpaired)"
        met = ratio <= CPU_FLOOR_TARGET
        extra = dict(paired_floor_ratio=round(ratio, 3), unpaired_floor_ratio=round(mmfast_ms / floor_ms, 3),
                     paired_floor_ratio_quartiles=[round(ratios[len(ratios) * q // 4], 3) for q in (1, 3)],
                     paired_step_ms=round(paired_step_ms, 2), paired_floor_on_huge_pages=huge_pages_enabled(), thp_mode=thp_mode(),
                     # the graded step is the model's (DecodeStep + argmax); generate_text's loop adds its own
                     # work (the sampler call, bookkeeping): their ratio says how much, unpaired
                     generate_over_model_step=round(mmfast_ms / paired_step_ms, 3))
    else:
        target, met = f">= {CPU_BATCH8_TARGET}x transformers tokens/s", hf_ms / mmfast_ms >= CPU_BATCH8_TARGET
    record_metrics(benchmark, op="liquid_lm.decode_step", shape=f"llama-138M B={batch} prompt={PROMPT}", device=DEVICE,
                   dtype=torch.float32,
                   times={"mmfast": mmfast_ms, "transformers_generate": hf_ms,
                          "transformers_static_cache": static_ms, "mmfast_eager": eager_ms},
                   floor_bytes=floor_bytes, items=(batch, "tokens"), target=target, target_met=met and identical,
                   identical_greedy_tokens=identical, floor_ms=round(floor_ms, 2), **extra)


def thp_mode() -> str:
    """The kernel's transparent huge page mode ("always", "madvise", "never"), or "unknown"."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "unknown"


def paired_floor_ratio(lm, prompts, floor_bytes, pairs):
    """(median, sorted list of the ratio step time / floor-read time, median step ms) over `pairs`
    pairs, each one compiled decode step (DecodeStep + a greedy argmax: generate_text's step
    without its sampler call) followed at once by a read of floor_bytes (a sum over a buffer that
    size, far past the caches): the CPU target's figure. Each pair spans ~30 ms, well inside the
    drifts of this VM's bandwidth (35-65 GB/s) that separate a floor measured once from a step
    timed later. The buffer is on transparent huge pages, as from_pretrained puts the weights: a
    read over 4 KiB pages is 4-18% slower on the 2-core AMD EPYC VM and would flatter the step."""
    numel = floor_bytes // 4
    buffer = (huge_page_empty((numel,)) if huge_pages_enabled() else torch.empty(numel)).fill_(1)
    step = DecodeStep(lm, compile=True)
    token = lm.prefill(prompts).argmax(-1, keepdim=True)
    buffer.sum()
    steps, reads = [], []
    for _ in range(pairs + 1):
        start = time.perf_counter()
        token = step(token).argmax(-1, keepdim=True)
        middle = time.perf_counter()
        buffer.sum()
        steps.append(middle - start)
        reads.append(time.perf_counter() - middle)
    steps, reads = steps[1:], reads[1:]  # the first step pays for the compiled function's first call
    ratios = sorted(a / b for a, b in zip(steps, reads))
    return statistics.median(ratios), ratios, 1e3 * statistics.median(steps)


@pytest.mark.skipif(not ON_GPU, reason="Liquid-7B's shape needs a GPU (16 GB of bf16 weights)")
def test_liquid_7b_step(benchmark):
    """One decode step of Liquid-7B's shape at batch 8 (4 images with CFG), image-head logits only,
    under the CUDA graph of generate_images' DecodeStep, against its bandwidth floor."""
    from mmfast.models.liquid.generate import DecodeStep

    with torch.device(DEVICE):
        lm = LiquidLM(LiquidLMConfig()).to(torch.bfloat16).eval()  # the defaults: Liquid-7B
    batch, context = 8, 40 + 512
    lm.setup_caches(batch, context + 64)
    rows = slice(256000, 264192)
    with torch.no_grad():
        lm.prefill(torch.randint(0, 256000, (batch, context), device=DEVICE))
        step = DecodeStep(lm, rows)
        tokens = torch.randint(256000, 264192, (batch, 1), device=DEVICE)
        for _ in range(3):
            step(tokens)
        assert step.graph is not None, "DecodeStep fell back to eager: this would time no CUDA graph"
        step_time = median_ms(lambda: step(tokens), DEVICE, warmup=2, repeats=50)  # a median, not a mean
    benchmark.pedantic(lambda: step(tokens), rounds=3, iterations=1)
    config = lm.config
    kv_bytes = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 2 * batch * (context + 32)
    floor_bytes = weight_bytes(lm, rows.stop - rows.start) + kv_bytes
    # The floor is the datasheet's (4.8 TB/s on an H200: its "about 4.1 ms" at 1.25x); the
    # measured copy bandwidth's, a looser one (about 4.1 TB/s), is reported beside it. No
    # datasheet figure for this GPU: the measured floor grades, and the row says so.
    measured, measured_source = peak_bandwidth(DEVICE, measured=True)
    sheet, sheet_source = peak_bandwidth(DEVICE)
    bandwidth, source = (sheet, sheet_source) if sheet else (measured, measured_source)
    floor_ms = 1e3 * floor_bytes / bandwidth
    record_metrics(benchmark, op="liquid_lm.decode_step", shape=f"liquid-7b B={batch} context={context}",
                   device=DEVICE, dtype=torch.bfloat16, times={"mmfast": step_time}, floor_bytes=floor_bytes,
                   items=(batch, "tokens"), target=f"<= {GPU_FLOOR_TARGET}x the floor ({floor_ms:.2f} ms, {source})",
                   target_met=step_time <= GPU_FLOOR_TARGET * floor_ms if is_h200(DEVICE) else None,  # the H200's target
                   floor_ms=round(floor_ms, 2),
                   floor_bandwidth=source, measured_copy_floor_ms=round(1e3 * floor_bytes / measured, 2))


@pytest.mark.skipif(not ON_GPU, reason="Liquid-7B's shape needs a GPU (16 GB of bf16 weights)")
def test_liquid_7b_four_images_end_to_end(benchmark):
    """Issue 9's end-to-end target: 4 images at 512 px (1024 image tokens each, CFG 7: 8 rows, the
    eval's sampling settings) from a 40-token prompt, then the Chameleon VQGAN decode, under 5 s.
    Random weights of Liquid-7B's (bf16) and the VQGAN's (fp32, as examples/liquid_generate.py)
    shapes. The first call (cuBLAS and allocator warm-up) is not timed; every timed call includes
    the prefill, one eager step and the CUDA-graph capture of its own DecodeStep, as a user's."""
    with torch.device(DEVICE):
        lm = LiquidLM(LiquidLMConfig()).to(torch.bfloat16).eval()
        vqgan = VQGAN(VQGANConfig()).eval()
    generator = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(3, 256000, (40,), generator=generator).tolist()
    uncond_ids = [2, 3, 4]

    def end_to_end():
        codes = generate_images(lm, prompt_ids, uncond_ids=uncond_ids, num_images=4, image_tokens=1024, seed=0,
                                progress=False)
        with torch.no_grad():
            return vqgan.decode(codes)

    images = end_to_end()  # warm-up
    assert images.shape == (4, 3, 512, 512), images.shape
    times = []
    for _ in range(2):
        synchronize(DEVICE)
        start = time.perf_counter()
        end_to_end()
        synchronize(DEVICE)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # the row's time is the median above
    record_metrics(benchmark, op="liquid.generate_images+vqgan.decode", shape="liquid-7b 4 images 512px CFG 7",
                   device=DEVICE, dtype=torch.bfloat16, times={"mmfast": 1e3 * seconds}, items=(4, "images"),
                   target=f"4 images at 512 px in under {GPU_END_TO_END_TARGET_S:g} s (Liquid: 10-30 s per image)",
                   target_met=seconds < GPU_END_TO_END_TARGET_S, seconds_per_round=[round(t, 2) for t in times])
