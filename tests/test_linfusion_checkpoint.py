"""LinFusion checkpoints in the official format (config.json + safetensors): round trips,
mismatches named, dtypes, and generation with a loaded checkpoint."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import mmfast
from mmfast.models.linfusion import LinFusion, LinFusionMismatchError
from mmfast.testing.tiny_diffusers import tiny_unet

from _utils import run_unet, unet_inputs


# --- checkpoints -----------------------------------------------------------------------


def expected_keys(count, with_mlp=True):
    keys = []
    for i in range(count):
        keys += [f"{i}.to_q.weight", f"{i}.to_k.weight", f"{i}.to_v.weight", f"{i}.to_out.0.weight", f"{i}.to_out.0.bias"]
        if with_mlp:
            keys += [f"{i}.{p}.{j}.{t}" for p in ("to_q_", "to_k_") for j in (0, 1, 3) for t in ("weight", "bias")]
    return set(keys)


@pytest.mark.parametrize("style", ["sd15", "sdxl"])
def test_checkpoint_round_trip_official_format(style, sd15_style_unet, tmp_path):
    from safetensors import safe_open

    if style == "sd15":
        unet, mid_dim_scale = sd15_style_unet, None
    else:  # SD-XL: D = 64 and MLP width C / 16
        unet, mid_dim_scale = tiny_unet((64, 128), heads=(1, 2), norm_num_groups=16), 16
    saved = LinFusion.from_unet(unet, mid_dim_scale=mid_dim_scale)
    saved.save_pretrained(str(tmp_path))

    config = json.loads((tmp_path / "config.json").read_text())
    names = [name for name, _ in unet.named_modules() if name.endswith("attn1")]
    assert [entry["module_name"] for entry in config["modules_list"]] == names
    for entry, module in zip(config["modules_list"], saved.attention_modules()):
        assert set(entry) == {"module_name", "dim_n", "heads", "projection_mid_dim"}
        assert (entry["dim_n"], entry["heads"]) == (module.dim_n, module.heads)
        expected_mid = None if mid_dim_scale is None else module.dim_n // 16
        assert entry["projection_mid_dim"] == expected_mid
    with safe_open(str(tmp_path / "diffusion_pytorch_model.safetensors"), "pt") as f:
        keys = set(f.keys())
        if mid_dim_scale:
            assert f.get_tensor("0.to_q_.0.weight").shape == (config["modules_list"][0]["dim_n"] // 16,
                                                               config["modules_list"][0]["dim_n"])
    assert keys == expected_keys(len(names))

    loaded = LinFusion.from_pretrained(str(tmp_path))
    for key, value in saved.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    inputs = unet_inputs(unet)
    outputs = []
    for model in (saved, loaded):
        model.mount_to(unet)
        try:
            outputs.append(run_unet(unet, inputs))
        finally:
            model.unmount()
    assert torch.equal(outputs[0], outputs[1])


def test_checkpoint_without_mlps(unet, tmp_path):
    specs = [dict(spec.__dict__, projection_mid_dim=-1) for spec in LinFusion.from_unet(unet).specs]
    LinFusion(specs).save_pretrained(str(tmp_path))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert set(f.keys()) == expected_keys(len(specs), with_mlp=False)
    loaded = LinFusion.from_pretrained(str(tmp_path))
    assert isinstance(loaded.attention_modules()[0].to_q_, nn.Identity)


def test_checkpoint_for_another_unet_names_first_mismatch(unet, tmp_path):
    LinFusion.from_unet(tiny_unet((32, 48), heads=2)).save_pretrained(str(tmp_path))
    originals = {name: m for name, m in unet.named_modules() if name.endswith("attn1")}
    # attn1 order is down, up, mid: the 32-channel layers match, the mid block (64 vs 48) is first to differ.
    with pytest.raises(LinFusionMismatchError) as error:
        LinFusion.construct_for(unet, pretrained=str(tmp_path))
    assert str(error.value) == (
        "LinFusion: module 3 'mid_block.attentions.0.transformer_blocks.0.attn1' does not match the UNet: "
        "the UNet expects dim_n=64, heads=2, the LinFusion checkpoint has dim_n=48, heads=2"
    )
    assert all(unet.get_submodule(name) is module for name, module in originals.items())


def test_checkpoint_tensor_mismatch_and_missing_dir(unet, tmp_path):
    from safetensors.torch import load_file, save_file

    LinFusion.from_unet(unet).save_pretrained(str(tmp_path))
    path = str(tmp_path / "diffusion_pytorch_model.safetensors")
    state = load_file(path)
    state["1.to_k_.0.weight"] = torch.zeros(7, state["1.to_k_.0.weight"].shape[1])
    save_file(state, path)
    with pytest.raises(LinFusionMismatchError, match=r"module 1 'up_blocks\.1\.attentions\.0\.transformer_blocks\.0"
                       r"\.attn1' \(dim_n=32, heads=2\): 1\.to_k_\.0\.weight has shape \(7, 32\), config\.json implies \(32, 32\)"):
        LinFusion.from_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="download the checkpoint first"):
        LinFusion.from_pretrained(str(tmp_path / "Yuanshi" / "LinFusion-1-5"))
    with pytest.raises(FileNotFoundError, match="is a file; pass the checkpoint directory"):
        LinFusion.from_pretrained(str(tmp_path / "config.json"))
    # a truncated weights file (an interrupted download) names its file, not only safetensors' words
    with open(path, "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match="LinFusion: .*diffusion_pytorch_model.safetensors is not a readable "
                       "safetensors file .*fetch it again"):
        LinFusion.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        LinFusion.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("key, value, expected", [
    ("heads", 0, r"modules_list\[0\]\.heads must be an integer >= 1, got 0"),
    ("dim_n", 32.5, r"modules_list\[0\]\.dim_n must be an integer >= 1, got 32\.5"),
    ("dim_n", "32", r"modules_list\[0\]\.dim_n must be an integer >= 1, got '32'"),
    ("projection_mid_dim", 0, r"modules_list\[0\]\.projection_mid_dim must be an integer >= 1, got 0"),
    ("heads", 3, r"modules_list\[0\] needs a module_name string and heads dividing dim_n"),
    ("dim_n", float("inf"), r"modules_list\[0\]\.dim_n must be an integer >= 1, got inf"),  # JSON's Infinity
    ("heads", float("nan"), r"modules_list\[0\]\.heads must be an integer >= 1, got nan"),
])
def test_checkpoint_config_entries_are_validated(unet, tmp_path, key, value, expected):
    LinFusion.from_unet(unet).save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    config["modules_list"][0][key] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=expected):
        LinFusion.from_pretrained(str(tmp_path))


def test_integral_float_dims_load_as_ints(unet, tmp_path):
    LinFusion.from_unet(unet).save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    config["modules_list"][0]["dim_n"] = float(config["modules_list"][0]["dim_n"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    spec = LinFusion.from_pretrained(str(tmp_path)).specs[0]
    assert type(spec.dim_n) is int


def test_half_precision_checkpoint_loads_into_fp32_unet(unet, tmp_path):
    """The published checkpoints are stored in fp16; mounting casts to the UNet's dtype."""
    saved = LinFusion.from_unet(unet).half()
    saved.save_pretrained(str(tmp_path))
    loaded = LinFusion.from_pretrained(str(tmp_path))
    assert {p.dtype for p in loaded.parameters()} == {torch.float16}
    loaded = LinFusion.construct_for(unet, pretrained_model_name_or_path=str(tmp_path))  # the official keyword
    try:
        assert {p.dtype for p in loaded.parameters()} == {torch.float32}
        assert torch.equal(loaded.attention_modules()[0].to_q.weight, saved.attention_modules()[0].to_q.weight.float())
    finally:
        loaded.unmount()


