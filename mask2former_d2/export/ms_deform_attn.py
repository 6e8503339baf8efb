"""An export-friendly formulation of multi-scale deformable attention.

The eager :class:`~mask2former_d2.layers.MSDeformAttn` samples a bordered value table with
``F.embedding_bag`` and per-sample weights, and builds small index tensors from the level
sizes with ``torch.tensor``: fast on the CPU, but neither the ONNX exporter nor symbolic level
sizes (dynamic height and width) can take it. :class:`GridSampleMSDeformAttn` computes the same
values with one ``F.grid_sample`` per level (bilinear, zero padding, ``align_corners=False``:
exactly the sampling the eager module implements) followed by the attention-weighted sum; every
size it needs is read from tensor shapes, so it traces with symbolic sizes. ONNX has
``GridSample`` from opset 16.

It is a drop-in class for existing modules: :func:`grid_sample_ms_deform_attn` swaps it in for
the duration of a ``with`` block (parameters, buffers and state_dict keys are untouched).

Shapes: B batch, Q queries, C channels, M heads, D = C / M, L levels, P points,
H_l/W_l level sizes, S = sum_l H_l * W_l.
"""

import contextlib
from typing import Iterator, List, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers.ms_deform_attn import MSDeformAttn
from ..modeling.pixel_decoder.msdeformattn import level_sizes

__all__ = ["GridSampleMSDeformAttn", "LevelValues", "grid_sample_ms_deform_attn", "sample_levels"]


class LevelValues(NamedTuple):
    """Projected values split into levels, each (B * M, D, H_l, W_l)."""

    levels: List[Tensor]
    batch: int
    heads: int
    head_dim: int


def sample_levels(values: LevelValues, grids: Sequence[Tensor], weights: Tensor) -> Tensor:
    """Attention-weighted bilinear samples.

    Args:
        values: the levels to sample.
        grids: per level, (B * M, Q, P, 2) locations in ``grid_sample``'s [-1, 1] frame.
        weights: (B, Q, M, L, P) attention weights.

    Returns:
        (B, Q, M * D).
    """
    b, m, d = values.batch, values.heads, values.head_dim
    q, num_levels, num_points = weights.shape[1], weights.shape[3], weights.shape[4]
    samples = [
        F.grid_sample(level, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        for level, grid in zip(values.levels, grids)
    ]  # L x (B * M, D, Q, P)
    samples = torch.stack(samples, dim=3)  # (B * M, D, Q, L, P)
    w = weights.permute(0, 2, 1, 3, 4).reshape(b * m, 1, q, num_levels, num_points)
    out = (samples * w).sum(dim=(3, 4))  # (B * M, D, Q)
    return out.view(b, m * d, q).transpose(1, 2)  # (B, Q, M * D)


class GridSampleMSDeformAttn(MSDeformAttn):
    """:class:`MSDeformAttn` computed with ``grid_sample`` (see the module docstring). Only
    :meth:`project_value` and :meth:`attend` differ; both accept the level sizes as a tensor
    or as a list of (H_l, W_l) pairs."""

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        input_flatten: Tensor,
        input_spatial_shapes,
        input_level_start_index,
        input_padding_mask: Optional[Tensor] = None,
    ) -> Tensor:
        values = self.project_value(input_flatten, input_spatial_shapes, input_padding_mask)
        return self.attend(query, reference_points, values)

    def project_value(
        self,
        input_flatten: Tensor,
        input_spatial_shapes,
        input_padding_mask: Optional[Tensor] = None,
    ) -> LevelValues:
        b = input_flatten.shape[0]
        m, d = self.num_heads, self.head_dim
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        sizes = level_sizes(input_spatial_shapes)
        levels = torch.split(value, [h * w for h, w in sizes], dim=1)
        # (B, H*W, M * D) -> (B, M, D, H*W) -> (B * M, D, H, W)
        maps = [
            z.view(b, h * w, m, d).permute(0, 2, 3, 1).reshape(b * m, d, h, w)
            for z, (h, w) in zip(levels, sizes)
        ]
        return LevelValues(maps, b, m, d)

    def attend(self, query: Tensor, reference_points: Tensor, values: LevelValues) -> Tensor:
        b, q, _ = query.shape
        m, num_levels, num_points = self.num_heads, self.num_levels, self.num_points
        offsets = self.sampling_offsets(query).view(b, q, m, num_levels, num_points, 2)
        weights = self.attention_weights(query).view(b, q, m, num_levels * num_points)
        weights = F.softmax(weights, -1).view(b, q, m, num_levels, num_points)
        grids = []
        for lvl, level in enumerate(values.levels):
            ref = reference_points[:, :, None, lvl, None, :]  # (B, Q, 1, 1, 2|4)
            off = offsets[:, :, :, lvl]  # (B, Q, M, P, 2)
            if reference_points.shape[-1] == 2:
                # Offsets are in pixels of the level: normalise x by W_l and y by H_l.
                h, w = level.shape[-2], level.shape[-1]
                loc = torch.stack((ref[..., 0] + off[..., 0] / w, ref[..., 1] + off[..., 1] / h), -1)
            else:
                loc = ref[..., :2] + off / num_points * ref[..., 2:] * 0.5
            # (B, Q, M, P, 2) -> (B * M, Q, P, 2) in grid_sample's frame.
            grids.append((2.0 * loc - 1.0).transpose(1, 2).reshape(b * m, q, num_points, 2))
        return self.output_proj(sample_levels(values, grids, weights))


@contextlib.contextmanager
def grid_sample_ms_deform_attn(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every :class:`MSDeformAttn` of ``model`` runs as
    :class:`GridSampleMSDeformAttn`; their classes are restored on exit."""
    swapped = [m for m in model.modules() if type(m) is MSDeformAttn]
    for m in swapped:
        m.__class__ = GridSampleMSDeformAttn
    try:
        yield model
    finally:
        for m in swapped:
            m.__class__ = MSDeformAttn
