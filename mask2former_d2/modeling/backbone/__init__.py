"""Backbones; importing this package registers ``D2SwinTransformer`` in BACKBONE_REGISTRY."""

from .swin import D2SwinTransformer, SwinTransformer

__all__ = ["D2SwinTransformer", "SwinTransformer"]
