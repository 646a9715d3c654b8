"""Liquid's LM (mmfast.models.liquid.LiquidLM) and its generation loops against transformers.

Tiny random LlamaForCausalLM (GQA, with and without llama3 rope scaling, tied and untied),
GemmaForCausalLM (MHA, as Liquid_V1_7B) and Gemma2ForCausalLM (GQA, sliding window, softcaps)
are built here in fp32 with eager attention, saved with save_pretrained (one file and shards)
and loaded with LiquidLM.from_pretrained. Nothing is downloaded. CPU only.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import warnings
import weakref

import pytest
import torch

import mmfast
import mmfast.memory
from mmfast.models.liquid import (DecodeStep, LiquidLM, LiquidLMCheckpointError, LiquidLMConfig, generate_images,
                                  generate_text)
from mmfast.models.liquid.generate import compile_options
from mmfast.reference import sample_probs_ref
from mmfast.testing.tiny_liquid import tiny_liquid_lm

from _utils import HAS_TRITON, TRITON_DEVICE

transformers = pytest.importorskip("transformers")

VOCAB = 272  # 256 "text" tokens + 16 "image" codes
IMAGE_START, IMAGE_CODES = 256, 16
PROMPT_LENGTHS = (11, 4, 8)  # a left-padded batch of different lengths
KINDS = ("llama", "llama3", "gemma", "gemma2")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The models are tiny: one intra-op thread is as fast, and far faster when other jobs
    compete for the 2 cores (OpenMP threads then wait on each other at every small op)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _hf_model(kind: str):
    """A tiny random transformers causal LM, fp32, eager attention, weights drawn so that greedy
    decoding does not collapse to one token."""
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=256, attn_implementation="eager",
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    elif kind == "llama3":  # llama3 rope scaling with a short original context so that all three bands occur
        scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 32}
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, rope_scaling=scaling,
                                                                       rope_theta=500000.0, tie_word_embeddings=True))
    elif kind == "gemma":  # MHA like Gemma-7B
        model = transformers.GemmaForCausalLM(transformers.GemmaConfig(**{**common, "num_key_value_heads": 4}))
    else:
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**common, sliding_window=6,
                                                                         query_pre_attn_scalar=24))
    generator = torch.Generator().manual_seed(KINDS.index(kind))
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = 0.1 if p.dim() == 1 else (0.05 if "embed" in name and kind.startswith("gemma") else 0.3)
            p.copy_(torch.randn(p.shape, generator=generator) * std)
            if p.dim() == 1 and kind.startswith("llama"):
                p.add_(1.0)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{kind: (transformers model, checkpoint directory)}; gemma2 is saved in shards."""
    out = {}
    for kind in KINDS:
        model = _hf_model(kind)
        directory = tmp_path_factory.mktemp(kind)
        model.save_pretrained(directory, safe_serialization=True,
                              **({"max_shard_size": "40KB"} if kind == "gemma2" else {}))
        out[kind] = (model, directory)
    return out


def _left_padded_batch(seed=0, lengths=PROMPT_LENGTHS):
    """(input_ids, attention_mask) (B, S), left-padded with pad id 0, tokens in [3, 256)."""
    generator = torch.Generator().manual_seed(seed)
    seq = max(lengths)
    ids = torch.randint(3, IMAGE_START, (len(lengths), seq), generator=generator)
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for b, length in enumerate(lengths):
        mask[b, seq - length:] = 1
    return ids * mask, mask


def _right_padded(ids, mask):
    lengths = mask.sum(1)
    out = torch.zeros_like(ids)
    for b, length in enumerate(lengths.tolist()):
        out[b, :length] = ids[b, ids.shape[1] - length:]
    return out, lengths


# --- loading and logits -------------------------------------------------------------------------------


