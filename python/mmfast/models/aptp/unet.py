"""AptpUNet: K physically pruned APTP experts served as one diffusers UNet, for batches that
mix architecture codes.

Source: APTP (Ganjdanesh et al., ICLR 2025; shared/reference/aptp.md 1.3, 5.3). APTP slices
one UNet per code and fine-tunes each separately, so the experts differ in kept groups AND in
weights, and the official code runs one expert at a time. Here every weight of every layer is
stacked per code, (K, ...), with pruned rows / columns zero-filled, and each layer runs mmfast's
masked ops: sample b computes exactly its code's sliced expert, embedded in the dense layout
(pruned channels are exactly 0), in one pass over the mixed batch.

Structure: a deep copy of the base UNet with its layers swapped for coded ones
  nn.Conv2d -> CodedConv2d (masked_conv2d)     nn.Linear    -> CodedLinear (masked_linear)
  nn.GroupNorm -> CodedGroupNorm (masked_group_norm)   nn.LayerNorm -> CodedLayerNorm
  depth-gated blocks -> CodedDepthGate (runs the block on the rows whose code keeps it)
The coded layers read the rows' codes from one shared CodeState that AptpUNet.forward sets.
Attention heads are pruned through masks on q/k/v (out) and to_out.0 (in): a masked head has
q = k = v = 0, so its SDPA output is exactly 0 and to_out never reads it, as in the pruned expert;
CodedAttnProcessor runs SDPA on the kept (row, head) pairs only.
"""
from __future__ import annotations

import contextlib
import copy
import threading
import warnings
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ... import ops
from .._modules import swap_submodule
from .architecture import FF_GROUPS, ArchitectureCode, LayerMask, _index, depth_gates, to_masks

__all__ = ["AptpUNet", "run_per_expert", "CodeState", "CodedConv2d", "CodedLinear", "CodedGroupNorm", "CodedLayerNorm",
           "CodedDepthGate", "CodedAttnProcessor", "stack_expert_weights"]

Expert = Tuple[Union[nn.Module, Mapping[str, torch.Tensor]], ArchitectureCode]


class CodeState:
    """The architecture codes (B,) of the rows the coded layers are running on, per thread: one
    AptpUNet serves several threads at once (shared, the codes of one thread's batch were read
    by the other's layers: wrong outputs without an error)."""

    def __init__(self):
        self._local = threading.local()

    def __getstate__(self):  # deepcopy / pickle: no codes are set outside forward
        return {}

    def __setstate__(self, state):
        self._local = threading.local()

    @property
    def codes(self) -> Optional[torch.Tensor]:
        return getattr(self._local, "codes", None)

    def get(self) -> torch.Tensor:
        codes = self.codes
        if codes is None:
            raise RuntimeError("APTP coded layer called outside AptpUNet.forward: no sample codes are set")
        return codes

    def as_tuple(self) -> Tuple[int, ...]:
        """The codes as Python ints: read from the device once per use() (one host sync), for
        layers that plan on the host (CodedAttnProcessor)."""
        if getattr(self._local, "as_tuple", None) is None:
            self._local.as_tuple = tuple(self.get().tolist())
        return self._local.as_tuple

    @contextlib.contextmanager
    def use(self, codes: torch.Tensor):
        local = self._local
        previous = getattr(local, "codes", None), getattr(local, "as_tuple", None)
        local.codes, local.as_tuple = codes, None
        try:
            yield
        finally:
            local.codes, local.as_tuple = previous


# --- coded layers --------------------------------------------------------------------------------


class _Coded(nn.Module):
    """Per-code weights (K, ...) as parameters, channel masks (K, C) as buffers."""

    def __init__(self, state: CodeState, params: Dict[str, Optional[torch.Tensor]], masks: Dict[str, torch.Tensor]):
        super().__init__()
        self.state = state
        for name, value in params.items():
            self.register_parameter(name, None if value is None else nn.Parameter(value, requires_grad=False))
        for name, value in masks.items():
            self.register_buffer(name, value)

    @property
    def num_codes(self) -> int:
        return self.weight.shape[0]


