"""Tree-aware losses of Bertinetto et al., "Making Better Mistakes" (CVPR 2020).

**Hierarchical cross-entropy (``hxe``).** Writing the leaf probability as the product of
conditionals down its path ``root = a0 -> a1 -> ... -> ak = leaf``::

    HXE = sum_i  lambda(a_i) * -log P(a_i | a_{i-1}),      lambda(a) = exp(-alpha * h(a))

With all ``lambda = 1`` this is plain cross-entropy. ``h`` follows the reference code
(``get_exponential_weighting``): the depth of the edge's child (root's children 1), so the
weights fall going down the tree and a larger ``alpha`` puts more weight on the coarse
decisions ("discounting information down the hierarchy"). ``measure="height"`` counts
from the leaves instead (leaf edges 0), which weights the fine decisions most. The
reference code also divides all weights by their sum over the tree; that constant only
rescales the learning rate and is left out.

Two uses, one loss:

- *per node* (``context.node`` set, a head per internal node): the node's term is
  ``lambda(child) * CE`` over its children. Summing the per-node losses along an image's
  path gives exactly the HXE above, so the joint / per-node strategies optimise HXE when
  every head uses ``hxe``.
- *flat* (``context.node`` None, one softmax over leaves): node probabilities are sums of
  leaf probabilities and the whole path sum is computed from the leaf logits. A partial
  label (several marked leaves) contributes the path down to the marked leaves' lowest
  common ancestor, plus, when the marks are not all leaves under it, the term
  ``-lambda * log(P(marked) / P(ancestor))``.

**Soft labels (``soft_labels``).** Cross-entropy against soft targets
``p(c) = softmax_c(-beta * d(c, target) / d_max)``, ``d`` the tree distance (edges) and
``d_max`` the largest distance between two of the classes, as in the reference code's
normalisation, so ``beta`` does not depend on the tree's size. ``beta = 10`` (default)
keeps about 99.99 % of the mass on the target for classes at the largest distance and
gives near neighbours a little. With several marked classes the distance is to the
nearest marked class. As ``beta`` grows the loss becomes cross-entropy.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hiercls.errors import ConfigError
from hiercls.losses import LossContext, masked_log_prob, target_weight
from hiercls.taxonomy import Taxonomy

__all__ = ["HierarchicalCrossEntropy", "SoftLabelCrossEntropy", "edge_weight", "hxe", "soft_labels"]

MEASURES = ("depth", "height")


def hxe(context: LossContext, alpha: float = 0.1, measure: str = "depth") -> nn.Module:
    """Hierarchical cross-entropy; ``alpha >= 0`` (0 gives cross-entropy), ``measure`` depth | height."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
        raise ConfigError(f"loss 'hxe': alpha must be a number >= 0, got {alpha!r}")
    if measure not in MEASURES:
        raise ConfigError(f"loss 'hxe': measure must be one of {', '.join(MEASURES)}, got {measure!r}")
    return HierarchicalCrossEntropy(context, float(alpha), measure)


def soft_labels(context: LossContext, beta: float = 10.0) -> nn.Module:
    """Cross-entropy with tree-distance soft targets; ``beta > 0`` (larger: closer to one-hot)."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
        raise ConfigError(f"loss 'soft_labels': beta must be a number > 0, got {beta!r}")
    return SoftLabelCrossEntropy(context, float(beta))


def _height(taxonomy: Taxonomy, node: str) -> int:
    if taxonomy.is_leaf(node):
        return 0
    return max(taxonomy.depth(leaf) for leaf in taxonomy.leaves_under(node)) - taxonomy.depth(node)


def edge_weight(taxonomy: Taxonomy, node: str, alpha: float, measure: str = "depth") -> float:
    """``lambda`` of the edge from ``node``'s parent to ``node``."""
    h = taxonomy.depth(node) if measure == "depth" else _height(taxonomy, node)
    return math.exp(-alpha * h)


