"""Multi-scale deformable attention (Deformable DETR), the reference formulation.

Shapes: B batch, Q queries, C channels, M heads, D = C / M channels per head, L feature levels,
P sampling points per head and level, H_l/W_l the size of level l, S = sum_l H_l * W_l the
length of the flattened multi-level input. Locations are (x, y) pairs normalised to [0, 1] over
each level, (0, 0) being the top-left corner of the top-left pixel.

Each query and head takes P bilinear samples (zero padding outside the level, pixel centres at
``(i + 0.5) / size``) from every level and sums them with its attention weights: one
``F.grid_sample(..., align_corners=False)`` per level at ``2 * location - 1``, which is what the
published CUDA kernel computes too. Every size is read from tensor shapes, so this formulation
also traces with symbolic sizes (torch.export, ONNX ``GridSample`` from opset 16).
:mod:`mask2former_d2.accel.ms_deform_attn` computes the same with one ``embedding_bag`` per
query and head (the model's default on the CPU); tests hold the two equal.
"""

import math
import warnings
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LevelValues", "MSDeformAttn", "check_ms_deform_attn_inputs", "level_sizes", "ms_deform_attn"]

Sizes = Union[Tensor, Sequence[Tuple[int, int]]]


def level_sizes(spatial_shapes: Sizes) -> List[Tuple[int, int]]:
    """(H_l, W_l) of every level, from the (L, 2) integer tensor or, while torch.export traces,
    from the list of (possibly symbolic) pairs that stands for it."""
    if isinstance(spatial_shapes, Tensor):
        return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    return [(h, w) for h, w in spatial_shapes]


