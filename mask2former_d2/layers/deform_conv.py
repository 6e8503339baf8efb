"""Modulated deformable convolution (DCNv2) on torchvision's maintained operator.

Shapes: B batch, C input channels, O output channels, H/W input size, Ho/Wo output size,
K = kh * kw kernel taps, G deformable groups. ``offset`` is (B, 2*G*K, Ho, Wo) with the two
coordinates of each tap interleaved, (dy, dx) for tap 0, then tap 1, ... (Detectron2's
``ModulatedDeformConv`` layout, which is also torchvision's); ``mask`` is (B, G*K, Ho, Wo), the
modulation of each tap (PEM passes a sigmoid).

Two formulations (:func:`modulated_deform_conv`'s ``formulation``, chosen once per module):

* ``torchvision.ops.deform_conv2d`` (the reference: CPU and CUDA kernels, offsets and
  modulation, gradients);
* "grid_sample", the same arithmetic from ``F.grid_sample`` and a matrix product, for ONNX
  exports (ONNX Runtime has no deformable-convolution kernel) and for speed on a CPU.
"""
import contextlib
from typing import Iterator, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.utils import _pair

__all__ = [
    "ModulatedDeformConv",
    "grid_sample_deform_conv",
    "modulated_deform_conv",
]

_IntPair = Union[int, Tuple[int, int]]


def _check_inputs(x: Tensor, offset: Tensor, mask: Tensor, weight: Tensor, groups: int) -> int:
    """Returns the number of deformable groups G implied by the shapes (ValueError if they
    disagree)."""
    kh, kw = weight.shape[-2:]
    taps = kh * kw
    if x.dim() != 4 or offset.dim() != 4 or mask.dim() != 4:
        raise ValueError(
            f"deformable conv expects 4-D input/offset/mask, got {tuple(x.shape)}, "
            f"{tuple(offset.shape)}, {tuple(mask.shape)}"
        )
    if offset.shape[1] % (2 * taps) != 0:
        raise ValueError(f"offset has {offset.shape[1]} channels; expected a multiple of 2*{taps}")
    dg = offset.shape[1] // (2 * taps)
    if mask.shape[1] != dg * taps:
        raise ValueError(f"mask has {mask.shape[1]} channels; expected {dg * taps} ({dg} groups x {taps} taps)")
    if x.shape[1] % dg != 0 or x.shape[1] != weight.shape[1] * groups:
        raise ValueError(
            f"input has {x.shape[1]} channels; weight {tuple(weight.shape)} with groups={groups} "
            f"and {dg} deformable groups do not fit it"
        )
    return dg


FORMULATIONS = ("torchvision", "grid_sample")


def modulated_deform_conv(
    x: Tensor,
    offset: Tensor,
    mask: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: _IntPair = 1,
    padding: _IntPair = 0,
    dilation: _IntPair = 1,
    *,
    formulation: str = "torchvision",
) -> Tensor:
    """Modulated deformable convolution.

    Args:
        x: (B, C, H, W) input.
        offset: (B, 2*G*K, Ho, Wo) sampling offsets in pixels, (dy, dx) interleaved per tap.
        mask: (B, G*K, Ho, Wo) modulation per tap.
        weight: (O, C / groups, kh, kw); the convolution groups follow from its shape.
        bias: optional (O,).
        stride, padding, dilation: as in ``nn.Conv2d``.
        formulation: "torchvision" (``torchvision.ops.deform_conv2d``, the reference) or
            "grid_sample" (:func:`_grid_sample_formulation`: the same values up to float
            rounding, from operators ONNX Runtime implements; on a CPU also faster).

    Returns:
        (B, O, Ho, Wo).
    """
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    if formulation == "grid_sample":
        return _grid_sample_formulation(x, offset, mask, weight, bias, stride, padding, dilation)
    if formulation != "torchvision":
        raise ValueError(f"formulation must be one of {FORMULATIONS}; got {formulation!r}")
    from torchvision.ops import deform_conv2d

    return deform_conv2d(x, offset, weight, bias, stride=stride, padding=padding, dilation=dilation, mask=mask)