def test_sharded_checkpoint_and_tied_head(checkpoints):
    _, directory = checkpoints["gemma2"]
    assert os.path.isfile(directory / "model.safetensors.index.json")
    model = LiquidLM.from_pretrained(directory)
    assert model.lm_head is None and model.config.sliding_layers == (True, False)
    hf = checkpoints["gemma2"][0]
    for name, p in hf.state_dict().items():
        if name != "lm_head.weight":
            torch.testing.assert_close(model.state_dict()[name], p, rtol=0, atol=0)
    assert LiquidLM.from_pretrained(checkpoints["llama"][1]).lm_head is not None
    assert LiquidLM.from_pretrained(checkpoints["llama3"][1]).lm_head is None
    bf16 = LiquidLM.from_pretrained(checkpoints["llama3"][1], dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and bf16.inv_freq.dtype == torch.float32  # RoPE stays fp32
    assert model.to(torch.float16).inv_freq.dtype == torch.float32


def test_config_reads_transformers_4_files():
    """config.json as older transformers wrote it (Liquid_V1_7B: transformers 4.39, Gemma's legacy
    hidden_act "gelu", rope_theta / rope_scaling at the top level)."""
    gemma = LiquidLMConfig.from_hf({"model_type": "gemma", "vocab_size": 264192, "hidden_size": 3072,
                                    "intermediate_size": 24576, "num_hidden_layers": 28, "num_attention_heads": 16,
                                    "num_key_value_heads": 16, "head_dim": 256, "hidden_act": "gelu",
                                    "hidden_activation": None, "rope_theta": 10000.0, "rope_scaling": None})
    assert gemma == LiquidLMConfig()  # the defaults are Liquid_V1_7B's
    llama = LiquidLMConfig.from_hf({"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
                                    "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 64,
                                    "rope_theta": 5e5, "rope_scaling": {"type": "llama3", "factor": 8.0,
                                                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0}})
    assert (llama.num_key_value_heads, llama.head_dim, llama.hidden_act, llama.tie_word_embeddings) == (2, 4, "silu",
                                                                                                          False)
    assert llama.rope_theta == 5e5 and llama.rope_scaling["original_max_position_embeddings"] == 64
    # the activation as transformers 5 reads it: Gemma-2 takes hidden_activation as written (no
    # "gelu" -> tanh remap; mmfast remapped it, 1.7e-4 off transformers), Gemma hidden_act
    base = {"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2,
            "num_attention_heads": 2}
    assert LiquidLMConfig.from_hf({**base, "model_type": "gemma2", "hidden_activation": "gelu"}).hidden_act == "gelu"
    assert LiquidLMConfig.from_hf({**base, "model_type": "gemma", "hidden_act": "gelu",
                                   "hidden_activation": "gelu"}).hidden_act == "gelu_pytorch_tanh"
    with pytest.raises(ValueError, match="the config has no intermediate_size"):  # was a bare KeyError
        LiquidLMConfig.from_hf({k: v for k, v in {**base, "model_type": "llama"}.items() if k != "intermediate_size"})


@pytest.mark.parametrize("kind", ["llama3", "gemma", "gemma2"])
def test_bfloat16_error_is_like_transformers(checkpoints, kind):
    """bf16 rounding differs in order from transformers' eager bf16 (not bitwise equal), so the
    check is that our bf16 error against fp32 is of the size of transformers' own."""
    hf, directory = checkpoints[kind]
    ids, mask = _left_padded_batch()
    with torch.no_grad():
        fp32 = hf(input_ids=ids, attention_mask=mask).logits[:, -1].float()
        hf_bf16 = copy.deepcopy(hf).to(torch.bfloat16)(input_ids=ids, attention_mask=mask).logits[:, -1].float()
    model = LiquidLM.from_pretrained(directory, dtype=torch.bfloat16)
    model.setup_caches(3, 16)
    ours = model.prefill(*_right_padded(ids, mask))
    assert ours.dtype == torch.float32
    hf_error, our_error = float((hf_bf16 - fp32).abs().max()), float((ours - fp32).abs().max())
    assert our_error <= 2 * hf_error + 1e-3, (our_error, hf_error)
    model.decode_step(torch.tensor([[260], [261], [262]]))  # the bf16 decode path runs


@pytest.mark.parametrize("kind", KINDS)
def test_prefill_logits_match_transformers(checkpoints, kind):
    hf, directory = checkpoints[kind]
    model = LiquidLM.from_pretrained(directory)
    ids, mask = _left_padded_batch()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits
    tokens, lengths = _right_padded(ids, mask)
    seq = ids.shape[1]
    full = model(tokens, lengths)
    model.setup_caches(4, 64)
    last = model.prefill(tokens, lengths)
    for b, length in enumerate(lengths.tolist()):
        torch.testing.assert_close(full[b, :length], expected[b, seq - length:], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(last[b], expected[b, -1], rtol=1e-4, atol=1e-4)
    assert model.cache_seqlens.tolist() == [*lengths.tolist(), 0]


def test_image_head_reads_only_its_rows(checkpoints):
    model = LiquidLM.from_pretrained(checkpoints["llama"][1])
    tokens, lengths = _right_padded(*_left_padded_batch())
    rows = slice(IMAGE_START, IMAGE_START + IMAGE_CODES)
    model.setup_caches(3, 32)
    full = model.prefill(tokens, lengths)
    step_full = model.decode_step(torch.tensor([[260], [261], [262]]))
    with torch.no_grad():  # poison every other head row: the image logits must not see them
        model.lm_head.weight[:IMAGE_START] = float("nan")
        model.lm_head.weight[IMAGE_START + IMAGE_CODES:] = float("nan")
    image = model.prefill(tokens, lengths, logits_rows=rows)
    step_image = model.decode_step(torch.tensor([[260], [261], [262]]), logits_rows=rows)
    assert image.shape == (3, IMAGE_CODES) and step_image.shape == (3, 1, IMAGE_CODES)
    torch.testing.assert_close(image, full[:, rows], rtol=0, atol=0)
    torch.testing.assert_close(step_image, step_full[:, :, rows], rtol=0, atol=0)


# --- text generation ---------------------------------------------------------------------------------


def test_fused_projections_keep_transformers_names_and_biases(tmp_path):
    """q/k/v and gate/up live fused (qkv_proj, gate_up_proj: one decode_linear each); checkpoints
    with projection biases (Llama's attention_bias, mlp_bias) load, match transformers, and
    state_dict gives back transformers' names and tensors, which load into a fresh model."""
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, attention_bias=True, mlp_bias=True, attn_implementation="eager")).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model = LiquidLM.from_pretrained(tmp_path)
    attention = model.model.layers[0].self_attn
    assert attention.qkv_proj.weight.shape == (4 * 16 + 2 * 2 * 16, 64) and attention.qkv_proj.bias is not None
    assert model.model.layers[0].mlp.gate_up_proj.weight.shape == (2 * 96, 64)
    state = model.state_dict()
    expected = hf.state_dict()  # untied head: lm_head.weight on both sides
    assert set(state) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0)
    ids, mask = _left_padded_batch(seed=2)
    tokens, lengths = _right_padded(ids, mask)
    with torch.no_grad():
        reference = hf(input_ids=ids, attention_mask=mask).logits[:, -1]
        model.setup_caches(3, 32)
        torch.testing.assert_close(model.prefill(tokens, lengths), reference, rtol=1e-4, atol=1e-4)
        fresh = LiquidLM(model.config)
        fresh.load_state_dict(state)
        torch.testing.assert_close(fresh.model.layers[1].mlp.gate_up_proj.weight,
                                   model.model.layers[1].mlp.gate_up_proj.weight, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_matches_transformers_generate(checkpoints, kind):
    hf, directory = checkpoints[kind]
    model = LiquidLM.from_pretrained(directory)
    ids, mask = _left_padded_batch(seed=1)
    expected = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32, do_sample=False,
                           pad_token_id=0, eos_token_id=None)[:, ids.shape[1]:]
    got = generate_text(model, ids, attention_mask=mask, max_new_tokens=32)
    assert len(set(expected.flatten().tolist())) > 8, "degenerate test model"
    assert torch.equal(got, expected)
    b = 1  # the shortest prompt, alone, gives the same tokens as in the padded batch
    alone = ids[b:b + 1, mask[b] == 1]
    assert torch.equal(generate_text(model, alone, max_new_tokens=32), expected[b:b + 1])


def test_eos_stops_like_transformers(checkpoints):
    hf, directory = checkpoints["llama"]
    model = LiquidLM.from_pretrained(directory)
    ids, mask = _left_padded_batch(seed=1)
    greedy = generate_text(model, ids, attention_mask=mask, max_new_tokens=32)
    eos = int(greedy[0, 5])  # a token row 0 emits early
    expected = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32, do_sample=False, pad_token_id=0,
                           eos_token_id=eos)[:, ids.shape[1]:]
    got = generate_text(model, ids, attention_mask=mask, max_new_tokens=32, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, expected)
    # transformers' other spellings: a nested-list mask, a 0-d tensor eos
    same = generate_text(model, ids, attention_mask=mask.tolist(), max_new_tokens=32,
                         eos_token_id=torch.tensor(eos), pad_token_id=0)
    assert torch.equal(same, expected)