class CodedConv2d(_Coded):
    """nn.Conv2d per code: weight (K, Cout, Cin, kh, kw), bias (K, Cout)?, in_mask (K, Cin),
    out_mask (K, Cout). x (B, Cin, H, W) -> (B, Cout, Ho, Wo)."""

    def __init__(self, state, weight, bias, in_mask, out_mask, conv: nn.Conv2d):
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise NotImplementedError(f"CodedConv2d: needs groups=1, zero padding given as ints, got {conv}")
        super().__init__(state, {"weight": weight, "bias": bias}, {"in_mask": in_mask, "out_mask": out_mask})
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.masked_conv2d(x, self.weight, self.bias, self.state.get(), self.in_mask, self.out_mask,
                                 stride=self.stride, padding=self.padding, dilation=self.dilation)


class CodedLinear(_Coded):
    """nn.Linear per code: weight (K, Cout, Cin), bias (K, Cout)?. x (B, N, Cin) tokens, or
    (B, Cin) (the time-embedding MLP) -> (B, N, Cout) / (B, Cout)."""

    def __init__(self, state, weight, bias, in_mask, out_mask):
        super().__init__(state, {"weight": weight, "bias": bias}, {"in_mask": in_mask, "out_mask": out_mask})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.unsqueeze(1) if x.dim() == 2 else x
        y = ops.masked_linear(tokens, self.weight, self.bias, self.state.get(), self.in_mask, self.out_mask)
        return y.squeeze(1) if x.dim() == 2 else y


class CodedGroupNorm(_Coded):
    """nn.GroupNorm per code: weight / bias (K, C), channel_mask (K, C) (a resnet's norm2 keeps
    its code's groups; statistics over kept groups only = the expert's smaller GroupNorm)."""

    def __init__(self, state, weight, bias, channel_mask, norm: nn.GroupNorm):
        super().__init__(state, {"weight": weight, "bias": bias}, {"channel_mask": channel_mask})
        self.num_groups, self.eps = norm.num_groups, norm.eps

    @property
    def num_codes(self) -> int:
        return self.channel_mask.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.masked_group_norm(x, self.weight, self.bias, self.num_groups, self.state.get(),
                                     self.channel_mask, eps=self.eps)


class CodedLayerNorm(_Coded):
    """nn.LayerNorm over the last dim with per-code affine weight / bias (K, C), gathered per row.
    x (B, ..., C). Never pruned (the transformer residual stream is dense)."""

    def __init__(self, state, weight, bias, norm: nn.LayerNorm):
        super().__init__(state, {"weight": weight, "bias": bias}, {})
        self.normalized_shape, self.eps = norm.normalized_shape, norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x, self.normalized_shape, None, None, self.eps)
        codes = self.state.get()
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
        weight = self.weight[codes].view(shape) if self.weight is not None else None
        bias = self.bias[codes].view(shape) if self.bias is not None else None
        if weight is not None and bias is not None:
            return torch.addcmul(bias, y, weight)  # one pass over the activations, not two
        if weight is not None:
            return y * weight
        return y + bias if bias is not None else y


class CodedGEGLU(nn.Module):
    """diffusers' GEGLU (proj, then hidden * GELU(gate) of the projection's two halves) over a
    coded projection, computed in place when no gradient is needed: GELU and the product
    overwrite the projection's own fresh output, and the hidden half goes on as a strided view
    that the next masked_linear reads where it is (CPU: token rows at one stride). Out of place,
    the mixed batch's three full-width (B, N, F) temporaries leave the cache that the experts'
    1-2-row batches stay in and are faulted in anew each call: on 2 CPU cores GELU and the
    product took 9x the per-expert passes' time. Masked groups stay exact zeros (GELU(0) * 0).
    With a gradient to track (the projection's output requires grad), or a forward hook that may
    keep the projection's output (on proj, or global), it is diffusers' out-of-place formula."""

    def __init__(self, geglu: nn.Module):
        super().__init__()
        self.proj = geglu.proj

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        projected = self.proj(hidden_states)
        hidden, gate = projected.chunk(2, dim=-1)
        if projected.requires_grad or self.proj._forward_hooks or nn.modules.module._global_forward_hooks:
            return hidden * F.gelu(gate)
        torch.ops.aten.gelu_(gate)
        return hidden.mul_(gate)


