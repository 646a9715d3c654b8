"""GeneralizedLinearAttention: LinFusion's self-attention module on mmfast's op.

Parameters and state-dict keys follow the official LinFusion module, so official
checkpoints load unchanged:
    q = to_q(x + to_q_(x)),  k = to_k(x + to_k_(x)),  v = to_v(x)
    o = to_out(linear_attention(q, k, v, eps=1e-4))        (per head, phi = elu + 1)
to_q_/to_k_ = Linear(C, M) -> LayerNorm(M) -> LeakyReLU(0.01) -> Linear(M, C), or
Identity when projection_mid_dim == -1.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch
from torch import nn

from ... import ops

# LinFusion applies its epsilon to the mean-normalised denominator.
LINFUSION_EPS = 1e-4


def nonlinear_projection(dim: int, mid_dim: Optional[int] = None) -> nn.Module:
    """The residual MLP on the q/k inputs; indices 0, 1, 3 hold the checkpoint's weights."""
    if mid_dim == -1:
        return nn.Identity()
    mid = mid_dim or dim
    return nn.Sequential(
        nn.Linear(dim, mid),
        nn.LayerNorm(mid),
        # In place is safe: LayerNorm's backward needs its input, not its output.
        nn.LeakyReLU(0.01, inplace=True),
        nn.Linear(mid, dim),
    )


