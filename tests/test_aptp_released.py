"""Loading APTP experts in the layout rezashkv/diffusion_pruning releases them (arch_vector.pt +
unet/diffusion_pytorch_model.safetensors of APTP's pruned UNet), written here from tiny random
experts: the loaded experts equal the ones written, bit for bit, and run as one AptpUNet."""
from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("diffusers")

from mmfast.models.aptp import (AptpUNet, dense_skeleton, load_expert, load_released_expert,  # noqa: E402
                                released_expert_dirs, run_per_expert, save_expert)
from mmfast.testing.tiny_aptp import tiny_experts, tiny_inputs, write_released_expert  # noqa: E402

CODES = [1, 0, 2, 2, 0]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes (see test_aptp.py)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """(root with arch0..arch2 in the trainer's layout, base UNet, [(expert, arch)])."""
    root = tmp_path_factory.mktemp("APTP-Tiny")
    base, experts = tiny_experts(3, torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(5)
    for k, (expert, arch) in enumerate(experts):
        write_released_expert(str(root / f"arch{k}"), expert, arch, base, g)
    return root, base, experts


def assert_same_expert(loaded, written):
    (expert, arch), (reference, reference_arch) = loaded, written
    assert arch.depth == reference_arch.depth
    assert arch.width.keys() == reference_arch.width.keys()
    assert all(torch.equal(arch.width[n], reference_arch.width[n]) for n in arch.width)
    x, t, text = tiny_inputs(2, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(expert(x, t, text).sample, reference(x, t, text).sample, rtol=0, atol=0)


@torch.no_grad()
def test_released_experts_load_and_run_as_one_model(released):
    root, base, experts = released
    dirs = released_expert_dirs(str(root))
    loaded = [load_expert(d) for d in dirs]
    for pair, written in zip(loaded, experts):
        assert_same_expert(pair, written)
    skeleton = dense_skeleton(dirs[0])  # the dense structure from the saved APTP config
    assert skeleton.conv_in.weight.is_meta
    assert list(skeleton.config.down_block_types) == list(base.config.down_block_types)
    model = AptpUNet.from_experts(skeleton, loaded)
    x, t, text = tiny_inputs(len(CODES), seed=7)
    expected = run_per_expert(experts, x, t, text, torch.tensor(CODES))
    actual = model(x, t, text, torch.tensor(CODES)).sample
    error = (actual - expected).abs().max() / expected.abs().max()
    assert error <= 1e-4, f"max difference {error:.3g} of the output scale"


def test_one_checkpoint_folder_loads_too(released):
    """A checkpoint folder, or its unet/ folder (arch_vector.pt then lies in the folder above)."""
    root, _, experts = released
    checkpoint = root / "arch2" / "checkpoint-30000"
    assert_same_expert(load_released_expert(str(checkpoint)), experts[2])
    assert_same_expert(load_released_expert(str(checkpoint / "unet")), experts[2])
    assert_same_expert(load_expert(str(checkpoint / "unet")), experts[2])  # load_expert tells the layout too


def test_an_older_trainers_copy_beside_the_weights(released, tmp_path):
    """Older trainers copied arch_vector.pt into checkpoint-<step>/unet/ only."""
    _, base, experts = released
    weights = write_released_expert(str(tmp_path / "arch0"), *experts[0], base, torch.Generator().manual_seed(3))
    unet = os.path.dirname(weights)
    os.replace(os.path.join(os.path.dirname(unet), "arch_vector.pt"), os.path.join(unet, "arch_vector.pt"))
    os.remove(tmp_path / "arch0" / "arch_vector.pt")
    assert_same_expert(load_released_expert(str(tmp_path / "arch0")), experts[0])


def test_fid_layout_needs_the_dense_config(released, tmp_path):
    """The layout the official FID script reads (arch_vector.pt beside unet/, no config.json):
    the dense config comes from base_config, a UNet folder or a pipeline folder."""
    _, base, experts = released
    expert, arch = experts[1]
    write_released_expert(str(tmp_path / "arch1"), expert, arch, base, torch.Generator().manual_seed(6), layout="fid")
    with pytest.raises(FileNotFoundError, match="pass base_config="):
        load_released_expert(str(tmp_path / "arch1"))
    base.save_config(str(tmp_path / "sd" / "unet"))
    for config in (tmp_path / "sd" / "unet", tmp_path / "sd"):
        assert_same_expert(load_expert(str(tmp_path / "arch1"), base_config=str(config)), experts[1])
    with pytest.raises(FileNotFoundError, match="has neither config.json nor unet/config.json"):
        load_released_expert(str(tmp_path / "arch1"), base_config=str(tmp_path))


def test_dtype_casts_as_it_loads(released):
    root, _, _ = released
    expert, _ = load_released_expert(str(root / "arch0"), dtype=torch.bfloat16)
    assert {p.dtype for p in expert.parameters()} == {torch.bfloat16}


def test_experts_order_by_index_not_name(tmp_path):
    for name in ("arch10", "arch2", "arch0", "quantizer", "arch1x"):
        (tmp_path / name).mkdir()
    with pytest.raises(ValueError, match=r"lacks arch1 and 7 more \(has arch0, arch2, arch10\).*allow_gaps=True"):
        released_expert_dirs(str(tmp_path))
    names = [os.path.basename(d) for d in released_expert_dirs(str(tmp_path), allow_gaps=True)]
    assert names == ["arch0", "arch2", "arch10"]
    for k in (1, 3, 4, 5, 6, 7, 8, 9):
        (tmp_path / f"arch{k}").mkdir()
    assert [os.path.basename(d) for d in released_expert_dirs(str(tmp_path))] == [f"arch{k}" for k in range(11)]
    with pytest.raises(FileNotFoundError, match="no arch<k> folders"):
        released_expert_dirs(str(tmp_path / "quantizer"))
    with pytest.raises(FileNotFoundError, match="'APTP-Base-CC3M' is not a local folder.*nothing is downloaded"):
        released_expert_dirs("APTP-Base-CC3M")  # the README's name, not downloaded (a new-user trial)


# --- bad checkpoints -------------------------------------------------------------------------------


@pytest.fixture
def one_expert(released, tmp_path):
    """(folder of a copy of expert 0 in the trainer's layout, its weights file, base, experts)."""
    _, base, experts = released
    expert, arch = experts[0]
    weights = write_released_expert(str(tmp_path / "arch0"), expert, arch, base, torch.Generator().manual_seed(8))
    return tmp_path / "arch0", weights, base, experts


def test_neither_layout_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an mmfast expert .* nor a released APTP expert"):
        load_expert(str(tmp_path))
    for load in (load_expert, load_released_expert):
        with pytest.raises(FileNotFoundError, match="missing does not exist"):
            load(str(tmp_path / "missing"))
    (tmp_path / "arch_vector.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no unet/diffusion_pytorch_model.safetensors under"):
        load_released_expert(str(tmp_path))
    with pytest.raises(TypeError, match="dtype must be a torch.dtype"):
        load_expert(str(tmp_path), dtype="bfloat16")
    with pytest.raises(TypeError, match="dtype must be a floating-point dtype"):
        load_expert(str(tmp_path), dtype=torch.int8)
    mmfast_layout = tmp_path / "mmfast_expert"  # a new-user trial: raw safetensors / diffusers errors here
    mmfast_layout.mkdir()
    (mmfast_layout / "architecture.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="architecture.safetensors is not a readable safetensors file"):
        load_expert(str(mmfast_layout))


def test_two_checkpoints_are_ambiguous(one_expert, released):
    folder, _, base, experts = one_expert
    expert, arch = experts[0]
    write_released_expert(str(folder), expert, arch, base, torch.Generator().manual_seed(9), step=20000)
    with pytest.raises(ValueError, match=r"2 checkpoints under .*checkpoint-20000.*checkpoint-30000.*pass the folder"):
        load_released_expert(str(folder))
    assert_same_expert(load_released_expert(str(folder / "checkpoint-20000")), experts[0])


def test_missing_arch_vector(one_expert):
    folder, weights, _, _ = one_expert
    os.remove(folder / "arch_vector.pt")
    os.remove(os.path.join(os.path.dirname(os.path.dirname(weights)), "arch_vector.pt"))
    with pytest.raises(FileNotFoundError, match="no arch_vector.pt beside"):
        load_released_expert(str(folder))


def test_arch_vector_must_be_a_tensor(one_expert):
    folder, weights, _, _ = one_expert
    arch_vector = os.path.join(os.path.dirname(os.path.dirname(weights)), "arch_vector.pt")
    torch.save({"arch": [1.0]}, arch_vector)
    with pytest.raises(ValueError, match="holds a dict, expected the"):
        load_released_expert(str(folder))
    with open(arch_vector, "wb") as f:
        f.write(b"")
    with pytest.raises(ValueError, match="arch_vector.pt is not a tensor file torch.load.weights_only=True. can read"):
        load_released_expert(str(folder))


def test_truncated_weights_name_the_file(one_expert):
    folder, weights, _, _ = one_expert
    with open(weights, "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match="diffusion_pytorch_model.safetensors is not a readable safetensors file"):
        load_released_expert(str(folder))


def test_weights_of_another_expert_are_refused(one_expert, released):
    """The arch vector of expert 0 with the weights of expert 1: keys or shapes disagree."""
    folder, weights, _, _ = one_expert
    root, _, _ = released
    other = root / "arch1" / "checkpoint-30000" / "unet" / "diffusion_pytorch_model.safetensors"
    with open(other, "rb") as src, open(weights, "wb") as dst:
        dst.write(src.read())
    with pytest.raises(ValueError, match=r"does not hold the expert its architecture code describes \(width"):
        load_released_expert(str(folder))


def test_arch_vector_of_another_unet_is_refused(one_expert):
    folder, weights, _, _ = one_expert
    torch.save(torch.rand(1, 12), os.path.join(os.path.dirname(os.path.dirname(weights)), "arch_vector.pt"))
    with pytest.raises(ValueError, match=r"expected \(\d+,\) or \(1, \d+\)"):
        load_released_expert(str(folder))


def edit_config(weights, **changes):
    path = os.path.join(os.path.dirname(weights), "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)


def test_ungated_feed_forwards_are_not_supported(one_expert):
    folder, weights, _, _ = one_expert
    edit_config(weights, gated_ff=False)
    with pytest.raises(NotImplementedError, match="gated_ff = false"):
        load_released_expert(str(folder))


def test_per_block_ff_gate_width_is_not_supported(one_expert):
    folder, weights, _, _ = one_expert
    edit_config(weights, ff_gate_width=[32, 32])
    with pytest.raises(NotImplementedError, match=r"ff_gate_width \[32, 32\]; only one GEGLU group count"):
        load_released_expert(str(folder))


@pytest.mark.parametrize("block, error, message", [
    ("FancyBlock2D", ValueError, "'FancyBlock2D' is neither a diffusers block"),
    ("DownBlock2DGated", NotImplementedError, "'DownBlock2DGated': only APTP's HalfGated"),
    ("DownBlock2DWidthDepthGated", NotImplementedError, "'DownBlock2DWidthDepthGated': only APTP's HalfGated"),
])
def test_unsupported_block_types(one_expert, block, error, message):
    """Unknown blocks, and APTP's blocks that depth-gate every layer (another arch-vector layout)."""
    folder, weights, _, _ = one_expert
    edit_config(weights, down_block_types=["CrossAttnDownBlock2DHalfGated", block])
    with pytest.raises(error, match=message):
        load_released_expert(str(folder))


def test_half_gated_spellings_map_to_diffusers_blocks(one_expert, released):
    folder, weights, _, experts = one_expert
    edit_config(weights, down_block_types=["CrossAttnDownBlock2DWidthHalfDepthGated", "DownBlock2DHalfGated"])
    assert_same_expert(load_released_expert(str(folder)), experts[0])


def test_mmfast_layout_still_loads(released, tmp_path):
    _, base, experts = released
    save_expert(str(tmp_path / "expert"), *experts[2], base)
    assert_same_expert(load_expert(str(tmp_path / "expert")), experts[2])
