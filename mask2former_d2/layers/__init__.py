"""Neural-network layers shared by the models."""

from .deform_conv import ModulatedDeformConv, modulated_deform_conv
from .ms_deform_attn import MSDeformAttn, ms_deform_attn
from .pointwise_conv import is_channels_last, pointwise_conv

__all__ = [
    "MSDeformAttn",
    "ModulatedDeformConv",
    "is_channels_last",
    "modulated_deform_conv",
    "ms_deform_attn",
    "pointwise_conv",
]