def test_seeded_sampling_is_reproducible(checkpoints):
    model = LiquidLM.from_pretrained(checkpoints["gemma2"][1])
    ids, mask = _left_padded_batch(seed=2)

    def run(seed):
        return generate_text(model, ids, attention_mask=mask, max_new_tokens=16, do_sample=True, temperature=1.5,
                             top_k=50, top_p=0.95, generator=torch.Generator().manual_seed(seed))

    first = run(0)
    assert torch.equal(first, run(0))
    assert not torch.equal(first, run(1))


def test_first_step_distribution_matches_transformers_processors(checkpoints):
    hf, directory = checkpoints["gemma2"]
    model = LiquidLM.from_pretrained(directory)
    ids, mask = _left_padded_batch(seed=3)
    temperature, top_k, top_p = 0.7, 40, 0.9
    with torch.no_grad():
        hf_logits = hf(input_ids=ids, attention_mask=mask).logits[:, -1].float()
    processors = transformers.LogitsProcessorList([transformers.TemperatureLogitsWarper(temperature),
                                                   transformers.TopKLogitsWarper(top_k),
                                                   transformers.TopPLogitsWarper(top_p)])
    hf_probs = processors(ids, hf_logits.clone()).softmax(-1).double()
    model.setup_caches(3, 16)
    logits = model.prefill(*_right_padded(ids, mask))
    probs = sample_probs_ref(logits, temperature, top_k, top_p)
    torch.testing.assert_close(probs, hf_probs, rtol=0, atol=1e-5)
    # draws of the sampler itself (the op generate_text calls) against transformers' probabilities
    draws = 4000
    tokens = mmfast.ops.sample(logits[:1].expand(draws, -1).contiguous(), temperature=temperature, top_k=top_k,
                               top_p=top_p, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(tokens, minlength=VOCAB).double()
    support = hf_probs[0] > 0
    assert counts[~support].sum() == 0
    expected = draws * hf_probs[0, support]
    chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
    dof = int(support.sum()) - 1
    p_value = float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                            torch.tensor(chi2 / 2, dtype=torch.float64)))
    assert dof > 3 and p_value > 1e-4, (chi2, dof, p_value)


class _InverseCdfDraw(transformers.LogitsProcessor):
    """The last processor of a greedy transformers generate that makes it a sampled one matched
    draw for draw to generate_text's: each step draws u = torch.rand(B) from `generator` (as
    mmfast.ops.sample does) and keeps only the token where the running sum of the processed
    probabilities, in index order, first exceeds u: greedy then picks that token."""

    def __init__(self, generator):
        self.generator = generator

    def __call__(self, input_ids, scores):
        probs = scores.double().softmax(-1)
        uniform = torch.rand((scores.shape[0],), generator=self.generator, dtype=torch.float32)
        token = (probs.cumsum(-1) <= uniform.double()[:, None]).sum(-1).clamp(max=scores.shape[1] - 1)
        return torch.full_like(scores, -float("inf")).scatter_(1, token[:, None], 0.0)


@pytest.mark.parametrize("kind", KINDS)
def test_sampled_generate_text_matches_transformers_generate_draw_for_draw(checkpoints, kind):
    """Every step of a seeded sampled run, not only the first: transformers' own generate (its
    cache, left-padding positions and warpers) with the same uniform draws gives the same tokens."""
    hf, directory = checkpoints[kind]
    model = LiquidLM.from_pretrained(directory)
    ids, mask = _left_padded_batch(seed=4)
    temperature, top_k, top_p, steps = 1.3, 40, 0.9, 24
    processors = transformers.LogitsProcessorList([
        transformers.TemperatureLogitsWarper(temperature), transformers.TopKLogitsWarper(top_k),
        transformers.TopPLogitsWarper(top_p), _InverseCdfDraw(torch.Generator().manual_seed(6))])
    expected = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                           logits_processor=processors, pad_token_id=0, eos_token_id=None)[:, ids.shape[1]:]
    got = generate_text(model, ids, attention_mask=mask, max_new_tokens=steps, do_sample=True,
                        temperature=temperature, top_k=top_k, top_p=top_p, generator=torch.Generator().manual_seed(6))
    greedy = generate_text(model, ids, attention_mask=mask, max_new_tokens=steps)
    assert len(set(expected.flatten().tolist())) > 16, "degenerate test model"
    assert not torch.equal(expected, greedy), "the draws changed nothing: not a sampled run"
    assert torch.equal(got, expected)


