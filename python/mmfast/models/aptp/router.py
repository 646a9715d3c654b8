"""APTP's router: prompt embedding -> architecture logits -> one of K architecture codes.

Source: APTP (Ganjdanesh et al., ICLR 2025; rezashkv/diffusion_pruning, shared/reference/aptp.md
2.1): a frozen sentence encoder (all-mpnet-base-v2, mean-pooled, 768-d; the user supplies the
embeddings) feeds a linear hypernetwork (HyperStructure: one nn.Linear per width gate plus one for
all depth gates, orthogonal init) whose concatenated logits are compared, by cosine similarity
after a Gumbel-sigmoid relaxation and a per-gate normalisation, to K learned code embeddings
(StructureVectorQuantizer). Inference takes the argmax; training balances the assignment with
Sinkhorn optimal transport and adds a contrastive loss tying architecture similarity to prompt
similarity.

The architecture vector is laid out as APTP's arch vectors are (arch_vector_layout: width gates
block by block, each block's resnets before its attentions, then the depth gates), so
Router.for_unet's entries line up with an official arch_vector.pt (for UNets that layout covers;
others, e.g. with resnet downsamplers, get width_gates' order and a warning).

Simplifications against the official code (StructureVectorQuantizer, pdm/models/vq/quantizer.py;
documented, not verified numerically against it, so routes can differ from APTP's):
- the normalisation scales each gate by sqrt(1 / width) and L2-normalises; APTP also multiplies
  widths by their block's depth value, applies hard_concrete to widths that are not depth-gated
  and weights gates by their prunable FLOPs (resource_aware_normalization);
- depth gates are relaxed like width gates; APTP relaxes them by importance_gumbel_softmax_sample
  (a cumulative softmax) and scatters them by depth_order;
- inference uses the noiseless sigmoid unless a generator is passed (APTP adds a Gumbel sample
  drawn with the fixed seed 0), and compares against relax(codebook) where APTP keeps the
  codebook's Gumbel sample of the last training step (embedding_gs).
The released router is therefore not loaded; to route prompts as APTP does, run APTP's
scripts/aptp/filter_dataset.py and pass its expert ids as sample codes.
"""
from __future__ import annotations

import math
import warnings
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .architecture import FF_GROUPS, ArchitectureCode, arch_vector_layout, depth_gates, width_gates

__all__ = ["Router", "sinkhorn", "contrastive_loss"]


def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """Balanced soft assignment (SwAV's Sinkhorn-Knopp; APTP's distributed_sinkhorn on one
    process). scores (B, K) similarities -> Q (B, K): each row sums to 1 and each code gets about
    B / K of the mass; codes = Q.argmax(-1). Computed in fp64 and in the log domain (the same
    normalisations as logsumexp subtractions: scores spanning more than ~37 / epsilon would
    underflow exp to 0 and give NaN), returned in scores' dtype."""
    batch, codes = scores.shape
    log_q = (scores.detach().double() / epsilon).t()  # (K, B)
    log_q = log_q - torch.logsumexp(log_q.flatten(), 0)
    for _ in range(iterations):
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - math.log(codes)  # every code gets 1/K
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - math.log(batch)  # every sample gets 1/B
    return (log_q.exp() * batch).t().to(scores.dtype)


def contrastive_loss(arch_vectors: torch.Tensor, prompt_embeddings: torch.Tensor,
                     arch_temperature: float = 0.03, prompt_temperature: float = 0.03) -> torch.Tensor:
    """APTP's contrastive loss (pdm/losses/contrastive_loss.py; weight 100 in training): BCE between
    the row-softmaxed similarity matrices of the (B, D) architecture vectors and of the (B, E)
    prompt embeddings (both L2-normalised here), prompts as the target."""
    a = F.normalize(arch_vectors.float(), dim=-1)
    p = F.normalize(prompt_embeddings.float(), dim=-1)
    arch_similarity = F.softmax(a @ a.T / arch_temperature, dim=-1)
    prompt_similarity = F.softmax(p @ p.T / prompt_temperature, dim=-1)
    return F.binary_cross_entropy(arch_similarity.T, prompt_similarity.T, reduction="mean")


