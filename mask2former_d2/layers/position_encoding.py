"""Sine position encodings of 2-D feature maps (as in DETR and the published Mask2Former) and of
clips of them (the published Mask2Former-VIS).

Shapes: B batch, T frames, C channels (= 2 * num_pos_feats), H/W spatial.
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

        dim_t = _frequencies(self.num_pos_feats, self.temperature, x.device)
        pos_x = _sine(x_embed, dim_t)  # (B, H, W, F)
        pos_y = _sine(y_embed, dim_t)
        pos = torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)  # (B, C, H, W)
        return pos.to(x.dtype)


class PositionEmbeddingSine3D(PositionEmbeddingSine):
    """Sine encoding of the (t, y, x) position of every pixel of a clip (Mask2Former-VIS).

    The (y, x) part is :class:`PositionEmbeddingSine`'s, per frame; the time term has
    ``2 * num_pos_feats`` features of its own frequency table (over ``2 * num_pos_feats``) and
    is *added* to it, not concatenated. With ``normalize`` the frame index is scaled over the
    clip, so the encoding depends on the clip length T.
    """

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """x: (B, T, *, H, W); mask: optional (B, T, H, W) bool, True = padding. Returns
        (B, T, C, H, W) in x's dtype."""
        if x.dim() < 4:
            raise ValueError(f"PositionEmbeddingSine3D expects (B, T, *, H, W) inputs, got {tuple(x.shape)}")
        b, t, h, w = x.shape[0], x.shape[1], x.shape[-2], x.shape[-1]
        if mask is None:
            # No padding: the spatial part is the same for every frame, the time part for every pixel.
            spatial = super().forward(x[:1, 0])[:, None]  # (1, 1, C, H, W)
            z_embed = torch.arange(1, t + 1, device=x.device, dtype=torch.float32).view(1, t, 1, 1)
        else:
            spatial = super().forward(x.flatten(0, 1), mask.flatten(0, 1)).unflatten(0, (b, t))
            z_embed = (~mask).cumsum(1, dtype=torch.float32)  # (B, T, H, W)
        if self.normalize:
            z_embed = z_embed / (z_embed[:, -1:] + 1e-6) * self.scale
        dim_t = _frequencies(2 * self.num_pos_feats, self.temperature, x.device)
        pos_t = _sine(z_embed, dim_t).permute(0, 1, 4, 2, 3)  # (B or 1, T, C, H or 1, W or 1)
        pos = (spatial.float() + pos_t).expand(b, t, -1, h, w)
        return pos.to(x.dtype)


def _frequencies(num_feats: int, temperature: int, device: torch.device) -> Tensor:
    """(F,) divisors: ``temperature ** (2 * (i // 2) / F)``, each pair shared by a sin and a cos."""
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=device)
    return temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)


def _sine(embed: Tensor, dim_t: Tensor) -> Tensor:
    """(...) positions -> (..., F): sin of the even and cos of the odd frequencies, interleaved."""
    pos = embed[..., None] / dim_t  # (..., F)
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)
