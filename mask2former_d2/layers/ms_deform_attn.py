"""Multi-scale deformable attention (Deformable DETR) in pure PyTorch.

Shapes: B batch, Q queries, C channels, M heads, D = C / M channels per head, L feature levels,
P sampling points per head and level, K = L * P samples per query and head, H_l/W_l the size
of level l, S = sum_l H_l * W_l the length of the flattened multi-level input, N = B * Q * M
(one weighted sum per query and head), T = sum_l (H_l + 2) * (W_l + 2) the length of the
zero-bordered copy of the input. Locations are (x, y) pairs normalised to [0, 1] over each
level, (0, 0) being the top-left corner of the top-left pixel.

The sampling is bilinear with zero padding outside each level, and pixel centres sit at
``(i + 0.5) / size``: the semantics of ``F.grid_sample(..., align_corners=False)`` applied to
``2 * location - 1``, which is what the published CUDA kernel computes too.

How it is computed: rather than one ``grid_sample`` per level followed by a large weighted
reduction, each output row (one query and head) is a single ``F.embedding_bag`` sum over its
4 * K bilinear corners. The table is the value tensor with a one-pixel zero border around every
level, read as (B * T * M, D) rows; with the border, the four corners of a sample are always
the rows ``r, r + M, r + (W_l + 2) M, r + (W_l + 2) M + M``, and corners outside a level
read zeros without per-corner masks; only samples entirely outside the border are dropped. The
bilinear weight of a corner is multiplied by the attention weight of its sample. Autograd runs
through the corner weights (gradients for locations and attention weights) and through the table
(gradient for value).
"""

import math
import warnings
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MSDeformAttn", "ms_deform_attn", "ValueTable", "value_table", "sample_value_table"]

# Largest row count whose indices float32 represents exactly.
_FLOAT32_EXACT_INT = 2**24


