"""Neural-network layers shared by the models."""

from .deform_conv import ModulatedDeformConv, modulated_deform_conv
from .ms_deform_attn import MSDeformAttn, ms_deform_attn
from .pointwise_conv import is_channels_last, pointwise_conv

__all__ = [
    "ModulatedDeformConv",
    "MSDeformAttn",
    "modulated_deform_conv", "is_channels_last", "ms_deform_attn", "pointwise_conv"]