def _fuse_geglu(unet: nn.Module) -> None:
    """CodedGEGLU in place of every diffusers GEGLU whose projection is coded."""
    from diffusers.models.activations import GEGLU

    for name, module in list(unet.named_modules()):
        if type(module) is GEGLU and isinstance(module.proj, CodedLinear):
            swap_submodule(unet, name, CodedGEGLU(module))


class CodedDepthGate(nn.Module):
    """A depth-gated block (a resnet or a Transformer2DModel, APTP's DepthGate): rows whose code
    runs it (runs (K,) bool) go through the block, only those rows; the others take the
    identity input[:, :channels] (up blocks: the non-skip part of the concatenated input)."""

    def __init__(self, state: CodeState, block: nn.Module, runs: torch.Tensor, channels: int, returns_tuple: bool):
        super().__init__()
        self.state, self.block, self.channels, self.returns_tuple = state, block, channels, returns_tuple
        self.register_buffer("runs", runs.bool())

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        codes = self.state.get()
        runs = self.runs[codes]
        if bool(runs.all()):
            return self.block(hidden_states, *args, **kwargs)
        out = hidden_states[:, :self.channels]
        if bool(runs.any()):
            rows = torch.nonzero(runs)[:, 0]
            batch = hidden_states.shape[0]

            def take(v):  # the batch rows of any per-row tensor argument (temb, encoder states)
                return v.index_select(0, rows) if torch.is_tensor(v) and v.dim() and v.shape[0] == batch else v

            with self.state.use(codes.index_select(0, rows)):
                ran = self.block(take(hidden_states), *map(take, args), **{k: take(v) for k, v in kwargs.items()})
            out = out.index_copy(0, rows, ran[0] if self.returns_tuple else ran)
        return (out,) if self.returns_tuple else out