def _check_inputs(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> List[Tuple[int, int]]:
    """Raises ValueError on inconsistent inputs; returns the level sizes as ints."""
    if value.dim() != 4:
        raise ValueError(f"value must be (B, S, M, D), got shape {tuple(value.shape)}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            "sampling_locations must be (B, Q, M, L, P, 2), got shape "
            f"{tuple(sampling_locations.shape)}"
        )
    b, s, m, _ = value.shape
    b2, q, m2, num_levels, num_points, _ = sampling_locations.shape
    if (b2, m2) != (b, m):
        raise ValueError(
            f"sampling_locations {tuple(sampling_locations.shape)} does not match value "
            f"{tuple(value.shape)} in batch size or number of heads"
        )
    if tuple(attention_weights.shape) != (b, q, m, num_levels, num_points):
        raise ValueError(
            f"attention_weights must be (B, Q, M, L, P) = {(b, q, m, num_levels, num_points)}, "
            f"got {tuple(attention_weights.shape)}"
        )
    if tuple(spatial_shapes.shape) != (num_levels, 2) or spatial_shapes.is_floating_point():
        raise ValueError(
            f"spatial_shapes must be an integer (L, 2) = ({num_levels}, 2) tensor, got "
            f"{spatial_shapes.dtype} {tuple(spatial_shapes.shape)}"
        )
    if tuple(level_start_index.shape) != (num_levels,) or level_start_index.is_floating_point():
        raise ValueError(
            f"level_start_index must be an integer (L,) = ({num_levels},) tensor, got "
            f"{level_start_index.dtype} {tuple(level_start_index.shape)}"
        )
    sizes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    if sum(h * w for h, w in sizes) != s:
        raise ValueError(
            f"spatial_shapes {sizes} cover {sum(h * w for h, w in sizes)} positions, "
            f"but value has S={s}"
        )
    expected_starts = [sum(h * w for h, w in sizes[:i]) for i in range(num_levels)]
    if level_start_index.tolist() != expected_starts:
        raise ValueError(
            f"level_start_index {level_start_index.tolist()} does not match spatial_shapes "
            f"{sizes}; expected {expected_starts}"
        )
    return sizes


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


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Attention-weighted sum of bilinear samples taken at given locations of every level.

    Args:
        value: (B, S, M, D) the flattened levels, split into heads.
        spatial_shapes: (L, 2) integer (H_l, W_l) of every level.
        level_start_index: (L,) integer offset of each level along S.
        sampling_locations: (B, Q, M, L, P, 2) normalised (x, y); values outside [0, 1] are
            allowed and read zeros outside the level.
        attention_weights: (B, Q, M, L, P) weight of every sample (usually softmax-normalised
            over L * P).

    Returns:
        (B, Q, M * D), heads concatenated, in ``value``'s dtype.

    Coordinates and bilinear weights are computed in float32 (float64 if any input is
    float64) whatever the value dtype, so half-precision values under autocast still sample
    at exact positions.
    """
    sizes = _check_inputs(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    return sample_value_table(value_table(value, sizes), sampling_locations, attention_weights)


def sample_value_table(
    values: ValueTable,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    *,
    locations_in_pixels: bool = False,
) -> Tensor:
    """:func:`ms_deform_attn` on a prepared :class:`ValueTable`: locations (B, Q, M, L, P, 2)
    and weights (B, Q, M, L, P) -> (B, Q, M * D).

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


def _float32_if_half(x: Tensor) -> Tensor:
    """float16/bfloat16 -> float32; other dtypes (float32, float64) unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _is_power_of_2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module (Deformable DETR).

    Each query predicts, per head, level and point, an offset from its reference point and an
    attention weight (softmax over the L * P samples of a head); the output is the weighted
    sum of the projected values sampled there, followed by an output projection.

    Args:
        embed_dim: channels C of queries and values.
        num_levels: number of feature levels L.
        num_heads: attention heads M; must divide ``embed_dim``.
        num_points: sampling points P per head and level.

    Submodule names (``sampling_offsets``, ``attention_weights``, ``value_proj``,
    ``output_proj``) are those of the published checkpoints.
    """

    def __init__(
        self, embed_dim: int = 256, num_levels: int = 4, num_heads: int = 8, num_points: int = 4
    ) -> None:
        super().__init__()
        for name, v in (
            ("embed_dim", embed_dim),
            ("num_levels", num_levels),
            ("num_heads", num_heads),
            ("num_points", num_points),
        ):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"MSDeformAttn: {name} must be a positive int, got {v!r}")
        if embed_dim % num_heads != 0:
            raise ValueError(
                f"MSDeformAttn: embed_dim={embed_dim} is not divisible by num_heads={num_heads}"
            )
        head_dim = embed_dim // num_heads
        if not _is_power_of_2(head_dim):
            # Only the CUDA kernel of the published project cares; this implementation does not.
            warnings.warn(
                f"MSDeformAttn: channels per head ({head_dim}) is not a power of 2, which the "
                "published CUDA kernel handles less efficiently",
                stacklevel=2,
            )
        self.embed_dim = embed_dim
        self.num_levels = num_levels
        self.num_heads = num_heads
        self.num_points = num_points
        self.head_dim = head_dim

        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """Published init: offsets start on a ring of directions (one per head) whose radius
        grows with the point index; attention starts uniform; projections are Xavier."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (
            2.0 * math.pi / self.num_heads
        )
        directions = torch.stack((angles.cos(), angles.sin()), -1)  # (M, 2)
        # Scale so that the larger coordinate is +-1: the point lands on a square's border.
        directions = directions / directions.abs().max(-1, keepdim=True)[0]
        radius = torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        bias = directions.view(self.num_heads, 1, 1, 2) * radius  # (M, 1, P, 2)
        bias = bias.expand(self.num_heads, self.num_levels, self.num_points, 2)  # (M, L, P, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        input_flatten: Tensor,
        input_spatial_shapes: Tensor,
        input_level_start_index: Tensor,
        input_padding_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """
        Args:
            query: (B, Q, C), position embedding already added.
            reference_points: (B, Q, L, 2) normalised (x, y) points, or (B, Q, L, 4) boxes
                (cx, cy, w, h) whose half-size scales the offsets.
            input_flatten: (B, S, C) the flattened levels.
            input_spatial_shapes: (L, 2) integer (H_l, W_l).
            input_level_start_index: (L,) integer offset of each level along S.
            input_padding_mask: optional (B, S) bool, True where the input is padding.

        Returns:
            (B, Q, C).
        """
        self._check_forward_inputs(
            query, reference_points, input_flatten, input_spatial_shapes, input_padding_mask
        )
        values = self.project_value(input_flatten, input_spatial_shapes, input_padding_mask)
        return self.attend(query, reference_points, values)

    def project_value(
        self,
        input_flatten: Tensor,
        input_spatial_shapes: Tensor,
        input_padding_mask: Optional[Tensor] = None,
    ) -> ValueTable:
        """The first half of :meth:`forward`: projected values, laid out for sampling. Queries
        can then be attended in chunks (:meth:`attend`) against one table."""
        b, s, _ = input_flatten.shape
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        # Sampled in float32 at any precision: one cast per layer here, instead of per-sample
        # half arithmetic in the gathers (the CPU's slow path).
        value = _float32_if_half(value).view(b, s, self.num_heads, self.head_dim)  # (B, S, M, D)
        sizes = [(int(h), int(w)) for h, w in input_spatial_shapes.tolist()]
        return value_table(value, sizes)

    def attend(self, query: Tensor, reference_points: Tensor, values: ValueTable) -> Tensor:
        """The second half of :meth:`forward`: query (B, Q, C), reference_points (B, Q, L, 2|4)
        -> (B, Q, C)."""
        b, q, _ = query.shape
        m, num_levels, num_points = self.num_heads, self.num_levels, self.num_points
        # Locations and attention weights in float32 whatever the precision of the projections.
        offsets = _float32_if_half(self.sampling_offsets(query)).view(b, q, m, num_levels, num_points, 2)
        weights = _float32_if_half(self.attention_weights(query)).view(b, q, m, num_levels * num_points)
        weights = F.softmax(weights, -1).view(b, q, m, num_levels, num_points)

        if reference_points.shape[-1] == 2:
            # Offsets are in pixels of each level. The published code divides them by
            # (W_l, H_l) and the sampler multiplies back; here the reference points go to
            # pixels instead (B * Q * L points, not B * Q * M * L * P samples).
            size = torch.tensor(
                [(w, h) for h, w in values.sizes], dtype=offsets.dtype, device=offsets.device
            )  # (L, 2)
            ref_pixels = torch.addcmul(torch.full_like(size, 0.5), reference_points, size)
            # (B, Q, M, L, P, 2), added as (B * Q, M, L * P * 2) + (B * Q, 1, L * P * 2): a
            # broadcast over few, contiguous dims is several times faster than over six.
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

    def _check_forward_inputs(
        self,
        query: Tensor,
        reference_points: Tensor,
        input_flatten: Tensor,
        input_spatial_shapes: Tensor,
        input_padding_mask: Optional[Tensor],
    ) -> None:
        if query.dim() != 3 or query.shape[-1] != self.embed_dim:
            raise ValueError(
                f"MSDeformAttn: query must be (B, Q, {self.embed_dim}), got {tuple(query.shape)}"
            )
        b, q, _ = query.shape
        if input_flatten.dim() != 3 or input_flatten.shape[0] != b:
            raise ValueError(
                f"MSDeformAttn: input_flatten must be (B={b}, S, {self.embed_dim}), "
                f"got {tuple(input_flatten.shape)}"
            )
        if input_flatten.shape[-1] != self.embed_dim:
            raise ValueError(
                f"MSDeformAttn: input_flatten has {input_flatten.shape[-1]} channels, "
                f"expected embed_dim={self.embed_dim}"
            )
        expected_ref = (b, q, self.num_levels)
        if reference_points.dim() != 4 or tuple(reference_points.shape[:3]) != expected_ref:
            raise ValueError(
                f"MSDeformAttn: reference_points must be (B, Q, L, 2 or 4) with (B, Q, L) = "
                f"{expected_ref}, got {tuple(reference_points.shape)}"
            )
        if reference_points.shape[-1] not in (2, 4):
            raise ValueError(
                "MSDeformAttn: the last dim of reference_points must be 2 (points) or 4 (boxes), "
                f"got {reference_points.shape[-1]}"
            )
        if tuple(input_spatial_shapes.shape) != (self.num_levels, 2):
            raise ValueError(
                f"MSDeformAttn: input_spatial_shapes must be (L={self.num_levels}, 2), "
                f"got {tuple(input_spatial_shapes.shape)}"
            )
        # Shapes usually live on the CPU; reading them from an accelerator costs one sync.
        total = int((input_spatial_shapes[:, 0] * input_spatial_shapes[:, 1]).sum())
        if total != input_flatten.shape[1]:
            raise ValueError(
                f"MSDeformAttn: sum of H*W over input_spatial_shapes is {total}, but input_flatten "
                f"has S={input_flatten.shape[1]}"
            )
        if input_padding_mask is not None and tuple(input_padding_mask.shape) != tuple(
            input_flatten.shape[:2]
        ):
            raise ValueError(
                "MSDeformAttn: input_padding_mask must be (B, S) = "
                f"{tuple(input_flatten.shape[:2])}, got {tuple(input_padding_mask.shape)}"
            )
