"""The one output every strategy produces: a probability for every node of the tree.

For N images, ``NodeProbabilities`` holds

* ``conditional[N, num_nodes]``: P(node | parent, image), root = 1; each internal node's
  children sum to 1;
* ``marginal[N, num_nodes]``: P(node | image) = product of conditionals along the path;
  root = 1 and every parent equals the sum of its children.

Decoding, metrics, group aggregation and reports take this object and nothing
strategy-specific (docs/architecture.md, "The shared output").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from hiercls.errors import ConfigError
from hiercls.taxonomy import Taxonomy

__all__ = ["NodeProbabilities", "DecodeMethod", "DECODE_METHODS"]

DecodeMethod = Literal["greedy", "best_leaf", "threshold"]
DECODE_METHODS: tuple[str, ...] = ("greedy", "best_leaf", "threshold")


@dataclass
class NodeProbabilities:
    taxonomy: Taxonomy
    conditional: np.ndarray
    marginal: np.ndarray

    def __post_init__(self) -> None:
        expected = self.taxonomy.num_nodes
        for name in ("conditional", "marginal"):
            array = getattr(self, name)
            if array.ndim != 2 or array.shape[1] != expected:
                raise ValueError(f"{name} must have shape [N, {expected}], got {tuple(array.shape)}")

    def __len__(self) -> int:
        return self.marginal.shape[0]

    # -- construction -------------------------------------------------------------------

    @classmethod
    def from_conditionals(cls, taxonomy: Taxonomy, conditional: np.ndarray) -> NodeProbabilities:
        """Marginals by multiplying conditionals down the tree (pre-order: parents come first)."""
        conditional = np.asarray(conditional, dtype=np.float64).copy()
        conditional[:, taxonomy.index[taxonomy.root]] = 1.0
        marginal = np.empty_like(conditional)
        for node in taxonomy.nodes:
            i = taxonomy.index[node]
            parent = taxonomy.parent(node)
            marginal[:, i] = conditional[:, i] * (marginal[:, taxonomy.index[parent]] if parent else 1.0)
        return cls(taxonomy, conditional, marginal)

    @classmethod
    def from_leaf_probabilities(cls, taxonomy: Taxonomy, leaf_probs: np.ndarray) -> NodeProbabilities:
        """From a flat softmax over ``taxonomy.leaves`` (columns in that order)."""
        leaf_probs = np.asarray(leaf_probs, dtype=np.float64)
        if leaf_probs.ndim != 2 or leaf_probs.shape[1] != len(taxonomy.leaves):
            raise ValueError(f"leaf_probs must be [N, {len(taxonomy.leaves)}], got {leaf_probs.shape}")
        marginal = np.zeros((leaf_probs.shape[0], taxonomy.num_nodes))
        for j, leaf in enumerate(taxonomy.leaves):
            marginal[:, taxonomy.index[leaf]] = leaf_probs[:, j]
        # Reverse pre-order visits children before parents, so sums build bottom-up.
        for node in reversed(taxonomy.nodes):
            children = taxonomy.children_indices(node)
            if children:
                marginal[:, taxonomy.index[node]] = marginal[:, children].sum(axis=1)
        return cls(taxonomy, _conditionals_from_marginals(taxonomy, marginal), marginal)

    @classmethod
    def from_marginals(cls, taxonomy: Taxonomy, marginal: np.ndarray) -> NodeProbabilities:
        """From consistent marginals (e.g. read back from a predictions CSV, or averaged)."""
        marginal = np.asarray(marginal, dtype=np.float64)
        return cls(taxonomy, _conditionals_from_marginals(taxonomy, marginal), marginal)

    # -- queries ------------------------------------------------------------------------

    def column(self, node: str) -> np.ndarray:
        return self.marginal[:, self.taxonomy.index[node]]

    def leaf_marginals(self) -> np.ndarray:
        """``[N, num_leaves]`` in ``taxonomy.leaves`` order; rows sum to 1."""
        return self.marginal[:, [self.taxonomy.index[leaf] for leaf in self.taxonomy.leaves]]

    def consistency_error(self) -> float:
        """Largest violation of root = 1 and parent = sum(children) (0 for a consistent output)."""
        tax = self.taxonomy
        worst = float(np.abs(self.marginal[:, tax.index[tax.root]] - 1.0).max(initial=0.0))
        for node in tax.internal_nodes:
            children = tax.children_indices(node)
            gap = np.abs(self.marginal[:, tax.index[node]] - self.marginal[:, children].sum(axis=1))
            worst = max(worst, float(gap.max(initial=0.0)))
        return worst

    def __getitem__(self, rows) -> NodeProbabilities:
        return NodeProbabilities(self.taxonomy, self.conditional[rows], self.marginal[rows])

    # -- decoding -----------------------------------------------------------------------

    def decode(self, method: DecodeMethod = "greedy", threshold: float = 0.5) -> list[str]:
        """One node name per image.

        * ``greedy``: from the root, follow the most probable child down to a leaf.
        * ``best_leaf``: the leaf with the highest marginal probability.
        * ``threshold``: greedy, but stop at an internal node when its best child's
          conditional probability is below ``threshold`` ("Leukemia > Acute, subtype uncertain").
        """
        return self.taxonomy.decode(self.decode_indices(method, threshold))

    def decode_indices(self, method: DecodeMethod = "greedy", threshold: float = 0.5) -> np.ndarray:
        """``decode`` as node indices; refuses a ``threshold`` outside [0, 1] (ConfigError)."""
        _check_threshold(threshold)
        tax = self.taxonomy
        if method == "best_leaf":
            leaf_idx = np.array([tax.index[leaf] for leaf in tax.leaves])
            return leaf_idx[self.marginal[:, leaf_idx].argmax(axis=1)]
        if method not in ("greedy", "threshold"):
            raise ConfigError(f"unknown decode method '{method}'; choose one of {', '.join(DECODE_METHODS)}")
        stop_below = threshold if method == "threshold" else -1.0
        current = np.full(len(self), tax.index[tax.root], dtype=np.int64)
        active = np.ones(len(self), dtype=bool)
        for _ in range(tax.max_depth):
            for node in tax.internal_nodes:
                rows = np.where(active & (current == tax.index[node]))[0]
                if rows.size == 0:
                    continue
                children = np.array(tax.children_indices(node))
                cond = self.conditional[np.ix_(rows, children)]
                best = cond.argmax(axis=1)
                sure = cond[np.arange(rows.size), best] >= stop_below
                current[rows[sure]] = children[best[sure]]
                active[rows[~sure]] = False
        return current


def _check_threshold(threshold: float) -> None:
    """The stop threshold is compared with probabilities: a value outside [0, 1] (or NaN) would
    silently stop every image at the root (> 1, NaN) or never stop (< 0)."""
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise ConfigError(f"threshold must be a number in [0, 1], got {threshold!r}") from None
    if not 0.0 <= value <= 1.0:  # also false for NaN
        raise ConfigError(f"threshold must be in [0, 1], got {threshold}; it is compared with probabilities")


def _conditionals_from_marginals(taxonomy: Taxonomy, marginal: np.ndarray) -> np.ndarray:
    conditional = np.ones_like(marginal)
    for node in taxonomy.internal_nodes:
        parent_p = marginal[:, [taxonomy.index[node]]]
        children = taxonomy.children_indices(node)
        n_children = len(children)
        with np.errstate(divide="ignore", invalid="ignore"):
            cond = np.where(parent_p > 0, marginal[:, children] / parent_p, 1.0 / n_children)
        conditional[:, children] = cond
    return conditional
