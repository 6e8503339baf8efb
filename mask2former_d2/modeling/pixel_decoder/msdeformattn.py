"""Multi-scale deformable-attention pixel decoder (Mask2Former's default).

Shapes: B batch, C channels (``conv_dim``), L encoder levels (lowest resolution first),
H_l/W_l the size of level l, S = sum_l H_l * W_l, M attention heads, P sampling points.
Sequences are batch-first (B, S, C); feature maps are (B, C, H, W).

The backbone levels named by ``transformer_in_features`` (normally res3..res5) are projected to
C channels and refined jointly by a deformable-attention transformer encoder. The finer
backbone levels (normally res2) are then merged in FPN style, and a 1x1 conv produces the mask
features. Attribute names (``input_proj``, ``transformer.level_embed``,
``transformer.encoder.layers.{j}``, ``mask_features``, ``adapter_{k}``, ``layer_{k}``) match the
published checkpoints.
"""

import copy
import logging
import math
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.config import CfgNode, configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from torch import Tensor, nn

from ...accel.layout import is_channels_last
from ...accel.ms_deform_attn import EmbeddingBagMSDeformAttn
from ...accel.pointwise_conv import linear_relu, pointwise_conv
from ...accel.precision import full_precision, low_precision_inference
from ...layers.attention import FeedForwardMixin, make_dropout
from ...layers.ms_deform_attn import MSDeformAttn, level_sizes
from ...layers.position_encoding import PositionEmbeddingSine
from .build import PIXEL_DECODER_REGISTRY

__all__ = [
    "MSDeformAttnPixelDecoder",
    "MSDeformAttnTransformerEncoderOnly",
    "MSDeformAttnTransformerEncoder",
    "MSDeformAttnTransformerEncoderLayer",
]

logger = logging.getLogger(__name__)

# The published checkpoints use this feed-forward width in the encoder, whatever
# MODEL.MASK_FORMER.DIM_FEEDFORWARD says (that key sizes the transformer decoder).
ENCODER_DIM_FEEDFORWARD = 1024
# Positions per chunk of the encoder layers at inference with fast paths (see the layer's
# forward): intermediates of a few MB that stay in cache.
QUERY_CHUNK = 2048
# The transformer decoder always reads the three coarsest outputs.
NUM_DECODER_LEVELS = 3


def _relu_(x: Tensor) -> Tensor:
    """In-place ReLU for the FPN convs: their input is a fresh GroupNorm output."""
    return F.relu(x, inplace=True)


