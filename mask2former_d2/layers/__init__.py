"""Neural-network layers shared by the models."""

from .ms_deform_attn import MSDeformAttn, ms_deform_attn

__all__ = ["MSDeformAttn", "ms_deform_attn"]