class CodedAttnProcessor:
    """A diffusers attention processor that runs SDPA on each row's kept heads only.

    AptpUNet prunes heads through the masks of to_q / to_k / to_v (out) and to_out.0 (in), so a
    masked head has q = k = v = 0 and attends to exact zeros: running it is pure waste (half of
    the attention at keep 0.5). This processor gathers the kept (row, head) pairs of the batch
    into one SDPA call over (pairs, tokens, head_dim) and scatters the result into a zero
    (B, N, heads * head_dim) tensor, what the full-head computation gives. A code keeps the heads
    it keeps in any of q / k / v, read from the layer's masks on the first call and again after
    load_state_dict (in place or assign: a hook on the layer) or a replaced or in-place edited
    mask (its version counter moves; inference tensors have none: after editing those outside
    load_state_dict, call invalidate()); a layer that keeps every head runs `full`, the layer's
    own processor (diffusers' AttnProcessor2_0 by default). The pairs are planned on the host
    per tuple of row codes (one read of the codes per UNet call, CodeState.as_tuple) and kept
    for later steps (the codes stay fixed over a sampling run). Inputs outside SD's plain self /
    cross attention (an attention mask, 4-D hidden states, spatial / group / q-k norms) go
    through `full` over every head instead, which computes the same result."""

    _MAX_PLANS = 64  # distinct batches' code tuples remembered per layer

    def __init__(self, state: CodeState, full=None):
        from diffusers.models.attention_processor import AttnProcessor2_0

        # full: what runs every head (the layer's own processor, so a layer that prunes none
        # keeps whatever processor it had)
        self.state, self.full = state, full if full is not None else AttnProcessor2_0()
        self.kept_heads: List[List[int]] = []  # per code, read from the masks by _prunes_heads
        self.heads = 0
        self._masks_read: Optional[tuple] = None  # the masks kept_heads was read from, and their versions
        self._prunes = False  # whether some code prunes a head (of the masks read)
        self._plans: Dict[Tuple[Tuple[int, ...], torch.device], Tuple[torch.Tensor, torch.Tensor]] = {}
        self._warned = False

    def invalidate(self) -> None:
        """Re-read the kept heads from the masks at the next call."""
        self._masks_read = None

    def _prunes_heads(self, attn) -> bool:
        """Whether some code prunes a head of this layer, re-reading its masks when they changed.
        Under torch.compile the version counters are not read (they cannot be traced): only
        load_state_dict's hook and invalidate() re-plan there."""
        if self._masks_read is not None and torch.compiler.is_compiling():
            return self._prunes
        masks = tuple(getattr(attn, name).out_mask for name in ("to_q", "to_k", "to_v"))
        versions = tuple(None if mask.is_inference() else mask._version for mask in masks)
        read = self._masks_read
        # the masks themselves are held (not their ids, which a new tensor may reuse)
        if read is None or any(a is not b for a, b in zip(read[0], masks)) or read[1] != versions:
            head_kept = _kept_heads(attn)
            self.kept_heads = [torch.nonzero(row)[:, 0].tolist() for row in head_kept.cpu()]
            self.heads = head_kept.shape[1]
            self._plans.clear()
            self._masks_read = (masks, versions)
            self._prunes = any(len(kept) < self.heads for kept in self.kept_heads)
        return self._prunes

    def _pairs(self, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """(rows, heads) int64 on device: every kept (row, head) pair of the batch."""
        codes = self.state.as_tuple()
        plan = self._plans.get((codes, device))
        if plan is None:
            rows = [b for b, code in enumerate(codes) for _ in self.kept_heads[code]]
            heads = [h for code in codes for h in self.kept_heads[code]]
            if len(self._plans) >= self._MAX_PLANS:
                self._plans.clear()
            plan = self._plans[(codes, device)] = (torch.tensor(rows, dtype=torch.long, device=device),
                                                   torch.tensor(heads, dtype=torch.long, device=device))
        return plan

    @staticmethod
    def _plain(attn, hidden_states, attention_mask, args, kwargs) -> bool:
        return (hidden_states.dim() == 3 and attention_mask is None and not args and kwargs.get("scale") is None
                and attn.spatial_norm is None and attn.group_norm is None and attn.norm_q is None
                and attn.norm_k is None)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, temb: Optional[torch.Tensor] = None, *args, **kwargs):
        plain = self._plain(attn, hidden_states, attention_mask, args, kwargs)
        if not plain or not self._prunes_heads(attn):
            if not plain and not self._warned:
                self._warned = True
                warnings.warn("CodedAttnProcessor: an attention mask, 4-D input or extra norms: this layer runs "
                              "SDPA over every head (masked heads as zeros, the same result, slower)", stacklevel=2)
            return self.full(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        batch, tokens, inner = query.shape
        rows, heads = self._pairs(query.device)

        def kept(t):  # (B, L, heads * d) -> (pairs, L, d)
            return t.view(batch, t.shape[1], self.heads, -1).transpose(1, 2)[rows, heads]

        merged = query.new_zeros(batch, tokens, self.heads, inner // self.heads)
        if rows.numel():  # 4-D (1, pairs, L, d): the fused SDPA kernels take 4-D inputs only
            attended = F.scaled_dot_product_attention(*(kept(t).unsqueeze(0) for t in (query, key, value)))
            merged.transpose(1, 2)[rows, heads] = attended[0].to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](merged.view(batch, tokens, inner)))
        if attn.residual_connection:
            out = out + hidden_states
        # x / 1.0 == x: SD's factor is 1, and the division would copy the whole batch's output
        return out if attn.rescale_output_factor == 1.0 else out / attn.rescale_output_factor


