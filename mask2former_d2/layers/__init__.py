"""Neural-network layers shared by the models."""

from .ms_deform_attn import MSDeformAttn, ms_deform_attn
from .pointwise_conv import pointwise_conv

__all__ = ["MSDeformAttn", "ms_deform_attn", "pointwise_conv"]
