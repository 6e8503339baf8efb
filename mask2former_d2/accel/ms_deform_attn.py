"""Multi-scale deformable attention sampled with ``F.embedding_bag``: the fast formulation of
:mod:`mask2former_d2.layers.ms_deform_attn` (same values; tests hold the two equal).

Shapes: B batch, Q queries, C channels, M heads, D = C / M channels per head, L feature levels,
P sampling points per head and level, K = L * P samples per query and head, H_l/W_l the size
of level l, S = sum_l H_l * W_l the length of the flattened multi-level input, N = B * Q * M
(one weighted sum per query and head), T = sum_l (H_l + 2) * (W_l + 2) the length of the
zero-bordered copy of the input.

Why: rather than one ``grid_sample`` per level followed by a large weighted reduction (which
materialises every sample), each output row (one query and head) is a single
``F.embedding_bag`` sum over its 4 * K bilinear corners. The table is the value tensor with a
one-pixel zero border around every level, read as (B * T * M, D) rows; with the border, the four
corners of a sample are always the rows ``r, r + M, r + (W_l + 2) M, r + (W_l + 2) M + M``, and
corners outside a level read zeros without per-corner masks; only samples entirely outside the
border are dropped. The bilinear weight of a corner is multiplied by the attention weight of its
sample. Autograd runs through the corner weights (gradients for locations and attention weights)
and through the table (gradient for value).

The gather takes neither the ONNX exporter nor symbolic level sizes: while torch.export traces,
:class:`EmbeddingBagMSDeformAttn` computes its reference formulation instead.
"""

from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..layers.ms_deform_attn import (
    LevelValues,
    MSDeformAttn,
    Sizes,
    level_sizes,
)

__all__ = ["EmbeddingBagMSDeformAttn", "ValueTable", "sample_value_table", "value_table"]

# Largest row count whose indices float32 represents exactly.
_FLOAT32_EXACT_INT = 2**24


def _bordered_table(value: Tensor, sizes: List[Tuple[int, int]]) -> Tensor:
    """(B, S, M, D) -> (B * T * M, D): every level gets a one-pixel zero border."""
    b, _, m, d = value.shape
    total = sum((h + 2) * (w + 2) for h, w in sizes)
    table = value.new_empty(b, total, m * d)
    offset, start = 0, 0
    for h, w in sizes:
        level = table[:, offset : offset + (h + 2) * (w + 2)].view(b, h + 2, w + 2, m * d)
        level[:, 1:-1, 1:-1] = value[:, start : start + h * w].reshape(b, h, w, m * d)
        # Only the border is zeroed: filling the whole table first would write it twice.
        level[:, 0::h + 1].zero_()
        level[:, 1:-1, 0::w + 1].zero_()
        offset += (h + 2) * (w + 2)
        start += h * w
    return table.view(b * total * m, d)


class ValueTable(NamedTuple):
    """Values laid out for sampling: (B * T * M, D) rows with a zero border around each level
    (see the module docstring). Built once, sampled by any number of query chunks."""

    table: Tensor
    sizes: List[Tuple[int, int]]
    batch: int
    heads: int
    head_dim: int


def value_table(value: Tensor, sizes: List[Tuple[int, int]]) -> ValueTable:
    """(B, S, M, D) values of levels ``sizes`` -> :class:`ValueTable`."""
    b, _, m, d = value.shape
    return ValueTable(_bordered_table(value, sizes), sizes, b, m, d)


