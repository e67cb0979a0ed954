"""Models: backbones from any plugin, and the heads built on top of them."""

from hiercls.models.backbone import (
    create_backbone,
    find_gradcam_layer,
    set_backbone_attributes,
)

__all__ = ["create_backbone", "find_gradcam_layer", "set_backbone_attributes"]