def _kept_heads(attn) -> torch.Tensor:
    """(K, heads) bool: the heads each code keeps in any of the layer's q / k / v."""
    return torch.stack([getattr(attn, n).out_mask.view(-1, attn.heads, attn.inner_dim // attn.heads)
                        for n in ("to_q", "to_k", "to_v")]).any(dim=(0, 3))


def _prune_attention_heads(unet: nn.Module, state: CodeState) -> None:
    """CodedAttnProcessor on every attention with coded q / k / v: it skips the heads a code
    prunes, and follows the masks when they change (a layer with no pruned head now may have
    some after load_state_dict)."""
    from diffusers.models.attention_processor import Attention

    for module in unet.modules():
        if not isinstance(module, Attention) or module.inner_kv_dim != module.inner_dim or \
                module.added_kv_proj_dim is not None or not all(
                    isinstance(getattr(module, n), CodedLinear) for n in ("to_q", "to_k", "to_v")):
            continue  # (grouped k / v heads, added k / v projections: every head runs)
        own = module.processor
        module.set_processor(CodedAttnProcessor(state, None if isinstance(own, CodedAttnProcessor) else own))
        module.register_load_state_dict_post_hook(_replan_heads)


def _replan_heads(attn, incompatible_keys) -> None:
    """After load_state_dict: the masks may hold other heads (also inference tensors, whose
    in-place copy leaves no version count). A module-level function: deepcopies keep it."""
    if isinstance(getattr(attn, "processor", None), CodedAttnProcessor):
        attn.processor.invalidate()


# --- stacking the experts ---------------------------------------------------------------------------


def _inside(name: str, blocks: Sequence[str]) -> bool:
    return any(name == b or name.startswith(b + ".") for b in blocks)


def stack_expert_weights(name: str, param: str, dense: torch.Tensor, state_dicts: Sequence[Mapping],
                         masks: Sequence[LayerMask], skipped: Sequence[Sequence[str]]) -> Optional[torch.Tensor]:
    """(K, *dense.shape): expert k's sliced tensor "<name>.<param>" scattered into its kept rows
    (out_mask) and, for weights, kept columns (in_mask); zeros elsewhere and for experts that
    skip the block holding the layer. dense: the base layer's tensor (only its shape is read)."""
    key = f"{name}.{param}"
    stacked = None
    for k, (state_dict, (in_mask, out_mask)) in enumerate(zip(state_dicts, masks)):
        if key not in state_dict:
            if _inside(name, skipped[k]):
                continue
            raise KeyError(f"AptpUNet.from_experts: expert {k} has no {key}")
        sliced = state_dict[key]
        rows = _index(out_mask, dense.shape[0])
        index = (rows,) if param == "bias" or dense.dim() == 1 else (rows[:, None], _index(in_mask, dense.shape[1]))
        expected = (rows.numel(),) + (() if len(index) == 1 else (index[1].numel(),)) + tuple(dense.shape[len(index):])
        if tuple(sliced.shape) != expected:
            raise ValueError(f"AptpUNet.from_experts: expert {k}'s {key} is {tuple(sliced.shape)}, its architecture "
                             f"code slices the dense {tuple(dense.shape)} to {expected}")
        if stacked is None:
            stacked = torch.zeros((len(state_dicts), *dense.shape), dtype=sliced.dtype, device=sliced.device)
        stacked[k][index] = sliced.to(stacked.dtype)
    if stacked is None:
        raise ValueError(f"AptpUNet.from_experts: every expert skips {name}")
    return stacked


def _layer_masks(masks: Sequence[Dict[str, LayerMask]], name: str, in_size: int, out_size: int):
    """(K, Cin), (K, Cout) bool masks of one layer (all true where a code does not prune it)."""
    def full(mask, size):
        return torch.ones(size, dtype=torch.bool) if mask is None else mask
    pairs = [m.get(name, (None, None)) for m in masks]
    return (torch.stack([full(i, in_size) for i, _ in pairs]), torch.stack([full(o, out_size) for _, o in pairs]))


def _coded_layer(name, module, state, state_dicts, masks, skipped) -> Optional[nn.Module]:
    """The coded twin of one base layer, or None for modules without weights of their own."""
    if not isinstance(module, (nn.Conv2d, nn.Linear, nn.GroupNorm, nn.LayerNorm)):
        return None
    per_layer = [m.get(name, (None, None)) for m in masks]

    def stack(param):
        dense = getattr(module, param, None)
        return None if dense is None else stack_expert_weights(name, param, dense, state_dicts, per_layer, skipped)

    weight, bias = stack("weight"), stack("bias")
    if isinstance(module, nn.Conv2d):
        in_mask, out_mask = _layer_masks(masks, name, module.in_channels, module.out_channels)
        return CodedConv2d(state, weight, bias, in_mask.to(weight.device), out_mask.to(weight.device), module)
    if isinstance(module, nn.Linear):
        in_mask, out_mask = _layer_masks(masks, name, module.in_features, module.out_features)
        return CodedLinear(state, weight, bias, in_mask.to(weight.device), out_mask.to(weight.device))
    if isinstance(module, nn.GroupNorm):
        _, channel_mask = _layer_masks(masks, name, module.num_channels, module.num_channels)
        if weight is not None:
            channel_mask = channel_mask.to(weight.device)
        return CodedGroupNorm(state, weight, bias, channel_mask, module)
    return CodedLayerNorm(state, weight, bias, module)


class AptpUNet(nn.Module):
    """K APTP experts of one diffusers UNet2DConditionModel, run on mixed-code batches.

    forward(sample (B, C, H, W), timestep (scalar or (B,)), encoder_hidden_states (B, L, D),
    sample_codes (B,) int in [0, K), or (B/2,) under classifier-free guidance: the pipeline's
    [uncond; cond] rows share their prompt's code, so codes are repeated) -> UNet2DConditionOutput
    whose .sample (B, C, H, W) is what UNet2DConditionModel(...).sample of each row's expert
    returns. The batch is sorted by code once at entry and unsorted at exit (aptp.md 5.3.1), so
    each code's rows are contiguous.
    """

    def __init__(self, unet: nn.Module, state: CodeState, architectures: Sequence[ArchitectureCode]):
        super().__init__()
        self.unet, self.state, self.architectures = unet, state, list(architectures)

    @property
    def num_codes(self) -> int:
        return len(self.architectures)

    @classmethod
    @torch.no_grad()
    def from_experts(cls, base_unet: nn.Module, experts: Sequence[Expert], ff_groups: int = FF_GROUPS) -> "AptpUNet":
        """experts: [(sliced expert UNet or its state dict, its ArchitectureCode)], code k = index k.
        base_unet gives the dense module structure only (its weights are never read; it may live on
        the meta device). Every layer's weights are stacked per code with pruned rows / columns
        zero-filled; layers a code does not prune get all-true masks (still its own weights).
        Inference only: the stacked weights are frozen (requires_grad False; gradients with respect
        to the latents still flow), so fine-tune the experts themselves, then rebuild."""
        if not experts:
            raise ValueError("AptpUNet.from_experts: need at least one expert")
        for index, pair in enumerate(experts):
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[1], ArchitectureCode)):
                raise TypeError(f"AptpUNet.from_experts: expert {index} must be a pair (expert UNet or its state dict, "
                                f"its ArchitectureCode), as load_expert returns, got {type(pair).__name__}")
        archs = [arch for _, arch in experts]
        state_dicts = [e if isinstance(e, Mapping) else e.state_dict() for e, _ in experts]
        dtypes = sorted({str(t.dtype) for sd in state_dicts for t in sd.values() if t.is_floating_point()})
        if len(dtypes) > 1:  # stacking would cast every expert to one dtype without a word
            raise ValueError(f"AptpUNet.from_experts: the experts' weights mix dtypes ({', '.join(dtypes)}); cast "
                             "them to one (load_expert(..., dtype=...)) first")
        known = set(base_unet.state_dict())
        for index, state_dict in enumerate(state_dicts):
            extra = sorted(set(state_dict) - known)
            if extra:  # weights of another model: they would be silently left out
                raise ValueError(f"AptpUNet.from_experts: expert {index} has {len(extra)} weights the base UNet does "
                                 f"not have (e.g. {', '.join(extra[:3])}); pass experts pruned from this UNet")
        masks = [to_masks(base_unet, arch, ff_groups) for arch in archs]
        gates = depth_gates(base_unet)
        skipped = [[n for n in gates if not arch.runs(n)] for arch in archs]
        state = CodeState()
        unet = copy.deepcopy(base_unet)
        for name, module in base_unet.named_modules():
            coded = _coded_layer(name, module, state, state_dicts, masks, skipped)
            if coded is not None:
                swap_submodule(unet, name, coded)
        for name, channels in gates.items():
            runs = torch.tensor([arch.runs(name) for arch in archs])
            if not bool(runs.all()):
                gate = CodedDepthGate(state, unet.get_submodule(name), runs, channels, ".attentions." in name)
                swap_submodule(unet, name, gate.to(_device_of(unet)))
        _check_all_coded(unet)
        _prune_attention_heads(unet, state)
        _fuse_geglu(unet)
        return cls(unet.eval(), state, archs)

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                sample_codes: torch.Tensor, return_dict: bool = True, **unet_kwargs):
        """The noise prediction (B, C, H, W) for a batch whose rows use experts sample_codes, as
        UNet2DConditionModel returns it: UNet2DConditionOutput(sample=...), or with
        return_dict=False a 1-tuple (which diffusers' pipelines pass)."""
        if not torch.is_tensor(sample) or sample.dim() != 4:
            raise ValueError(f"AptpUNet: sample must be (B, C, H, W) latents, got "
                             f"{tuple(getattr(sample, 'shape', ())) or type(sample).__name__}")
        batch = sample.shape[0]
        if torch.is_tensor(encoder_hidden_states) and encoder_hidden_states.shape[0] != batch:
            raise ValueError(f"AptpUNet: encoder_hidden_states has {encoder_hidden_states.shape[0]} rows for "
                             f"{batch} samples (one text embedding per sample, CFG rows included)")
        codes = self.row_codes(sample_codes, batch)
        order = torch.argsort(codes, stable=True)

        def by_code(t):  # per-row tensors, also inside tuples, lists and dicts (ControlNet residuals, SDXL's)
            if isinstance(t, tuple) and hasattr(t, "_fields"):  # a namedtuple
                return type(t)(*(by_code(x) for x in t))
            if isinstance(t, (tuple, list)):
                return type(t)(by_code(x) for x in t)
            if isinstance(t, dict):  # a shallow copy keeps the dict's type (OrderedDict, diffusers' BaseOutput)
                sorted_dict = copy.copy(t)
                for k, v in t.items():
                    sorted_dict[k] = by_code(v)
                return sorted_dict
            return t.index_select(0, order) if torch.is_tensor(t) and t.dim() and t.shape[0] == batch else t

        with self.state.use(codes.index_select(0, order)):
            out = self.unet(by_code(sample), by_code(timestep), by_code(encoder_hidden_states), return_dict=False,
                            **{k: by_code(v) for k, v in unet_kwargs.items()})[0]
        out = torch.empty_like(out).index_copy_(0, order, out)  # unsort: out row i is input row order[i]
        if not return_dict:
            return (out,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=out)

    def row_codes(self, sample_codes: torch.Tensor, batch: int) -> torch.Tensor:
        """(B,) int64 codes of the rows: sample_codes (an integer tensor or sequence of B or B/2
        ints) as is, or repeated when it has B/2 entries (CFG doubles rows, not codes).
        TypeError for non-integer codes, ValueError for a wrong count or shape, IndexError for
        codes outside [0, K)."""
        codes = torch.as_tensor(sample_codes, device=self.state_device())
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise TypeError(f"AptpUNet: sample_codes must be integers (the expert of each row), got {codes.dtype}")
        if codes.dim() > 1:
            raise ValueError(f"AptpUNet: sample_codes must be one code per row, (B,) or (B/2,), got shape "
                             f"{tuple(codes.shape)}")
        codes = codes.long().reshape(-1)
        if codes.numel() * 2 == batch:
            codes = codes.repeat(2)
        if codes.numel() != batch:
            raise ValueError(f"AptpUNet: {codes.numel()} sample codes for {batch} rows (need B, or B/2 under CFG)")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.num_codes):
            raise IndexError(f"AptpUNet: sample codes must be in [0, {self.num_codes}), got {codes.tolist()}")
        return codes

    def state_device(self) -> torch.device:
        return _device_of(self.unet)


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _check_all_coded(unet: nn.Module) -> None:
    """Every parameter must sit in a coded layer: anything else would be shared across codes."""
    for name, module in unet.named_modules():
        if not isinstance(module, _Coded) and any(True for _ in module.parameters(recurse=False)):
            raise NotImplementedError(f"AptpUNet: {name} ({type(module).__name__}) has weights but no coded twin")


def run_per_expert(experts: Sequence[Expert], sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                   sample_codes: torch.Tensor) -> torch.Tensor:
    """APTP's own way to serve a mixed batch, the baseline AptpUNet replaces: one pass per code
    present, each physically sliced expert (experts[code][0], a UNet2DConditionModel) batched
    over its rows. sample_codes (B,) gives each row's code (repeat them under CFG); timestep is
    a number, a scalar tensor or one per row (B,). Returns the (B, C, H, W) outputs in row order."""
    out = torch.empty_like(sample)
    per_row = torch.is_tensor(timestep) and timestep.dim() == 1 and timestep.shape[0] == sample.shape[0]
    for code in torch.unique(sample_codes).tolist():
        rows = torch.nonzero(sample_codes == code)[:, 0]
        t = timestep[rows] if per_row else timestep
        out[rows] = experts[code][0](sample[rows], t, encoder_hidden_states[rows]).sample
    return out