class LinFusionAttnProcessor:
    """What diffusers' attention-processor API sees of a mounted LinFusion layer.

    `unet.attn_processors` lists it for every mounted attn1, so a dict taken while mounted fits
    `unet.set_attn_processor`, and diffusers' loaders that re-create each layer's current
    processor class (e.g. IP-Adapter loading, which replaces only attn2's) keep working. It
    holds nothing: the layer's parameters and computation are GeneralizedLinearAttention's.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        if not isinstance(attn, GeneralizedLinearAttention):  # attn(...) would call this processor again
            raise ValueError(
                f"LinFusionAttnProcessor runs mounted LinFusion layers only, not a diffusers {type(attn).__name__}: "
                "a processor dict taken while LinFusion was mounted was restored after unmount (or diffusers' "
                "unfuse_qkv_projections restored one saved then); set the UNet's own processors, e.g. "
                "unet.set_default_attn_processor(), or mount LinFusion")
        return attn(hidden_states, encoder_hidden_states, attention_mask, **kwargs)


class GeneralizedLinearAttention(nn.Module):
    """Drop-in replacement for a diffusers `Attention` used as `attn1` of a transformer block.

    Takes (B, N, C) or (B, C, H, W) hidden states. `encoder_hidden_states`, when given,
    provides the keys and values (their token count may differ from the queries').
    `token_chunk_size` (inference memory knob, exact): when set and N exceeds it, the
    projections run chunk by chunk in two passes (state, then output), so the peak
    memory is the input + output plus a few chunks instead of ~6 full-size tensors.
    `attention_op` (None: mmfast.ops.linear_attention) is the self-attention core,
    called as attention_op(q, k, v, eps=eps) on (B, N, H, D) views; parallelism swaps it
    from outside (models/linfusion/row_parallel.py gives it the token-parallel op).
    """

    def __init__(self, dim_n: int, heads: int, projection_mid_dim: Optional[int] = None,
                 eps: float = LINFUSION_EPS):
        super().__init__()
        if heads < 1 or dim_n < 1 or dim_n % heads != 0:
            raise ValueError(f"GeneralizedLinearAttention: dim_n={dim_n} must be a positive multiple of heads={heads} >= 1")
        if projection_mid_dim is not None and projection_mid_dim != -1 and projection_mid_dim < 1:
            raise ValueError(
                f"GeneralizedLinearAttention: projection_mid_dim must be None, -1 or >= 1, got {projection_mid_dim}"
            )
        self.dim_n = dim_n
        self.heads = heads
        self.dim_head = dim_n // heads
        self.projection_mid_dim = projection_mid_dim
        self.eps = eps
        self.token_chunk_size: Optional[int] = None
        self.attention_op: Optional[Callable] = None
        self.to_q = nn.Linear(dim_n, dim_n, bias=False)
        self.to_k = nn.Linear(dim_n, dim_n, bias=False)
        self.to_v = nn.Linear(dim_n, dim_n, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim_n, dim_n, bias=True), nn.Dropout(0.0)])
        self.to_q_ = nonlinear_projection(dim_n, projection_mid_dim)
        self.to_k_ = nonlinear_projection(dim_n, projection_mid_dim)
        self._warned_kwargs: set = set()
        self._processor = LinFusionAttnProcessor()

    def extra_repr(self) -> str:
        return f"dim_n={self.dim_n}, heads={self.heads}, dim_head={self.dim_head}, eps={self.eps}"

    # --- diffusers' attention-processor API ----------------------------------------

    def get_processor(self, return_deprecated_lora: bool = False) -> LinFusionAttnProcessor:
        return self._processor

    def set_processor(self, processor) -> None:
        """Accepts LinFusion's processor only: a softmax processor cannot run this layer."""
        if not isinstance(processor, LinFusionAttnProcessor):
            raise ValueError(
                f"GeneralizedLinearAttention: this attn1 runs LinFusion's linear attention while LinFusion is "
                f"mounted and cannot run {type(processor).__name__}. Unmount LinFusion (linfusion.unmount()) before "
                "setting softmax processors on attn1, or pass the processors `unet.attn_processors` lists while "
                "mounted (LinFusionAttnProcessor for each attn1)."
            )
        self._processor = processor

    # --- construction from a diffusers attn1 ---------------------------------------

    @torch.no_grad()
    def load_projections_from(self, attention: nn.Module) -> None:
        """Copies to_q/to_k/to_v/to_out[0] from a diffusers Attention of the same size."""
        for name in ("to_q", "to_k", "to_v"):
            source = getattr(attention, name)
            if source.bias is not None:
                raise ValueError(f"GeneralizedLinearAttention: the source {name} has a bias; LinFusion's has none")
            getattr(self, name).weight.copy_(source.weight)
        self.to_out[0].weight.copy_(attention.to_out[0].weight)
        self.to_out[0].bias.copy_(attention.to_out[0].bias)

    # --- forward -----------------------------------------------------------------------

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, **cross_attention_kwargs) -> torch.Tensor:
        if attention_mask is not None:
            raise NotImplementedError(
                "GeneralizedLinearAttention: attention_mask is not supported by LinFusion's linear attention "
                "(the official module ignores it; mmfast refuses rather than silently drop it)"
            )
        self._warn_ignored_kwargs(cross_attention_kwargs)
        if hidden_states.dim() == 4:
            return self._forward_image(hidden_states, encoder_hidden_states)
        self._check_tokens(hidden_states, encoder_hidden_states)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        chunk = self.token_chunk_size
        chunked = chunk is not None and max(hidden_states.shape[1], context.shape[1]) > chunk
        if self.attention_op is not None and (chunked or encoder_hidden_states is not None):
            raise NotImplementedError("GeneralizedLinearAttention: a custom attention_op (e.g. token-parallel) "
                                      "runs self-attention without token chunking only")
        if chunked:
            return self._forward_chunked(hidden_states, context, chunk)
        if encoder_hidden_states is None:
            q, k, v = self._query(hidden_states), self._key(hidden_states), self._value(hidden_states)
            out = (self.attention_op or ops.linear_attention)(q, k, v, eps=self.eps)
        else:  # keys/values from another sequence, possibly of another length
            state, mean = ops.linear_attention_state(self._key(context), self._value(context))
            out = ops.linear_attention_apply(self._query(hidden_states), state, mean, eps=self.eps)
            out = _official_length_scale(out, hidden_states.shape[1], context.shape[1])
        return self._output(out)

    def _check_tokens(self, hidden_states, encoder_hidden_states) -> None:
        for name, x in (("hidden_states", hidden_states), ("encoder_hidden_states", encoder_hidden_states)):
            if x is not None and (x.dim() != 3 or x.shape[-1] != self.dim_n):
                raise ValueError(
                    f"GeneralizedLinearAttention: {name} must be (B, N, {self.dim_n})"
                    f"{' or (B, C, H, W)' if name == 'hidden_states' else ''}, got shape {tuple(x.shape)}"
                )
        if encoder_hidden_states is not None and encoder_hidden_states.shape[0] != hidden_states.shape[0]:
            raise ValueError(f"GeneralizedLinearAttention: encoder_hidden_states must have hidden_states' batch "
                             f"{hidden_states.shape[0]}, got shape {tuple(encoder_hidden_states.shape)}")

    def _forward_image(self, hidden_states, encoder_hidden_states):
        b, c, h, w = hidden_states.shape
        if c != self.dim_n:  # said of the image, not of the (B, H*W, C) tokens made of it
            raise ValueError(f"GeneralizedLinearAttention: hidden_states must be (B, N, {self.dim_n}) or "
                             f"(B, {self.dim_n}, H, W), got shape {tuple(hidden_states.shape)}")
        tokens = hidden_states.reshape(b, c, h * w).transpose(1, 2)
        out = self.forward(tokens, encoder_hidden_states)
        return out.transpose(1, 2).reshape(b, c, h, w)

    # What diffusers passes to every attention and its own processors ignore without a word.
    _QUIET_KWARGS = frozenset({"ip_adapter_masks", "ip_hidden_states"})

    def _warn_ignored_kwargs(self, kwargs: dict) -> None:
        new = set(kwargs) - self._warned_kwargs - self._QUIET_KWARGS
        if new:
            self._warned_kwargs |= new
            warnings.warn(f"GeneralizedLinearAttention: ignoring cross_attention_kwargs {sorted(new)}", stacklevel=3)

    # Projections return (B, N, H, D) views of the (B, N, C) GEMM outputs: no transposes.
    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.heads, self.dim_head)

    def _query(self, x):
        return self._heads(self.to_q(x + self.to_q_(x)))

    def _key(self, x):
        return self._heads(self.to_k(x + self.to_k_(x)))

    def _value(self, x):
        return self._heads(self.to_v(x))

    def _output(self, out: torch.Tensor) -> torch.Tensor:
        out = out.reshape(out.shape[0], out.shape[1], self.dim_n)
        return self.to_out[1](self.to_out[0](out))

    def _forward_chunked(self, hidden_states, context, chunk: int):
        """Two passes over token chunks; the mean-normalised state combines exactly."""
        total = context.shape[1]
        state_sum, mean_sum = None, None
        for part in context.split(chunk, dim=1):
            state, mean = ops.linear_attention_state(self._key(part), self._value(part))
            weight = part.shape[1] / total
            state_sum = state * weight if state_sum is None else state_sum + state * weight
            mean_sum = mean * weight if mean_sum is None else mean_sum + mean * weight
        # Written into one preallocated output (a final torch.cat would double the peak), of the
        # dtype the projections return: under autocast that is not the input's.
        out = None
        for start in range(0, hidden_states.shape[1], chunk):
            part = hidden_states[:, start:start + chunk]
            attended = ops.linear_attention_apply(self._query(part), state_sum, mean_sum, eps=self.eps)
            result = self._output(_official_length_scale(attended, hidden_states.shape[1], total))
            if out is None:
                out = result.new_empty(hidden_states.shape[:2] + result.shape[2:])
            out[:, start:start + chunk] = result
        return out


def _official_length_scale(out: torch.Tensor, queries: int, keys: int) -> torch.Tensor:
    """The official forward scales K^T V by 1 / N with N the number of *queries* while the
    denominator takes the mean of phi(K) over the keys: with keys from a sequence of another
    length (encoder_hidden_states) its output is mmfast's normalised one times N_k / N_q.
    Matched, so a checkpoint behaves as it was trained; self-attention (N_q = N_k) is untouched."""
    return out if queries == keys else out * (keys / queries)