def check_ms_deform_attn_inputs(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> List[Tuple[int, int]]:
    """Raises ValueError on inconsistent inputs of :func:`ms_deform_attn`; returns the level
    sizes as ints."""
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
    sizes = level_sizes(spatial_shapes)
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


class LevelValues(NamedTuple):
    """Values split into levels, each (B * M, D, H_l, W_l): what ``grid_sample`` reads."""

    levels: List[Tensor]
    batch: int
    heads: int
    head_dim: int


def split_levels(value: Tensor, sizes: Sequence[Tuple[int, int]]) -> LevelValues:
    """(B, S, M, D) values of levels ``sizes`` -> :class:`LevelValues`."""
    b, _, m, d = value.shape
    levels = torch.split(value, [h * w for h, w in sizes], dim=1)
    # (B, H*W, M, D) -> (B, M, D, H*W) -> (B * M, D, H, W)
    maps = [z.permute(0, 2, 3, 1).reshape(b * m, d, h, w) for z, (h, w) in zip(levels, sizes)]
    return LevelValues(maps, b, m, d)


def sample_levels(values: LevelValues, sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """Attention-weighted bilinear samples: locations (B, Q, M, L, P, 2) in [0, 1] and weights
    (B, Q, M, L, P) -> (B, Q, M * D)."""
    b, m, d = values.batch, values.heads, values.head_dim
    q, num_levels, num_points = attention_weights.shape[1], attention_weights.shape[3], attention_weights.shape[4]
    # (B, Q, M, L, P, 2) -> (B, M, Q, L, P, 2) -> (B * M, Q, L, P, 2) in grid_sample's [-1, 1] frame.
    grids = (2.0 * sampling_locations - 1.0).transpose(1, 2).reshape(b * m, q, num_levels, num_points, 2)
    samples = [
        F.grid_sample(level, grids[:, :, lvl], mode="bilinear", padding_mode="zeros", align_corners=False)
        for lvl, level in enumerate(values.levels)
    ]  # L x (B * M, D, Q, P)
    samples = torch.stack(samples, dim=3)  # (B * M, D, Q, L, P)
    # (B, Q, M, L, P) -> (B, M, Q, L, P) -> (B * M, 1, Q, L, P)
    w = attention_weights.transpose(1, 2).reshape(b * m, 1, q, num_levels, num_points)
    out = (samples * w).sum(dim=(3, 4))  # (B * M, D, Q)
    return out.view(b, m * d, q).transpose(1, 2)  # (B, Q, M * D)


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Attention-weighted sum of bilinear samples taken at given locations of every level (the
    published op's signature).

    Args:
        value: (B, S, M, D) the flattened levels, split into heads.
        spatial_shapes: (L, 2) integer (H_l, W_l) of every level.
        level_start_index: (L,) integer offset of each level along S (checked against the sizes).
        sampling_locations: (B, Q, M, L, P, 2) normalised (x, y); values outside [0, 1] are
            allowed and read zeros outside the level.
        attention_weights: (B, Q, M, L, P) weight of every sample.

    Returns:
        (B, Q, M * D), heads concatenated, in ``value``'s dtype (sampled in float32 or wider).
    """
    sizes = check_ms_deform_attn_inputs(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    dtype = torch.promote_types(torch.promote_types(value.dtype, sampling_locations.dtype), torch.float32)
    values = split_levels(value.to(dtype), sizes)
    out = sample_levels(values, sampling_locations.to(dtype), attention_weights.to(dtype))
    return out.to(value.dtype)


def float32_if_half(x: Tensor) -> Tensor:
    """float16/bfloat16 -> float32; other dtypes (float32, float64) unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module (Deformable DETR).

    Each query predicts, per head, level and point, an offset from its reference point and an
    attention weight (softmax over the L * P samples of a head); the output is the weighted
    sum of the projected values sampled there, followed by an output projection. Locations,
    weights and samples are float32 at any precision of the projections.

    Args:
        embed_dim: channels C of queries and values.
        num_levels: number of feature levels L.
        num_heads: attention heads M; must divide ``embed_dim``.
        num_points: sampling points P per head and level.

    Submodule names (``sampling_offsets``, ``attention_weights``, ``value_proj``,
    ``output_proj``) are those of the published checkpoints. :meth:`forward` is
    :meth:`project_value` then :meth:`attend`; callers that attend many queries to one input
    may call the two halves themselves (e.g. in chunks of queries).
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
        if head_dim & (head_dim - 1):
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
        input_spatial_shapes: Sizes,
        input_level_start_index: Optional[Tensor] = None,
        input_padding_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """
        Args:
            query: (B, Q, C), position embedding already added.
            reference_points: (B, Q, L, 2) normalised (x, y) points, or (B, Q, L, 4) boxes
                (cx, cy, w, h) whose half-size scales the offsets.
            input_flatten: (B, S, C) the flattened levels.
            input_spatial_shapes: (L, 2) integer (H_l, W_l), or a list of (H_l, W_l) pairs (as
                while torch.export traces; not checked then).
            input_level_start_index: unused (the level offsets follow from the sizes); kept in
                the published module's signature.
            input_padding_mask: optional (B, S) bool, True where the input is padding.

        Returns:
            (B, Q, C).
        """
        del input_level_start_index
        if isinstance(input_spatial_shapes, Tensor):
            self._check_forward_inputs(
                query, reference_points, input_flatten, input_spatial_shapes, input_padding_mask
            )
        values = self.project_value(input_flatten, input_spatial_shapes, input_padding_mask)
        return self.attend(query, reference_points, values)

    def _project(self, input_flatten: Tensor, input_padding_mask: Optional[Tensor]) -> Tensor:
        """(B, S, C) -> projected values (B, S, M, D), padding zeroed, float32 at any precision."""
        b, s, _ = input_flatten.shape
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        return float32_if_half(value).view(b, s, self.num_heads, self.head_dim)

    def _offsets_and_weights(self, query: Tensor) -> Tuple[Tensor, Tensor]:
        """Sampling offsets (B, Q, M, L, P, 2) and softmax attention weights (B, Q, M, L, P),
        float32 at any precision of the projections."""
        b, q, _ = query.shape
        m, num_levels, num_points = self.num_heads, self.num_levels, self.num_points
        offsets = float32_if_half(self.sampling_offsets(query)).view(b, q, m, num_levels, num_points, 2)
        weights = float32_if_half(self.attention_weights(query)).view(b, q, m, num_levels * num_points)
        return offsets, F.softmax(weights, -1).view(b, q, m, num_levels, num_points)

    def project_value(
        self, input_flatten: Tensor, input_spatial_shapes: Sizes, input_padding_mask: Optional[Tensor] = None
    ) -> LevelValues:
        """The first half of :meth:`forward`: the projected values, split into levels."""
        return split_levels(self._project(input_flatten, input_padding_mask), level_sizes(input_spatial_shapes))

    def attend(self, query: Tensor, reference_points: Tensor, values: LevelValues) -> Tensor:
        """The second half of :meth:`forward`: query (B, Q, C), reference_points (B, Q, L, 2|4)
        -> (B, Q, C)."""
        offsets, weights = self._offsets_and_weights(query)
        ref = reference_points[:, :, None, :, None, :]  # (B, Q, 1, L, 1, 2|4)
        if reference_points.shape[-1] == 2:
            # Offsets are in pixels of each level: x normalised by W_l, y by H_l (the sizes read
            # from the level maps, which stay symbolic while torch.export traces).
            normalised = []
            for lvl, level in enumerate(values.levels):
                off = offsets[:, :, :, lvl]  # (B, Q, M, P, 2)
                normalised.append(torch.stack((off[..., 0] / level.shape[-1], off[..., 1] / level.shape[-2]), -1))
            locations = ref + torch.stack(normalised, dim=3)  # (B, Q, M, L, P, 2)
        else:
            # Offsets are relative to the box: P points span half its width and height.
            locations = ref[..., :2] + offsets / self.num_points * ref[..., 2:] * 0.5
        return self.output_proj(sample_levels(values, locations, weights))

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
