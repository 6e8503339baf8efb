"""PEM's pixel decoder (Prototype-based Efficient MaskFormer, Cavagnero et al., CVPR 2024).

A light top-down path: every backbone level is projected to ``conv_dim`` channels, reweighted by
a context-based channel modulation, and the coarser level is refined by a modulated deformable
3x3 convolution (DCNv2) and upsampled 2x by a learned transposed convolution before being added
to the next finer level. Module and parameter names are PEM's, so its checkpoints load.

Shapes: B batch, C_k backbone channels of level k, D ``conv_dim``, E ``mask_dim``, H_k/W_k the
size of level k (strides 4, 8, 16, 32 for res2..res5), K = 9 taps of a 3x3 kernel.
"""
import math
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import fvcore.nn.weight_init as weight_init
import torch
from detectron2.config import CfgNode, configurable
from detectron2.layers import ShapeSpec, get_norm
from torch import Tensor, nn

from ...layers.deform_conv import ModulatedDeformConv
from .build import PIXEL_DECODER_REGISTRY, common_decoder_args

__all__ = ["PEM_Pixel_Decoder"]

Norm = Optional[Union[str, Callable[[int], nn.Module]]]


class ConvNormReLU(nn.Sequential):
    """Conv (no bias), norm, ReLU, with PEM's initialisation (Kaiming normal, a=1); children
    ``conv``, ``bn``, ``relu``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, norm: Norm) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = get_norm(norm, out_channels)
        self.relu = nn.ReLU()
        nn.init.kaiming_normal_(self.conv.weight, a=1)


class ChannelMLP(nn.Module):
    """1x1 conv to half the channels, norm, ReLU, 1x1 conv back (no biases); child ``mlp``."""

    def __init__(self, channels: int, reduction: int, norm: Norm) -> None:
        super().__init__()
        hidden = channels // reduction
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False),
            get_norm(norm, hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, channels, 1, bias=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)


class ChannelModulation(nn.Module):
    """Context-based self-modulation: ``x + x * w`` with per-channel weights ``w`` predicted from
    the globally averaged ``x``.

    The published model applies the sigmoid twice (once as the last module of ``mlp``, once on
    its output); the checkpoints were trained that way, so ``w`` lies in (0.5, 0.73).
    """

    def __init__(self, channels: int, norm: Norm, reduction: int = 2) -> None:
        super().__init__()
        self.mlp = nn.Sequential(ChannelMLP(channels, reduction, norm), nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        """(B, D, H, W) -> (B, D, H, W)."""
        weight = self.mlp(x.mean(dim=(2, 3), keepdim=True)).sigmoid()  # (B, D, 1, 1)
        return x + x * weight


class DeformUpsample(nn.Module):
    """Modulated deformable 3x3 conv + norm + ReLU, then a 4x4 stride-2 transposed conv + norm +
    ReLU that doubles the resolution.

    ``dcn_offset`` predicts 3K channels per pixel: the first 2K are the (dy, dx) offsets of
    the K taps, interleaved as Detectron2's deformable conv reads them; the sigmoid of the last
    K is the modulation.
    """

    def __init__(self, channels: int, norm: Norm, deform_formulation: str = "torchvision") -> None:
        super().__init__()
        taps = 9
        self.dcn_offset = nn.Conv2d(channels, 3 * taps, kernel_size=3, padding=1)
        self.dcn = ModulatedDeformConv(
            channels, channels, kernel_size=3, padding=1, bias=False, formulation=deform_formulation
        )
        self.dcn_bn = get_norm(norm, channels)
        self.up_sample = nn.ConvTranspose2d(channels, channels, kernel_size=4, stride=2, padding=1, bias=False)
        self.up_bn = get_norm(norm, channels)
        self.relu = nn.ReLU()
        # Start as a plain convolution (zero offsets, modulation 0.5) and a bilinear upsampling.
        weight_init.c2_msra_fill(self.dcn)
        nn.init.zeros_(self.dcn_offset.weight)
        nn.init.zeros_(self.dcn_offset.bias)
        _bilinear_init(self.up_sample.weight)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """(B, D, H, W) -> refined (B, D, H, W) and upsampled (B, D, 2H, 2W)."""
        offset_mask = self.dcn_offset(x)  # (B, 3K, H, W)
        taps = offset_mask.shape[1] // 3
        offset = offset_mask[:, : 2 * taps]  # (B, 2K, H, W), (dy, dx) per tap
        modulation = offset_mask[:, 2 * taps :].sigmoid()  # (B, K, H, W)
        refined = self.relu(self.dcn_bn(self.dcn(x, offset, modulation)))
        up = self.relu(self.up_bn(self.up_sample(refined)))
        return refined, up


def _bilinear_init(weight: Tensor) -> None:
    """PEM's initialisation of a transposed conv (C_in, C_out, k, k): the bilinear upsampling
    kernel at output channel 0 of every input channel (the other entries keep their default)."""
    k = weight.shape[-1]
    f = math.ceil(k / 2)
    c = (2 * f - 1 - f % 2) / (2.0 * f)
    kernel = weight.new_tensor([[(1 - abs(i / f - c)) * (1 - abs(j / f - c)) for j in range(k)] for i in range(k)])
    with torch.no_grad():
        weight[:, 0] = kernel


@PIXEL_DECODER_REGISTRY.register()
class PEM_Pixel_Decoder(nn.Module):  # noqa: N801  (PEM's registered name)
    """PEM's pixel decoder over four backbone levels (res2..res5).

    Each level k goes through a 1x1 conv-norm-ReLU to D channels (``in_projections``) and a
    channel modulation (``csm``); the coarsest also gets a 1x1 conv-norm-ReLU of the global
    average of its backbone feature (``conv_avg``). From the coarsest down, a level is refined by
    ``dcn[i]`` (:class:`DeformUpsample`) and its 2x upsampling added to the next finer level.

    Returns, from ``forward_features``: mask features (B, E, H_2, W_2) = 1x1 conv-norm-ReLU of
    the finest level (``out``; non-negative), no encoder features, and the refined 1/32, 1/16,
    1/8 maps (B, D, H_k, W_k) for the transformer decoder.
    """

    num_levels = 4

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        conv_dim: int,
        mask_dim: int,
        norm: Norm = "BN",
        deform_formulation: str = "torchvision",
    ) -> None:
        """
        Args:
            input_shape: channels and stride of the four input features.
            conv_dim: D, channels of the decoder's maps (``SEM_SEG_HEAD.CONVS_DIM``, 128 in PEM).
            mask_dim: E, channels of the mask features.
            norm: normalization of every conv (``SEM_SEG_HEAD.NORM``).
            deform_formulation: how the deformable convolutions compute
                (:class:`~mask2former_d2.layers.deform_conv.ModulatedDeformConv`'s ``formulation``):
                ``from_config`` picks "grid_sample" for a CPU model with ``MODEL.MASK_FORMER.FAST_PATHS``
                (faster there than torchvision's kernel), torchvision's kernel otherwise.
        """
        super().__init__()
        if len(input_shape) != self.num_levels:
            raise ValueError(
                f"PEM_Pixel_Decoder reads {self.num_levels} backbone features; got {sorted(input_shape)} "
                "(check MODEL.SEM_SEG_HEAD.IN_FEATURES)"
            )
        ordered = sorted(input_shape.items(), key=lambda kv: kv[1].stride)  # finest first
        self.in_features: List[str] = [k for k, _ in ordered]
        channels = [v.channels for _, v in ordered]
        self.in_projections = nn.ModuleList(ConvNormReLU(c, conv_dim, 1, norm) for c in channels)
        self.conv_avg = ConvNormReLU(channels[-1], conv_dim, 1, norm)
        self.csm = nn.ModuleList(ChannelModulation(conv_dim, norm) for _ in range(self.num_levels))
        self.dcn = nn.ModuleList(
            DeformUpsample(conv_dim, norm, deform_formulation) for _ in range(self.num_levels - 1)
        )
        self.out = ConvNormReLU(conv_dim, mask_dim, 1, norm)

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape: Dict[str, ShapeSpec]) -> Dict[str, Any]:
        return {
            **common_decoder_args(cfg, input_shape),
            "deform_formulation": (
                "grid_sample" if cfg.MODEL.MASK_FORMER.FAST_PATHS and cfg.MODEL.DEVICE == "cpu" else "torchvision"
            ),
        }

    def forward_features(self, features: Dict[str, Tensor]) -> Tuple[Tensor, None, List[Tensor]]:
        """
        Args:
            features: backbone features by name (at least ``in_features``).

        Returns:
            ``(mask_features, None, [x_32, x_16, x_8])`` as described in the class docstring.
        """
        projected = [proj(features[name]) for proj, name in zip(self.in_projections, self.in_features)]
        coarsest = features[self.in_features[-1]]
        context = self.conv_avg(coarsest.mean(dim=(2, 3), keepdim=True))  # (B, D, 1, 1)
        # Coarsest first: csm[0] and dcn[0] act on res5, csm[3] on res2 (PEM's order).
        x = self.csm[0](projected[-1]) + context
        multi_scale = []
        for i in range(self.num_levels - 1):
            refined, up = self.dcn[i](x)
            multi_scale.append(refined)
            x = self.csm[i + 1](projected[-2 - i]) + up
        return self.out(x), None, multi_scale

    def forward(self, features: Dict[str, Tensor]) -> Tuple[Tensor, None, List[Tensor]]:
        """Same as :meth:`forward_features`."""
        return self.forward_features(features)