def test_tiny_pipeline_generates_with_linfusion(backend, tmp_path):
    pytest.importorskip("transformers")
    from diffusers.models.attention_processor import Attention

    from mmfast.testing.tiny_diffusers import tiny_pipeline

    pipe = tiny_pipeline()
    LinFusion.from_unet(pipe.unet).save_pretrained(str(tmp_path))
    linfusion = LinFusion.construct_for(pipe, pretrained=str(tmp_path))
    attn2 = [m for name, m in pipe.unet.named_modules() if name.endswith("attn2")]
    assert attn2 and all(isinstance(m, Attention) for m in attn2)  # cross-attention stays softmax
    def generate():
        return pipe("a photo of a cat", num_inference_steps=2, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    images = generate()
    with mmfast.use_backend("reference"):  # the oracle's image (the fixture's backend made the first;
        expected = generate()              # its reference run checks only what follows)
    linfusion.unmount()
    assert images.shape == (1, 16, 16, 3) and bool((images >= 0).all() and (images <= 1).all())
    assert images.std() > 1e-3  # not a constant image
    if backend != "reference":
        np.testing.assert_allclose(images, expected, atol=1e-4, rtol=0)
    unmounted = generate()  # softmax attention again: LinFusion's layers did change the image
    assert np.abs(unmounted - images).max() > 1e-3
