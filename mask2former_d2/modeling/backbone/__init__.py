"""Backbones; importing this package registers ``D2SwinTransformer`` and ``D2STDCnet`` in
BACKBONE_REGISTRY."""

from .stdc import D2STDCnet, STDCNet
from .swin import D2SwinTransformer, SwinTransformer

__all__ = ["D2STDCnet", "D2SwinTransformer", "STDCNet", "SwinTransformer"]
