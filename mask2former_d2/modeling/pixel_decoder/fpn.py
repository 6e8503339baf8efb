"""FPN-style pixel decoders of MaskFormer (optionally with a transformer encoder on res5).

Shapes: B batch, C_in backbone channels, D ``conv_dim``, E ``mask_dim``, H_k/W_k the size
of input feature k (stride 4, 8, 16, 32 for res2..res5), S = H_5*W_5.
"""

from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import fvcore.nn.weight_init as weight_init
from detectron2.config import CfgNode, configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from torch import Tensor, nn
from torch.nn import functional as F

from ...layers.attention import input_projection
from ...layers.detr_transformer import TransformerEncoderOnly
from ...layers.position_encoding import PositionEmbeddingSine
from .build import PIXEL_DECODER_REGISTRY, common_decoder_args

__all__ = ["BasePixelDecoder", "TransformerEncoderPixelDecoder"]

Norm = Optional[Union[str, Callable[[int], nn.Module]]]


def _conv(in_channels: int, out_channels: int, kernel_size: int, norm: Norm, relu: bool) -> Conv2d:
    """Conv + optional norm (+ ReLU), Caffe2-Xavier initialised; a bias only without norm."""
    conv = Conv2d(
        in_channels,
        out_channels,
        kernel_size=kernel_size,
        padding=kernel_size // 2,
        bias=norm == "",
        norm=get_norm(norm, out_channels),
        activation=F.relu if relu else None,
    )
    weight_init.c2_xavier_fill(conv)
    return conv


@PIXEL_DECODER_REGISTRY.register()
class BasePixelDecoder(nn.Module):
    """A top-down FPN whose finest output, through a 3x3 conv, gives the mask features.

    The coarsest input (res5) goes through a 3x3 conv (``layer_{n}``); each finer input k
    through a 1x1 lateral conv (``adapter_{k}``) added to the nearest-upsampled coarser
    output, then a 3x3 conv (``layer_{k}``). Inputs are numbered 1..n from the finest.
    """

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        conv_dim: int,
        mask_dim: int,
        norm: Norm = None,
    ) -> None:
        """
        Args:
            input_shape: channels and stride of each input feature.
            conv_dim: channels D of the FPN convs.
            mask_dim: channels E of the mask features.
            norm: normalisation of the FPN convs ("" = none, with bias), e.g. "GN".
        """
        super().__init__()
        if not input_shape:
            raise ValueError(
                f"{type(self).__name__}: input_shape is empty; check MODEL.SEM_SEG_HEAD.IN_FEATURES"
            )
        ordered = sorted(input_shape.items(), key=lambda kv: kv[1].stride)
        self.in_features = [name for name, _ in ordered]  # finest (res2) first
        channels = [spec.channels for _, spec in ordered]
        top = len(ordered)

        for k, c in enumerate(channels[:-1], start=1):
            self.add_module(f"adapter_{k}", _conv(c, conv_dim, 1, norm, relu=False))
            self.add_module(f"layer_{k}", _conv(conv_dim, conv_dim, 3, norm, relu=True))
        top_in = self._top_input_channels(channels[-1], conv_dim)
        self.add_module(f"layer_{top}", _conv(top_in, conv_dim, 3, norm, relu=True))

        self.mask_dim = mask_dim
        self.mask_features = Conv2d(conv_dim, mask_dim, kernel_size=3, padding=1)
        weight_init.c2_xavier_fill(self.mask_features)
        self.maskformer_num_feature_levels = 3  # multi-scale outputs for the decoder

    def _top_input_channels(self, in_channels: int, conv_dim: int) -> int:
        """Input channels of the coarsest level's 3x3 conv."""
        return in_channels

    def _encode_top(self, x: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """Coarsest level: returns its FPN output and the transformer-encoder features (if
        any)."""
        return getattr(self, f"layer_{len(self.in_features)}")(x), None

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape: Dict[str, ShapeSpec]) -> Dict[str, Any]:
        return common_decoder_args(cfg, input_shape)

    def forward_features(
        self, features: Dict[str, Tensor]
    ) -> Tuple[Tensor, Optional[Tensor], List[Tensor]]:
        """Runs the FPN.

        Args:
            features: backbone features by name, (B, C_in, H_k, W_k).

        Returns:
            mask_features: (B, E, H_1, W_1).
            transformer_encoder_features: (B, D, H_n, W_n) or None.
            multi_scale_features: the first three FPN outputs, coarsest first, (B, D, H, W).
        """
        num = len(self.in_features)
        y, encoder_features = self._encode_top(features[self.in_features[-1]])
        multi_scale = [y]
        for k in range(num - 1, 0, -1):  # coarse to fine
            lateral = getattr(self, f"adapter_{k}")(features[self.in_features[k - 1]])
            # Nearest upsampling, as in FPN.
            y = lateral + F.interpolate(y, size=lateral.shape[-2:], mode="nearest")
            y = getattr(self, f"layer_{k}")(y)
            if len(multi_scale) < self.maskformer_num_feature_levels:
                multi_scale.append(y)
        return self.mask_features(y), encoder_features, multi_scale

    def forward(self, features: Dict[str, Tensor]) -> Tuple[Tensor, Optional[Tensor], List[Tensor]]:
        """Same as :meth:`forward_features`."""
        return self.forward_features(features)