class MSDeformAttnTransformerEncoderLayer(FeedForwardMixin, nn.Module):
    """Post-norm encoder layer: deformable self-attention, then a ReLU feed-forward block.

    Args:
        hidden_dim: channels C.
        dim_feedforward: inner width of the feed-forward block.
        dropout: dropout after attention, inside and after the feed-forward block.
        num_levels: feature levels L.
        num_heads: attention heads M.
        num_points: sampling points P per head and level.
        query_chunk: > 0 (fast paths): without autograd, positions are attended in chunks of
            this many, with the ``embedding_bag`` sampling and a fused linear + ReLU; 0: the
            reference formulation, all positions at once.
    """

    def __init__(
        self,
        *,
        hidden_dim: int = 256,
        dim_feedforward: int = ENCODER_DIM_FEEDFORWARD,
        dropout: float = 0.1,
        num_levels: int = 4,
        num_heads: int = 8,
        num_points: int = 4,
        query_chunk: int = QUERY_CHUNK,
    ) -> None:
        super().__init__()
        self.query_chunk = query_chunk
        attention = EmbeddingBagMSDeformAttn if query_chunk > 0 else MSDeformAttn
        # Construction order matches the published module, so a seeded init draws the same
        # random numbers.
        self.self_attn = attention(hidden_dim, num_levels, num_heads, num_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(hidden_dim)
        self._init_feed_forward(hidden_dim, dim_feedforward, dropout)  # linear1, linear2 (ReLU)
        self.dropout2 = make_dropout(dropout)
        self.norm2 = nn.LayerNorm(hidden_dim)

    def forward(
        self,
        src: Tensor,
        pos: Tensor,
        reference_points: Tensor,
        spatial_shapes: Tensor,
        padding_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """src, pos: (B, S, C); reference_points: (B, S, L, 2). Returns (B, S, C).

        Every position is a query of the same values, and everything after the value projection
        is per position: with ``query_chunk`` and without autograd, positions go through in
        chunks, so that the intermediates (sampling rows and weights, the feed-forward hidden
        layer, ...) are a few MB that stay in cache instead of ~100 MB tensors allocated for
        every layer.
        """
        values = self.self_attn.project_value(src, spatial_shapes, padding_mask)
        s = src.shape[1]
        chunked = self.query_chunk > 0 and not torch.is_grad_enabled()
        # No chunks while torch.export traces: the loop would need a concrete S.
        step = self.query_chunk if chunked and not torch.compiler.is_exporting() else s
        if step >= s:
            return self._forward_queries(src, pos, reference_points, values)
        out = torch.empty_like(src)
        for s0 in range(0, s, step):
            part = slice(s0, s0 + step)
            out[:, part] = self._forward_queries(
                src[:, part], pos[:, part], reference_points[:, part], values
            )
        return out

    def _forward_queries(self, src: Tensor, pos: Tensor, reference_points: Tensor, values: Any) -> Tensor:
        attn = self.self_attn.attend(src + pos, reference_points, values)
        src = self.norm1(src + self.dropout1(attn))
        return self.norm2(src + self.dropout2(self._feed_forward(src)))

    def _feed_forward(self, x: Tensor) -> Tensor:
        if self.query_chunk > 0:  # fast paths: linear1 + ReLU fused (accel.pointwise_conv)
            return self.linear2(self.dropout(linear_relu(self.linear1, x)))
        return super()._feed_forward(x)


class MSDeformAttnTransformerEncoder(nn.Module):
    """A stack of identical-at-init encoder layers sharing the reference points.

    Args:
        encoder_layer: the layer to clone.
        num_layers: number of clones.
    """

    def __init__(self, encoder_layer: nn.Module, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(encoder_layer) for _ in range(num_layers))
        self.num_layers = num_layers

    @staticmethod
    def get_reference_points(spatial_shapes: Tensor, device: torch.device) -> Tensor:
        """Pixel centres of every level (none is padded: the decoder never pads its inputs).

        Args:
            spatial_shapes: (L, 2) integer (H_l, W_l) (or the list of pairs while exporting).
            device: where to make them.

        Returns:
            (1, S, L, 2) normalised (x, y): the centre of each position, the same in the frame
            of every level.
        """
        points = []
        for h, w in level_sizes(spatial_shapes):
            ys = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h  # (H,)
            xs = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w  # (W,)
            grid = torch.stack((xs[None, :].expand(h, w), ys[:, None].expand(h, w)), -1)  # (H, W, 2)
            points.append(grid.reshape(h * w, 2))
        num_levels = len(points)
        return torch.cat(points, 0)[None, :, None].expand(-1, -1, num_levels, -1)  # (1, S, L, 2)

    def forward(
        self, src: Tensor, spatial_shapes: Tensor, pos: Tensor, padding_mask: Optional[Tensor] = None
    ) -> Tensor:
        """src, pos: (B, S, C). Returns (B, S, C)."""
        reference_points = self.get_reference_points(spatial_shapes, src.device)
        reference_points = reference_points.expand(src.shape[0], -1, -1, -1)  # (B, S, L, 2)
        out = src
        for layer in self.layers:
            out = layer(out, pos, reference_points, spatial_shapes, padding_mask)
        return out


class MSDeformAttnTransformerEncoderOnly(nn.Module):
    """Flattens the levels, adds level embeddings to the position encodings and runs the encoder.

    Args:
        hidden_dim: channels C.
        num_heads: attention heads M.
        num_encoder_layers: encoder depth.
        dim_feedforward: feed-forward width.
        dropout: dropout probability.
        num_feature_levels: levels L.
        num_points: sampling points P per head and level.
        query_chunk: see :class:`MSDeformAttnTransformerEncoderLayer` (0 = reference).
    """

    def __init__(
        self,
        *,
        hidden_dim: int = 256,
        num_heads: int = 8,
        num_encoder_layers: int = 6,
        dim_feedforward: int = ENCODER_DIM_FEEDFORWARD,
        dropout: float = 0.1,
        num_feature_levels: int = 4,
        num_points: int = 4,
        query_chunk: int = QUERY_CHUNK,
    ) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.num_heads = num_heads
        layer = MSDeformAttnTransformerEncoderLayer(
            hidden_dim=hidden_dim,
            dim_feedforward=dim_feedforward,
            dropout=dropout,
            num_levels=num_feature_levels,
            num_heads=num_heads,
            num_points=num_points,
            query_chunk=query_chunk,
        )
        self.encoder = MSDeformAttnTransformerEncoder(layer, num_encoder_layers)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, hidden_dim))
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # Xavier for every matrix, then the attention modules' own init, then N(0, 1) level
        # embeddings: the published order.
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for module in self.modules():
            if isinstance(module, MSDeformAttn):
                module._reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(self, srcs: List[Tensor], pos_embeds: List[Tensor]) -> Tuple[Tensor, Any]:
        """
        Args:
            srcs: L maps (B, C, H_l, W_l), lowest resolution first.
            pos_embeds: matching position encodings (B, C, H_l, W_l).

        Returns:
            memory (B, S, C) and spatial_shapes (L, 2) long (H_l, W_l) (a plain list of pairs
            while torch.export traces).
        """
        if len(srcs) != self.level_embed.shape[0] or len(pos_embeds) != len(srcs):
            raise ValueError(
                f"expected {self.level_embed.shape[0]} feature levels and as many position "
                f"encodings, got {len(srcs)} and {len(pos_embeds)}"
            )
        src_flatten, pos_flatten, sizes = [], [], []
        for level, (src, pos) in enumerate(zip(srcs, pos_embeds)):
            sizes.append(tuple(src.shape[-2:]))
            src_flatten.append(src.flatten(2).transpose(1, 2))  # (B, H*W, C)
            pos = pos.flatten(2).transpose(1, 2)  # (B, H*W, C)
            pos_flatten.append(pos + self.level_embed[level].view(1, 1, -1))
        src_flatten = torch.cat(src_flatten, 1)  # (B, S, C)
        pos_flatten = torch.cat(pos_flatten, 1)
        if torch.compiler.is_exporting():
            # Symbolic sizes (dynamic height and width) do not survive a round trip through a
            # tensor: the levels are described by the (H_l, W_l) pairs themselves.
            spatial_shapes = sizes
        else:
            spatial_shapes = torch.as_tensor(sizes, dtype=torch.long, device=src_flatten.device)  # (L, 2)
        return self.encoder(src_flatten, spatial_shapes, pos_flatten), spatial_shapes


