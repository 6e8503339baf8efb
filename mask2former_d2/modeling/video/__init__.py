"""Mask2Former-VIS (video instance segmentation); importing this module registers
``VideoMaskFormer`` and ``VideoMultiScaleMaskedTransformerDecoder``."""
from .meta_arch import VideoMaskFormer
from .transformer_decoder import VideoMultiScaleMaskedTransformerDecoder

__all__ = ["VideoMaskFormer", "VideoMultiScaleMaskedTransformerDecoder"]
