"""Building blocks shared by the models, in their reference formulation: attention,
feed-forward and MLP blocks, position encodings, DETR's transformer and multi-scale deformable
attention. Pixel decoders, transformer decoders and export import them from here, never from
each other; their fast formulations live in :mod:`mask2former_d2.accel`."""

from .attention import MLP, CrossAttentionLayer, FFNLayer, MultiHeadAttention, SelfAttentionLayer
from .deform_conv import ModulatedDeformConv, modulated_deform_conv
from .ms_deform_attn import MSDeformAttn, ms_deform_attn
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
    "modulated_deform_conv",
    "ms_deform_attn",
]
