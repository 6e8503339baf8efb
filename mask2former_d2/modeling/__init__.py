"""Model components; importing this module registers them with Detectron2.

The model files hold the reference formulation; fast paths live in :mod:`mask2former_d2.accel`
and shared blocks in :mod:`mask2former_d2.layers` (map: docs/layout.md). One vocabulary of
shape letters everywhere: B batch (clips for video), T frames of a clip, Q queries, K classes
(+1 no-object), G ground-truth segments, C channels, E mask-embedding channels, M heads,
L levels, P points, H/W spatial (Hp/Wp padded, Hm/Wm mask features).
"""
from . import (
    backbone,  # noqa: F401  (registers D2SwinTransformer)
    pixel_decoder,  # noqa: F401
    transformer_decoder,  # noqa: F401
    video,  # noqa: F401  (registers VideoMaskFormer and its decoder)
)
from .head import MaskFormerHead
from .meta_arch import MaskFormer

__all__ = ["MaskFormer", "MaskFormerHead"]