@PIXEL_DECODER_REGISTRY.register()
class TransformerEncoderPixelDecoder(BasePixelDecoder):
    """:class:`BasePixelDecoder` whose coarsest level is first projected to ``conv_dim``
    (``input_proj``) and refined by a DETR transformer encoder (``transformer``) with a
    sine position encoding; the encoder output is also returned as
    ``transformer_encoder_features``."""

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        transformer_dropout: float, transformer_nheads: int, transformer_dim_feedforward: int,
        transformer_enc_layers: int, transformer_pre_norm: bool,
        conv_dim: int, mask_dim: int, norm: Norm = None,
    ) -> None:
        """
        Args: those of :class:`BasePixelDecoder` (``conv_dim`` also sizes the encoder), and
            transformer_dropout: dropout probability in the encoder.
            transformer_nheads: attention heads; must divide ``conv_dim``.
            transformer_dim_feedforward: feed-forward width.
            transformer_enc_layers: encoder depth.
            transformer_pre_norm: pre-norm instead of post-norm encoder layers.
        """
        if conv_dim % transformer_nheads != 0:
            raise ValueError(
                f"conv_dim={conv_dim} is not divisible by transformer_nheads="
                f"{transformer_nheads}"
            )
        super().__init__(input_shape, conv_dim=conv_dim, mask_dim=mask_dim, norm=norm)
        top_channels = max(input_shape.values(), key=lambda spec: spec.stride).channels
        self.input_proj = input_projection(top_channels, conv_dim, enforce=True)
        self.transformer = TransformerEncoderOnly(
            conv_dim, transformer_nheads, transformer_enc_layers, transformer_dim_feedforward,
            transformer_dropout, normalize_before=transformer_pre_norm,
        )
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)

    def _top_input_channels(self, in_channels: int, conv_dim: int) -> int:
        # The coarsest 3x3 conv reads the encoder output, not the backbone feature.
        return conv_dim

    def _encode_top(self, x: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        pos = self.pe_layer(x[:1])  # (1, D, H_n, W_n): the same for every image
        encoded = self.transformer(self.input_proj(x), None, pos)  # (B, D, H_n, W_n)
        return getattr(self, f"layer_{len(self.in_features)}")(encoded), encoded

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape: Dict[str, ShapeSpec]) -> Dict[str, Any]:
        ret = super().from_config(cfg, input_shape)
        mf = cfg.MODEL.MASK_FORMER
        ret.update(
            transformer_dropout=mf.DROPOUT,
            transformer_nheads=mf.NHEADS,
            transformer_dim_feedforward=mf.DIM_FEEDFORWARD,
            transformer_enc_layers=cfg.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS,
            transformer_pre_norm=mf.PRE_NORM,
        )
        return ret