def test_bad_inputs_raise(checkpoints, tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory.*never a Hugging Face Hub id"):
        LiquidLM.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(TypeError, match=r"dtype must be a torch.dtype .* got 'bfloat16' \(torch.bfloat16\?\)"):
        LiquidLM.from_pretrained(tmp_path / "nowhere", dtype="bfloat16")
    model = tiny_liquid_lm("llama", vocab_size=64)
    with pytest.raises(TypeError, match="generate_images: num_images must be an int, got 2.0"):
        generate_images(model, [1, 2], num_images=2.0, image_tokens=4, cfg_scale=None, image_vocab_start=0,
                        image_vocab_size=8)
    with pytest.raises(TypeError, match="generate_text: max_new_tokens must be an int, got 2.5"):
        generate_text(model, torch.tensor([[1, 2]]), max_new_tokens=2.5)
    # found by a new-user trial: a float tensor was reported by its (fine) shape, a mask of another
    # batch as a padding fault
    with pytest.raises(ValueError, match=r"input_ids must be a \(B, S\) integer tensor, got torch.float32 of shape "
                       r"\(1, 2\)"):
        generate_text(model, torch.tensor([[1.0, 2.0]]), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"attention_mask must have input_ids' shape \(2, 2\), got \(1, 2\)"):
        generate_text(model, torch.tensor([[1, 2], [3, 4]]), attention_mask=torch.tensor([[1, 1]]), max_new_tokens=2)
    model.setup_caches(1, 8)
    for call in (model.forward, model.prefill):
        with pytest.raises(ValueError, match=r"token ids must be in \[0, 64\).*got ids in \[3, 64\]"):
            call(torch.tensor([[3, 64]]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        LiquidLM.from_pretrained(tmp_path / "empty")
    config = json.loads((checkpoints["llama"][1] / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    with pytest.raises(ValueError, match="unsupported model_type 'mistral'"):
        LiquidLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        LiquidLM.from_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    state = load_file(checkpoints["llama"][1] / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(LiquidLMCheckpointError, match="missing .*model.layers.1.mlp.up_proj.weight"):
        LiquidLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="rope type 'yarn'"):
        LiquidLMConfig.from_hf({**config, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}})

    model = tiny_liquid_lm("gemma", vocab_size=VOCAB)
    ids, mask = _left_padded_batch()
    with pytest.raises(ValueError, match="LEFT-padded"):
        generate_text(model, ids, attention_mask=mask.flip(1), max_new_tokens=2)
    with pytest.raises(RuntimeError, match="setup_caches"):
        tiny_liquid_lm("llama").decode_step(torch.zeros(1, 1, dtype=torch.long))
    kwargs = dict(image_vocab_start=IMAGE_START, image_vocab_size=IMAGE_CODES, progress=False)
    with pytest.raises(ValueError, match="square"):
        generate_images(model, [1, 5, 6], uncond_ids=[1, 7], image_tokens=15, **kwargs)
    with pytest.raises(ValueError, match="uncond_ids"):
        generate_images(model, [1, 5, 6], image_tokens=16, **kwargs)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        generate_images(model, [1, 5, 6], uncond_ids=[1, 7], image_tokens=16, image_vocab_start=IMAGE_START + 1,
                        image_vocab_size=IMAGE_CODES, progress=False)
    with pytest.raises(ValueError, match="logits_rows"):
        model(torch.zeros(1, 2, dtype=torch.long), logits_rows=slice(0, 2 * VOCAB))
    # found by a new-user trial: these fell through to IndexError / a reduction error / a late TypeError
    with pytest.raises(ValueError, match=rf"token ids must be in \[0, {VOCAB}\).*\[1, {VOCAB}\]"):
        generate_images(model, [1, VOCAB], uncond_ids=[1, 7], image_tokens=16, **kwargs)
    with pytest.raises(ValueError, match="token ids must be in"):
        generate_text(model, torch.tensor([[3, -1]]), max_new_tokens=1)
    with pytest.raises(ValueError, match="at least one row and one token"):
        generate_text(model, torch.zeros(0, 3, dtype=torch.long), max_new_tokens=1)
    with pytest.raises(ValueError, match="empty list"):
        generate_images(model, [], uncond_ids=[1, 7], image_tokens=16, **kwargs)
    with pytest.raises(ValueError, match="model's dtype and device .*torch.bfloat16"):
        model.setup_caches(2, 8, dtype=torch.bfloat16)
    model.setup_caches(2, 8, dtype=torch.float32, device="cpu")  # the model's own: fine


# --- image generation --------------------------------------------------------------------------------


def _liquid_loop_with_transformers(hf, prompt, uncond, num_images, steps, cfg_scale, sample):
    """Liquid's evaluation/inference_t2i.py loop on a transformers model: one left-padded batch of
    [prompt] * n + [uncond] * n, HF positions, a DynamicCache, CFG on the last logits, text logits
    masked to -inf, `sample(cfg_logits over the image rows)` -> codes, fed to both halves."""
    rows = [prompt] * num_images + [uncond] * num_images
    seq = max(map(len, rows))
    ids = torch.zeros(len(rows), seq, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        ids[b, seq - len(row):], mask[b, seq - len(row):] = torch.tensor(row), 1
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    codes = []
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        for step in range(steps):
            cond, uncond_logits = out.logits[:, -1].float().chunk(2)
            cfg = uncond_logits + (cond - uncond_logits) * cfg_scale
            code = sample(cfg[:, IMAGE_START:IMAGE_START + IMAGE_CODES])
            codes.append(code)
            if step + 1 == steps:
                break
            token = (code + IMAGE_START).repeat(2)[:, None]
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            positions = positions[:, -1:] + 1
            out = hf(input_ids=token, attention_mask=mask, position_ids=positions, past_key_values=out.past_key_values,
                     use_cache=True)
    return torch.stack(codes, dim=1)


PROMPT, UNCOND = [1, 17, 99, 42, 8, 150, 77, 3, 250], [1, 5, 6]


@pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning")
@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
def test_generate_images_matches_liquid_loop(checkpoints, greedy):
    hf, directory = checkpoints["gemma"]
    model = LiquidLM.from_pretrained(directory)
    num_images, steps, cfg_scale = 3, 16, 3.0
    temperature, top_k, top_p = (0.0, 0, 1.0) if greedy else (1.0, 8, 0.9)
    generator = torch.Generator().manual_seed(5)

    def sample(cfg_logits):  # the reference sampler with the same uniform draws as mmfast.ops.sample
        uniform = torch.rand(cfg_logits.shape[0], generator=generator)
        return mmfast.reference.sample_ref(cfg_logits, uniform, temperature, top_k, top_p)

    expected = _liquid_loop_with_transformers(hf, PROMPT, UNCOND, num_images, steps, cfg_scale, sample)
    codes = generate_images(model, PROMPT, uncond_ids=UNCOND, cfg_scale=cfg_scale, temperature=temperature,
                            top_k=top_k, top_p=top_p, num_images=num_images, image_tokens=steps, seed=5,
                            image_vocab_start=IMAGE_START, image_vocab_size=IMAGE_CODES, progress=False)
    assert codes.shape == (num_images, 4, 4)
    assert len(set(expected.flatten().tolist())) > 4, "degenerate test model"
    assert torch.equal(codes.flatten(1), expected)


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_generate_images_guides_only_above_scale_one_as_liquid(scale):
    """Liquid's scripts guide only `if guidance_scale > 1`: a scale <= 1 samples the conditional
    logits alone (no unconditional rows), the same codes as cfg_scale=None."""
    model = tiny_liquid_lm("gemma", vocab_size=256 + 64, seed=2)
    kwargs = dict(num_images=2, image_tokens=16, seed=3, image_vocab_start=256, image_vocab_size=64, progress=False)
    codes = generate_images(model, PROMPT, uncond_ids=UNCOND, cfg_scale=scale, **kwargs)
    assert model.cache_shape()[0] == 2  # no unconditional rows were prefilled
    assert torch.equal(codes, generate_images(model, PROMPT, cfg_scale=None, **kwargs))
    with pytest.raises(ValueError, match="cfg_scale must be finite"):  # not silently unguided
        generate_images(model, PROMPT, uncond_ids=UNCOND, cfg_scale=float("nan"), **kwargs)


def test_generate_images_pairs_share_tokens_without_padding():
    model = tiny_liquid_lm("gemma2", vocab_size=256 + 64, seed=1)
    num_images, image_tokens = 3, 64
    codes = generate_images(model, PROMPT, uncond_ids=UNCOND, num_images=num_images, image_tokens=image_tokens,
                            seed=0, image_vocab_start=256, image_vocab_size=64, progress=False)
    assert codes.shape == (num_images, 8, 8) and codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < 64
    steps = image_tokens - 1  # tokens fed back (the last code is not)
    lc, lu = len(PROMPT), len(UNCOND)
    assert model.cache_seqlens.tolist() == [lc + steps] * num_images + [lu + steps] * num_images
    assert model.cache_shape() == (2 * num_images, 256)  # lc + image_tokens, rounded up to 256 (one allocation)
    # layer 0's values depend on the token only (no RoPE): both rows of a pair were fed the same tokens
    v_cache = model.model.layers[0].self_attn.kv_cache.v_cache
    for b in range(num_images):
        # (equal up to the BLAS's row-dependent rounding; a different token differs by ~0.1)
        torch.testing.assert_close(v_cache[b, lc:lc + steps], v_cache[num_images + b, lu:lu + steps], rtol=0,
                                   atol=1e-5)
    again = generate_images(model, PROMPT, uncond_ids=UNCOND, num_images=num_images, image_tokens=image_tokens,
                            seed=0, image_vocab_start=256, image_vocab_size=64, progress=False)
    assert torch.equal(codes, again) and len(set(codes.flatten().tolist())) > 8


def test_compiled_decode_step_gives_the_same_tokens(tmp_path):
    """generate_text(compile=True) (torch.compile of the decode step) == eager, greedy."""
    model = tiny_liquid_lm("llama", vocab_size=VOCAB, seed=3)
    prompts = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    eager = generate_text(model, prompts, max_new_tokens=6)
    compiled = generate_text(model, prompts, max_new_tokens=6, compile=True)
    assert torch.equal(compiled, eager)
    assert torch.equal(generate_text(model, prompts, max_new_tokens=6, compile=True), eager)  # reused, no recompile
    # inductor options merged over mmfast's (the C++ wrapper on the CPU): a second compiled step
    assert compile_options(torch.device("cpu"), True) == {"cpp_wrapper": True}
    assert torch.equal(generate_text(model, prompts, max_new_tokens=6, compile={"cpp_wrapper": False}), eager)
    assert len(model._compiled_decode_steps) == 2
    lengths = model.cache_seqlens.clone()
    with pytest.raises(TypeError, match="compile must be True / False or a dict"):
        generate_text(model, prompts, max_new_tokens=2, compile="max-autotune")
    with pytest.raises(RuntimeError, match="not_an_inductor_option"):
        generate_text(model, prompts, max_new_tokens=2, compile={"not_an_inductor_option": 1})
    assert torch.equal(model.cache_seqlens, lengths)  # refused before the prefill
    # a copy decodes on its own weights: the compiled steps (closures over the original) stay behind
    twin = copy.deepcopy(model)
    assert "_compiled_decode_steps" not in twin.__dict__
    with torch.no_grad():
        twin.lm_head.weight.mul_(-1)
    assert torch.equal(generate_text(twin, prompts, max_new_tokens=6, compile=True),
                       generate_text(twin, prompts, max_new_tokens=6))
    assert torch.equal(generate_text(model, prompts, max_new_tokens=6, compile=True), eager)
    import pickle

    pickle.loads(pickle.dumps(model))  # a closure in the state made it unpicklable


def test_compiled_decode_step_falls_back_to_eager_at_the_recompile_limit():
    """Each new batch size recompiles the step (static shapes); past torch's recompile limit the
    fullgraph compile raised FailOnRecompileLimitHit and the generation died: now it warns and
    decodes eagerly. (Caches grow in steps of 256 tokens, so longer prompts alone do not recompile.)"""
    import torch._dynamo

    model = tiny_liquid_lm("llama", vocab_size=VOCAB, seed=3)
    prompts = torch.randint(3, VOCAB, (3, 5), generator=torch.Generator().manual_seed(0))
    options = {"cpp_wrapper": False}
    # torch's own patch (a monkeypatch of the config module hid the option from later compiles)
    with torch._dynamo.config.patch(recompile_limit=2):
        for batch in (1, 2):
            generate_text(model, prompts[:batch], max_new_tokens=2, compile=options)
        assert model.cache_shape()[1] == 256
        with pytest.warns(UserWarning, match="stopped recompiling the step .* decoding eagerly"):
            out = generate_text(model, prompts, max_new_tokens=3, compile=options)
    assert torch.equal(out, generate_text(model, prompts, max_new_tokens=3))


@pytest.mark.skipif(not mmfast.memory.huge_pages_enabled() or os.environ.get("THP_MEM_ALLOC_ENABLE", "0") != "0",
                    reason="needs Linux with transparent huge pages, MMFAST_CPU_HUGE_PAGES on, THP_MEM_ALLOC_ENABLE off")
def test_from_pretrained_puts_cpu_weights_on_huge_pages_with_the_same_tokens(tmp_path):
    """from_pretrained on the CPU moves weights of 2 MiB and more onto huge pages (the tied
    4096 x 256 embedding here); huge_pages=False leaves them; both give the same tokens."""
    config = transformers.LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=4, head_dim=64,
                                      tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path, safe_serialization=True)
    plain = LiquidLM.from_pretrained(tmp_path, huge_pages=False)
    model = LiquidLM.from_pretrained(tmp_path)
    assert plain.head_weight.data_ptr() % mmfast.memory.HUGE_PAGE_BYTES != 0
    assert model.head_weight.data_ptr() % mmfast.memory.HUGE_PAGE_BYTES == 0
    assert torch.equal(model.head_weight, plain.head_weight)
    prompts = torch.randint(3, 4096, (2, 5), generator=torch.Generator().manual_seed(0))
    assert torch.equal(generate_text(model, prompts, max_new_tokens=6), generate_text(plain, prompts, max_new_tokens=6))


@pytest.mark.parametrize("compile", [False, True])
def test_decode_step_runs_in_inference_mode_and_leaves_normal_tensors(compile):
    """DecodeStep runs under torch.inference_mode (its logits are inference tensors: no autograd
    dispatch per op call), its logits equal an eager decode_step's, and the tokens generate_text
    returns and the caches the step updated stay usable in place outside inference mode."""
    model = tiny_liquid_lm("llama", vocab_size=VOCAB, seed=3)
    model.setup_caches(2, 16)
    prompts = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    tokens = generate_text(model, prompts, max_new_tokens=4, compile=compile)
    assert not tokens.is_inference()
    tokens.add_(0)  # in place outside inference mode: refused on an inference tensor
    k_cache = model.model.layers[0].self_attn.kv_cache.k_cache
    assert not k_cache.is_inference() and not model.cache_seqlens.is_inference()
    lengths = model.cache_seqlens.clone()
    logits = DecodeStep(model, compile=compile)(tokens[:, -1:])
    assert logits.is_inference() and logits.shape == (2, VOCAB)
    assert torch.equal(model.cache_seqlens, lengths + 1)
    model.cache_seqlens.copy_(lengths)  # in place outside inference mode; the same token again, eagerly
    torch.testing.assert_close(logits, model.decode_step(tokens[:, -1:])[:, -1], rtol=1e-5, atol=1e-5)
    model.prefill(prompts)  # writes the caches in place outside inference mode
    # The step counts its tokens on the host, compiled too (which runs no Python check of its own):
    # 5 prompt tokens + 11 steps fill the 16 slots, the 12th is refused before any write.
    step, token = DecodeStep(model, compile=compile), tokens[:, -1:]
    for _ in range(11):
        step(token)
    lengths = model.cache_seqlens.clone()
    with pytest.raises(ValueError, match="do not fit"):
        step(token)
    assert torch.equal(model.cache_seqlens, lengths)
    alive = weakref.ref(step)
    del step
    assert alive() is None  # no reference cycle keeps a step (and a CUDA graph's pool) alive


def test_caches_made_under_inference_mode_are_remade_or_named_outside_it():
    """Found by a new-user trial: after one generate_text under torch.inference_mode(), every
    later call outside it failed with torch's bare "Inplace update to inference tensor" error
    (the caches, kept because they were large enough, were inference tensors)."""
    model = tiny_liquid_lm("llama", vocab_size=VOCAB, seed=3)
    assert not model.caches_need_inference_mode()  # no caches yet
    prompts = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        inside = generate_text(model, prompts, max_new_tokens=4)
    assert model.cache_seqlens.is_inference()
    outside = generate_text(model, prompts, max_new_tokens=4)  # remakes the caches
    assert torch.equal(inside, outside) and not model.cache_seqlens.is_inference()
    with torch.inference_mode():
        model.setup_caches(2, 16)
    with pytest.raises(RuntimeError, match="made under torch.inference_mode"):
        model.prefill(prompts)
    with torch.inference_mode():
        model.prefill(prompts)  # inside the mode they work as they are


def test_loader_and_generation_refuse_numbers_they_would_coerce(tmp_path):
    """Found by a new-user trial: dtype=torch.int8 failed deep in load_state_dict, float lengths
    were truncated (2.7 -> 2), and generate_images(top_k=50.0) was reported by sample."""
    model = tiny_liquid_lm("llama", vocab_size=VOCAB)
    with pytest.raises(TypeError, match="dtype must be a floating-point dtype"):
        LiquidLM.from_pretrained(tmp_path, dtype=torch.int8)
    model.setup_caches(2, 16)
    with pytest.raises(TypeError, match="lengths must be integers"):
        model.prefill(torch.randint(3, VOCAB, (2, 6)), torch.tensor([2.7, 6.0]))
    with pytest.raises(TypeError, match="generate_images: top_k must be an int, got 50.0"):
        generate_images(model, [1, 2], top_k=50.0, image_tokens=4, cfg_scale=None, image_vocab_start=0,
                        image_vocab_size=8)
    with pytest.raises(TypeError, match="generate_text: top_k must be an int"):
        generate_text(model, torch.randint(3, VOCAB, (1, 3)), max_new_tokens=2, top_k=5.0)
    images = dict(image_tokens=4, cfg_scale=None, image_vocab_start=0, image_vocab_size=8)
    for seed in (1.5, torch.tensor(1.5)):  # int() of either seeded 1
        with pytest.raises(TypeError, match="generate: seed must be an int"):
            generate_images(model, [1, 2], seed=seed, **images)
    with pytest.raises(TypeError, match="prompt_ids must be token ids, got the text 'a red fox': tokenize it first"):
        generate_images(model, "a red fox", **images)


def test_decode_step_refuses_to_overrun_the_cache():
    model = tiny_liquid_lm("llama", vocab_size=VOCAB)
    model.setup_caches(1, 6)
    model.prefill(torch.tensor([[5, 6, 7, 8, 9]]))
    model.decode_step(torch.tensor([[3]]))
    with pytest.raises(ValueError, match="setup_caches with a larger max_tokens"):
        model.decode_step(torch.tensor([[4]]))


def test_a_refused_decode_step_leaves_the_caches_and_the_count():
    """Out-of-range ids and S > 16 were refused after the host count (each bad call took a token
    of room for good), S > 16 after layer 0's cache was written; the ids as a bare IndexError."""
    model = tiny_liquid_lm("llama", vocab_size=VOCAB)
    model.setup_caches(2, 40)
    model.prefill(torch.tensor([[5, 6, 7, 8], [9, 10, 11, 3]]), torch.tensor([4, 3]))
    held, lengths = model.tokens_held, model.cache_seqlens.clone()
    keys = model.model.layers[0].self_attn.kv_cache.k_cache.clone()
    for tokens, match in ((torch.tensor([[VOCAB], [4]]), f"token ids must be in \\[0, {VOCAB}\\)"),
                          (torch.tensor([[-1], [4]]), "token ids must be in"),
                          (torch.full((2, 17), 4), "1 to 16 new tokens per row")):
        with pytest.raises(ValueError, match=match):
            model.decode_step(tokens)
        assert model.tokens_held == held and torch.equal(model.cache_seqlens, lengths)
        assert torch.equal(model.model.layers[0].self_attn.kv_cache.k_cache, keys)
    model.decode_step(torch.tensor([[4], [4]]))
    assert model.tokens_held == held + 1


def test_a_checkpoint_of_mixed_dtypes_loads_as_one(checkpoints, tmp_path):
    """fp32 norms in a bf16 checkpoint loaded as they were, then failed at the first call
    (decode_linear: all inputs must have the same dtype): cast to the config's dtype."""
    from safetensors.torch import save_file

    hf, directory = checkpoints["llama"]
    state = {k: v.contiguous() if "norm" in k else v.to(torch.bfloat16) for k, v in hf.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    config = {**json.loads((directory / "config.json").read_text()), "torch_dtype": "bfloat16", "dtype": "bfloat16"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = LiquidLM.from_pretrained(tmp_path)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    loaded.setup_caches(1, 8)
    assert loaded.prefill(torch.tensor([[5, 6, 7]])).dtype == torch.float32


def test_generation_past_the_trained_context_warns(checkpoints):
    """Found by a new-user trial: a checkpoint trained on 256 positions generated 600 tokens without a word."""
    model = LiquidLM.from_pretrained(checkpoints["llama"][1])
    assert model.config.max_position_embeddings == 256
    model.config = dataclasses.replace(model.config, max_position_embeddings=12)
    ids = torch.tensor([[5, 6, 7, 8]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate_text(model, ids, max_new_tokens=8)  # positions 0..11: within
    with pytest.warns(UserWarning, match=r"reaches position 12, past the model's trained context "
                      r"\(max_position_embeddings = 12\)"):
        generate_text(model, ids, max_new_tokens=9)


def test_truncated_shards_and_bad_configs_name_their_file(checkpoints, tmp_path):
    """Found by a new-user trial: a truncated model.safetensors (an interrupted download) raised
    safetensors' own error, which names no file, and a malformed config.json json's."""
    import shutil

    directory = tmp_path / "llama"
    shutil.copytree(checkpoints["llama"][1], directory)
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(LiquidLMCheckpointError, match="LiquidLM: .*model.safetensors is not a readable safetensors "
                       "file .*fetch it again"):
        LiquidLM.from_pretrained(directory)
    (directory / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="LiquidLM: .*config.json is not valid JSON"):
        LiquidLM.from_pretrained(directory)


def test_the_dtype_cast_releases_each_stored_tensor_before_the_next():
    """from_pretrained's cast held the stored and the cast state at once (twice the model)."""
    import weakref

    from mmfast.models.liquid.lm import cast_in_place

    class WatchedState(dict):
        def __setitem__(self, key, value):
            # every earlier key's stored tensor must be gone by the time this one is replaced
            earlier = list(stored)[:list(stored).index(key)]
            assert all(stored[name]() is None for name in earlier), key
            super().__setitem__(key, value)

    state = WatchedState({**{f"w{i}": torch.ones(4) for i in range(4)}, "ids": torch.arange(3)})
    stored = {name: weakref.ref(tensor) for name, tensor in state.items() if tensor.is_floating_point()}
    cast_in_place(state, torch.float16)
    assert [t.dtype for t in state.values()] == [torch.float16] * 4 + [torch.int64]
    assert all(ref() is None for ref in stored.values())


def test_prefill_empties_the_rows_it_does_not_fill():
    """A second, smaller prefill must not leave the first one's rows behind: decoding such a row
    starts from an empty cache, as on a fresh model (found by a new-user trial)."""
    model = tiny_liquid_lm("llama", vocab_size=VOCAB)
    model.setup_caches(2, 16)
    model.prefill(torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]]))
    model.prefill(torch.tensor([[5, 6, 7]]))
    assert model.cache_seqlens.tolist() == [3, 0]
    step = model.decode_step(torch.tensor([[13], [14]]))
    fresh = tiny_liquid_lm("llama", vocab_size=VOCAB)
    fresh.setup_caches(1, 16)
    torch.testing.assert_close(step[1], fresh.decode_step(torch.tensor([[14]]))[0], rtol=1e-5, atol=1e-5)


def test_frozen_weights_still_give_input_gradients():
    """Prompt tuning / LoRA: frozen weights, an input that requires grad (found in review)."""
    model = tiny_liquid_lm("llama", vocab_size=VOCAB).requires_grad_(False)
    hidden = torch.randn(1, 2, model.config.hidden_size, requires_grad=True)
    model.logits(hidden).sum().backward()
    assert hidden.grad is not None and bool(hidden.grad.abs().sum() > 0)


def test_generation_reports_rows_of_invalid_logits():
    model = tiny_liquid_lm("gemma", vocab_size=VOCAB)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="NaN, \\+inf or all -inf"):
        generate_text(model, torch.tensor([[5, 6, 7]]), max_new_tokens=3)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_generation_runs_on_the_triton_backend():
    """Every decode op through its Triton twin (the interpreter here); decode_linear has none and
    the model uses F.linear then (found in review)."""
    model = tiny_liquid_lm("llama", vocab_size=VOCAB, seed=2).to(TRITON_DEVICE)
    prompts = torch.randint(3, VOCAB, (2, 4), generator=torch.Generator().manual_seed(1)).to(TRITON_DEVICE)
    expected = generate_text(model, prompts, max_new_tokens=3)  # the native backend on the same device
    with mmfast.use_backend("triton"):
        tokens = generate_text(model, prompts, max_new_tokens=3)
    assert torch.equal(tokens, expected)


@pytest.mark.parametrize("model_type", ["llama", "gemma", "gemma2"])
def test_every_model_type_pickles(model_type):
    """A systems trial: Gemma's and Gemma-2's GELU was a lambda, so their models could not be
    pickled (torch.save(model), a spawn process)."""
    import pickle

    from mmfast.testing.tiny_liquid import tiny_liquid_lm

    model = tiny_liquid_lm(model_type)
    restored = pickle.loads(pickle.dumps(model))
    ids = torch.randint(3, 300, (1, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(restored(ids), model(ids), rtol=0, atol=0)


def test_compiled_decode_step_checks_and_counts_once_even_when_dynamo_runs_eagerly():
    """The compiled step's host-side checks name the problem (no caches, tokens of the wrong
    shape), and its token count holds when torch.compile falls back to eager (decode_step then
    counts too: the count is set, not added)."""
    model = tiny_liquid_lm("llama", vocab_size=VOCAB, seed=3)
    step = DecodeStep(model, compile=True)
    token = torch.tensor([[5]])
    with pytest.raises(RuntimeError, match="setup_caches"):
        step(token)
    model.setup_caches(1, 8)
    with pytest.raises(ValueError, match=r"tokens must be \(B, S\) int64"):
        step(torch.tensor([5]))
    model.prefill(torch.tensor([[3, 4, 5]]))
    with torch.compiler.set_stance("force_eager"):
        for _ in range(5):  # 3 + 5 = 8 tokens: full, no error
            step(token)
        with pytest.raises(ValueError, match="do not fit"):
            step(token)
    assert model.tokens_held == 8


def test_a_second_thread_generating_on_one_model_is_refused_in_words():
    """A systems trial: three threads calling generate_images on one LiquidLM failed with "the
    caches hold up to 20 of 20 tokens ... call setup_caches", pointing at the wrong fix. The one
    static KV cache serves one generation at a time: the second thread now gets a RuntimeError
    saying so, and a deepcopy per thread works."""
    import threading

    from mmfast.models.liquid import generate_text
    from mmfast.models.liquid import generate as generate_module
    from mmfast.testing.tiny_liquid import tiny_liquid_lm

    model = tiny_liquid_lm("llama")
    prompts = torch.randint(3, 300, (1, 4), generator=torch.Generator().manual_seed(0))
    expected = generate_text(model, prompts, max_new_tokens=3)
    errors = []
    with generate_module._one_generation(model, "test"):  # as if another thread were generating
        thread = threading.Thread(target=lambda: errors.append(_raised(lambda: generate_text(model, prompts,
                                                                                            max_new_tokens=3))))
        thread.start()
        thread.join()
    assert errors and "generating in another thread" in errors[0] and "copy.deepcopy" in errors[0]
    copies = [copy.deepcopy(model) for _ in range(2)]
    results = [None, None]
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, generate_text(copies[i], prompts,
                                                                                         max_new_tokens=3)))
               for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(torch.equal(result, expected) for result in results)
    assert torch.equal(generate_text(model, prompts, max_new_tokens=3), expected)  # the lock was released


def _raised(fn) -> str:
    try:
        fn()
    except RuntimeError as error:
        return str(error)
    return ""


# --- DecodeStep's CUDA-graph logic, on a stand-in for torch.cuda's graph API -----------------------


class _FakeGraphs:
    """torch.cuda's streams and graphs for the host: a capture runs the step and then, as a real
    capture records without running, puts the caches back ("record"); "empty" leaves them moved (the
    ops ran outside the capture); "fail" puts them back and raises; "fail_after_running" raises
    with the caches moved (an empty graph's warning made an error). replay() runs the step."""

    def __init__(self, monkeypatch):
        self.mode, self.step, self.events = "record", None, []
        fakes = self

        class Stream:
            def wait_stream(self, other):
                pass

        class Graph:
            def replay(self):
                fakes.events.append("replay")
                model, held = fakes.step.model, fakes.step.model.tokens_held
                fakes.step.static_logits.copy_(fakes.step._decode(fakes.step.static_tokens))
                model.tokens_held = held  # a replay runs no Python

            def reset(self):
                fakes.events.append("reset")

        @contextlib.contextmanager
        def graph(cuda_graph, stream=None, capture_error_mode="global"):
            fakes.events.append("capture")
            model = fakes.step.model
            caches = [model.cache_seqlens] + [tensor for layer in model.model.layers for tensor in
                                              (layer.self_attn.kv_cache.k_cache, layer.self_attn.kv_cache.v_cache)]
            saved = [t.clone() for t in caches]
            yield
            if fakes.mode in ("record", "fail"):
                for tensor, copy_ in zip(caches, saved):
                    tensor.copy_(copy_)
            if fakes.mode.startswith("fail"):
                raise RuntimeError("capture failed (simulated)")

        for name, value in (("device", lambda device: contextlib.nullcontext()),
                            ("Stream", lambda device=None: Stream()), ("current_stream", lambda: Stream()),
                            ("stream", lambda stream: contextlib.nullcontext()), ("set_stream", lambda stream: None),
                            ("CUDAGraph", Graph), ("graph", graph)):
            monkeypatch.setattr(torch.cuda, name, value)
        def warm_up(step, fn, tokens):
            fakes.events.append("warm-up")
            return fn(tokens)

        monkeypatch.setattr(DecodeStep, "_on_stream", warm_up)

    def decode_step(self, model):
        self.step = DecodeStep(model)
        self.step.use_graph = True  # as on a CUDA model
        return self.step


@pytest.mark.parametrize("mode", ["record", "empty", "fail", "fail_after_running"])
def test_decode_step_graph_logic_against_eager_steps(monkeypatch, mode):
    """From a review of the never-GPU-run graph path: every step's logits, token count and
    cache_seqlens equal an eager twin's whether the capture records, records nothing (the ops ran),
    fails before or after running; new caches warm up and capture again; close() too."""
    fakes = _FakeGraphs(monkeypatch)
    fakes.mode = mode
    model = tiny_liquid_lm("llama", vocab_size=VOCAB, seed=1)
    twin = copy.deepcopy(model)
    graphed, eager = fakes.decode_step(model), DecodeStep(twin, cuda_graph=False)
    prompts = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))

    def restart():
        for lm in (model, twin):
            lm.setup_caches(2, 20)
        with torch.inference_mode():
            twin.prefill(prompts)
            return model.prefill(prompts).argmax(-1, keepdim=True)

    token = restart()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(12):
            if i == 5:
                token = restart()  # new caches: the graph's pointers are stale
            if i == 9:
                graphed.close()
            logits = graphed(token).clone()
            torch.testing.assert_close(logits, eager(token), rtol=0, atol=0)
            assert model.tokens_held == twin.tokens_held and torch.equal(model.cache_seqlens, twin.cache_seqlens)
            token = logits.argmax(-1, keepdim=True)
    messages = [str(w.message) for w in caught if "DecodeStep" in str(w.message)]
    if mode == "record":  # warm-up, capture + replay; again after new caches and after close()
        assert not messages and fakes.events.count("capture") == fakes.events.count("warm-up") == 3
        assert fakes.events[:3] == ["warm-up", "capture", "replay"]
        assert graphed.use_graph and graphed.graph is not None
    else:  # one failed capture, then eager for good
        assert len(messages) == 1 and fakes.events.count("capture") == 1 and not graphed.use_graph
        assert ("recorded nothing" in messages[0]) == (mode == "empty")