def sample_value_table(
    values: ValueTable,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    *,
    locations_in_pixels: bool = False,
) -> Tensor:
    """:func:`mask2former_d2.layers.ms_deform_attn.ms_deform_attn` on a prepared
    :class:`ValueTable`: locations (B, Q, M, L, P, 2) and weights (B, Q, M, L, P) ->
    (B, Q, M * D). Coordinates and bilinear weights are computed in float32 (float64 if any
    input is float64) whatever the table's dtype, so half-precision values under autocast still
    sample at exact positions.

    With ``locations_in_pixels``, locations are already ``loc * (W_l, H_l) + 0.5``: pixel
    units of the bordered level, where pixel i spans [i + 0.5, i + 1.5) (callers that start
    from pixel offsets save a division and a multiplication per sample)."""
    table, sizes, b, m, d = values
    shape = tuple(sampling_locations.shape)
    if len(shape) != 6 or (shape[0], shape[2], shape[3], shape[5]) != (b, m, len(sizes), 2):
        raise ValueError(
            f"sampling_locations must be (B={b}, Q, M={m}, L={len(sizes)}, P, 2), got {shape}"
        )
    if tuple(attention_weights.shape) != shape[:5]:
        raise ValueError(
            f"attention_weights must be (B, Q, M, L, P) = {shape[:5]}, "
            f"got {tuple(attention_weights.shape)}"
        )
    q, num_levels, num_points = sampling_locations.shape[1], *sampling_locations.shape[3:5]
    k = num_levels * num_points
    device = table.device

    coord_dtype = torch.promote_types(sampling_locations.dtype, attention_weights.dtype)
    coord_dtype = torch.promote_types(coord_dtype, torch.float32)
    num_rows = table.shape[0]
    # Rows are computed in floating point, then converted once; they must be exact.
    row_dtype = coord_dtype if num_rows < _FLOAT32_EXACT_INT else torch.float64
    index_dtype = torch.int32 if num_rows < 2**31 else torch.int64

    # Per-sample constants over K = (l, p), as plain lists turned into small tensors.
    size_xy, row_step_y, level_rows = [], [], []
    bordered_start = 0
    for h, w in sizes:
        size_xy += [(w, h)] * num_points
        row_step_y += [(w + 2) * m] * num_points
        level_rows += [bordered_start * m] * num_points
        bordered_start += (h + 2) * (w + 2)
    size = torch.tensor(size_xy, dtype=coord_dtype, device=device)  # (K, 2)
    row_step_y = torch.tensor(row_step_y, dtype=row_dtype, device=device)  # (K,)
    total = bordered_start
    # First row of (batch, level, head), laid out to broadcast against (B, Q, M, K).
    base_rows = (
        torch.tensor(level_rows, dtype=row_dtype, device=device)
        + torch.arange(m, dtype=row_dtype, device=device).view(1, 1, m, 1)
        + torch.arange(b, dtype=row_dtype, device=device).view(b, 1, 1, 1) * (total * m)
    )  # (B, 1, M, K)
    m_tensor = torch.tensor(m, dtype=row_dtype, device=device)
    # Row offsets of the four corners (dy, dx) = (0, 0), (0, 1), (1, 0), (1, 1): (4, K).
    corner_rows = torch.stack(
        (torch.zeros_like(row_step_y), torch.full_like(row_step_y, m), row_step_y, row_step_y + m)
    ).to(index_dtype)

    loc = sampling_locations.to(coord_dtype).reshape(b * q * m, k, 2)
    attn = attention_weights.to(coord_dtype).reshape(b * q * m, k)
    # Position in the bordered level, in pixels: pixel i of the level is column i + 1, and
    # align_corners=False puts its centre at i + 0.5, hence loc * size + 0.5.
    pos = loc if locations_in_pixels else torch.addcmul(torch.full_like(size, 0.5), loc, size)
    with torch.no_grad():
        # Top-left corner. Unless it lies in [0, size], both corners are outside the bordered
        # level: the sample reads zeros, so it is dropped and its corner merely kept valid.
        floored = pos.floor()
        corner = torch.clamp(floored, torch.zeros_like(size), size)  # (N, K, 2)
        inside = corner == floored
        keep = inside[..., 0] & inside[..., 1]  # (N, K); False for NaN locations too
        rows = torch.addcmul(base_rows, corner[..., 0].view(b, q, m, k), m_tensor)
        rows.addcmul_(corner[..., 1].view(b, q, m, k), row_step_y)  # (B, Q, M, K)
        rows.nan_to_num_(0.0)  # NaN locations must still read a valid row
        rows = rows.view(b * q * m, 1, k).to(index_dtype) + corner_rows  # (N, 4, K)
    # Gradients flow through the fractional part only, as in grid_sample: at an exact pixel
    # boundary the derivative is the one from the right.
    frac = pos - floored  # (N, K, 2) in [0, 1)
    frac_x, frac_y = frac[..., 0], frac[..., 1]
    attn = attn * keep
    wy1 = frac_y * attn  # bottom row weight, attention folded in
    wy = torch.stack((attn - wy1, wy1), 1)  # (N, 2, K)
    wx = torch.stack((1 - frac_x, frac_x), 1)  # (N, 2, K)
    weights = (wy[:, :, None] * wx[:, None]).view(b * q * m, 4 * k)  # (N, 4 K)

    out = F.embedding_bag(
        rows.view(b * q * m, 4 * k), table, per_sample_weights=weights.to(table.dtype), mode="sum"
    )  # (N, D)
    return out.view(b, q, m * d)


