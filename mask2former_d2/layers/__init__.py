"""Building blocks shared by the models: attention, feed-forward and MLP blocks, position
encodings, DETR's transformer, multi-scale deformable attention and pointwise convolutions.
Pixel decoders, transformer decoders and export import them from here, never from each other."""

from .attention import MLP, CrossAttentionLayer, FFNLayer, MultiHeadAttention, SelfAttentionLayer
from .deform_conv import ModulatedDeformConv, modulated_deform_conv
from .ms_deform_attn import MSDeformAttn, ms_deform_attn
from .pointwise_conv import is_channels_last, pointwise_conv
from .position_encoding import PositionEmbeddingSine, PositionEmbeddingSine3D

__all__ = [
    "CrossAttentionLayer",
    "FFNLayer",
    "MLP",
    "MSDeformAttn",
    "ModulatedDeformConv",
    "MultiHeadAttention",
    "PositionEmbeddingSine",
    "PositionEmbeddingSine3D",
    "SelfAttentionLayer",
    "is_channels_last",
    "modulated_deform_conv",
    "ms_deform_attn",
    "pointwise_conv",
]
