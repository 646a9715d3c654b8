"""APTP experts as one mixed-code UNet (mmfast.models.aptp): exactness against the physically
sliced expert UNets, CFG, checkpoints, and the router."""
from __future__ import annotations

import collections
import copy

import pytest
import torch

pytest.importorskip("diffusers")

import mmfast  # noqa: E402
from mmfast.models.aptp import (ArchitectureCode, AptpUNet, DepthSkip, Router, arch_vector_layout,  # noqa: E402
                                contrastive_loss, dense_skeleton, depth_gates, load_expert, prune_unet,
                                random_architecture, run_per_expert, save_expert, sinkhorn, width_gates)
from mmfast.models.aptp.unet import CodedAttnProcessor  # noqa: E402
from mmfast.testing.tiny_aptp import soft_arch_vector, tiny_aptp_unet, tiny_experts, tiny_inputs  # noqa: E402

CODES = [2, 0, 2, 1, 0, 2]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny shapes: one intra-op thread. On a loaded 2-core machine OpenMP's spinning threads make
    each tiny conv up to 100x slower; the results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup():
    """Base UNet, 3 experts (expert 0 runs every depth-gated block, expert 1 skips them all,
    expert 2 some) with random kept groups and perturbed weights, and their AptpUNet."""
    base, experts = tiny_experts(3, torch.Generator().manual_seed(1))
    return base, experts, AptpUNet.from_experts(base, experts)


def per_expert(experts, x, t, text, codes):
    """Each row through its own sliced expert UNet (the definition)."""
    return torch.cat([experts[k][0](x[i:i + 1], t[i:i + 1], text[i:i + 1]).sample for i, k in enumerate(codes)])


def assert_matches(actual, expected, rel=1e-4):
    """max |actual - expected| <= rel * max |expected|; returns the measured ratio."""
    error = (actual - expected).abs().max().item() / expected.abs().max().item()
    assert error <= rel, f"max difference {error:.3g} of the output scale"
    return error