class HierarchicalCrossEntropy(nn.Module):
    """HXE for one decision: per node (weighted CE) or flat (path sum from leaf logits)."""

    def __init__(self, context: LossContext, alpha: float = 0.1, measure: str = "depth"):
        super().__init__()
        self.alpha, self.measure = alpha, measure
        self.taxonomy, self.classes, self.flat = context.taxonomy, context.classes, context.node is None
        tax = context.taxonomy
        weights = torch.tensor([edge_weight(tax, c, alpha, measure) for c in self.classes], dtype=torch.float32)
        self.register_buffer("class_weights", weights, persistent=False)
        if self.flat:
            self._build_flat_tables(tax)

    def _build_flat_tables(self, tax: Taxonomy) -> None:
        """Per path node ``u`` (every node on a path from the root to a class), as buffers:

        ``membership[u, c]`` u is c or above it; ``path_coef[u]`` the coefficients of log P(node)
        when the marks are exactly u's classes (the weighted edges of u's path); ``depth[u]``;
        ``into[u]`` the weight of the edge into u; ``child_of[u, v]`` v is a child of u.
        With these the loss of any mask is a few batched tensor ops: no per-pattern Python
        loop and nothing that makes the host wait for the GPU.
        """
        on_paths = {a for c in self.classes for a in tax.path(c)}
        self.path_nodes = tuple(n for n in tax.nodes if n in on_paths)
        position = {n: i for i, n in enumerate(self.path_nodes)}
        size = len(self.path_nodes)
        member = torch.tensor([[tax.is_ancestor(u, c) for c in self.classes] for u in self.path_nodes])
        path_coef = torch.zeros(size, size)
        child_of = torch.zeros(size, size, dtype=torch.bool)
        into = torch.zeros(size)
        for u, node in enumerate(self.path_nodes):
            path = tax.path(node)
            for parent, child in zip(path[:-1], path[1:]):
                weight = edge_weight(tax, child, self.alpha, self.measure)
                path_coef[u, position[child]] -= weight
                path_coef[u, position[parent]] += weight
            if len(path) > 1:
                into[u] = edge_weight(tax, node, self.alpha, self.measure)
                child_of[position[path[-2]], u] = True
        depth = torch.tensor([tax.depth(n) for n in self.path_nodes])
        for name, value in [("membership", member), ("path_coef", path_coef), ("child_of", child_of),
                            ("into", into), ("depth", depth)]:
            self.register_buffer(name, value, persistent=False)

    def forward(self, logits: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
        mask = target_mask.to(device=logits.device, dtype=torch.bool)
        if not self.flat:
            loss = -masked_log_prob(logits, mask) * target_weight(self.class_weights, mask)
            return torch.where(mask.any(dim=1), loss, torch.zeros_like(loss))
        log_p = torch.log_softmax(logits.float(), dim=1)  # [B, C]
        node_log_p = torch.logsumexp(
            log_p[:, None, :].masked_fill(~self.membership[None], float("-inf")), dim=2
        )  # [B, U]: log P(node)
        coef, q = self._coefficients(mask)
        finite = torch.where(coef != 0, node_log_p, torch.zeros_like(node_log_p))
        loss = (coef * finite).sum(dim=1)
        return loss + torch.where(q != 0, q * masked_log_prob(logits, mask), torch.zeros_like(loss))

    def _coefficients(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: coefficients ``[B, U]`` of log P(node), and ``[B]`` of log P(marked).

        The marks' lowest common ancestor is the deepest path node whose classes hold them all;
        its path's edges count. When the marks are only part of its classes, one more (partial)
        edge counts: the mean weight of the edges into its children that hold a mark.
        """
        # integer counts, not a matmul: autocast would run one in bf16, inexact above 256 classes
        hits = (mask[:, None, :] & self.membership[None]).sum(dim=2)  # [B, U]: marked classes under each node
        marked = mask.sum(dim=1)
        covers = hits == marked[:, None]
        lca = torch.where(covers, self.depth, -1).argmax(dim=1)  # [B]
        coef = self.path_coef[lca]
        below = self.child_of[lca] & (hits > 0)
        partial_weight = (below * self.into).sum(dim=1) / below.sum(dim=1).clamp(min=1)
        partial = marked < self.membership.sum(dim=1)[lca]  # the marks are only part of the LCA's classes
        weight = torch.where(partial, partial_weight, torch.zeros_like(partial_weight))
        coef = coef.scatter_add(1, lca[:, None], weight[:, None])
        labelled = (marked > 0).to(coef.dtype)  # a row without a mark adds nothing
        return coef * labelled[:, None], -weight * labelled

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, measure={self.measure}, flat={self.flat}, classes={len(self.classes)}"


class SoftLabelCrossEntropy(nn.Module):
    """Cross-entropy against soft targets that decay with tree distance from the label."""

    def __init__(self, context: LossContext, beta: float = 10.0):
        super().__init__()
        self.beta = beta
        tax, classes = context.taxonomy, context.classes
        distance = torch.tensor([[tax.distance(a, b) for b in classes] for a in classes], dtype=torch.float32)
        distance = distance / distance.max().clamp(min=1)
        self.register_buffer("distance", distance, persistent=False)

    def targets(self, target_mask: torch.Tensor) -> torch.Tensor:
        """Soft target distributions ``[B, C]`` for a mask (distance to the nearest marked class)."""
        mask = target_mask.to(device=self.distance.device, dtype=torch.bool)
        nearest = self.distance[None].masked_fill(~mask[:, :, None], float("inf")).amin(dim=1)  # [B, C]
        nearest = torch.where(mask.any(dim=1, keepdim=True), nearest, torch.zeros_like(nearest))
        return torch.softmax(-self.beta * nearest, dim=1)

    def forward(self, logits: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
        soft = self.targets(target_mask).to(logits.device)
        loss = -(soft * torch.log_softmax(logits.float(), dim=1)).sum(dim=1)
        return torch.where(target_mask.to(logits.device).any(dim=1), loss, torch.zeros_like(loss))

    def extra_repr(self) -> str:
        return f"beta={self.beta}"