def _grid_sample_formulation(
    x: Tensor, offset: Tensor, mask: Tensor, weight: Tensor, bias: Optional[Tensor],
    stride: Tuple[int, int], padding: Tuple[int, int], dilation: Tuple[int, int],
) -> Tensor:
    """:func:`modulated_deform_conv` from ``F.grid_sample`` and a matrix product.

    Every tap's sampling point is ``(y * stride - padding + i * dilation + dy,
    x * stride - padding + j * dilation + dx)``; the input is sampled there bilinearly with
    zeros outside (DCN's convention: each of the four neighbours outside the image counts as
    0), multiplied by the tap's modulation, and the (B, C*K, Ho*Wo) columns are multiplied by
    the (O, C*K) weight, as an im2col convolution would.
    """
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    out_c, c_per_group, kh, kw = weight.shape
    b, c, h, w = x.shape
    taps = kh * kw
    dg = offset.shape[1] // (2 * taps)
    groups = c // c_per_group
    ho, wo = offset.shape[-2:]

    # Base sampling grid of every tap: (K, Ho, Wo) rows and columns in input pixels.
    ys = torch.arange(ho, device=x.device, dtype=x.dtype) * sh - ph
    xs = torch.arange(wo, device=x.device, dtype=x.dtype) * sw - pw
    ki = torch.arange(kh, device=x.device, dtype=x.dtype).repeat_interleave(kw) * dh  # (K,)
    kj = torch.arange(kw, device=x.device, dtype=x.dtype).repeat(kh) * dw  # (K,)
    base_y = ki[:, None, None] + ys[None, :, None]  # (K, Ho, 1)
    base_x = kj[:, None, None] + xs[None, None, :]  # (K, 1, Wo)

    off = offset.view(b, dg, taps, 2, ho, wo)  # (B, G, K, [dy, dx], Ho, Wo)
    py = base_y + off[:, :, :, 0]  # (B, G, K, Ho, Wo)
    px = base_x + off[:, :, :, 1]
    # grid_sample with align_corners=False: pixel p sits at normalised (2p + 1) / size - 1.
    gy = (2.0 * py + 1.0) / h - 1.0
    gx = (2.0 * px + 1.0) / w - 1.0
    grid = torch.stack((gx, gy), dim=-1)  # (B, G, K, Ho, Wo, 2)
    grid = grid.view(b * dg, taps * ho, wo, 2)  # taps stacked along the output rows

    xg = x.reshape(b * dg, c // dg, h, w)  # (B*G, C/G, H, W)
    sampled = F.grid_sample(xg, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    sampled = sampled.view(b, dg, c // dg, taps, ho, wo)  # (B, G, C/G, K, Ho, Wo)
    sampled = sampled * mask.view(b, dg, 1, taps, ho, wo)
    cols = sampled.reshape(b, groups, c_per_group * taps, ho * wo)  # (B, g, C/g*K, Ho*Wo)
    wmat = weight.reshape(groups, out_c // groups, c_per_group * taps)  # (g, O/g, C/g*K)
    out = torch.matmul(wmat, cols)  # (B, g, O/g, Ho*Wo)
    out = out.reshape(b, out_c, ho, wo)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out


class ModulatedDeformConv(nn.Module):
    """Modulated deformable convolution with Detectron2's ``ModulatedDeformConv`` interface and
    parameter names (``weight``, ``bias`` when ``bias=True``), so checkpoints that hold one
    load unchanged.

    Args:
        in_channels: C.
        out_channels: O.
        kernel_size, stride, padding, dilation, groups: as in ``nn.Conv2d``.
        deformable_groups: G, channel groups with their own offsets and modulation.
        bias: add a learned bias.
        norm: optional module applied to the output.
        activation: optional callable applied after ``norm``.
        formulation: that of :func:`modulated_deform_conv`, "torchvision" (the reference) or
            "grid_sample" (faster on a CPU).

    ``export_formulation`` (False by default) switches to "grid_sample" too; exporters set it
    before tracing.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _IntPair,
        stride: _IntPair = 1,
        padding: _IntPair = 0,
        dilation: _IntPair = 1,
        groups: int = 1,
        deformable_groups: int = 1,
        bias: bool = True,
        norm: Optional[nn.Module] = None,
        activation: Optional[nn.Module] = None,
        formulation: str = "torchvision",
    ) -> None:
        super().__init__()
        if formulation not in FORMULATIONS:
            raise ValueError(f"formulation must be one of {FORMULATIONS}; got {formulation!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels={in_channels} and out_channels={out_channels} must be divisible by groups={groups}"
            )
        if in_channels % deformable_groups:
            raise ValueError(
                f"in_channels={in_channels} is not divisible by deformable_groups={deformable_groups}"
            )
        # Detectron2's attribute names (read by code written for its ModulatedDeformConv).
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.groups, self.deformable_groups = groups, deformable_groups
        self.with_bias = bias
        self.norm, self.activation = norm, activation
        self.formulation = formulation
        self.export_formulation = False

        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_channels))
        else:
            self.register_parameter("bias", None)
        # Detectron2's initialisation: He (fan-in, ReLU gain), zero bias.
        nn.init.kaiming_uniform_(self.weight, nonlinearity="relu")

    def forward(self, x: Tensor, offset: Tensor, mask: Tensor) -> Tensor:
        """x (B, C, H, W), offset (B, 2*G*K, Ho, Wo), mask (B, G*K, Ho, Wo) -> (B, O, Ho, Wo)."""
        if not torch.jit.is_tracing() and not torch.compiler.is_exporting():
            _check_inputs(x, offset, mask, self.weight, self.groups)
        out = modulated_deform_conv(
            x, offset, mask, self.weight, self.bias, self.stride, self.padding, self.dilation,
            formulation="grid_sample" if self.export_formulation else self.formulation,
        )
        if self.norm is not None:
            out = self.norm(out)
        if self.activation is not None:
            out = self.activation(out)
        return out

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"groups={self.groups}, deformable_groups={self.deformable_groups}, bias={self.with_bias}, "
            f"formulation={self.formulation!r}"
        )


@contextlib.contextmanager
def grid_sample_deform_conv(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every :class:`ModulatedDeformConv` of ``model`` computes with the
    "grid_sample" formulation (what exporters trace); their formulation is
    restored on exit."""
    convs = [m for m in model.modules() if isinstance(m, ModulatedDeformConv)]
    previous = [m.export_formulation for m in convs]
    for m in convs:
        m.export_formulation = True
    try:
        yield model
    finally:
        for m, flag in zip(convs, previous):
            m.export_formulation = flag