@torch.no_grad()
def test_mixed_batch_equals_sliced_experts(setup):
    base, experts, model = setup
    archs = [arch for _, arch in experts]
    # the experts really differ: kept groups, depth gates, weights
    assert all(archs[0].depth.values()) and not any(archs[1].depth.values())
    assert not torch.equal(archs[0].width["down_blocks.0.resnets.0"], archs[1].width["down_blocks.0.resnets.0"])
    assert any(not bool(v.all()) for v in archs[2].width.values() if v.numel() <= 6)  # some heads pruned
    x, t, text = tiny_inputs(len(CODES))
    expected = per_expert(experts, x, t, text, CODES)
    actual = model(x, t, text, torch.tensor(CODES)).sample
    assert actual.shape == expected.shape == x.shape
    assert_matches(actual, expected)
    # a row run by another expert differs: the test tells experts apart
    other = experts[0][0](x[:1], t[:1], text[:1]).sample
    assert (other - expected[:1]).abs().max() > 1e-2 * expected.abs().max()
    # the one-pass-per-code baseline (per-row timesteps sliced with the rows) agrees
    assert_matches(run_per_expert(experts, x, t, text, torch.tensor(CODES)), expected)
    # one code only, and already-sorted codes
    assert_matches(model(x[:2], t[:2], text[:2], torch.tensor([1, 1])).sample,
                   per_expert(experts, x[:2], t[:2], text[:2], [1, 1]))
    # diffusers' pipelines pass return_dict=False (a new-user trial got a 10,000-character TypeError)
    as_tuple = model(x, t, text, torch.tensor(CODES), return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1 and torch.equal(as_tuple[0], actual)
    # by default UNet2DConditionOutput, as the UNet's: [0] is the batch (a bare tensor gave its first row)
    output = model(x, t, text, torch.tensor(CODES))
    assert type(output).__name__ == "UNet2DConditionOutput" and torch.equal(output[0], actual)


@torch.no_grad()
def test_one_model_serves_several_threads(setup):
    """A systems trial: two threads sharing one AptpUNet read each other's sample codes (68 of 80
    outputs wrong, no error); the codes are per thread now, and none are left set afterwards."""
    import threading

    _, experts, model = setup
    x, t, text = tiny_inputs(4)
    batches = [torch.tensor([0, 1, 2, 0]), torch.tensor([2, 2, 1, 1])]
    expected = [model(x, t, text, codes).sample for codes in batches]
    failures = []

    def run(index):
        for _ in range(6):
            if not torch.equal(model(x, t, text, batches[index]).sample, expected[index]):
                failures.append(index)

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
    assert model.state.codes is None
    copy_ = copy.deepcopy(model)  # the per-thread state copies (empty)
    assert torch.equal(copy_(x, t, text, batches[0]).sample, expected[0])


@torch.no_grad()
def test_attention_runs_kept_heads_only(setup):
    """Every attention of the tiny UNet has pruned heads: CodedAttnProcessor runs SDPA on the
    kept (row, head) pairs; with an encoder attention mask it falls back to diffusers' processor
    over every head (masked heads are zeros either way), and both give the same result."""
    base, experts, model = setup
    processors = [m.processor for m in model.unet.modules() if hasattr(m, "processor")]
    assert processors and all(isinstance(p, CodedAttnProcessor) for p in processors)
    x, t, text = tiny_inputs(len(CODES))
    codes = torch.tensor(CODES)
    plain = model(x, t, text, codes).sample
    with model.state.use(codes.sort(stable=True).values):  # the plan of the sorted batch
        rows, heads = processors[0]._pairs(torch.device("cpu"))
    kept = processors[0].kept_heads
    assert rows.numel() == sum(len(kept[c]) for c in CODES) < len(CODES) * processors[0].heads
    for p in processors:
        p._warned = False  # each layer says it once per model: whatever ran before
    with pytest.warns(UserWarning, match="over every head"):
        masked = model(x, t, text, codes, encoder_attention_mask=torch.ones(len(CODES), text.shape[1])).sample
    assert_matches(masked, plain)


@torch.no_grad()
def test_loaded_state_dict_and_edited_masks_replan_the_kept_heads():
    """A skeleton AptpUNet of other experts, given this one's state dict (strict, every key
    matched), ran its old head plan: heads the loaded masks keep came out as zeros (17% of the
    output scale off). The plan follows the masks: after load_state_dict (in place or assign)
    and after an in-place mask edit."""
    base = tiny_aptp_unet()
    _, first = tiny_experts(2, torch.Generator().manual_seed(1), base=base, skip_depth=(0.0,))
    _, second = tiny_experts(2, torch.Generator().manual_seed(2), base=base, skip_depth=(0.0,))
    x, t, text = tiny_inputs(2)
    codes = torch.tensor([0, 1])
    source = AptpUNet.from_experts(base, first)
    expected = source(x, t, text, codes).sample
    for assign in (False, True):
        skeleton = AptpUNet.from_experts(base, second)
        skeleton(x, t, text, codes)  # plans the second experts' heads
        skeleton.load_state_dict(source.state_dict(), strict=True, assign=assign)
        assert_matches(skeleton(x, t, text, codes).sample, expected, rel=1e-6)
    with torch.inference_mode():  # inference-tensor masks (no version counter), loaded in place
        fresh = AptpUNet.from_experts(base, second)
        fresh(x, t, text, codes)
        fresh.load_state_dict(source.state_dict(), strict=True)
        assert_matches(fresh(x, t, text, codes).sample, expected, rel=1e-6)
    attention = next(m for m in skeleton.unet.modules()
                     if isinstance(getattr(m, "processor", None), CodedAttnProcessor))
    head = attention.inner_dim // attention.heads
    for name in ("to_q", "to_k", "to_v"):  # code 0 now drops head 0 of this layer, as if pruned
        getattr(attention, name).out_mask[0, :head] = False
    skeleton(x, t, text, codes)
    assert 0 not in attention.processor.kept_heads[0] and 0 in attention.processor.kept_heads[1]


@torch.no_grad()
def test_classifier_free_guidance_repeats_codes(setup):
    base, experts, model = setup
    prompts = [1, 2, 0]
    x, t, text = tiny_inputs(2 * len(prompts), seed=3)
    t = torch.full((6,), 500)  # one timestep for the whole CFG batch, as pipelines pass it
    rows = prompts + prompts   # [uncond; cond]: CFG doubles rows, not codes
    expected = per_expert(experts, x, t, text, rows)
    assert_matches(model(x, t[0], text, torch.tensor(prompts)).sample, expected)
    assert_matches(model(x, t[0], text, torch.tensor(rows)).sample, expected)
    with pytest.raises(ValueError, match="sample codes"):
        model(x, t, text, torch.tensor([0, 1, 2, 0]))
    with pytest.raises(IndexError, match=r"sample codes must be in \[0, 3\)"):
        model(x, t, text, torch.tensor([0, 1, 3, 0, 1, 2]))
    with pytest.raises(TypeError, match="must be integers"):
        model(x, t[0], text, torch.tensor([0.0, 1.7, 1.0]))  # would truncate to expert 1
    with pytest.raises(ValueError, match="one code per row"):
        model(x, t[0], text, torch.tensor(rows).reshape(2, 3))
    with pytest.raises(ValueError, match="encoder_hidden_states has 3 rows for 6 samples"):
        model(x, t[0], text[:3], torch.tensor(prompts))
    with pytest.raises(ValueError, match=r"sample must be \(B, C, H, W\) latents, got \(4, 8, 8\)"):
        model(x[0], t[0], text, torch.tensor(rows))  # one latent without its batch dim


def _controlnet_residual_shapes(unet, x, t, text):
    """Shapes of the residuals a ControlNet adds: the skip connections (conv_in's output, then
    every down block's), then the mid block's output."""
    shapes = []
    hooks = [unet.conv_in.register_forward_hook(lambda m, i, out: shapes.append(out.shape))]
    hooks += [block.register_forward_hook(lambda m, i, out: shapes.extend(r.shape for r in out[1]))
              for block in unet.down_blocks]
    hooks.append(unet.mid_block.register_forward_hook(lambda m, i, out: shapes.append(out.shape)))
    unet(x, t, text)
    for hook in hooks:
        hook.remove()
    return shapes


@torch.no_grad()
def test_per_row_arguments_inside_tuples_follow_their_rows(setup):
    """ControlNet residuals come as a tuple of per-row tensors: AptpUNet sorts rows by code, and
    must sort those too (found by a new-user trial: a permuted batch gave other results)."""
    base, _, model = setup
    x, t, text = tiny_inputs(len(CODES), seed=5)
    generator = torch.Generator().manual_seed(6)
    *down, mid = [torch.randn(shape, generator=generator) for shape in _controlnet_residual_shapes(base, x, t, text)]
    codes = torch.tensor(CODES)
    out = model(x, t, text, codes, down_block_additional_residuals=tuple(down),
                mid_block_additional_residual=mid).sample
    assert (out - model(x, t, text, codes).sample).abs().max() > 1e-3  # the residuals matter
    perm = torch.randperm(len(CODES), generator=generator)
    permuted = model(x[perm], t[perm], text[perm], codes[perm],
                     down_block_additional_residuals=tuple(r[perm] for r in down),
                     mid_block_additional_residual=mid[perm]).sample
    assert_matches(permuted, out[perm])


@torch.no_grad()
def test_per_row_dicts_keep_their_type_and_follow_their_rows(setup):
    """added_cond_kwargs may be an OrderedDict (or a diffusers BaseOutput): sorted by code, not turned into a dict."""
    _, _, model = setup
    x, t, text = tiny_inputs(len(CODES), seed=7)
    codes = torch.tensor(CODES)
    row_ids = torch.arange(len(CODES), dtype=torch.float32)
    seen = {}

    def capture(module, args, kwargs):
        seen.update(kwargs)

    hook = model.unet.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        model(x, t, text, codes, added_cond_kwargs=collections.OrderedDict(row_ids=row_ids, scale=2.0))
    finally:
        hook.remove()
    passed = seen["added_cond_kwargs"]
    assert type(passed) is collections.OrderedDict and passed["scale"] == 2.0
    order = torch.argsort(codes, stable=True)
    assert torch.equal(passed["row_ids"], row_ids[order])


@torch.no_grad()
def test_from_state_dicts_and_unpruned_expert(setup):
    base, experts, model = setup
    x, t, text = tiny_inputs(len(CODES), seed=5)
    from_dicts = AptpUNet.from_experts(base, [(e.state_dict(), a) for e, a in experts])
    torch.testing.assert_close(from_dicts(x, t, text, torch.tensor(CODES)).sample,
                               model(x, t, text, torch.tensor(CODES)).sample, rtol=0, atol=0)
    foreign = {**experts[0][0].state_dict(), "controlnet_cond_embedding.conv_in.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="expert 0 has 1 weights the base UNet does not have"):
        AptpUNet.from_experts(base, [(foreign, experts[0][1])])
    with pytest.raises(TypeError, match=r"expert 1 must be a pair \(expert UNet or its state dict, its Archit"):
        AptpUNet.from_experts(base, [experts[0], experts[1][0]])  # a bare UNet, its code left out
    half = {name: t.half() for name, t in experts[1][0].state_dict().items()}
    with pytest.raises(ValueError, match=r"mix dtypes \(torch.float16, torch.float32\); cast them to one"):
        AptpUNet.from_experts(base, [experts[0], (half, experts[1][1])])
    # an unpruned expert (all-true masks, base weights) next to a pruned one
    full = ArchitectureCode()
    mixed = AptpUNet.from_experts(base, [(base, full), experts[1]])
    codes = [0, 1, 0]
    expected = torch.cat([base(x[:1], t[:1], text[:1]).sample, experts[1][0](x[1:2], t[1:2], text[1:2]).sample,
                          base(x[2:3], t[2:3], text[2:3]).sample])
    assert_matches(mixed(x[:3], t[:3], text[:3], torch.tensor(codes)).sample, expected)


@torch.no_grad()
def test_reference_backend_runs_a_mixed_batch(setup):
    base, experts, model = setup
    x, t, text = tiny_inputs(len(CODES), seed=7)
    native = model(x, t, text, torch.tensor(CODES)).sample
    with mmfast.use_backend("reference"):
        reference = model(x, t, text, torch.tensor(CODES)).sample
    assert_matches(reference, native, rel=1e-5)


def test_prune_unet_slices_like_aptp(setup):
    base, experts, _ = setup
    expert, arch = experts[2]
    name = "down_blocks.1.resnets.0"
    kept = int(arch.width[name].sum())
    resnet = expert.get_submodule(name)
    assert resnet.conv1.out_channels == resnet.time_emb_proj.out_features == kept * 6 == resnet.conv2.in_channels
    assert (resnet.norm2.num_groups, resnet.norm2.num_channels) == (kept, kept * 6)
    attn = expert.get_submodule("up_blocks.1.attentions.0.transformer_blocks.0.attn2")
    heads = int(arch.width["up_blocks.1.attentions.0.transformer_blocks.0.attn2"].sum())
    assert attn.heads == heads and attn.to_k.out_features == attn.to_out[0].in_features == heads * 8
    ff = expert.get_submodule("up_blocks.1.attentions.0.transformer_blocks.0.ff")
    inner = int(arch.width["up_blocks.1.attentions.0.transformer_blocks.0.ff"].sum()) * 3
    assert ff.net[0].proj.out_features == 2 * inner and ff.net[2].in_features == inner
    assert isinstance(experts[1][0].get_submodule("up_blocks.0.resnets.2"), DepthSkip)
    assert depth_gates(base)["up_blocks.0.resnets.2"] == 48  # identity keeps input[:, :96 - 48]
    with pytest.raises(ValueError, match="every group"):
        prune_unet(base, ArchitectureCode({name: torch.zeros(8, dtype=torch.bool)}))


@torch.no_grad()
def test_architecture_and_expert_checkpoints(setup, tmp_path):
    base, experts, _ = setup
    expert, arch = experts[2]
    path = str(tmp_path / "arch.safetensors")
    arch.save(path)
    from safetensors.torch import load_file
    tensors = load_file(path)
    assert all(v.dtype == torch.bool for v in tensors.values())
    assert set(tensors) == set(width_gates(base)) | {"depth/" + n for n in depth_gates(base)}
    loaded = ArchitectureCode.load(path)
    assert loaded.depth == arch.depth
    assert all(torch.equal(loaded.width[n], arch.width[n]) for n in arch.width)
    save_expert(str(tmp_path / "expert"), expert, arch, base)
    reloaded, reloaded_arch = load_expert(str(tmp_path / "expert"))
    x, t, text = tiny_inputs(2, seed=9)
    expected = expert(x, t, text).sample
    torch.testing.assert_close(reloaded(x, t, text).sample, expected, rtol=0, atol=0)
    # the dense structure from the config alone (meta device, no weights) is enough to stack experts
    skeleton = dense_skeleton(str(tmp_path / "expert"))
    assert skeleton.conv_in.weight.is_meta
    stacked = AptpUNet.from_experts(skeleton, [(reloaded, reloaded_arch), experts[0]])
    assert_matches(stacked(x, t, text, torch.tensor([0, 0])).sample, expected)


# --- router -------------------------------------------------------------------------------------


def test_router_routes_known_embeddings():
    torch.manual_seed(0)
    router = Router([4, 6], num_codes=3, embed_dim=3, depth=2)
    codebook = torch.randn(3, 12) * 3
    with torch.no_grad():
        router.codebook.copy_(codebook)
        # embedding e_k = one-hot(k) gets exactly code k's logits: cosine 1 with code k
        for layer, rows in zip(router.hypernet, codebook.T.split([4, 6, 2])):
            layer.weight.copy_(rows)
            layer.bias.zero_()
    embeddings = torch.eye(3)[[2, 0, 1, 1, 0]]
    assert router(embeddings).tolist() == [2, 0, 1, 1, 0]
    scores = router.scores(embeddings)
    assert scores.shape == (5, 3)
    torch.testing.assert_close(scores.max(dim=-1).values, torch.ones(5))
    with pytest.raises(ValueError, match=r"embeddings must be \(B, 3\) prompt embeddings .* got \(5, 768\)"):
        router(torch.randn(5, 768))  # a sentence encoder of another width


def test_router_for_unet_decodes_architectures(setup):
    base = setup[0]
    router = Router.for_unet(base, num_codes=4, embed_dim=32)
    assert router.codebook.shape[1] == sum(width_gates(base).values()) + len(depth_gates(base))
    widths, depths = arch_vector_layout(base)  # APTP's order: each block's resnets before its attentions
    assert router.gate_names == [name for name, _ in widths] and router.depth_names == depths
    assert router.widths == [groups for _, groups in widths] + [1] * len(depths)
    codes = router(torch.randn(5, 32))
    assert codes.shape == (5,) and codes.dtype == torch.int64 and int(codes.max()) < 4
    for arch in router.architectures():
        prune_unet(base, arch)  # every decoded code is a valid expert structure
    with torch.no_grad():  # a gate dropping every group keeps its first (APTP's non_zero_width)
        router.codebook[:, :router.widths[0]] = -100.0
        router.codebook[0, 1] = 100.0  # code 0 keeps group 1 of the first gate: no forced group
    first = [arch.width[router.gate_names[0]] for arch in router.architectures()]
    assert first[0].tolist() == [i == 1 for i in range(router.widths[0])]
    assert all(kept.tolist() == [i == 0 for i in range(router.widths[0])] for kept in first[1:])


def test_router_for_a_unet_outside_aptps_layout_warns_and_keeps_every_gate():
    """Resnet downsamplers have width gates but no place in an official arch vector: the router
    still covers them (width_gates' order) and says so, rather than refusing the UNet."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("ResnetDownsampleBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "ResnetUpsampleBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=8)
    with pytest.warns(UserWarning, match="gates outside the official layout"):
        router = Router.for_unet(unet, num_codes=2, embed_dim=8)
    assert router.gate_names == list(width_gates(unet))
    for arch in router.architectures():
        prune_unet(unet, arch)


def test_router_noise_is_one_gumbel_draw_per_entry():
    """APTP's gumbel_softmax_sample adds -log(-log u): mean ~ Euler-Mascheroni 0.577, not 0."""
    router = Router([4], num_codes=1, embed_dim=3, temperature=1.0, offset=0.0)
    logits = torch.zeros(20000, 4)
    noise = torch.logit(router.relax(logits, torch.Generator().manual_seed(0)))  # sigmoid^-1 with T = 1
    assert abs(noise.mean().item() - 0.5772) < 0.03 and abs(noise.var().item() - torch.pi ** 2 / 6) < 0.1
    torch.testing.assert_close(router.relax(logits), torch.full_like(logits, 0.5))
    # 16-bit logits: the draw is made in fp32 and rounded once (a bf16 u rounds to 1.0 in ~0.2% of
    # draws, g = +46 where fp32 tops out near 16.6)
    u = torch.rand(logits.shape, generator=torch.Generator().manual_seed(0))
    g = (-torch.log(-torch.log(u + 1e-20) + 1e-20)).bfloat16()
    half = router.relax(logits.bfloat16(), torch.Generator().manual_seed(0))
    assert torch.equal(half, torch.sigmoid((torch.zeros_like(g) + g + 0.0) / 1.0))


def test_sinkhorn_balances_a_skewed_batch():
    torch.manual_seed(0)
    batch, codes = 32, 4
    scores = 0.1 * torch.randn(batch, codes)
    scores[:, 0] += 0.5  # plain argmax sends every prompt to code 0
    assert scores.argmax(-1).eq(0).all()
    q = sinkhorn(scores, epsilon=0.05, iterations=3)
    torch.testing.assert_close(q.sum(-1), torch.ones(batch))
    torch.testing.assert_close(q.sum(0), torch.full((codes,), batch / codes), rtol=0.1, atol=0)
    counts = torch.bincount(q.argmax(-1), minlength=codes)
    assert int(counts.min()) >= batch // codes - 3 and int(counts.max()) <= batch // codes + 3
    # the same normalisations by exp-and-divide (APTP's code), where they do not underflow
    s = (scores.double() / 0.05).t().exp()
    s = s / s.sum()
    for _ in range(3):
        s = s / s.sum(dim=1, keepdim=True) / codes
        s = s / s.sum(dim=0, keepdim=True) / batch
    torch.testing.assert_close(q, (s * batch).t().float())
    wide = sinkhorn(100 * torch.randn(6, 3, generator=torch.Generator().manual_seed(1)))  # spans >> 37 / epsilon
    assert torch.isfinite(wide).all()
    torch.testing.assert_close(wide.sum(-1), torch.ones(6))


def test_contrastive_loss_prefers_matching_similarities():
    torch.manual_seed(0)
    prompts = torch.randn(8, 16)
    arch = (prompts @ torch.randn(16, 24)).requires_grad_()
    matched = contrastive_loss(arch, prompts)
    shuffled = contrastive_loss(arch[torch.randperm(8)], prompts)
    assert matched < shuffled
    matched.backward()
    assert arch.grad is not None and torch.isfinite(arch.grad).all()


def test_random_architecture_keeps_a_group_everywhere(setup):
    base = setup[0]
    arch = random_architecture(base, keep=0.0, generator=torch.Generator().manual_seed(0), skip_depth=1.0)
    assert all(int(v.sum()) == 1 for v in arch.width.values())
    assert not any(arch.depth.values())


@pytest.mark.parametrize("affine", ["weight+bias", "weight", "bias", "none"])
@pytest.mark.parametrize("shape", [(4, 6), (4, 5, 6), (4, 3, 5, 6)], ids=["2d", "3d", "4d"])
def test_coded_layer_norm_applies_each_rows_affine(affine, shape):
    """CodedLayerNorm: each row's code's weight / bias (either may be absent) on the LayerNorm
    over the last dim, for 2-D to 4-D inputs: F.layer_norm of each row with its code's affine."""
    from mmfast.models.aptp.unet import CodedLayerNorm, CodeState

    codes, channels = 3, shape[-1]
    weight = torch.randn(codes, channels) if "weight" in affine else None
    bias = torch.randn(codes, channels) if "bias" in affine else None
    state = CodeState()
    norm = CodedLayerNorm(state, weight, bias, torch.nn.LayerNorm(channels, eps=1e-6))
    x, sample_codes = torch.randn(shape), torch.tensor([2, 0, 1, 2])
    with state.use(sample_codes):
        y = norm(x)
    for row, code in enumerate(sample_codes.tolist()):
        expected = torch.nn.functional.layer_norm(x[row], (channels,), None if weight is None else weight[code],
                                                  None if bias is None else bias[code], 1e-6)
        torch.testing.assert_close(y[row], expected)


def test_geglu_runs_in_place_without_grad_and_as_diffusers_with_it(setup):
    """AptpUNet's feed-forwards use CodedGEGLU: without a gradient to track it overwrites the
    projection's output and hands on the hidden half as a strided view; with one it is diffusers'
    out-of-place formula. Both equal diffusers' GEGLU on the same coded projection, and the
    gradient reaches the input."""
    from diffusers.models.activations import GEGLU

    from mmfast.models.aptp.unet import CodedGEGLU

    _, _, model = setup
    fused = [m for m in model.unet.modules() if isinstance(m, CodedGEGLU)]
    assert fused and not any(type(m) is GEGLU for m in model.unet.modules())
    geglu = fused[0]
    reference = GEGLU(geglu.proj.weight.shape[2], geglu.proj.weight.shape[1] // 2)
    reference.proj = geglu.proj
    x = torch.randn(len(CODES), 5, geglu.proj.weight.shape[2])
    with model.state.use(torch.tensor(CODES)):
        expected = reference(x)
        for mode in (torch.no_grad, torch.inference_mode):
            with mode():
                in_place = geglu(x)
            assert not in_place.is_contiguous()  # the hidden half of the projection, not a copy
            torch.testing.assert_close(in_place, expected, rtol=0, atol=0)
        kept = []  # a hook that keeps the projection's output: out of place, so it stays intact
        handle = geglu.proj.register_forward_hook(lambda module, args, out: kept.append(out))
        with torch.no_grad():
            hooked = geglu(x)
        handle.remove()
        torch.testing.assert_close(hooked, expected, rtol=0, atol=0)
        torch.testing.assert_close(kept[0], geglu.proj(x), rtol=0, atol=0)
        xg = x.clone().requires_grad_(True)
        tracked = geglu(xg)
        torch.testing.assert_close(tracked, expected, rtol=0, atol=0)
        tracked.sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0


# APTP's SD-2.1 gate order (rezashkv/diffusion_pruning: get_structure over down, mid, up blocks,
# resnets before attentions, attn1 / attn2 / GEGLU per transformer block; then the 14 depth gates
# of its sd-2-1 config's depth_order): 1606 width entries, then these depth gates.
SD21_DEPTH_GATES = ["down_blocks.0.resnets.1", "down_blocks.0.attentions.1", "down_blocks.1.resnets.1",
                    "down_blocks.1.attentions.1", "down_blocks.2.resnets.1", "down_blocks.2.attentions.1",
                    "down_blocks.3.resnets.1", "up_blocks.0.resnets.2", "up_blocks.1.resnets.2",
                    "up_blocks.1.attentions.2", "up_blocks.2.resnets.2", "up_blocks.2.attentions.2",
                    "up_blocks.3.resnets.2", "up_blocks.3.attentions.2"]


def test_arch_vector_layout_of_sd21_is_the_official_one():
    from diffusers import UNet2DConditionModel


    config = dict(in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, layers_per_block=2,
                  cross_attention_dim=1024, use_linear_projection=True, block_out_channels=(320, 640, 1280, 1280),
                  attention_head_dim=(5, 10, 20, 20))
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    widths, depths = arch_vector_layout(unet)
    assert sum(groups for _, groups in widths) == 1606 and depths == SD21_DEPTH_GATES
    block = "down_blocks.0.attentions.0.transformer_blocks.0"
    assert widths[:5] == [("down_blocks.0.resnets.0", 32), ("down_blocks.0.resnets.1", 32), (f"{block}.attn1", 5),
                          (f"{block}.attn2", 5), (f"{block}.ff", 32)]
    assert widths[-3:] == [("up_blocks.3.attentions.2.transformer_blocks.0.attn1", 5),
                           ("up_blocks.3.attentions.2.transformer_blocks.0.attn2", 5),
                           ("up_blocks.3.attentions.2.transformer_blocks.0.ff", 32)]


def test_official_arch_vector_round_trip(setup, tmp_path):
    """to_arch_vector gives the official (1, D) layout; soft gate values as APTP saves them
    (kept >= 0.5; dropped below) load back to the same code, from a .pt file read
    with weights_only=True, and the code slices the same expert."""
    base, experts, _ = setup
    for _, arch in experts:
        vector = arch.to_arch_vector(base)
        assert vector.dtype == torch.float32 and vector.dim() == 2 and vector.shape[0] == 1
        soft = soft_arch_vector(arch, base, torch.Generator().manual_seed(0))
        torch.save(soft, tmp_path / "arch_vector.pt")
        loaded = ArchitectureCode.from_arch_vector(torch.load(tmp_path / "arch_vector.pt", weights_only=True), base)
        assert loaded.depth == {name: arch.runs(name) for name in depth_gates(base)}
        assert set(loaded.width) == set(width_gates(base))
        for name, groups in width_gates(base).items():
            assert torch.equal(loaded.kept(name, groups), arch.kept(name, groups)), name
        assert ArchitectureCode.from_arch_vector(vector[0], base).depth == loaded.depth  # (D,) works too


def test_bad_arch_vectors_are_value_errors(setup):
    base, experts, _ = setup
    vector = experts[0][1].to_arch_vector(base)
    with pytest.raises(ValueError, match=rf"expected \({vector.shape[1]},\) or \(1, {vector.shape[1]}\)"):
        ArchitectureCode.from_arch_vector(vector[:, :-1], base)
    short = ArchitectureCode(dict(experts[0][1].width), dict(experts[0][1].depth))
    name = next(iter(short.width))
    short.width[name] = short.width[name][:-1]
    with pytest.raises(ValueError, match=f"{name} keeps a"):
        short.to_arch_vector(base)
    vector[0, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        ArchitectureCode.from_arch_vector(vector, base)
