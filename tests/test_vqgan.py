"""The Liquid / Chameleon VQGAN tokenizer (mmfast.models.liquid) and taming's VectorQuantizer2
(mmfast.nn.VectorQuantizer) against straightforward re-implementations of taming-transformers'
math, on the CPU with tiny random taming-format checkpoints (mmfast.testing.tiny_vqgan)."""
from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmfast.models.liquid import (VQGAN, VQGANCheckpointError, VQGANConfig, codes_to_token_ids, is_image_token,
                                  postprocess, preprocess, token_ids_to_codes)
from mmfast.models.liquid.taming import AttnBlock
from mmfast.models.liquid.vqgan import checkpoint_file
from mmfast.nn import VectorQuantizer
from mmfast.testing.tiny_vqgan import (random_taming_state_dict, taming_vqgan_shapes, tiny_vqgan, tiny_vqgan_config,
                                       write_taming_checkpoint)


class _Opaque:
    """A custom object in a checkpoint: torch.load(weights_only=True) refuses it."""


def _images(batch=2, size=32, seed=0):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def model():
    return tiny_vqgan(seed=0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(safetensors path, ckpt path, the state dict without loss keys) of the tiny config."""
    directory = tmp_path_factory.mktemp("vqgan")
    paths = write_taming_checkpoint(directory, tiny_vqgan_config(), seed=3)
    state = random_taming_state_dict(tiny_vqgan_config(), seed=3, loss_keys=False)
    return (*paths, state)


# --- taming's math, written out (the oracle) ----------------------------------------------------


def taming_vq2(z, weight, beta, legacy):
    """CompVis/taming-transformers VectorQuantizer2.forward: (z_q, loss, flat indices)."""
    zp = z.permute(0, 2, 3, 1).contiguous()
    flat = zp.view(-1, weight.shape[1])
    d = flat.pow(2).sum(1, keepdim=True) + weight.pow(2).sum(1) - 2 * flat @ weight.t()
    indices = d.argmin(1)
    z_q = F.embedding(indices, weight).view(zp.shape)
    commitment, codebook = torch.mean((z_q.detach() - zp) ** 2), torch.mean((z_q - zp.detach()) ** 2)
    loss = commitment + beta * codebook if legacy else beta * commitment + codebook
    z_q = zp + (z_q - zp).detach()
    return z_q.permute(0, 3, 1, 2).contiguous(), loss, indices


def _gn(sd, name, x):
    return F.group_norm(x, 32, sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-6)


def _conv(sd, name, x, stride=1, padding=None):
    w = sd[f"{name}.weight"]
    return F.conv2d(x, w, sd[f"{name}.bias"], stride=stride, padding=w.shape[-1] // 2 if padding is None else padding)


def _swish(x):
    return x * torch.sigmoid(x)


def _resnet(sd, name, x):
    h = _conv(sd, f"{name}.conv1", _swish(_gn(sd, f"{name}.norm1", x)))
    h = _conv(sd, f"{name}.conv2", _swish(_gn(sd, f"{name}.norm2", h)))
    return (_conv(sd, f"{name}.nin_shortcut", x) if f"{name}.nin_shortcut.weight" in sd else x) + h


def _attn(sd, name, x):
    """taming's AttnBlock: bmm, scale c^-0.5, softmax over keys."""
    if f"{name}.q.weight" not in sd:
        return x
    h = _gn(sd, f"{name}.norm", x)
    q, k, v = (_conv(sd, f"{name}.{p}", h) for p in "qkv")
    b, c, height, width = q.shape
    w_ = torch.bmm(q.reshape(b, c, -1).permute(0, 2, 1), k.reshape(b, c, -1)) * c ** -0.5
    h = torch.bmm(v.reshape(b, c, -1), F.softmax(w_, dim=2).permute(0, 2, 1)).reshape(b, c, height, width)
    return x + _conv(sd, f"{name}.proj_out", h)


def _middle(sd, prefix, h):
    h = _attn(sd, f"{prefix}.mid.attn_1", _resnet(sd, f"{prefix}.mid.block_1", h))
    return _resnet(sd, f"{prefix}.mid.block_2", h)


def taming_encode(sd, cfg, x):
    """quant_conv(Encoder(x)) and the codes by taming's distance-matrix argmin."""
    h = _conv(sd, "encoder.conv_in", x)
    for i in range(len(cfg.ch_mult)):
        for j in range(cfg.num_res_blocks):
            h = _attn(sd, f"encoder.down.{i}.attn.{j}", _resnet(sd, f"encoder.down.{i}.block.{j}", h))
        if i != len(cfg.ch_mult) - 1:
            h = _conv(sd, f"encoder.down.{i}.downsample.conv", F.pad(h, (0, 1, 0, 1)), stride=2, padding=0)
    h = _conv(sd, "encoder.conv_out", _swish(_gn(sd, "encoder.norm_out", _middle(sd, "encoder", h))))
    latent = _conv(sd, "quant_conv", h)
    _, _, indices = taming_vq2(latent, sd["quantize.embedding.weight"], 0.25, True)
    return latent, indices.view(latent.shape[0], *latent.shape[2:])


def taming_decode(sd, cfg, codes):
    """get_codebook_entry + post_quant_conv + Decoder."""
    b, h, w = codes.shape
    weight = sd["quantize.embedding.weight"]
    quant = F.embedding(codes.reshape(-1), weight).view(b, h, w, -1).permute(0, 3, 1, 2)
    x = _middle(sd, "decoder", _conv(sd, "decoder.conv_in", _conv(sd, "post_quant_conv", quant)))
    for i in reversed(range(len(cfg.ch_mult))):
        for j in range(cfg.num_res_blocks + 1):
            x = _attn(sd, f"decoder.up.{i}.attn.{j}", _resnet(sd, f"decoder.up.{i}.block.{j}", x))
        if i != 0:
            x = _conv(sd, f"decoder.up.{i}.upsample.conv", F.interpolate(x, scale_factor=2.0, mode="nearest"))
    return _conv(sd, "decoder.conv_out", _swish(_gn(sd, "decoder.norm_out", x)))


# --- VectorQuantizer --------------------------------------------------------------------------


@pytest.mark.parametrize("legacy", [True, False])
def test_vector_quantizer_matches_taming(legacy):
    vq = VectorQuantizer(32, 8, beta=0.25, legacy=legacy)
    torch.nn.init.normal_(vq.embedding.weight)
    z = torch.randn(2, 8, 5, 7)
    z_q, loss, (perplexity, min_encodings, indices) = vq(z)
    ref_z_q, ref_loss, ref_indices = taming_vq2(z, vq.embedding.weight.detach(), 0.25, legacy)
    assert perplexity is None and min_encodings is None
    assert indices.shape == (2 * 5 * 7,) and indices.dtype == torch.int64
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(z_q, ref_z_q)
    torch.testing.assert_close(loss, ref_loss)
    assert z_q.shape == z.shape and z_q.is_contiguous()


def test_vector_quantizer_promotes_dtypes_as_taming():
    """A bf16 z (autocast) with an fp32 codebook: taming's z_q - z promotes, so z_q and the loss
    are fp32 (mmfast returned bf16, its loss off in the 3rd digit)."""
    vq = VectorQuantizer(32, 8, beta=0.25)
    torch.nn.init.normal_(vq.embedding.weight)
    z = torch.randn(2, 8, 5, 7).bfloat16()
    z_q, loss, (_, _, indices) = vq(z)
    weight = vq.embedding.weight.detach()
    # taming's promotion makes its result that of the fp32 copy of z (exact), searched in fp32
    ref_z_q, ref_loss, ref_indices = taming_vq2(z.float(), weight, 0.25, True)
    assert z_q.dtype == loss.dtype == torch.float32 == ref_z_q.dtype == ref_loss.dtype
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(z_q, ref_z_q)
    torch.testing.assert_close(loss, ref_loss)
    half = VectorQuantizer(32, 8).bfloat16()  # all bf16: stays bf16
    assert half(z)[0].dtype == torch.bfloat16


@pytest.mark.parametrize("legacy", [True, False])
def test_vector_quantizer_gradients_match_taming(legacy):
    """Straight-through estimator to z, commitment term to z, codebook term to the codebook."""
    vq = VectorQuantizer(16, 8, beta=0.25, legacy=legacy)
    torch.nn.init.normal_(vq.embedding.weight)
    ref_weight = vq.embedding.weight.detach().clone().requires_grad_()
    z = torch.randn(2, 8, 4, 3, requires_grad=True)
    ref_z = z.detach().clone().requires_grad_()
    upstream = torch.randn(2, 8, 4, 3)
    z_q, loss, _ = vq(z)
    ((z_q * upstream).sum() + loss).backward()
    ref_z_q, ref_loss, _ = taming_vq2(ref_z, ref_weight, 0.25, legacy)
    ((ref_z_q * upstream).sum() + ref_loss).backward()
    torch.testing.assert_close(z.grad, ref_z.grad)
    torch.testing.assert_close(vq.embedding.weight.grad, ref_weight.grad)
    assert vq.embedding.weight.grad.abs().sum() > 0


def test_vector_quantizer_index_shapes_metric_and_errors():
    vq = VectorQuantizer(16, 4, sane_index_shape=True)
    torch.nn.init.normal_(vq.embedding.weight)
    z = torch.randn(2, 4, 3, 5)
    _, _, (_, _, indices) = vq(z)
    assert indices.shape == (2, 3, 5)
    cos = VectorQuantizer(16, 4, metric="cosine")
    cos.embedding.weight.data.copy_(vq.embedding.weight)
    expected = (F.normalize(z.permute(0, 2, 3, 1), dim=-1) @ F.normalize(cos.embedding.weight, dim=-1).t()).argmax(-1)
    assert torch.equal(cos.codes(z), expected)
    with pytest.raises(ValueError, match="C=4"):
        vq(torch.randn(2, 3, 3, 5))
    with pytest.raises(TypeError, match="float"):
        vq(torch.zeros(2, 4, 3, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="metric"):
        VectorQuantizer(16, 4, metric="dot")
    with pytest.raises(ValueError, match="interface"):
        vq(z, temp=0.5)


def test_get_codebook_entry_taming_semantics():
    vq = VectorQuantizer(16, 4)
    torch.nn.init.normal_(vq.embedding.weight)
    indices = torch.randint(0, 16, (2 * 3 * 5,))
    out = vq.get_codebook_entry(indices, (2, 3, 5, 4))
    expected = vq.embedding.weight[indices].view(2, 3, 5, 4).permute(0, 3, 1, 2)
    assert out.shape == (2, 4, 3, 5) and torch.equal(out, expected)
    assert torch.equal(vq.get_codebook_entry(indices.view(2, 3, 5), (2, 3, 5, 4)), expected)
    assert torch.equal(vq.get_codebook_entry(indices, None), vq.embedding.weight[indices])
    with pytest.raises(ValueError, match="grid"):
        vq.get_codebook_entry(indices, (2, 3, 4, 4))
    with pytest.raises(ValueError, match="C=4"):
        vq.get_codebook_entry(indices, (2, 3, 5, 8))
    with pytest.raises(TypeError, match="integer"):
        vq.get_codebook_entry(indices.float(), (2, 3, 5, 4))


# --- VQGAN: keys and taming's forward -------------------------------------------------------


CONFIGS = {
    "tiny": tiny_vqgan_config(),
    "chameleon": VQGANConfig(),
    "variants": tiny_vqgan_config(ch_mult=(1, 2, 2), attn_resolutions=(32, 8), resamp_with_conv=False,
                                  num_res_blocks=2),
    "no-attn": tiny_vqgan_config(attn_type="none"),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_state_dict_keys_are_taming(name):
    cfg = CONFIGS[name]
    with torch.device("meta"):
        model = VQGAN(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == taming_vqgan_shapes(cfg)


def test_taming_state_dict_loads_strict():
    cfg = tiny_vqgan_config()
    state = random_taming_state_dict(cfg, seed=1, loss_keys=False)
    model = VQGAN(cfg)
    assert not model.load_state_dict(state, strict=True).missing_keys
    assert torch.equal(model.encoder.down[1].attn[0].q.weight, state["encoder.down.1.attn.0.q.weight"])


def test_attention_block_matches_taming_bmm():
    block = AttnBlock(64)
    sd = {f"a.{k}": v.detach() for k, v in block.state_dict().items()}
    x = torch.randn(2, 64, 6, 5)
    torch.testing.assert_close(block(x), _attn(sd, "a", x), atol=2e-5, rtol=2e-5)


def test_encode_decode_match_taming(model):
    cfg, sd = model.config, {k: v.detach() for k, v in model.state_dict().items()}
    images = _images(batch=2)
    latent, ref_codes = taming_encode(sd, cfg, images)
    torch.testing.assert_close(model.encode_to_latent(images), latent, atol=1e-4, rtol=1e-4)
    codes = model.encode(images)
    assert codes.shape == (2, 16, 16) and codes.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) < cfg.n_embed and codes.unique().numel() > 4
    assert (codes == ref_codes).float().mean() >= 0.99  # near-ties may flip between the two summations
    ref_images = taming_decode(sd, cfg, codes)
    torch.testing.assert_close(model.decode(codes, clamp=False), ref_images, atol=1e-4, rtol=1e-4)
    decoded = model.decode(codes)
    assert decoded.shape == (2, 3, 32, 32) and decoded.min() >= -1 and decoded.max() <= 1
    torch.testing.assert_close(decoded, ref_images.clamp(-1, 1), atol=1e-4, rtol=1e-4)


def test_forward_trains_encoder_and_codebook(model):
    trainable = tiny_vqgan(seed=0)
    reconstruction, loss = trainable(_images(batch=1))
    assert reconstruction.shape == (1, 3, 32, 32) and loss.dim() == 0
    (reconstruction.square().mean() + loss).backward()
    assert trainable.encoder.conv_in.weight.grad.abs().sum() > 0
    assert trainable.quantize.embedding.weight.grad.abs().sum() > 0


def test_decode_token_rows_and_input_errors(model):
    codes = model.encode(_images(batch=1))
    torch.testing.assert_close(model.decode(codes.flatten(1)), model.decode(codes))
    with pytest.raises(ValueError, match="square"):
        model.decode(torch.zeros(1, 15, dtype=torch.int64))
    with pytest.raises(TypeError, match="integer"):
        model.decode(codes.float())
    with pytest.raises(IndexError, match="index 64 is out of range for a codebook of 64 codes"):
        model.decode(torch.full((1, 4, 4), 64))
    with pytest.raises(ValueError, match="multiples of 2"):
        model.encode(torch.zeros(1, 3, 31, 32))
    with pytest.raises(ValueError, match=r"values in \[-1, 1\] .* got values in \[0, 255\]"):
        model.encode(torch.linspace(0, 255, 3 * 32 * 32).view(1, 3, 32, 32))  # a 0..255 image as floats
    with pytest.raises(ValueError, match="values in"):
        model.encode(torch.full((1, 3, 32, 32), float("nan")))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model.encode(torch.zeros(1, 4, 32, 32))
    with pytest.raises(TypeError, match="preprocess"):
        model.encode(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_batch_size_splits_give_identical_results(model):
    images = _images(batch=3, seed=5)
    codes = model.encode(images)
    assert torch.equal(model.encode(images, batch_size=1, progress=False), codes)
    assert torch.equal(model.encode(images, batch_size=2, progress=False), codes)
    # oneDNN may pick another convolution algorithm per batch size: equal up to fp32 rounding
    torch.testing.assert_close(model.decode(codes, batch_size=2, progress=False), model.decode(codes),
                               atol=2e-5, rtol=1e-5)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="batch_size"):
            model.encode(images, batch_size=bad)


def test_a_large_batch_goes_through_in_slices_under_a_bar(model, capsys):
    """Issue 8: 'batched ... with a progress bar over large batches': by default 8 images a pass."""
    images = _images(batch=10, seed=6)
    codes = model.encode(images)
    assert "VQGAN encode" in capsys.readouterr().err  # 2 slices: a bar
    assert torch.equal(codes, model.encode(images, batch_size=None, progress=False))
    model.decode(codes)
    assert "VQGAN decode" in capsys.readouterr().err
    model.encode(images[:8])
    assert capsys.readouterr().err == ""  # one slice: no bar


def test_bfloat16_end_to_end(model):
    images = _images(batch=2, seed=7)
    codes = model.encode(images)
    bf16 = tiny_vqgan(seed=0).to(torch.bfloat16)
    bf16_codes = bf16.encode(images)
    assert bf16_codes.dtype == torch.int64 and (bf16_codes == codes).float().mean() >= 0.9
    decoded = bf16.decode(codes)
    assert decoded.dtype == torch.bfloat16 and torch.isfinite(decoded).all()
    assert (decoded.float() - model.decode(codes)).abs().max() < 0.15
    reconstruction, loss = bf16(images)
    assert reconstruction.dtype == torch.bfloat16 and torch.isfinite(loss)


def test_real_photograph_512(model):
    """skimage's astronaut through a narrow Chameleon-shaped model: 512 x 512 -> 32 x 32 = 1024 codes."""
    data = pytest.importorskip("skimage.data")
    photo = data.astronaut()
    assert photo.shape == (512, 512, 3)
    cfg = VQGANConfig(ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1, attn_resolutions=(32,), z_channels=32,
                      embed_dim=32, n_embed=8192)
    narrow = tiny_vqgan(seed=2, config=cfg)
    images = preprocess(photo)
    assert images.shape == (1, 3, 512, 512) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    codes = narrow.encode(images)
    assert codes.shape == (1, 32, 32) and codes.unique().numel() > 16
    token_ids = codes_to_token_ids(codes.flatten(1))
    assert token_ids.shape == (1, 1024) and bool(is_image_token(token_ids).all())
    pixels = postprocess(narrow.decode(token_ids_to_codes(token_ids)))
    assert pixels.shape == (1, 512, 512, 3) and pixels.dtype == np.uint8


# --- checkpoints -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["safetensors", "ckpt"])
def test_from_pretrained(checkpoint, kind, caplog):
    safetensors_path, ckpt_path, state = checkpoint
    with caplog.at_level(logging.INFO, logger="mmfast.models.liquid.vqgan"):
        loaded = VQGAN.from_pretrained(safetensors_path if kind == "safetensors" else ckpt_path, tiny_vqgan_config())
    assert "dropped 4 training-only keys" in caplog.text
    assert not loaded.training
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key
    bf16 = VQGAN.from_pretrained(ckpt_path, tiny_vqgan_config(), dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}


def test_from_pretrained_flat_ckpt(checkpoint, tmp_path):
    state = checkpoint[2]
    path = tmp_path / "flat.pt"
    torch.save(state, path)
    model = VQGAN.from_pretrained(path, tiny_vqgan_config())
    assert torch.equal(model.quantize.embedding.weight, state["quantize.embedding.weight"])


def test_from_pretrained_key_errors(checkpoint, tmp_path):
    from safetensors.torch import save_file

    state = dict(checkpoint[2])
    missing = {k: v for k, v in state.items() if k != "decoder.up.1.attn.0.proj_out.bias"}
    save_file(missing, tmp_path / "missing.safetensors")
    with pytest.raises(VQGANCheckpointError, match=r"missing \(1\): decoder\.up\.1\.attn\.0\.proj_out\.bias"):
        VQGAN.from_pretrained(tmp_path / "missing.safetensors", tiny_vqgan_config())
    save_file({**state, "encoder.extra.weight": torch.zeros(1)}, tmp_path / "extra.safetensors")
    with pytest.raises(VQGANCheckpointError, match=r"unexpected \(1\): encoder\.extra\.weight"):
        VQGAN.from_pretrained(tmp_path / "extra.safetensors", tiny_vqgan_config())
    with pytest.raises(VQGANCheckpointError, match="shape mismatch.*quantize.embedding.weight") as error:
        VQGAN.from_pretrained(checkpoint[0], tiny_vqgan_config(n_embed=32))
    assert error.value.architecture_mismatch  # the examples then suggest another config
    # integer weights were cast into the float parameters without a word (a new-user trial)
    save_file({**state, "quantize.embedding.weight": state["quantize.embedding.weight"].long()},
              tmp_path / "int.safetensors")
    with pytest.raises(VQGANCheckpointError, match=r"not floating point \(1\): quantize\.embedding\.weight: "
                                                    r"torch\.int64: a corrupted") as error:
        VQGAN.from_pretrained(tmp_path / "int.safetensors", tiny_vqgan_config())
    assert not error.value.architecture_mismatch


def test_from_pretrained_refuses_to_unpickle(checkpoint, tmp_path):
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": checkpoint[2], "hyper_parameters": _Opaque()}, path)
    with pytest.raises(VQGANCheckpointError, match="will not unpickle(.|\n)*safetensors"):
        VQGAN.from_pretrained(path, tiny_vqgan_config())


def test_from_pretrained_names_broken_files_and_bad_dtypes(tmp_path):
    """Found by a new-user trial: truncated, empty or foreign files raised safetensors' / torch's raw
    errors (or were called a pickle to convert with weights_only=False), and dtype="bfloat16" a
    device-string error."""
    for name, data in (("empty.ckpt", b""), ("text.ckpt", b"hello world"), ("empty.safetensors", b""),
                       ("short.safetensors", b"\x00\x01")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(VQGANCheckpointError, match="is not a readable (torch checkpoint|safetensors file)") as error:
            VQGAN.from_pretrained(tmp_path / name, tiny_vqgan_config())
        assert not error.value.architecture_mismatch  # no other config would read it
    for dtype, error in (("bfloat16", "must be a torch.dtype"), (torch.int64, "floating-point dtype")):
        with pytest.raises(TypeError, match=error):
            VQGAN.from_pretrained(tmp_path / "empty.ckpt", tiny_vqgan_config(), dtype=dtype)


def test_preprocess_scales_16_bit_images_and_names_resolution():
    """Found by a new-user trial: a 16-bit PIL image came out 94% saturated (PIL's convert clips at
    255) and a mode-F one all -1; preprocess(img, 0) failed with PIL's own words."""
    from PIL import Image

    ramp = np.linspace(0, 65535, 600).reshape(20, 30).astype(np.uint16)
    eight_bit = np.round(ramp / 257.0).astype(np.uint8)
    torch.testing.assert_close(preprocess(Image.fromarray(ramp), 16), preprocess(Image.fromarray(eight_bit), 16))
    with pytest.raises(ValueError, match="mode F .* no fixed range"):
        preprocess(Image.fromarray(ramp.astype(np.float32)), 16)
    with pytest.raises(ValueError, match="resolution must be an int >= 1"):
        preprocess(Image.fromarray(eight_bit), 0)


def test_from_pretrained_directory(checkpoint, tmp_path):
    """A directory as Liquid's demo space ships it (chameleon/vqgan.ckpt); vqgan.safetensors first."""
    import shutil

    safetensors_path, ckpt_path, state = checkpoint
    shutil.copy(ckpt_path, tmp_path / "vqgan.ckpt")
    model = VQGAN.from_pretrained(tmp_path, tiny_vqgan_config())
    assert torch.equal(model.quantize.embedding.weight, state["quantize.embedding.weight"])
    assert checkpoint_file(tmp_path) == str(tmp_path / "vqgan.ckpt")
    shutil.copy(safetensors_path, tmp_path / "vqgan.safetensors")
    assert checkpoint_file(tmp_path) == str(tmp_path / "vqgan.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds none of vqgan.safetensors, vqgan.ckpt"):
        VQGAN.from_pretrained(tmp_path / "empty")


def test_from_pretrained_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        VQGAN.from_pretrained(tmp_path / "absent.safetensors")
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="suffix|end in"):
        VQGAN.from_pretrained(tmp_path / "weights.npz")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="no state dict"):
        VQGAN.from_pretrained(tmp_path / "list.pt")


# --- images and tokens ------------------------------------------------------------------------


def test_preprocess_matches_chameleon_steps():
    from PIL import Image

    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    out = preprocess(array, resolution=32)
    img = Image.fromarray(array).resize((48, 32), Image.LANCZOS).crop((8, 0, 40, 32))
    expected = torch.from_numpy(np.array(img) / 255.0 * 2 - 1).permute(2, 0, 1).float()[None]
    assert out.shape == (1, 3, 32, 32) and torch.equal(out, expected)
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)  # fully transparent black -> white
    assert torch.equal(preprocess(rgba, resolution=32), torch.ones(1, 3, 32, 32))
    with pytest.raises(TypeError, match="uint8"):
        preprocess(array.astype(np.float32))


def test_postprocess():
    images = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    assert postprocess(images)[0, 0, :, 0].tolist() == [0, 0, 127, 255, 255]
    assert postprocess(images[0]).shape == (1, 5, 3)
    with pytest.raises(ValueError, match="3, H, W"):
        postprocess(torch.zeros(1, 4, 2, 2))
    with pytest.raises(FloatingPointError, match="NaN"):  # not a silent black pixel
        postprocess(torch.full((1, 3, 2, 2), float("nan")))
    assert postprocess(torch.full((3, 1, 1), float("inf")))[0, 0].tolist() == [255, 255, 255]  # clamped


def test_token_offsets():
    codes = torch.tensor([[0, 5, 8191]])
    ids = codes_to_token_ids(codes)
    assert ids.tolist() == [[256000, 256005, 264191]] and ids.dtype == torch.int64
    assert torch.equal(token_ids_to_codes(ids), codes)
    assert codes_to_token_ids([1, 2], offset=10, num_codes=4).tolist() == [11, 12]
    assert is_image_token(torch.tensor([255999, 256000, 264191, 264192])).tolist() == [False, True, True, False]
    assert token_ids_to_codes(torch.tensor([1, 256003, 300000]), clamp=True).tolist() == [0, 3, 8191]
    with pytest.raises(ValueError, match=r"image code 8192 is outside \[0, 8192\)"):
        codes_to_token_ids(torch.tensor([8192]))
    with pytest.raises(ValueError, match="image code -1"):
        codes_to_token_ids(torch.tensor([-1]))
    with pytest.raises(ValueError, match=r"token id 2 is outside \[256000, 264192\)"):
        token_ids_to_codes(torch.tensor([256001, 2]))
    with pytest.raises(TypeError, match="integer"):
        codes_to_token_ids(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="offset"):
        codes_to_token_ids(torch.tensor([1]), offset=-1)


def test_config_errors():
    with pytest.raises(ValueError, match="multiple of 32"):
        VQGANConfig(ch=48, ch_mult=(1, 2))
    with pytest.raises(ValueError, match="double_z"):
        VQGANConfig(double_z=True)
    cfg = VQGANConfig.from_taming_params({"ddconfig": {"ch": 64, "ch_mult": [1, 2], "double_z": False,
                                                       "unused": 1}, "n_embed": 16, "embed_dim": 8,
                                          "lossconfig": {}})
    assert dataclasses.astuple(cfg)[:3] == (64, 3, (1, 2)) and cfg.n_embed == 16 and cfg.downsample_factor == 2
