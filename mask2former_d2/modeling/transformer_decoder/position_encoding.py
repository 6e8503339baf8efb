"""Sine position encoding of 2-D feature maps (as in DETR and the published Mask2Former).

Shapes: B batch, C channels (= 2 * num_pos_feats), H/W spatial.
"""
import math
from typing import Optional

import torch
from torch import Tensor, nn


class PositionEmbeddingSine(nn.Module):
    """Fixed sine/cosine encoding of the (y, x) position of every pixel.

    Args:
        num_pos_feats: features per axis; the output has ``2 * num_pos_feats`` channels
            (y features first, then x).
        temperature: base of the geometric frequency progression.
        normalize: scale positions to ``[0, scale]`` before encoding.
        scale: the range used when ``normalize`` is set (default ``2 * pi``).
    """

    def __init__(
        self,
        num_pos_feats: int = 64,
        temperature: int = 10000,
        normalize: bool = False,
        scale: Optional[float] = None,
    ) -> None:
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("PositionEmbeddingSine: scale is only used with normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """x: (B, *, H, W); mask: optional (B, H, W) bool, True = padding. Returns (B, C, H, W)
        in x's dtype."""
        b, h, w = x.shape[0], x.shape[-2], x.shape[-1]
        if mask is None:
            # Cumulative sums of an all-ones mask are just 1..H and 1..W.
            y_embed = torch.arange(1, h + 1, device=x.device, dtype=torch.float32)
            y_embed = y_embed.view(1, h, 1).expand(b, h, w)
            x_embed = torch.arange(1, w + 1, device=x.device, dtype=torch.float32)
            x_embed = x_embed.view(1, 1, w).expand(b, h, w)
        else:
            not_mask = ~mask
            y_embed = not_mask.cumsum(1, dtype=torch.float32)  # (B, H, W)
            x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale

        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)

        pos_x = x_embed[:, :, :, None] / dim_t  # (B, H, W, F)
        pos_y = y_embed[:, :, :, None] / dim_t
        # Interleave sin of even and cos of odd frequencies: (B, H, W, F/2, 2) -> (B, H, W, F)
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        pos = torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)  # (B, C, H, W)
        return pos.to(x.dtype)
