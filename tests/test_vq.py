"""VQ codebook search and lookup on every backend against the fp64 reference, the peers users
would pick (vector-quantize-pytorch, faiss), autograd, torch.library integration and errors."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mmfast import reference
from mmfast.ops import vq_codebook_sqnorm, vq_dequantize, vq_quantize

from _utils import HAS_TRITON, TRITON_DEVICE, assert_grads_close, at_thread_counts, backend_params

BACKENDS = backend_params()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# N, K, D: one row, odd sizes, Liquid / Chameleon (K = 8192, D = 256) and LlamaGen (D = 8).
SHAPES = [(1, 1, 3), (3, 7, 8), (1025, 7, 3), (33, 1000, 40), (130, 8192, 8), (70, 8192, 256)]
# Tolerance on distances relative to ||z||^2 + 1 (the scale of the terms that cancel).
DISTANCE_TOL = {torch.float64: 1e-10, torch.float32: 2e-6, torch.float16: 2e-6, torch.bfloat16: 2e-6}


def make_inputs(n, k, d, dtype, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=generator, dtype=torch.float64).to(device, dtype)
    codebook = torch.randn(k, d, generator=generator, dtype=torch.float64).to(device, dtype)
    return z, codebook


def _distances(rows, codebook, dtype):
    """fp64 squared distances (rows x codes), the two best per row, and the tolerance of a
    distance computed in dtype's kernels (the rounding of the dots)."""
    all_d = torch.cdist(rows, codebook).pow(2)
    best2 = all_d.topk(min(2, codebook.shape[0]), dim=1, largest=False).values
    # x 4: the terms that cancel, ||z||^2 + ||e||^2 + 2 |z.e|, reach 4 ||z||^2 for codes of z's norm
    tol = DISTANCE_TOL[dtype] * (rows.pow(2).sum(-1) + 1) * rows.shape[-1] ** 0.5 * 4
    return all_d, best2, tol


def clear_rows(z, codebook, dtype):
    """Rows whose two best distances are apart by more than twice the rounding: any correct
    kernel must pick the same code there."""
    _, best2, tol = _distances(z.double().cpu(), codebook.double().cpu(), dtype)
    return best2[:, 1] - best2[:, 0] > 2 * tol


def assert_nearest(z, codebook, indices, distance, metric="l2", dtype=torch.float32):
    """The chosen code is the nearest within the rounding of the dots; where the two best
    distances are apart by more than that, the index is exactly the reference's."""
    zd, cd = z.double().cpu(), codebook.double().cpu()
    if metric == "cosine":
        zd, cd = torch.nn.functional.normalize(zd, dim=-1), torch.nn.functional.normalize(cd, dim=-1)
    rows = zd.reshape(-1, zd.shape[-1])
    all_d, best2, tol = _distances(rows, cd, dtype)
    idx = indices.reshape(-1).cpu()
    chosen = all_d.gather(1, idx[:, None])[:, 0]
    assert bool((chosen <= best2[:, 0] + tol).all()), (chosen - best2[:, 0]).max()
    assert bool(((distance.reshape(-1).cpu().double() - best2[:, 0]).abs() <= tol).all())
    if cd.shape[0] > 1:
        clear = best2[:, 1] - best2[:, 0] > 2 * tol
        expected, _ = reference.vq_quantize_ref(rows, cd, "l2")
        assert torch.equal(idx[clear], expected[clear])


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_quantize_finds_the_nearest_code(backend_device, dtype, shape):
    backend, device = backend_device
    if backend == "triton" and device == "cpu" and shape[0] * shape[1] * shape[2] > 2e7:
        pytest.skip("too slow under the Triton interpreter")
    z, codebook = make_inputs(*shape, dtype, device)
    indices, distance = vq_quantize(z, codebook, return_distance=True, backend=backend)
    assert indices.dtype == torch.int64 and indices.shape == (shape[0],)
    assert distance.dtype == torch.float32
    assert_nearest(z, codebook, indices, distance, dtype=dtype)


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_quantize_cosine_batched_shapes_and_given_norms(backend_device):
    backend, device = backend_device
    z, codebook = make_inputs(2 * 5 * 7, 300, 8, torch.float32, device)
    z = z.reshape(2, 5, 7, 8)
    indices, distance = vq_quantize(z, codebook, metric="cosine", return_distance=True, backend=backend)
    assert indices.shape == distance.shape == (2, 5, 7)
    assert_nearest(z, codebook, indices, distance, metric="cosine")
    expected = vq_quantize(z, codebook, backend=backend)
    given = vq_quantize(z, codebook, codebook_sqnorm=vq_codebook_sqnorm(codebook), backend=backend)
    torch.testing.assert_close(given, expected, rtol=0, atol=0)


