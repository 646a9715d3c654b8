"""README's self-contained Python examples run as written, and give what their comments say.

The examples that need a checkpoint, a diffusers pipeline or expert folders (APTP's UNet,
DiffDIS, LinFusion) are not run here; examples/*.py --tiny runs those paths (test_examples_*).
"""
from __future__ import annotations

import pathlib
import re

import torch

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def readme_python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def block_starting_with(first_import: str) -> str:
    """The README block whose first lines import `first_import` (fails if the README lost it)."""
    blocks = [b for b in readme_python_blocks() if first_import in b.split("\n\n")[0]]
    assert len(blocks) == 1, f"README: expected one python block importing {first_import!r}, found {len(blocks)}"
    return blocks[0]


# Every python block of the README, by a name its first lines import: run here, or why not.
RUN_HERE = ("linear_attention_apply", "vq_quantize", "kv_cache_append", "masked_conv2d")
NOT_RUN_HERE = {"released_expert_dirs": "needs APTP's released expert folders",
                "DiffDISPipeline": "needs a DiffDIS checkpoint (examples/diffdis_segment.py --tiny runs the path)",
                "generate_highres": "needs an SD pipeline and LinFusion weights (test_linfusion_highres runs the path)",
                "LinFusion": "needs an SD pipeline and LinFusion weights (test_linfusion_* run the path)"}


def run(code: str) -> dict:
    torch.manual_seed(0)  # the examples draw unseeded random inputs
    names: dict = {}
    exec(compile(code, str(README), "exec"), names)  # noqa: S102 - the README's own example code
    return names


def test_every_readme_block_is_run_or_listed():
    """A new self-contained example must join RUN_HERE (with a test) or NOT_RUN_HERE (with why)."""
    for block in readme_python_blocks():
        head = block.split("\n\n")[0]
        known = [name for name in (*RUN_HERE, *NOT_RUN_HERE) if name in head]
        assert known, f"README python block not covered by tests/test_readme_snippets.py:\n{head}"


def test_linear_attention_example():
    names = run(block_starting_with("linear_attention_apply"))
    B, N, H, D = (names[k] for k in "BNHD")
    assert names["out"].shape == (B, N, H, D)
    assert names["state"].shape == (B, H, D, D) and names["state"].dtype == torch.float32
    assert names["mean"].shape == (B, H, D)
    torch.testing.assert_close(names["out2"], names["out"], rtol=1e-5, atol=1e-5)  # "== out", up to fp32 rounding


def test_vq_example():
    names = run(block_starting_with("vq_quantize"))
    codes, dist, z, codebook = names["codes"], names["dist"], names["z"], names["codebook"]
    assert codes.shape == (64, 32, 32) and codes.dtype == torch.int64
    assert names["z_q"].shape == (64, 256, 32, 32)
    assert torch.equal(names["z_q"], codebook[codes].permute(0, 3, 1, 2))  # channels first, gathered
    rows = torch.arange(0, codes.numel(), 997)  # spot-check the nearest code on a sample of rows
    z_rows, chosen = z.reshape(-1, 256)[rows].double(), codes.reshape(-1)[rows]
    exact = torch.cdist(z_rows, codebook.double()).pow(2)
    torch.testing.assert_close(dist.reshape(-1)[rows].double(), exact.min(1).values, rtol=1e-4, atol=1e-2)
    # the returned code is one at that distance (ties within fp32 rounding allowed)
    torch.testing.assert_close((z_rows - codebook[chosen].double()).pow(2).sum(-1), exact.min(1).values,
                               rtol=1e-4, atol=1e-2)
    assert names["codes8"].shape == (4096,)


def test_decode_example():
    names = run(block_starting_with("kv_cache_append"))
    B, H, D = names["B"], names["H"], names["D"]
    lengths, k_cache, v_cache, q = names["lengths"], names["k_cache"], names["v_cache"], names["q"]
    assert names["out"].shape == (B, 1, H, D)
    for b in range(B):
        length = int(lengths[b])
        assert torch.equal(k_cache[b, length], names["k"][b, 0])  # appended at the row's old length
        assert torch.equal(v_cache[b, length], names["v"][b, 0])
        assert torch.all(k_cache[b, length + 1:] == 0)  # nothing else written
        keys, values = k_cache[b, :length + 1].transpose(0, 1), v_cache[b, :length + 1].transpose(0, 1)  # (H, T, D)
        expected = torch.softmax(q[b, 0, :, None] @ keys.transpose(1, 2) / D ** 0.5, dim=-1) @ values  # (H, 1, D)
        torch.testing.assert_close(names["out"][b, 0], expected[:, 0], rtol=1e-4, atol=1e-4)
    tokens = names["tokens"]
    assert tokens.shape == (4,) and tokens.dtype == torch.int64 and bool(((tokens >= 0) & (tokens < 8192)).all())


def test_masked_ops_example():
    """The op half of the APTP block (the UNet half needs a diffusers UNet and expert folders)."""
    code = block_starting_with("masked_conv2d")
    ops_part, marker, _ = code.partition("# The APTP UNet")
    assert marker, "README's APTP block changed: update this test"
    names = run(ops_part)
    B, K, Cout, N = (names[k] for k in ("B", "K", "Cout", "N"))
    codes, out_mask = names["sample_codes"], names["out_mask"]
    assert names["y"].shape == (B, Cout, 16, 16) and names["y_tokens"].shape == (B, N, Cout)
    for b in range(B):  # masked outputs are exactly 0
        dropped = ~out_mask[codes[b]]
        assert torch.all(names["y"][b, dropped] == 0) and torch.all(names["y_tokens"][b, :, dropped] == 0)
    # the kept values: the block's conv then GroupNorm + SiLU, as the fp64 reference computes them
    from mmfast import reference

    x, in_mask = names["x"].double(), names["in_mask"]
    conv = reference.masked_conv2d_ref(x, names["weight"].double(), names["bias"].double(), codes, in_mask, out_mask,
                                       stride=(1, 1), padding=(1, 1))
    expected = reference.masked_group_norm_ref(conv, torch.ones(K, Cout).double(), torch.zeros(K, Cout).double(), 32,
                                               codes, out_mask, silu=True)
    torch.testing.assert_close(names["y"].double(), expected, rtol=1e-4, atol=1e-4)