class EmbeddingBagMSDeformAttn(MSDeformAttn):
    """:class:`~mask2former_d2.layers.ms_deform_attn.MSDeformAttn` whose sampling is one
    ``embedding_bag`` per query and head over a :class:`ValueTable` (same parameters, same
    outputs up to float rounding). While torch.export traces it is the reference module."""

    def project_value(
        self, input_flatten: Tensor, input_spatial_shapes: Sizes, input_padding_mask: Optional[Tensor] = None
    ):
        """Projected values laid out for sampling: a :class:`ValueTable` (a
        :class:`~mask2former_d2.layers.ms_deform_attn.LevelValues` while exporting). Queries can
        then be attended in chunks (:meth:`attend`) against one table."""
        if torch.compiler.is_exporting():
            return super().project_value(input_flatten, input_spatial_shapes, input_padding_mask)
        value = self._project(input_flatten, input_padding_mask)  # (B, S, M, D)
        return value_table(value, level_sizes(input_spatial_shapes))

    def attend(self, query: Tensor, reference_points: Tensor, values) -> Tensor:
        """query (B, Q, C), reference_points (B, Q, L, 2|4) -> (B, Q, C)."""
        if isinstance(values, LevelValues):
            return super().attend(query, reference_points, values)
        b, q, _ = query.shape
        m, num_levels, num_points = self.num_heads, self.num_levels, self.num_points
        offsets, weights = self._offsets_and_weights(query)
        if reference_points.shape[-1] == 2:
            # Offsets are in pixels of each level. The reference divides them by (W_l, H_l) and
            # the sampler multiplies back; here the reference points go to pixels instead
            # (B * Q * L points, not B * Q * M * L * P samples).
            size = torch.tensor(
                [(w, h) for h, w in values.sizes], dtype=offsets.dtype, device=offsets.device
            )  # (L, 2)
            ref_pixels = torch.addcmul(torch.full_like(size, 0.5), reference_points, size)
            # (B, Q, M, L, P, 2), added as (B * Q, M, L * P * 2) + (B * Q, 1, L * P * 2): a
            # broadcast over few, contiguous dims is faster than over six.
            ref_pixels = ref_pixels.view(b * q, 1, num_levels, 1, 2)
            ref_pixels = ref_pixels.expand(-1, -1, -1, num_points, -1).reshape(b * q, 1, -1)
            locations = (offsets.view(b * q, m, -1) + ref_pixels).view(offsets.shape)
            out = sample_value_table(values, locations, weights, locations_in_pixels=True)
        else:
            # Offsets are relative to the box: P points span half its width and height.
            locations = (
                reference_points[:, :, None, :, None, :2]
                + offsets / num_points * reference_points[:, :, None, :, None, 2:] * 0.5
            )
            out = sample_value_table(values, locations, weights)
        return self.output_proj(out)
