"""examples/liquid_generate.py and examples/vq_tokenize.py end to end, as a user runs them (a
subprocess, as on the command line): --tiny, and vq_tokenize on a VQGAN checkpoint file written
here in the taming format (random weights: files, sizes and the printed summary only)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

Image = pytest.importorskip("PIL.Image")

EXAMPLES = os.path.join(os.path.dirname(__file__), os.pardir, "examples")


def _run(script, *args):
    result = subprocess.run([sys.executable, os.path.join(EXAMPLES, script), *args, "--device", "cpu"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _size(path):
    with Image.open(path) as image:
        return image.size, image.mode


def test_liquid_generate_tiny(tmp_path):
    out = _run("liquid_generate.py", "--tiny", "--num-images", "2", "--seed", "3", "--output", str(tmp_path))
    assert "2 images x 256 tokens ((16, 16) codes)" in out and "ms / step" in out
    (width, height), mode = _size(tmp_path / "grid.png")
    assert mode == "RGB" and width > 0 and height > 0


def _write_tiny_liquid_directory(directory, image_codes):
    """A Liquid-layout model directory as --model expects: a tiny random transformers
    GemmaForCausalLM (Liquid_V1_7B's class) over len(tokenizer) text tokens + image_codes, saved
    with save_pretrained, and a word-level fast tokenizer with Liquid's special tokens. Returns
    len(tokenizer), where the image codes start."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    specials = ["<pad>", "<bos>", "<eos>", "<unk>", "<boi>", "<unconditional>"]
    words = "a photo of red fox in the snow Generate an image based on this description .".split()
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({t: i for i, t in enumerate(specials + words)},
                                                               unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.post_processor = tokenizers.processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                                     unk_token="<unk>", pad_token="<pad>",
                                                     additional_special_tokens=["<boi>", "<unconditional>"])
    tokenizer.save_pretrained(directory)
    config = transformers.GemmaConfig(vocab_size=len(tokenizer) + image_codes, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.GemmaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    return len(tokenizer)


def test_liquid_generate_local_model_directory(tmp_path):
    """--model / --vqgan on local files in the released layouts (random weights), as for Liquid_V1_7B."""
    from mmfast.testing.tiny_vqgan import tiny_vqgan_config, write_taming_checkpoint

    model_dir = tmp_path / "liquid"
    text_vocab = _write_tiny_liquid_directory(model_dir, tiny_vqgan_config().n_embed)
    vqgan_path, _ = write_taming_checkpoint(tmp_path / "vqgan")
    out = _run("liquid_generate.py", "--model", str(model_dir), "--vqgan", vqgan_path, "--vqgan-config", "tiny",
               "--prompt", "a red fox in the snow", "--num-images", "1", "--image-tokens", "16", "--output",
               str(tmp_path / "out"))
    # <bos> + 6 words + Liquid's " Generate an image based on this description." (8) + <boi>;
    # <bos> <unconditional> <boi>
    assert "1 images x 16 tokens ((4, 4) codes), prompt 16 tokens, unconditional 3" in out, out
    assert str(model_dir) in out and text_vocab == 22
    (width, height), mode = _size(tmp_path / "out" / "grid.png")
    assert mode == "RGB" and (width, height) == (8, 8)  # 4 x 4 codes, one 2x upsampling
    # a VQGAN of another architecture than --vqgan-config's: one line naming the fix, before the LM loads
    wrong = subprocess.run([sys.executable, os.path.join(EXAMPLES, "liquid_generate.py"), "--model", str(model_dir),
                            "--vqgan", vqgan_path, "--device", "cpu", "--output", str(tmp_path / "wrong")],
                           capture_output=True, text=True, timeout=300)
    assert wrong.returncode == 1 and "Traceback" not in wrong.stderr, wrong.stderr[-3000:]
    assert "--vqgan-config chameleon gave the architecture" in wrong.stderr and "--vqgan-config tiny?" in wrong.stderr


def test_vq_tokenize_tiny_and_checkpoint_file(tmp_path):
    pytest.importorskip("skimage")
    from mmfast.testing.tiny_vqgan import write_taming_checkpoint

    tiny = tmp_path / "tiny"
    out = _run("vq_tokenize.py", "--tiny", "--output", str(tiny))
    assert "PSNR" in out
    safetensors_path, _ = write_taming_checkpoint(tmp_path / "checkpoint")
    from_file = tmp_path / "from_file"
    out = _run("vq_tokenize.py", "--checkpoint", safetensors_path, "--config", "tiny", "--resolution", "64",
               "--out", str(from_file))
    assert safetensors_path in out and "PSNR" in out
    for directory in (tiny, from_file):
        assert _size(directory / "reconstruction.png")[1] == "RGB"
        assert (directory / "code_histogram.png").is_file()
