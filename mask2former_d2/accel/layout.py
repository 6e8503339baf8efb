"""Memory layouts: which maps are channels-last (the layout a ResNet's features have when
the model is built with fast paths), and a bilinear resize that avoids a layout copy.

Shapes: B batch, E channels, H/W spatial.
"""
from typing import Tuple

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["is_channels_last", "resize_per_channel"]


def is_channels_last(x: Tensor) -> bool:
    """Whether a 4-d ``x`` is laid out channels-last and not also plainly contiguous (as a 1x1
    map or a single channel would be): the layout a ResNet's features have at CPU inference."""
    return (
        x.dim() == 4
        and x.is_contiguous(memory_format=torch.channels_last)
        and not x.is_contiguous()
    )


def resize_per_channel(x: Tensor, size: Tuple[int, int]) -> Tensor:
    """Bilinear resize (align_corners=False) of (B, E, H, W) to (B, E, *size).

    Resizing the channels as separate single-channel images gives the same values as
    ``F.interpolate(x, size)`` (up to rounding) without the full-size layout copy the CPU
    kernel makes for many-channel inputs.
    """
    if is_channels_last(x):
        # Channels-last is the layout the CPU kernel wants: no copy to avoid.
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    b, e = x.shape[:2]
    flat = x.reshape(b * e, 1, x.shape[-2], x.shape[-1])  # (B*E, 1, H, W)
    out = F.interpolate(flat, size=size, mode="bilinear", align_corners=False)
    return out.view(b, e, size[0], size[1])
