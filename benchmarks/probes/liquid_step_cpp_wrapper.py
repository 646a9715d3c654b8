"""Probe (2026-12-05): a Llama-138M batch-1 decode step (the CPU target's model, fp32, weights on
huge pages) compiled two ways in one process: inductor's default Python wrapper and its C++
wrapper (options={"cpp_wrapper": True}, which DecodeStep uses on the CPU since then). Each round
runs one step of each, every step followed by a read of the step's floor bytes; prints the
median step time, the median step / read ratio, and the median per-round ratio of the two steps.
Run: PYTHONPATH=python .venv/bin/python benchmarks/probes/liquid_step_cpp_wrapper.py [rounds=80]"""
import statistics
import sys
import tempfile
import time

import torch
import transformers

from mmfast.memory import huge_page_empty
from mmfast.models.liquid import LiquidLM


def llama_138m(directory):
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                      num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=2048,
                                      tie_word_embeddings=True, pad_token_id=0)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(directory, safe_serialization=True)
    weights = sum(p.numel() * 4 for name, p in hf.named_parameters() if "embed_tokens" not in name)
    return LiquidLM.from_pretrained(directory), weights + config.vocab_size * config.hidden_size * 4


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 80
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as directory:
        lm, floor_bytes = llama_138m(directory)
    lm.setup_caches(1, 32 + 3 * rounds + 8)
    floor = huge_page_empty((floor_bytes // 4,)).fill_(1)

    def decode(tokens):
        return lm.decode_step(tokens)[:, -1]

    variants = {"python wrapper": torch.compile(decode, fullgraph=True, dynamic=False),
                "cpp_wrapper": torch.compile(decode, fullgraph=True, dynamic=False, options={"cpp_wrapper": True})}
    steps = {name: [] for name in variants}
    ratios = {name: [] for name in variants}
    with torch.inference_mode():
        token = lm.prefill(torch.randint(3, 32000, (1, 32))).argmax(-1, keepdim=True)
        for name, step in variants.items():
            start = time.perf_counter()
            token = step(token).argmax(-1, keepdim=True)
            print(f"{name}: first call (compiles) {time.perf_counter() - start:.1f} s", flush=True)
        for _ in range(rounds):
            for name, step in variants.items():
                start = time.perf_counter()
                token = step(token).argmax(-1, keepdim=True)
                middle = time.perf_counter()
                floor.sum()
                steps[name].append(middle - start)
                ratios[name].append((middle - start) / (time.perf_counter() - middle))
    for name in variants:
        print(f"{name}: step {1e3 * statistics.median(steps[name]):.2f} ms, step / read "
              f"{statistics.median(ratios[name]):.3f}")
    per_round = statistics.median(a / b for a, b in zip(steps["cpp_wrapper"], steps["python wrapper"]))
    print(f"cpp_wrapper / python wrapper, per round: {per_round:.3f}")


if __name__ == "__main__":
    main()
