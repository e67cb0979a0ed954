"""hiercls plugin: hierarchy-aware losses ``hxe`` and ``soft_labels`` (Bertinetto et al., CVPR 2020).

Use them like any loss (``--loss hxe``); see :mod:`hiercls_hxe.losses` for the maths.
"""

from __future__ import annotations

from collections.abc import Callable

from hiercls.hookspecs import hookimpl
from hiercls_hxe.losses import HierarchicalCrossEntropy, SoftLabelCrossEntropy, hxe, soft_labels

__version__ = "0.1.0"
__all__ = ["HierarchicalCrossEntropy", "SoftLabelCrossEntropy", "hxe", "register_losses", "soft_labels"]


@hookimpl
def register_losses(register: Callable[..., None]) -> None:
    register("hxe", hxe)
    register("soft_labels", soft_labels)