@PIXEL_DECODER_REGISTRY.register()
class MSDeformAttnPixelDecoder(nn.Module):
    """Deformable-attention encoder over the coarse levels plus an FPN step to the finest ones.

    Returns mask features at ``common_stride``, the encoder output of the coarsest level and
    three multi-scale maps (strides 32, 16, 8 with the default features) for the transformer
    decoder. Runs in float32 even under autocast (training with AMP), as the published
    implementation does; at low-precision inference (:mod:`mask2former_d2.accel.precision`) its convolutions and
    linear layers run in that precision, the deformable sampling in float32.
    """

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        transformer_dropout: float,
        transformer_nheads: int,
        transformer_dim_feedforward: int,
        transformer_enc_layers: int,
        conv_dim: int,
        mask_dim: int,
        norm: Optional[Union[str, Callable]] = None,
        transformer_in_features: List[str],
        common_stride: int,
        transformer_n_points: int = 4,
        fast_paths: bool = True,
    ) -> None:
        """
        Args:
            input_shape: channels and stride of every backbone feature the decoder reads.
            transformer_dropout: dropout probability in the encoder.
            transformer_nheads: attention heads of the encoder.
            transformer_dim_feedforward: encoder feed-forward width (1024 in the published
                checkpoints).
            transformer_enc_layers: encoder depth.
            conv_dim: channels C of the encoder and the FPN convs.
            mask_dim: channels of the mask features.
            norm: normalization of the FPN convs ("GN" in the published configs; "" for none).
            transformer_in_features: the features the encoder reads (a subset of input_shape).
            common_stride: stride of the mask features; finer input features down to it are
                merged in FPN style.
            transformer_n_points: sampling points per head and level.
            fast_paths: build the fast formulations of :mod:`mask2former_d2.accel` (the
                ``embedding_bag`` sampling in chunks of positions, 1x1 convolutions as matrix
                products) instead of the reference ones.
        """
        super().__init__()
        if not input_shape:
            raise ValueError(
                "MSDeformAttnPixelDecoder: input_shape is empty; "
                "check MODEL.SEM_SEG_HEAD.IN_FEATURES"
            )
        missing = [f for f in transformer_in_features if f not in input_shape]
        if not transformer_in_features or missing:
            raise ValueError(
                "MSDeformAttnPixelDecoder: transformer_in_features="
                f"{list(transformer_in_features)} must be a non-empty subset of the input "
                f"features {sorted(input_shape)}"
            )
        # All inputs, finest first (res2 .. res5).
        ordered = sorted(input_shape.items(), key=lambda kv: kv[1].stride)
        self.in_features = [k for k, _ in ordered]
        self.feature_strides = [v.stride for _, v in ordered]
        self.feature_channels = [v.channels for _, v in ordered]
        # The encoder's inputs, finest first (res3 .. res5); the encoder itself sees them
        # coarsest first.
        enc_ordered = [(k, v) for k, v in ordered if k in transformer_in_features]
        self.transformer_in_features = [k for k, _ in enc_ordered]
        self.transformer_feature_strides = [v.stride for _, v in enc_ordered]
        transformer_in_channels = [v.channels for _, v in enc_ordered]
        self.transformer_num_feature_levels = len(self.transformer_in_features)

        num_fpn_levels = math.log2(min(self.transformer_feature_strides) / common_stride)
        if num_fpn_levels < 0 or num_fpn_levels != int(num_fpn_levels):
            raise ValueError(
                f"MSDeformAttnPixelDecoder: common_stride={common_stride} must be a power-of-2 "
                f"divisor of the finest encoder stride {min(self.transformer_feature_strides)}"
            )
        self.num_fpn_levels = int(num_fpn_levels)
        if (
            self.num_fpn_levels > 0
            and self.feature_strides[self.num_fpn_levels - 1] < common_stride
        ):
            raise ValueError(
                f"MSDeformAttnPixelDecoder: input strides {self.feature_strides} do not provide "
                f"{self.num_fpn_levels} FPN level(s) between common_stride={common_stride} and "
                f"the encoder's finest stride {min(self.transformer_feature_strides)}"
            )

        # 1x1 conv + GroupNorm(32) per encoder level, coarsest first (res5 -> res3).
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, conv_dim, kernel_size=1), nn.GroupNorm(32, conv_dim))
            for c in transformer_in_channels[::-1]
        )
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)

        self.transformer = MSDeformAttnTransformerEncoderOnly(
            hidden_dim=conv_dim,
            num_heads=transformer_nheads,
            num_encoder_layers=transformer_enc_layers,
            dim_feedforward=transformer_dim_feedforward,
            dropout=transformer_dropout,
            num_feature_levels=self.transformer_num_feature_levels,
            num_points=transformer_n_points,
            query_chunk=QUERY_CHUNK if fast_paths else 0,
        )
        self.fast_paths = fast_paths
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)

        self.mask_features = Conv2d(conv_dim, mask_dim, kernel_size=1, stride=1, padding=0)
        weight_init.c2_xavier_fill(self.mask_features)

        self.maskformer_num_feature_levels = NUM_DECODER_LEVELS
        self.common_stride = common_stride

        # FPN convs for the inputs finer than the encoder's, registered finest first as
        # adapter_1/layer_1, adapter_2/layer_2, ... (the checkpoint names).
        use_bias = norm == ""
        lateral_convs, output_convs = [], []
        for idx, in_channels in enumerate(self.feature_channels[: self.num_fpn_levels]):
            lateral_conv = Conv2d(
                in_channels, conv_dim, kernel_size=1, bias=use_bias, norm=get_norm(norm, conv_dim)
            )
            output_conv = Conv2d(
                conv_dim,
                conv_dim,
                kernel_size=3,
                stride=1,
                padding=1,
                bias=use_bias,
                norm=get_norm(norm, conv_dim),
                activation=_relu_,
            )
            weight_init.c2_xavier_fill(lateral_conv)
            weight_init.c2_xavier_fill(output_conv)
            self.add_module(f"adapter_{idx + 1}", lateral_conv)
            self.add_module(f"layer_{idx + 1}", output_conv)
            lateral_convs.append(lateral_conv)
            output_convs.append(output_conv)
        # Top-down order (coarse to fine) for forward; plain lists: already registered above.
        self.lateral_convs = lateral_convs[::-1]
        self.output_convs = output_convs[::-1]

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape: Dict[str, ShapeSpec]) -> Dict[str, Any]:
        head = cfg.MODEL.SEM_SEG_HEAD
        num_heads = cfg.MODEL.MASK_FORMER.NHEADS
        if head.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS != num_heads:
            # The published implementation sizes the encoder with MASK_FORMER.NHEADS and its
            # checkpoints depend on it; keep that behaviour but say so.
            logger.warning(
                "MSDeformAttnPixelDecoder uses MODEL.MASK_FORMER.NHEADS=%d heads, as published; "
                "MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS=%d is ignored",
                num_heads,
                head.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS,
            )
        return {
            "input_shape": {k: v for k, v in input_shape.items() if k in head.IN_FEATURES},
            "conv_dim": head.CONVS_DIM,
            "mask_dim": head.MASK_DIM,
            "norm": head.NORM,
            "transformer_dropout": cfg.MODEL.MASK_FORMER.DROPOUT,
            "transformer_nheads": num_heads,
            "transformer_dim_feedforward": ENCODER_DIM_FEEDFORWARD,
            "transformer_enc_layers": head.TRANSFORMER_ENC_LAYERS,
            "transformer_in_features": list(head.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES),
            "common_stride": head.COMMON_STRIDE,
            "transformer_n_points": head.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS,
            "fast_paths": cfg.MODEL.MASK_FORMER.FAST_PATHS,
        }

    def forward_features(self, features: Dict[str, Tensor]) -> Tuple[Tensor, Tensor, List[Tensor]]:
        """
        Args:
            features: backbone maps by name, at least every name in ``in_features``.

        Returns:
            mask_features: (B, mask_dim, H / common_stride, W / common_stride).
            encoder output of the coarsest level: (B, C, H_0, W_0).
            multi_scale_features: the first three outputs, coarsest first (strides 32, 16, 8
                with the default features), each (B, C, H_l, W_l).
        """
        if low_precision_inference() is not None:
            # Autocast stays on; the features stay in the low precision they come in.
            return self._forward(features, lambda x: x)
        any_feature = features[self.in_features[0]]
        # Deformable attention and GroupNorm run in float32, as in the published decoder.
        with full_precision(any_feature):
            return self._forward(features, Tensor.float)

    def _forward(
        self, features: Dict[str, Tensor], cast: Callable[[Tensor], Tensor]
    ) -> Tuple[Tensor, Tensor, List[Tensor]]:
        """:meth:`forward_features` with every backbone feature read through ``cast``."""
        srcs, pos = [], []
        for idx, name in enumerate(self.transformer_in_features[::-1]):  # coarsest first
            x = cast(features[name])
            conv, norm = self.input_proj[idx]
            srcs.append(norm(self._conv1x1(conv, x)))
            pos.append(self.pe_layer(x))
        memory, spatial_shapes = self.transformer(srcs, pos)  # (B, S, C)

        b, c = memory.shape[0], memory.shape[2]
        sizes = level_sizes(spatial_shapes)
        levels = torch.split(memory, [h * w for h, w in sizes], dim=1)
        # (B, H_l*W_l, C) -> (B, C, H_l, W_l), in the layout of the finest FPN input: the
        # upsampled maps and the FPN's additions follow it, and converting a stride-4 map
        # between layouts costs far more than anything at the encoder's resolutions. A
        # channels-last (B, C, H, W) is a free view of the encoder's output.
        fine_names = self.in_features[: self.num_fpn_levels][::-1]
        finest = features[fine_names[-1]] if fine_names else None
        if finest is not None and is_channels_last(finest):
            out = [z.view(b, h, w, c).permute(0, 3, 1, 2) for z, (h, w) in zip(levels, sizes)]
        else:
            out = [
                z.transpose(1, 2).reshape(b, -1, h, w).contiguous()
                for z, (h, w) in zip(levels, sizes)
            ]

        # Top-down FPN over the finer inputs (coarse to fine).
        for name, lateral_conv, output_conv in zip(
            fine_names, self.lateral_convs, self.output_convs
        ):
            lateral = self._conv1x1(lateral_conv, cast(features[name]))
            up = F.interpolate(
                out[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False
            )
            # In place: the GroupNorm output is not needed again (nor by its backward).
            out.append(output_conv(lateral.add_(up)))

        multi_scale_features = out[: self.maskformer_num_feature_levels]
        return self._conv1x1(self.mask_features, out[-1]), out[0], multi_scale_features

    def _conv1x1(self, conv: nn.Module, x: Tensor) -> Tensor:
        """``conv(x)`` for a 1x1 convolution; as matrix products with fast paths."""
        return pointwise_conv(conv, x) if self.fast_paths else conv(x)
