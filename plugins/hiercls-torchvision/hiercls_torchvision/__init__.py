"""hiercls plugin: torchvision classification models as backbones, named ``tv/<model>``.

``tv/googlenet``, ``tv/densenet121``, ``tv/resnet50``, ... any name from
``torchvision.models.list_models(module=torchvision.models)``. The classifier is replaced
by ``Identity`` so ``forward`` returns pooled features; ``num_features``,
``gradcam_layer``, ``is_token_model`` and ``num_prefix_tokens`` are set for Grad-CAM.
Weights come only from a local file (a torchvision ``state_dict``).
"""

from __future__ import annotations

from collections.abc import Callable

from hiercls.hookspecs import hookimpl
from hiercls_torchvision.backbones import PAPER_MODELS, PREFIX, create_torchvision_backbone

__version__ = "0.1.0"
__all__ = ["PAPER_MODELS", "PREFIX", "create_torchvision_backbone", "register_backbones"]


@hookimpl
def register_backbones(register: Callable[..., None]) -> None:
    for name in PAPER_MODELS:  # listed by `hiercls plugins`; the prefix serves the rest
        register(PREFIX + name, create_torchvision_backbone)
    register(PREFIX, create_torchvision_backbone, prefix=True)