class Router(nn.Module):
    """embeddings (B, embed_dim) -> codes (B,) in [0, num_codes).

    gate_widths: groups of each width gate (for_unet: in arch_vector_layout order); depth: number of depth
    gates (one shared Linear, APTP's layout). The architecture vector has D = sum(widths) + depth
    entries; the codebook (num_codes, D) holds the codes' logits. temperature / offset: APTP's
    quantizer_T 0.4 and quantizer_base 3 (biased towards keeping).
    """

    def __init__(self, gate_widths: Sequence[int], num_codes: int, embed_dim: int = 768, depth: int = 0,
                 temperature: float = 0.4, offset: float = 3.0, gate_names: Optional[Sequence[str]] = None,
                 depth_names: Optional[Sequence[str]] = None):
        super().__init__()
        self.widths = list(gate_widths) + [1] * depth  # a depth gate counts as one group
        self.num_width_gates, self.temperature, self.offset = len(gate_widths), temperature, offset
        self.gate_names, self.depth_names = list(gate_names or []), list(depth_names or [])
        self.hypernet = nn.ModuleList([nn.Linear(embed_dim, w) for w in gate_widths])
        if depth:
            self.hypernet.append(nn.Linear(embed_dim, depth))
        self.codebook = nn.Parameter(torch.empty(num_codes, sum(self.widths)))
        for layer in self.hypernet:
            nn.init.orthogonal_(layer.weight)
            nn.init.zeros_(layer.bias)
        nn.init.orthogonal_(self.codebook)
        # entry i of an architecture vector is scaled by sqrt(1 / width of its gate)
        self.register_buffer("gate_scale", torch.cat([torch.full((w,), math.sqrt(1 / w)) for w in self.widths]))

    @classmethod
    def for_unet(cls, unet: nn.Module, num_codes: int, embed_dim: int = 768, ff_groups: int = FF_GROUPS,
                 **kwargs) -> "Router":
        """A router over every width and depth gate of a diffusers UNet, in APTP's arch-vector order
        (arch_vector_layout; D = 1606 + 14 for SD 2.1); a UNet with gates outside that layout
        (e.g. resnet downsamplers) gets width_gates' order, with a warning."""
        try:
            gates, depth = arch_vector_layout(unet, ff_groups)
        except NotImplementedError as err:
            warnings.warn(f"Router.for_unet: {err}; the architecture vector follows width_gates' order instead "
                          "(no official arch vector exists for this UNet)", stacklevel=2)
            gates, depth = list(width_gates(unet, ff_groups).items()), list(depth_gates(unet))
        return cls([groups for _, groups in gates], num_codes, embed_dim, len(depth),
                   gate_names=[name for name, _ in gates], depth_names=depth, **kwargs)

    @property
    def num_codes(self) -> int:
        return self.codebook.shape[0]

    def architecture_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, embed_dim) -> (B, D): the hypernetwork's concatenated per-gate logits."""
        embed_dim = self.hypernet[0].in_features
        if not torch.is_tensor(embeddings) or embeddings.dim() != 2 or embeddings.shape[1] != embed_dim:
            raise ValueError(f"Router: embeddings must be (B, {embed_dim}) prompt embeddings (embed_dim of this "
                             f"router), got {tuple(getattr(embeddings, 'shape', ())) or type(embeddings).__name__}")
        return torch.cat([layer(embeddings) for layer in self.hypernet], dim=-1)

    def relax(self, logits: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Gumbel-sigmoid keep probabilities sigmoid((logits + offset + g) / T), APTP's
        gumbel_softmax_sample: g one Gumbel draw -log(-log u) per entry (eps 1e-20 as
        sample_gumbel), only when a generator is given (else g = 0)."""
        if generator is not None:  # drawn in fp32 as APTP's (a 16-bit u rounds to 0 or 1: g of +-inf or 46)
            u = torch.rand(logits.shape, generator=generator)
            logits = logits - torch.log(-torch.log(u + 1e-20) + 1e-20).to(logits)
        return torch.sigmoid((logits + self.offset) / self.temperature)

    def normalize(self, probs: torch.Tensor) -> torch.Tensor:
        """Every gate counts equally: scale by sqrt(1 / width), then L2-normalise."""
        return F.normalize(probs * self.gate_scale, dim=-1)

    def scores(self, embeddings: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """(B, embed_dim) -> (B, K) cosine similarity of the prompt's architecture to each code's."""
        prompts = self.normalize(self.relax(self.architecture_logits(embeddings), generator))
        codes = self.normalize(self.relax(self.codebook))
        return prompts @ codes.T

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Inference routing: (B, embed_dim) -> (B,) int64 codes, argmax cosine (no balancing)."""
        return self.scores(embeddings).argmax(dim=-1)

    def balanced_codes(self, embeddings: torch.Tensor, generator: Optional[torch.Generator] = None,
                       epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
        """Training-time routing: argmax of the Sinkhorn-balanced assignment (about B / K per code)."""
        return sinkhorn(self.scores(embeddings, generator), epsilon, iterations).argmax(dim=-1)

    @torch.no_grad()
    def architectures(self) -> List[ArchitectureCode]:
        """The K codebook entries as ArchitectureCodes (keep probability >= 0.5, APTP's hard_concrete;
        a gate that would drop every group keeps its first, as APTP's non_zero_width adds 0.5 to
        group 0). Needs a router built by for_unet (gate names)."""
        if len(self.gate_names) != self.num_width_gates:
            raise ValueError("Router.architectures: build the router with Router.for_unet to know the gate names")
        out = []
        for probs in self.relax(self.codebook).cpu():
            parts = probs.split(self.widths[:self.num_width_gates] + [len(self.depth_names)])
            width = {}
            for name, p in zip(self.gate_names, parts):
                kept = p >= 0.5
                if not kept.any():
                    kept[0] = True
                width[name] = kept
            depth = {name: bool(p >= 0.5) for name, p in zip(self.depth_names, parts[-1])}
            out.append(ArchitectureCode(width, depth))
        return out