def test_fp64_on_cpu_is_exact():
    z, codebook = make_inputs(200, 500, 33, torch.float64, "cpu")
    indices, distance = vq_quantize(z, codebook, return_distance=True, backend="native")
    expected, expected_distance = reference.vq_quantize_ref(z, codebook)
    assert torch.equal(indices, expected)
    torch.testing.assert_close(distance, expected_distance, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ties_go_to_the_lowest_index_and_non_finite_rows_to_zero(backend_device, dtype):
    backend, device = backend_device
    base = torch.randn(10, 6).to(dtype)
    codebook = torch.cat([base, base, base])  # code c equals codes c + 10 and c + 20
    codebook[4, 0] = float("nan")  # never chosen
    z = torch.cat([codebook[[13, 27, 0]], torch.full((1, 6), float("nan"), dtype=dtype),
                   torch.full((1, 6), float("inf"), dtype=dtype)])
    indices, distance = vq_quantize(z.to(device), codebook.to(device), return_distance=True, backend=backend)
    assert indices.cpu().tolist()[:3] == [3, 7, 0] and indices.cpu().tolist()[3:] == [0, 0]
    assert distance[3].isnan() and distance[4].isinf()
    expected = reference.vq_quantize_ref(z.double(), codebook.double())
    assert torch.equal(indices.cpu(), expected[0])


@pytest.mark.parametrize("backend_device", BACKENDS + [pytest.param(("reference", "cpu"), id="reference-cpu")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_cosine_ties_of_a_zero_row_go_to_the_lowest_index(backend_device, dtype):
    """Found by a new-user trial: a zero row of z has every cosine 0, but the normalised codes'
    rounded squared norms (1 +- 1e-7) decided it: native chose 2, the reference 10, distance 1.
    The codes' normalised norms are exactly 1 now, on every backend: index 0, distance 1."""
    backend, device = backend_device
    if dtype == torch.float64 and backend == "triton":
        pytest.skip("no fp64 on Triton")
    codebook = torch.randn(16, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    codebook[0] = 0.0  # a zero code: normalised to 0, so its distance is ||z||^2 (0 for the zero row)
    z = torch.zeros(3, 8, dtype=dtype)
    z[1] = codebook[5]  # a true nearest code still wins
    indices, distance = vq_quantize(z.to(device), codebook.to(device), metric="cosine", return_distance=True,
                                    backend=backend)
    assert indices.cpu().tolist() == [0, 5, 0]
    assert distance.cpu().tolist()[0] == 0.0 and abs(distance[1].item()) < 1e-6
    codebook[0] = codebook[1]  # no zero code: the zero row's cosines all tie
    indices, distance = vq_quantize(z.to(device), codebook.to(device), metric="cosine", return_distance=True,
                                    backend=backend)
    assert indices.cpu().tolist()[::2] == [0, 0] and distance.cpu().tolist()[::2] == [1.0, 1.0]


@pytest.mark.parametrize("backend_device", BACKENDS + [pytest.param(("reference", "cpu"), id="reference-cpu")])
def test_distances_of_exact_hits_are_never_negative(backend_device):
    """||z||^2 + sqnorm - 2 z.e rounds below 0 on exact hits: the reference returned -2.7e-7
    (cosine) and -2.2e-5 (l2 with codebook_sqnorm) on half the rows, NaN under a sqrt."""
    backend, device = backend_device
    codebook = (torch.randn(512, 8, generator=torch.Generator().manual_seed(3)) * 3).to(device)
    for kwargs in ({"metric": "cosine"}, {"codebook_sqnorm": vq_codebook_sqnorm(codebook)}):
        indices, distance = vq_quantize(codebook, codebook, return_distance=True, backend=backend, **kwargs)
        assert bool((distance >= 0).all()) and bool(indices.eq(torch.arange(512, device=device)).all())


@pytest.mark.parametrize("backend_device", BACKENDS + [pytest.param(("reference", "cpu"), id="reference-cpu")])
def test_ties_go_to_the_lowest_index_for_a_transposed_z(backend_device):
    """Found by an op-level trial: the reference's differences inherited a transposed z's layout
    and summed equal codes differently by their position (ties went to 1020, not 0)."""
    backend, device = backend_device
    z = torch.randn(17, 64).to(device).t()  # (64, 17), column-major
    codebook = torch.randn(1, 17).repeat(1023, 1).to(device)  # 1023 identical codes
    assert vq_quantize(z, codebook, backend=backend).eq(0).all()
    assert vq_quantize(z, codebook.t().contiguous().t(), backend=backend).eq(0).all()  # a column-major codebook


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_strided_rows(backend_device):
    backend, device = backend_device
    wide, codebook = make_inputs(40, 100, 24, torch.float32, device)
    z = wide[::2, 3:19]  # row stride 48, columns sliced
    codebook = codebook[:, :16]
    indices, distance = vq_quantize(z, codebook, return_distance=True, backend=backend)
    assert_nearest(z, codebook, indices, distance)
    last_dim_strided = wide[:, ::2][:, :12]
    assert_nearest(last_dim_strided, codebook[:, :12], *vq_quantize(last_dim_strided, codebook[:, :12],
                                                                     return_distance=True, backend=backend))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_smoke_search_and_lookup_every_kernel(dtype):
    """Both CUDA search kernels (fp16 / bf16 with 16-byte aligned rows take the cp.async one, by
    wgmma on sm_90 with an sm_90a build, else mma.sync; unaligned rows, odd D and fp32 the tile-GEMM
    one) and the lookup on small odd shapes, with
    given and computed norms: the subset `make gpu-check` also runs under compute-sanitizer."""
    for n, k, d in ((130, 300, 64), (200, 383, 40), (9, 10, 16), (33, 70, 3)):
        z, codebook = make_inputs(n, k, d, dtype, "cuda")
        for given in (None, vq_codebook_sqnorm(codebook)):
            indices, distance = vq_quantize(z, codebook, codebook_sqnorm=given, return_distance=True)
            assert_nearest(z, codebook, indices, distance, dtype=dtype)
    wide, codebook = make_inputs(40, 100, 40, dtype, "cuda")
    z = wide[:, 8:40]  # rows 80 bytes apart in 16-bit types: aligned to 16 bytes; z starts 16 bytes in
    assert_nearest(z, codebook[:, :32], *vq_quantize(z, codebook[:, :32], return_distance=True), dtype=dtype)
    z = wide[:, 1:33]  # a base pointer off 16 bytes: the tile-GEMM search
    assert_nearest(z, codebook[:, :32], *vq_quantize(z, codebook[:, :32], return_distance=True), dtype=dtype)
    indices = torch.randint(0, 100, (2, 5, 7), device="cuda")
    assert torch.equal(vq_dequantize(indices, codebook), codebook[indices])


@pytest.mark.cuda
def test_cuda_row_strides_past_32_bit_tile_offsets():
    """The cp.async search keeps a 128-row tile's chunks at 32-bit byte offsets: z rows 2^24
    elements apart (bf16) take the tile-GEMM search instead, 2^24 - 8 apart still the cp.async one;
    both find the nearest codes."""
    from torch.profiler import ProfilerActivity, profile

    _, codebook = make_inputs(3, 50, 16, torch.bfloat16, "cuda")
    for stride, kernel in ((2**24, "vq_search_kernel"), (2**24 - 8, "vq_search_async_kernel")):
        wide = torch.zeros(3, stride, dtype=torch.bfloat16, device="cuda")
        z = wide[:, :16]
        z.copy_(torch.randn(3, 16, dtype=torch.bfloat16))
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            indices, distance = vq_quantize(z, codebook, return_distance=True)
            torch.cuda.synchronize()
        assert any(kernel + "<" in event.key for event in prof.key_averages()), (stride, kernel)
        assert_nearest(z, codebook, indices, distance, dtype=torch.bfloat16)
        del wide


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_wgmma_search_finds_what_mma_sync_finds(dtype, tmp_path):
    """On sm_90 with an sm_90a build, 16-bit aligned searches run on wgmma
    (vq_search_async_kernel<T, NtWgmma>): the nearest codes within rounding, and the same codes as the
    mma.sync search (MMFAST_CUDA_WGMMA=0, in a subprocess) wherever the two best distances are
    apart by more than the rounding of the dots (the two sum in different orders)."""
    from mmfast import _extension

    if torch.cuda.get_device_capability() != (9, 0) or not getattr(_extension.build_info, "cuda_wgmma", False):
        pytest.skip("wgmma needs an sm_90 GPU and a build with sm_90a code (TORCH_CUDA_ARCH_LIST with 9.0a)")
    if os.environ.get("MMFAST_CUDA_WGMMA", "")[:1] == "0":
        pytest.skip("MMFAST_CUDA_WGMMA=0 keeps mma.sync")
    from torch.profiler import ProfilerActivity, profile

    shapes = [(130, 300, 64), (200, 383, 40), (1024, 8192, 256), (70, 129, 96)]
    inputs = [make_inputs(n, k, d, dtype, "cpu", seed=n) for n, k, d in shapes]
    torch.save(inputs, tmp_path / "inputs.pt")
    script = textwrap.dedent(
        f"""
        import torch, mmfast
        inputs = torch.load({str(tmp_path / "inputs.pt")!r}, weights_only=True)
        out = [mmfast.ops.vq_quantize(z.cuda(), c.cuda()).cpu() for z, c in inputs]
        torch.save(out, {str(tmp_path / "mma_sync.pt")!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], env={**os.environ, "MMFAST_CUDA_WGMMA": "0"}, check=True)
    mma_sync = torch.load(tmp_path / "mma_sync.pt", weights_only=True)
    for (z, codebook), expected in zip(inputs, mma_sync):
        z, codebook = z.cuda(), codebook.cuda()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            indices, distance = vq_quantize(z, codebook, return_distance=True)
            torch.cuda.synchronize()
        kernels = {event.key for event in prof.key_averages()}
        assert any("vq_search_async_kernel" in name and "NtWgmma" in name for name in kernels), kernels
        assert_nearest(z, codebook, indices, distance, dtype=dtype)
        clear = clear_rows(z, codebook, dtype)
        assert torch.equal(indices.cpu()[clear], expected[clear])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(20, 5000, 16), (300, 3000, 40), (50, 2000, 8)], ids=lambda s: "x".join(map(str, s)))
def test_cpu_result_does_not_depend_on_the_thread_count(shape, dtype):
    """The thread count changes how the codes are split (few rows: code ranges per thread);
    indices and distances must stay bitwise identical (bf16: the AMX kernel where active)."""
    z, codebook = make_inputs(*shape, dtype, "cpu")
    z[::3] = z[::3].round()  # exact ties between codes, some rows
    codebook[1::2] = codebook[::2][: codebook[1::2].shape[0]].clone()  # duplicate codes: ties across splits
    results = at_thread_counts(lambda: vq_quantize(z, codebook, return_distance=True, backend="native"))
    assert bool((results[0][0] % 2 == 0).all()), "code 2j+1 duplicates code 2j: the lower index wins"
    for indices, distance in results[1:]:
        assert torch.equal(indices, results[0][0])
        assert torch.equal(distance, results[0][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ties_across_code_blocks_and_splits_go_to_the_lowest_index(dtype):
    """Code j + 1400 equals code j: the copies sit in other 256-code chunks, other 128 KB code
    blocks and, with 40 rows, other splits of the codes (2 or 3 threads); the lower index must
    win for any thread count."""
    z, codebook = make_inputs(40, 2800, 40, dtype, "cpu")
    codebook[1400:] = codebook[:1400]
    z = codebook[torch.arange(0, 2800, 70)].clone()  # rows equal to codes on both sides
    results = at_thread_counts(lambda: vq_quantize(z, codebook, backend="native"))
    for count, indices in zip((1, 2, 3), results):
        assert torch.equal(indices, torch.arange(0, 2800, 70) % 1400), (count, indices)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("splits", [2, 3, 64])
def test_triton_search_merges_its_code_splits(monkeypatch, splits):
    """The Triton search splits the codes over programs on the GPU (1 split under the
    interpreter unless forced); the merge must keep the lowest index on ties across splits,
    return the nearest code, and keep the rules for a NaN row. 64 is capped to the 3 code tiles."""
    from mmfast.triton import vq as triton_vq

    monkeypatch.setattr(triton_vq, "FORCE_SPLITS", splits)
    z, codebook = make_inputs(40, 150, 24, torch.float32, TRITON_DEVICE)
    codebook[75:] = codebook[:75]  # code j + 75 duplicates code j, in another 64-code tile and split
    z[:20] = codebook[torch.arange(0, 140, 7) % 75]
    z[20, 3] = float("nan")
    indices, distance = vq_quantize(z, codebook, return_distance=True, backend="triton")
    expected_indices, expected_distance = vq_quantize(z, codebook, return_distance=True, backend="native")
    assert torch.equal(indices[:20].cpu(), torch.arange(0, 140, 7) % 75), "ties go to the lowest index"
    assert torch.equal(indices.cpu(), expected_indices.cpu())
    torch.testing.assert_close(distance.cpu(), expected_distance.cpu(), rtol=1e-5, atol=1e-5, equal_nan=True)


# ---- bf16 on AMX tiles (mmfast/cpu/isa.h: MMFAST_CPU_AMX) ------------------------------------

def _cpuinfo_words():
    try:
        return set(open("/proc/cpuinfo").read().split())
    except OSError:
        return set()


def _cpu_has_amx_bf16():
    flags = _cpuinfo_words()
    return "amx_bf16" in flags and "amx_tile" in flags and "avx512f" in flags


def _cpu_has_avx512_bf16():
    flags = _cpuinfo_words()
    return {"avx512_bf16", "avx512f", "avx512vl", "avx512bw", "avx512dq"} <= flags


def _run_python(code, **env):
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                          cwd=os.path.dirname(__file__))


# Reasons mmfast gives (MMFAST_CPU_AMX=1) for AMX being unavailable on a CPU that has it.
AMX_REFUSED = ("Linux refused the tile state", "this build has no AMX kernels")


def test_amx_runs_bf16_where_the_cpu_has_it():
    """On a CPU with AMX-BF16 the bf16 search must use the tiles, unless the OS refuses them
    (kernel < 5.16, seccomp) or the build has none, which MMFAST_CPU_AMX=1 must then explain;
    elsewhere it must say it does not use them."""
    if _cpu_has_amx_bf16() and os.environ.get("MMFAST_CPU_AMX", "") not in ("", "1"):
        pytest.skip("MMFAST_CPU_AMX turns AMX off in this environment")
    if os.environ.get("MMFAST_CPU_ISA", "avx512") != "avx512":
        pytest.skip("a forced CPU ISA other than avx512 turns AMX off")
    if _cpu_has_amx_bf16() and not torch.ops.mmfast.cpu_amx_bf16():
        forced = _run_python("import torch, mmfast; torch.ops.mmfast.cpu_amx_bf16()", MMFAST_CPU_AMX="1")
        reason = [line for line in forced.stderr.splitlines() if "MMFAST_CPU_AMX=1 but" in line]
        if any(text in forced.stderr for text in AMX_REFUSED):
            pytest.skip(reason[-1] if reason else "AMX unavailable")
    assert torch.ops.mmfast.cpu_amx_bf16() == _cpu_has_amx_bf16()


BF16_PATH_SCRIPT = textwrap.dedent(
    """
    import torch, mmfast
    from mmfast.ops import vq_codebook_sqnorm, vq_quantize
    from test_vq import SHAPES, assert_nearest, make_inputs
    assert torch.ops.mmfast.cpu_amx_bf16() == {amx}
    assert torch.ops.mmfast.cpu_avx512_bf16() == {avx512_bf16}
    # D = 29, 30, 31: the three folded constant dims end at or straddle a 32-dim tile step (AMX);
    # odd D pads the last bf16 pair (AVX512-BF16).
    for shape in SHAPES + [(300, 3000, 40), (129, 95, 33), (70, 300, 29), (70, 300, 30), (70, 300, 31)]:
        z, codebook = make_inputs(*shape, torch.bfloat16, "cpu", seed=1)
        indices, distance = vq_quantize(z, codebook, return_distance=True, backend="native")
        assert_nearest(z, codebook, indices, distance, dtype=torch.bfloat16)
        given = vq_quantize(z, codebook, codebook_sqnorm=vq_codebook_sqnorm(codebook), backend="native")
        assert torch.equal(given, indices)
    print("ok")
    """
)


@pytest.mark.parametrize("path", ["avx512-fp32-sums", "amx-tiles", "avx512-bf16-dot"])
def test_bf16_search_on_each_path(path):
    """Every bf16 CPU path this machine has, against fp64: MMFAST_CPU_AMX and
    MMFAST_CPU_AVX512_BF16 pick the tiles, VDPBF16PS or the vector path (bf16 converted on load)."""
    amx, avx512_bf16 = path == "amx-tiles", path == "avx512-bf16-dot"
    if amx and not _cpu_has_amx_bf16():
        pytest.skip("this CPU has no AMX-BF16")
    if avx512_bf16 and not _cpu_has_avx512_bf16():
        pytest.skip("this CPU has no AVX512-BF16")
    if os.environ.get("MMFAST_CPU_ISA", "avx512") != "avx512" and path != "avx512-fp32-sums":
        pytest.skip("a forced CPU ISA other than avx512 turns both off")
    result = _run_python(BF16_PATH_SCRIPT.format(amx=amx, avx512_bf16=avx512_bf16), MMFAST_CPU_AMX="1" if amx else "0",
                         MMFAST_CPU_AVX512_BF16="1" if avx512_bf16 else "0")
    if amx and any(text in result.stderr for text in AMX_REFUSED):
        pytest.skip("AMX unavailable: " + result.stderr.strip().splitlines()[-1])
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_avx512_bf16_is_on_by_default_on_amd_only():
    """VDPBF16PS pays where it retires at the FMA rate (AMD Zen 4), not on Sapphire Rapids."""
    if os.environ.get("MMFAST_CPU_AVX512_BF16", "") != "" or os.environ.get("MMFAST_CPU_ISA", "avx512") != "avx512":
        pytest.skip("MMFAST_CPU_AVX512_BF16 or MMFAST_CPU_ISA forces a path in this environment")
    amd = "AuthenticAMD" in _cpuinfo_words()  # /proc/cpuinfo's vendor_id
    expected = _cpu_has_avx512_bf16() and amd and not torch.ops.mmfast.cpu_amx_bf16()
    assert torch.ops.mmfast.cpu_avx512_bf16() == expected


@pytest.mark.parametrize("env, message", [
    ({"MMFAST_CPU_AMX": "yes"}, "MMFAST_CPU_AMX must be 0 or 1, got 'yes'"),
    ({"MMFAST_CPU_AMX": "1", "MMFAST_CPU_ISA": "generic"}, "MMFAST_CPU_AMX=1 but"),
    ({"MMFAST_CPU_AVX512_BF16": "on"}, "MMFAST_CPU_AVX512_BF16 must be 0 or 1, got 'on'"),
    ({"MMFAST_CPU_AVX512_BF16": "1", "MMFAST_CPU_ISA": "generic"}, "MMFAST_CPU_AVX512_BF16=1 but"),
])
def test_bad_cpu_bf16_setting_is_an_error(env, message):
    check = "cpu_avx512_bf16" if "MMFAST_CPU_AVX512_BF16" in env else "cpu_amx_bf16"
    result = _run_python(f"import torch, mmfast; torch.ops.mmfast.{check}()", **env)
    assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]


def test_empty_input():
    z, codebook = make_inputs(0, 5, 4, torch.float32, "cpu")
    assert vq_quantize(z, codebook).shape == (0,)
    assert vq_dequantize(torch.empty(0, dtype=torch.int64), codebook).shape == (0, 4)
    for backend in ("native", "reference"):  # zero gradients from an empty batch's distances on both
        rows, codes = z.clone().requires_grad_(), codebook.clone().requires_grad_()
        vq_quantize(rows, codes, return_distance=True, backend=backend)[1].sum().backward()
        assert rows.grad.shape == (0, 4) and codes.grad.eq(0).all()


# ---- against the peers -------------------------------------------------------------------------


def test_agrees_with_vector_quantize_pytorch():
    vqp = pytest.importorskip("vector_quantize_pytorch")
    torch.manual_seed(0)
    quantizer = vqp.VectorQuantize(dim=32, codebook_size=512, kmeans_init=False).eval()
    x = torch.randn(2, 100, 32)
    with torch.no_grad():
        _, their_indices, _ = quantizer(x)
    codebook = quantizer._codebook.embed[0]
    ours = vq_quantize(x, codebook)
    assert_nearest(x, codebook, ours, vq_quantize(x, codebook, return_distance=True)[1])
    # Equal wherever the two best fp64 distances are apart by more than fp32's rounding; the
    # rest are near-ties either may decide.
    clear = clear_rows(x.reshape(-1, 32), codebook, torch.float32)
    assert clear.float().mean() > 0.9  # 92.5% here: most rows are compared
    assert torch.equal(ours.reshape(-1)[clear], their_indices.reshape(-1)[clear])


def test_agrees_with_faiss():
    faiss = pytest.importorskip("faiss")
    z, codebook = make_inputs(2000, 4096, 64, torch.float32, "cpu")
    index = faiss.IndexFlatL2(64)
    index.add(codebook.numpy())
    their_distance, their_indices = index.search(z.numpy(), 1)
    ours, distance = vq_quantize(z, codebook, return_distance=True)
    torch.testing.assert_close(distance, torch.from_numpy(their_distance[:, 0]), rtol=1e-4, atol=1e-3)
    clear = clear_rows(z, codebook, torch.float32)  # as above: near-ties excepted
    assert clear.float().mean() > 0.95
    assert torch.equal(ours[clear], torch.from_numpy(their_indices[:, 0])[clear])


MEMORY_SCRIPT = textwrap.dedent(
    """
    import torch, mmfast
    from mmfast.memory import PeakMemory
    from mmfast.ops import vq_quantize

    z, codebook = torch.randn(4096, 8), torch.randn(262144, 8)
    vq_quantize(z[:16], codebook)  # load kernels, warm the allocator
    with PeakMemory("cpu") as meter:
        indices = vq_quantize(z, codebook)
    print(meter.peak_bytes, int(indices.max()))
    """
)


def test_huge_codebook_needs_no_n_by_k_memory():
    """K = 262,144 codes, N = 4096: the N x K fp32 distance matrix would be 4.3 GB."""
    result = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, check=True,
                            env={**os.environ, "OMP_NUM_THREADS": "2"})
    growth, _ = result.stdout.split()
    if growth == "None":  # /proc/self/clear_refs forbidden (some sandboxes): PeakMemory measures nothing
        pytest.skip("no peak-RSS measurement here (PeakMemory.peak_bytes is None)")
    growth = int(growth)
    assert growth < 64 * 2**20, f"peak memory grew by {growth / 2**20:.1f} MiB"


# ---- lookup ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequantize(backend_device, dtype):
    backend, device = backend_device
    _, codebook = make_inputs(1, 50, 12, dtype, device)
    indices = torch.randint(0, 50, (2, 5, 7), device=device)
    rows = vq_dequantize(indices, codebook, backend=backend)
    assert torch.equal(rows, codebook[indices])
    planes = vq_dequantize(indices.int(), codebook, channels_first=True, backend=backend)
    assert planes.shape == (2, 12, 5, 7) and planes.is_contiguous()
    assert torch.equal(planes, codebook[indices].permute(0, 3, 1, 2))
    # non-contiguous indices (transposed) and codebook (every other column of a wider one)
    wide = torch.repeat_interleave(codebook, 2, dim=1)[:, ::2]
    assert not wide.is_contiguous() and torch.equal(wide, codebook)
    for idx in (indices.transpose(1, 2), indices[:, ::2]):
        assert torch.equal(vq_dequantize(idx, wide, backend=backend), codebook[idx])
    assert torch.equal(vq_dequantize(indices.transpose(1, 2), wide, channels_first=True, backend=backend),
                       codebook[indices.transpose(1, 2)].permute(0, 3, 1, 2))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["native", pytest.param("triton", marks=pytest.mark.skipif(
    not HAS_TRITON, reason="triton not installed"))])
@pytest.mark.parametrize("channels_first", [False, True], ids=["rows", "channels_first"])
def test_cuda_dequantize_past_2_to_the_31_output_elements(backend, channels_first):
    """An output of more than 2^31 elements (4 GiB of fp16: 8.4M codes of D = 256, about 8,200
    Liquid images): Triton once compared offsets against count x D computed in int32, which
    wrapped and left the output unwritten. The whole output is checked (one comparison per
    row block, no second 4 GiB copy)."""
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs a GPU of 24 GiB or more (about 12 GiB at its peak)")
    d, count = 256, 2**31 // 256 + 3
    codebook = torch.randn(100, d, dtype=torch.float16, device="cuda")
    indices = torch.randint(0, 100, (count // 4096 + 1, 64, 64), device="cuda")  # (B, h, w)
    out = vq_dequantize(indices, codebook, channels_first=channels_first, backend=backend)
    assert out.numel() > 2**31
    for b0 in range(0, indices.shape[0], 256):  # 256 images: 0.5 GiB of expected rows at a time
        expected = codebook[indices[b0:b0 + 256]]
        got = out[b0:b0 + 256].permute(0, 2, 3, 1) if channels_first else out[b0:b0 + 256]
        assert torch.equal(got, expected), b0
    del out


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_dequantize_out_of_range(backend_device):
    backend, device = backend_device
    _, codebook = make_inputs(1, 50, 12, torch.float32, device)
    for bad in (50, -1):
        indices = torch.tensor([3, bad, 4], device=device)
        if device == "cuda":  # native and Triton kernels: the documented NaN row, no host synchronisation
            assert vq_dequantize(indices, codebook, backend=backend)[1].isnan().all()
        else:
            with pytest.raises(IndexError, match=f"index {bad} is out of range for a codebook of 50 codes"):
                vq_dequantize(indices, codebook, backend=backend)
        with pytest.raises(IndexError, match=f"index {bad} is out of range"):  # the reference raises everywhere
            vq_dequantize(indices, codebook, backend="reference")
    with pytest.raises(IndexError, match="index 50"):
        torch.ops.mmfast.vq_dequantize(torch.tensor([1, 50]), codebook.cpu(), False)


# ---- autograd --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_gradients_fp64(backend):
    z, codebook = make_inputs(9, 13, 5, torch.float64, "cpu")
    z, codebook = z.requires_grad_(), codebook.requires_grad_()
    distance = lambda a, b: vq_quantize(a, b, return_distance=True, backend=backend)[1]  # noqa: E731
    # batched gradients too (vmap over grad_outputs: jacobian(vectorize=True), is_grads_batched): the
    # native backward summed per code with an in-place index_add_, which vmap refused
    assert torch.autograd.gradcheck(distance, (z, codebook), check_batched_grad=True)
    sqnorm = vq_codebook_sqnorm(codebook.detach()).requires_grad_()
    given = lambda a, b, s: vq_quantize(a, b, codebook_sqnorm=s, return_distance=True, backend=backend)[1]  # noqa
    assert torch.autograd.gradcheck(given, (z, codebook, sqnorm), check_batched_grad=True)
    indices = torch.randint(0, 13, (2, 3, 4))
    assert torch.autograd.gradcheck(lambda b: vq_dequantize(indices, b, channels_first=True, backend=backend),
                                    (codebook,))


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_fp32_gradients_match_the_fp64_reference(backend_device):
    """Every backend's fp32 backward (the Triton one had only opcheck's registration check) against
    the fp64 reference's autograd: distance -> z, codebook, given norms; dequantize -> codebook."""
    backend, device = backend_device
    z, codebook = make_inputs(33, 70, 9, torch.float64, device, seed=4)
    sqnorm = vq_codebook_sqnorm(codebook)
    grad_distance = torch.randn(33, dtype=torch.float64, device=device)
    indices = torch.randint(0, 70, (2, 5, 6), device=device)
    grad_rows = torch.randn(2, 9, 5, 6, dtype=torch.float64, device=device)

    def grads(dtype, backend):
        a, b, s = (t.detach().to(dtype).requires_grad_() for t in (z, codebook, sqnorm))
        distance = vq_quantize(a, b, codebook_sqnorm=s, return_distance=True, backend=backend)[1]
        rows = vq_dequantize(indices, b, channels_first=True, backend=backend)
        loss = (distance.double() * grad_distance).sum() + (rows.double() * grad_rows).sum()
        return torch.autograd.grad(loss, (a, b, s))

    assert_grads_close(grads(torch.float32, backend), grads(torch.float64, "reference"), torch.float32)


# ---- torch.library integration -----------------------------------------------------------------------


def _namespace(backend):
    if backend == "native":
        return torch.ops.mmfast
    import mmfast.triton  # noqa: F401
    return torch.ops.mmfast_triton


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_opcheck(backend_device):
    backend, device = backend_device
    ns = _namespace(backend)
    z, codebook = make_inputs(37, 70, 9, torch.float32, device)
    sqnorm = vq_codebook_sqnorm(codebook)
    for args in [(z, codebook, None), (z, codebook, sqnorm), (z.requires_grad_(), codebook.requires_grad_(), None)]:
        torch.library.opcheck(ns.vq_quantize.default, args)
    indices = torch.randint(0, 70, (2, 3, 4), device=device)
    for args in [(indices, codebook.detach(), False), (indices.int(), codebook.detach(), True),
                 (indices, codebook.detach().requires_grad_(), True)]:
        torch.library.opcheck(ns.vq_dequantize.default, args)


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_torch_compile_fullgraph(backend_device):
    backend, device = backend_device
    torch._dynamo.reset()

    def tokenize(x, codebook):
        indices, distance = vq_quantize(x * 2, codebook, return_distance=True, backend=backend)
        return vq_dequantize(indices, codebook, backend=backend), distance.sum()

    z, codebook = make_inputs(2 * 16, 64, 8, torch.float32, device)
    compiled = torch.compile(tokenize, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(z.view(2, 16, 8), codebook), tokenize(z.view(2, 16, 8), codebook)):
        torch.testing.assert_close(got, want)


# ---- errors ---------------------------------------------------------------------------------------------

BAD_QUANTIZE = {
    "D mismatch": (lambda: (torch.randn(4, 8), torch.randn(10, 7)), ValueError, "last dim must equal"),
    "empty codebook": (lambda: (torch.randn(4, 8), torch.randn(0, 8)), ValueError, "at least one code"),
    "codebook rank": (lambda: (torch.randn(4, 8), torch.randn(10)), ValueError, r"2-D \(K, D\)"),
    "integer z": (lambda: (torch.ones(4, 8, dtype=torch.int32), torch.randn(10, 8)), TypeError, "float32"),
    "mixed dtypes": (lambda: (torch.randn(4, 8).half(), torch.randn(10, 8)), TypeError, "same dtype"),
    "mixed devices": (lambda: (torch.randn(4, 8, device="meta"), torch.randn(10, 8)), TypeError, "same device"),
}


@pytest.mark.parametrize("case", list(BAD_QUANTIZE))
@pytest.mark.parametrize("entry", ["public", "torch.ops"])
def test_bad_inputs_raise_clear_errors(case, entry):
    make, error, message = BAD_QUANTIZE[case]
    z, codebook = make()
    with pytest.raises(error, match=message):
        if entry == "public":
            vq_quantize(z, codebook)
        else:
            torch.ops.mmfast.vq_quantize(z.reshape(-1, z.shape[-1]), codebook, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_codebook_sqnorm_matches_fp64_in_the_accumulation_dtype(dtype):
    codebook = (torch.randn(37, 29, generator=torch.Generator().manual_seed(5)) * 40).to(dtype)
    expected = codebook.double().pow(2).sum(-1)  # of the codes as stored (16-bit codes exactly)
    sqnorm = vq_codebook_sqnorm(codebook)
    assert sqnorm.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and sqnorm.shape == (37,)
    rtol = 1e-15 if dtype == torch.float64 else 2e-6  # 29-term fp32 sums: at most 29 x 2^-24 = 1.7e-6
    torch.testing.assert_close(sqnorm.double(), expected, rtol=rtol, atol=0)
    with pytest.raises(ValueError, match=r"codebook must be a 2-D \(K, D\) tensor"):
        vq_codebook_sqnorm(codebook[0])
    with pytest.raises(TypeError, match="codebook must be float32, float16, bfloat16 or float64, got torch.int32"):
        vq_codebook_sqnorm(codebook.int())


def test_bad_options_raise_clear_errors():
    z, codebook = make_inputs(4, 10, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="metric must be one of"):
        vq_quantize(z, codebook, metric="dot")
    with pytest.raises(ValueError, match="codebook_sqnorm must be"):
        vq_quantize(z, codebook, codebook_sqnorm=torch.ones(9))
    with pytest.raises(TypeError, match="codebook_sqnorm must be torch.float32"):
        vq_quantize(z, codebook, codebook_sqnorm=torch.ones(10, dtype=torch.float64))
    with pytest.raises(ValueError, match="applies to metric 'l2' only"):
        vq_quantize(z, codebook, metric="cosine", codebook_sqnorm=vq_codebook_sqnorm(codebook))
    with pytest.raises(TypeError, match="indices must be int64 or int32"):
        vq_dequantize(torch.ones(3), codebook)
    with pytest.raises(ValueError, match=r"channels_first needs \(B, h, w\) indices"):
        vq_dequantize(torch.zeros(3, dtype=torch.int64), codebook, channels_first=True)
    with pytest.raises(ValueError, match=r"codebook must be a 2-D \(K, D\) tensor, got shape \(5,\)"):
        vq_dequantize(torch.zeros(3, dtype=torch.int64), torch.randn(5))
    with pytest.raises(TypeError, match="codebook must be float32, float16, bfloat16 or float64, got torch.int32"):
        vq_dequantize(torch.zeros(3, dtype=torch.int64), codebook.int())
    for call in (lambda: vq_quantize(z.tolist(), codebook), lambda: vq_dequantize([1, 2], codebook),
                 lambda: vq_codebook_sqnorm(None), lambda: vq_quantize(z, codebook, codebook_sqnorm=[1.0])):
        with pytest.raises(TypeError, match="must be a torch.Tensor, got"):
            call()


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_triton_rejects_fp64_with_a_clear_error():
    z, codebook = make_inputs(4, 10, 8, torch.float64, TRITON_DEVICE)
    with pytest.raises(TypeError, match="triton backend has no float64 kernels"):
        vq_quantize(z, codebook, backend="triton")
