"""Model components; importing this module registers them with Detectron2."""
from . import (
    backbone,  # noqa: F401  (registers D2SwinTransformer)
    pixel_decoder,  # noqa: F401
    transformer_decoder,  # noqa: F401
    video,  # noqa: F401  (registers VideoMaskFormer and its decoder)
)
from .head import MaskFormerHead
from .meta_arch import MaskFormer

__all__ = ["MaskFormer", "MaskFormerHead"]
