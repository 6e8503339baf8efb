"""Swin Transformer backbone ("Swin Transformer: Hierarchical Vision Transformer using Shifted
Windows", Liu et al., 2021) and its Detectron2 wrapper ``D2SwinTransformer``.

Shapes: B batch, C channels of the current stage, H/W token grid of the current stage,
Hp/Wp that grid padded up to a multiple of the window size, ws window size, N = ws * ws tokens
per window, nW = (Hp / ws) * (Wp / ws) windows per image, M attention heads, D = C / M channels
per head. Inside the network, token grids are kept channels-last as (B, H, W, C); the returned
feature maps are (B, C, H, W).

The names of parameters and buffers follow Microsoft's detection/segmentation Swin code
(``patch_embed``, ``layers.{i}.blocks.{j}.attn.qkv``, ``layers.{i}.downsample`` at the end of
stage i, ``norm{i}`` per output), so the published Mask2Former Swin checkpoints load unchanged.
"""

import logging
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from detectron2.config import CfgNode, configurable
from detectron2.modeling import BACKBONE_REGISTRY, Backbone, ShapeSpec
from torch import Tensor, nn

__all__ = [
    "D2SwinTransformer",
    "DropPath",
    "PatchMerging",
    "SwinTransformer",
    "WindowAttention",
    "relative_position_index",
    "shifted_window_mask",
    "window_merge",
    "window_partition",
]

logger = logging.getLogger(__name__)

# Logit added to a (query, key) pair that shares a shifted window but comes from regions that are
# not neighbours in the image. Microsoft's implementation uses -100 rather than -inf; the softmax
# weight exp(-100) is below float32 resolution, and keeping the value keeps outputs identical.
_MASKED_LOGIT = -100.0


# --------------------------------------------------------------------------------------------
# Window helpers (pure functions)
# --------------------------------------------------------------------------------------------
def window_partition(x: Tensor, window_size: int) -> Tensor:
    """Cuts a padded grid into non-overlapping windows.

    Args:
        x: (B, Hp, Wp, C) with Hp and Wp multiples of ``window_size``.
        window_size: ws.

    Returns:
        (B * nW, N, C); windows are batch-major, then row-major over the grid of windows.
    """
    b, hp, wp, c = x.shape
    ws = window_size
    nh, nw = hp // ws, wp // ws
    x = x.view(b, nh, ws, nw, ws, c)  # (B, Hp/ws, ws, Wp/ws, ws, C)
    x = _contiguous(x.permute(0, 1, 3, 2, 4, 5))  # (B, Hp/ws, Wp/ws, ws, ws, C)
    return x.reshape(b * nh * nw, ws * ws, c)  # (B * nW, N, C)


def window_merge(windows: Tensor, window_size: int, hp: int, wp: int, batch: Optional[int] = None) -> Tensor:
    """Inverse of :func:`window_partition`: (B * nW, N, C) -> (B, Hp, Wp, C); ``batch`` is B
    (inferred when None)."""
    ws = window_size
    c = windows.shape[-1]
    nh, nw = hp // ws, wp // ws
    b = windows.shape[0] // (nh * nw) if batch is None else batch
    x = windows.view(b, nh, nw, ws, ws, c)  # (B, Hp/ws, Wp/ws, ws, ws, C)
    x = _contiguous(x.permute(0, 1, 3, 2, 4, 5))  # (B, Hp/ws, ws, Wp/ws, ws, C)
    return x.reshape(b, hp, wp, c)  # (B, Hp, Wp, C)


def _ceil_to(n: int, step: int) -> int:
    """``n`` rounded up to a multiple of ``step``, in integer arithmetic on non-negative values:
    a float ceil would become a constant under torch.export, and the ONNX exporter translates
    the floor division of a negative size (``-(-n // step)``) as a truncating one."""
    return (n + step - 1) // step * step


def _contiguous(x: Tensor) -> Tensor:
    """``x`` itself in eager mode (the reshape after it copies when it must). While torch.export
    traces, a contiguous copy: whether the reshape of a permuted grid can be a view depends on
    whether a window count is 1, and asking would specialise the graph to the traced size."""
    if torch.compiler.is_exporting():
        return x.clone(memory_format=torch.contiguous_format)
    return x


def relative_position_index(window_size: int) -> Tensor:
    """Index of every (query, key) pair of a window into the relative position bias table.

    The table has (2 * ws - 1) ** 2 rows, one per possible offset (dy, dx) in
    [-(ws - 1), ws - 1] ** 2, stored row-major as (dy + ws - 1) * (2 * ws - 1) + (dx + ws - 1),
    where the offset is query position minus key position.

    Returns:
        (N, N) int64 tensor.
    """
    ws = window_size
    grid = torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")
    coords = torch.stack(grid).flatten(1)  # (2, N): (row, col) of each token
    offsets = coords[:, :, None] - coords[:, None, :] + (ws - 1)  # (2, N, N), in [0, 2ws-2]
    return offsets[0] * (2 * ws - 1) + offsets[1]  # (N, N)


def shifted_window_mask(
    hp: int, wp: int, window_size: int, shift_size: int, device: Optional[torch.device] = None
) -> Tensor:
    """Additive attention mask for shifted windows on a padded (Hp, Wp) grid.

    After the grid is rolled by ``-shift_size`` along both axes, the last row (column) of
    windows holds rolled coordinates [Hp - ws, Hp - shift), which were neighbours in the image,
    next to [Hp - shift, Hp), which wrapped around from the opposite border. Attention between
    tokens on different sides of that seam, along either axis, is suppressed. (The reference
    code labels three strips per axis; its first strip, [0, Hp - ws), never shares a window with
    the others, so two per axis give the same mask.)

    Returns:
        (nW, N, N) float32 tensor with 0 for allowed pairs and -100 for suppressed ones.
    """

    def wrapped(n: int) -> Tensor:  # (n,) 1 where the rolled coordinate wrapped around, else 0
        return (torch.arange(n, device=device) >= n - shift_size).long()

    region = wrapped(hp)[:, None] * 2 + wrapped(wp)[None, :]  # (Hp, Wp), ids 0..3
    region = window_partition(region[None, :, :, None], window_size)[..., 0]  # (nW, N)
    different = region[:, :, None] != region[:, None, :]  # (nW, N, N)
    mask = torch.zeros(different.shape, device=device)
    return mask.masked_fill_(different, _MASKED_LOGIT)


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------
class DropPath(nn.Module):
    """Stochastic depth: drops the residual branch of whole samples at random during training.

    Kept samples are scaled by 1 / (1 - drop_prob), so the expected output is unchanged.
    """

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"DropPath: drop_prob={drop_prob} must be in [0, 1)")
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        """x (B, ...) -> (B, ...)."""
        if not self.training or self.drop_prob == 0.0:
            return x
        keep_prob = 1.0 - self.drop_prob
        # one Bernoulli draw per sample, broadcast over every other dimension
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep_prob)
        return x * keep.div_(keep_prob)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Mlp(nn.Module):
    """Feed-forward network fc1 -> GELU -> fc2, with dropout after each linear layer."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., C) -> (..., C)."""
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, with a learned relative position bias.

    The bias (and, for shifted windows, the region mask) is passed to
    ``F.scaled_dot_product_attention`` as an additive ``attn_mask``, which computes
    softmax(q k^T * scale + bias + mask) v, the same formula as the explicit implementation.

    Args:
        dim: channels C.
        num_heads: heads M; must divide ``dim``.
        window_size: ws.
        qkv_bias: learn a bias for the query/key/value projection.
        qk_scale: logit scale; ``None`` means D ** -0.5.
        attn_drop: dropout on the attention weights.
        proj_drop: dropout after the output projection.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        *,
        qkv_bias: bool = True,
        qk_scale: Optional[float] = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(
                f"WindowAttention: dim={dim} is not divisible by num_heads={num_heads}"
            )
        self.num_heads = num_heads
        self.window_size = window_size
        self.scale = qk_scale if qk_scale is not None else (dim // num_heads) ** -0.5
        self.attn_drop = attn_drop

        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) ** 2, num_heads)
        )
        # Persistent: the published checkpoints contain it.
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def relative_position_bias(self) -> Tensor:
        """Returns the (M, N, N) bias gathered from the table."""
        n = self.window_size**2
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]  # (N*N, M)
        return bias.view(n, n, -1).permute(2, 0, 1)  # (M, N, N)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """Attends within each window.

        Args:
            x: (B * nW, N, C) windows, batch-major.
            mask: optional additive (nW, N, N) mask shared by every image of the batch.

        Returns:
            (B * nW, N, C).
        """
        bw, n, c = x.shape
        m = self.num_heads
        qkv = self.qkv(x).view(bw, n, 3, m, c // m)  # (B*nW, N, 3, M, D)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B*nW, M, N, D)

        bias = self.relative_position_bias()  # (M, N, N)
        if mask is None:
            bias = bias.expand(bw, m, n, n)  # (B*nW, M, N, N), a view
        else:
            nw = mask.shape[0]
            bias = bias.unsqueeze(0) + mask.unsqueeze(1)  # (nW, M, N, N)
            # (B, nW, M, N, N) -> (B*nW, M, N, N); a 4-D mask keeps SDPA on its fused CPU/GPU paths
            bias = bias.expand(bw // nw, nw, m, n, n).reshape(bw, m, n, n)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=bias.to(q.dtype),
            dropout_p=self.attn_drop if self.training else 0.0,
            scale=self.scale,
        )  # (B*nW, M, N, D)
        out = out.transpose(1, 2)  # (B*nW, N, M, D)
        if torch.compiler.is_exporting():
            # The output's layout depends on the SDPA kernel: traced as a view, the reshape would
            # fail once an exporter decomposes SDPA into another layout.
            out = out.clone(memory_format=torch.contiguous_format)
        out = out.reshape(bw, n, c)  # (B*nW, N, C)
        return self.proj_drop(self.proj(out))


class SwinBlock(nn.Module):
    """Pre-norm transformer block with (shifted) window attention and an MLP.

    Args:
        dim: channels C.
        num_heads: heads M.
        window_size: ws.
        shift_size: cyclic shift of the grid before partitioning, 0 <= shift < ws.
        mlp_ratio: MLP hidden width as a multiple of C.
        qkv_bias, qk_scale, attn_drop: see :class:`WindowAttention`.
        drop: dropout after the attention projection and inside the MLP.
        drop_path: stochastic depth probability of both residual branches.
    """

    def __init__(
        self, dim: int, num_heads: int, window_size: int, shift_size: int, *,
        mlp_ratio: float = 4.0, qkv_bias: bool = True, qk_scale: Optional[float] = None,
        drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        assert 0 <= shift_size < window_size, (shift_size, window_size)
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(
            dim,
            num_heads,
            window_size,
            qkv_bias=qkv_bias,
            qk_scale=qk_scale,
            attn_drop=attn_drop,
            proj_drop=drop,
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None) -> Tensor:
        """Applies the block.

        Args:
            x: (B, H, W, C).
            attn_mask: (nW, N, N) shifted-window mask of the padded grid; used only when this
                block shifts.

        Returns:
            (B, H, W, C).
        """
        _, h, w, _ = x.shape
        ws, shift = self.window_size, self.shift_size
        y = self.norm1(x)
        # Pad after the norm, so padded tokens are exactly zero (as in the reference model, where
        # they also take part in attention as keys).
        # The padded grid as whole windows: Hp is then visibly a multiple of ws under torch.export.
        hp, wp = _ceil_to(h, ws), _ceil_to(w, ws)
        pad_b, pad_r = hp - h, wp - w
        # While torch.export traces, sizes are symbolic: pad (possibly by 0) without asking.
        if torch.compiler.is_exporting() or pad_b or pad_r:
            y = F.pad(y, (0, 0, 0, pad_r, 0, pad_b))  # (B, Hp, Wp, C)
        if shift:
            y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
        windows = window_partition(y, ws)  # (B*nW, N, C)
        windows = self.attn(windows, attn_mask if shift else None)
        y = window_merge(windows, ws, hp, wp, batch=x.shape[0])  # (B, Hp, Wp, C)
        if shift:
            y = torch.roll(y, shifts=(shift, shift), dims=(1, 2))
        x = x + self.drop_path(y[:, :h, :w])
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """Halves the resolution: concatenates each 2x2 neighbourhood, normalises, projects to 2C.

    Odd sizes are zero-padded at the bottom/right first. The four neighbours are concatenated in
    the reference order (row, col) offsets (0, 0), (1, 0), (0, 1), (1, 1).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C)."""
        b, h, w, c = x.shape
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        h2, w2 = (h + 1) // 2, (w + 1) // 2
        x = x.reshape(b, h2, 2, w2, 2, c)  # (B, H/2, dy, W/2, dx, C)
        # channel blocks ordered by dx, then dy: (dy, dx) = (0,0), (1,0), (0,1), (1,1)
        x = x.permute(0, 1, 3, 4, 2, 5).reshape(b, h2, w2, 4 * c)  # (B, H/2, W/2, 4C)
        return self.reduction(self.norm(x))


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding by a strided convolution, optionally layer-normalised.

    Inputs are zero-padded at the bottom/right to a multiple of the patch size.
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, norm: bool) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if norm else None

    def forward(self, x: Tensor) -> Tensor:
        """x (B, 3, H, W) -> (B, ceil(H/p), ceil(W/p), C), channels-last."""
        p = self.patch_size
        pad_b, pad_r = (-x.shape[-2]) % p, (-x.shape[-1]) % p
        if pad_b or pad_r:
            x = F.pad(x, (0, pad_r, 0, pad_b))
        x = self.proj(x).permute(0, 2, 3, 1)  # (B, H/p, W/p, C)
        return self.norm(x) if self.norm is not None else x


class SwinStage(nn.Module):
    """Blocks of one resolution, alternating regular and shifted windows, plus the patch merging
    that leads to the next stage (``downsample``; applied by the caller, ``None`` in the last
    stage).
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        *,
        drop_path: Sequence[float],
        downsample: bool,
        use_checkpoint: bool = False,
        **block_kwargs: Any,
    ) -> None:
        super().__init__()
        assert len(drop_path) == depth, (len(drop_path), depth)
        self.window_size = window_size
        self.shift_size = window_size // 2
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList(
            SwinBlock(
                dim,
                num_heads,
                window_size,
                shift_size=self.shift_size if j % 2 == 1 else 0,
                drop_path=drop_path[j],
                **block_kwargs,
            )
            for j in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        """x (B, H, W, C) -> (B, H, W, C) after all blocks (without the patch merging)."""
        _, h, w, _ = x.shape
        mask = None
        if self.shift_size > 0 and len(self.blocks) > 1:
            # One mask per stage and forward pass, shared by every shifted block of the stage.
            ws = self.window_size
            hp, wp = _ceil_to(h, ws), _ceil_to(w, ws)
            mask = shifted_window_mask(hp, wp, ws, self.shift_size, device=x.device)
        checkpointing = self.use_checkpoint and self.training and torch.is_grad_enabled()
        for blk in self.blocks:
            if checkpointing:
                x = torch.utils.checkpoint.checkpoint(blk, x, mask, use_reentrant=False)
            else:
                x = blk(x, mask)
        return x


# --------------------------------------------------------------------------------------------
# Backbone
# --------------------------------------------------------------------------------------------
class SwinTransformer(nn.Module):
    """Swin Transformer feature extractor, independent of any config system.

    Stage i works at stride ``patch_size * 2**i`` with ``embed_dim * 2**i`` channels. Any input
    size is accepted: an input of size (H, W) gives stage-i maps of size
    (ceil(H / stride_i), ceil(W / stride_i)).

    Args:
        pretrain_img_size: image size of the pre-training; sets the grid of the absolute position
            embedding (only used when ``ape``).
        patch_size: side of the square patches of the stem.
        in_chans: input channels.
        embed_dim: channels of the first stage.
        depths: blocks per stage.
        num_heads: attention heads per stage.
        window_size: side of the attention windows.
        mlp_ratio: MLP hidden width as a multiple of the channels.
        qkv_bias: learn biases for the query/key/value projections.
        qk_scale: attention logit scale; ``None`` means head_dim ** -0.5.
        drop_rate: dropout after the stem, the attention projections and inside the MLPs.
        attn_drop_rate: dropout on attention weights.
        drop_path_rate: stochastic depth of the last block; it grows linearly from 0 over blocks.
        ape: add a learned absolute position embedding (resized bicubically to the input).
        patch_norm: layer-normalise the patch embedding.
        out_indices: stages whose (normalised) outputs are returned, as ``res{i + 2}``.
        frozen_stages: -1 trains everything; 0 freezes the patch embedding; 1 also the absolute
            position embedding; k >= 2 also stages 0 .. k - 2 (with their patch merging).
        use_checkpoint: recompute each block in the backward pass to save memory.
    """

    def __init__(
        self,
        *,
        pretrain_img_size: int = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0, qkv_bias: bool = True, qk_scale: Optional[float] = None,
        drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.2,
        ape: bool = False,
        patch_norm: bool = True,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        frozen_stages: int = -1,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        depths, num_heads = list(depths), list(num_heads)
        num_stages = len(depths)
        if num_stages == 0 or len(num_heads) != num_stages:
            raise ValueError(
                f"SwinTransformer: depths={depths} and num_heads={num_heads} must be non-empty "
                "and of equal length"
            )
        if min(depths) < 1:
            raise ValueError(f"SwinTransformer: every stage needs >= 1 block, got depths={depths}")
        for name, value in (("patch_size", patch_size), ("window_size", window_size)):
            if value < 1:
                raise ValueError(f"SwinTransformer: {name}={value} must be >= 1")
        bad = [i for i in out_indices if not 0 <= i < num_stages]
        if bad or not out_indices:
            raise ValueError(
                f"SwinTransformer: out_indices={list(out_indices)} must be a non-empty subset of "
                f"{list(range(num_stages))}"
            )
        if not -1 <= frozen_stages <= num_stages + 1:
            raise ValueError(
                f"SwinTransformer: frozen_stages={frozen_stages} must be in [-1, {num_stages + 1}]"
            )

        self.in_chans = in_chans
        self.patch_size = patch_size
        self.num_features = [embed_dim * 2**i for i in range(num_stages)]
        self.out_indices = sorted(set(out_indices))
        self.frozen_stages = frozen_stages

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, norm=patch_norm)
        if ape:
            grid = pretrain_img_size // patch_size
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, embed_dim, grid, grid))
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)
        else:
            self.register_parameter("absolute_pos_embed", None)
        self.pos_drop = nn.Dropout(drop_rate)

        # stochastic depth grows linearly with the global block index
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList()
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            if self.num_features[i] % heads != 0:
                raise ValueError(
                    f"SwinTransformer: stage {i} has {self.num_features[i]} channels, which "
                    f"num_heads[{i}]={heads} does not divide"
                )
            first = sum(depths[:i])
            self.layers.append(
                SwinStage(
                    self.num_features[i],
                    depth,
                    heads,
                    window_size,
                    drop_path=rates[first : first + depth],
                    downsample=i < num_stages - 1,
                    use_checkpoint=use_checkpoint,
                    mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale,
                    drop=drop_rate, attn_drop=attn_drop_rate,
                )
            )
        # one LayerNorm per returned stage, named norm{i} as in the published checkpoints
        for i in self.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))

        self._init_linear_and_norm()
        self._freeze_stages()

    def _init_linear_and_norm(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _frozen_modules(self) -> List[nn.Module]:
        frozen: List[nn.Module] = []
        if self.frozen_stages >= 0:
            frozen.append(self.patch_embed)
        if self.frozen_stages >= 2:
            frozen.append(self.pos_drop)
            frozen.extend(self.layers[: self.frozen_stages - 1])
        return frozen

    def _freeze_stages(self) -> None:
        for module in self._frozen_modules():
            module.eval()
            for param in module.parameters():
                param.requires_grad = False
        if self.frozen_stages >= 1 and self.absolute_pos_embed is not None:
            self.absolute_pos_embed.requires_grad = False

    def train(self, mode: bool = True) -> "SwinTransformer":
        """Sets the training mode; frozen stages stay in eval mode."""
        super().train(mode)
        for module in self._frozen_modules():
            module.eval()
        return self

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        """Computes the multi-scale features.

        Args:
            x: (B, in_chans, H, W) images, any H and W.

        Returns:
            ``{"res{i + 2}": (B, C_i, ceil(H / stride_i), ceil(W / stride_i))}`` for every i in
            ``out_indices``, with C_i = embed_dim * 2**i and stride_i = patch_size * 2**i.
        """
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"SwinTransformer: expected input of shape (B, {self.in_chans}, H, W), "
                f"got {tuple(x.shape)}"
            )
        x = self.patch_embed(x)  # (B, H, W, C)
        if self.absolute_pos_embed is not None:
            pos = F.interpolate(self.absolute_pos_embed, size=x.shape[1:3], mode="bicubic")
            x = x + pos.permute(0, 2, 3, 1)  # (1, H, W, C)
        x = self.pos_drop(x)

        outputs: Dict[str, Tensor] = {}
        for i in range(self.out_indices[-1] + 1):  # stages after the last output are skipped
            if i > 0:
                x = self.layers[i - 1].downsample(x)  # (B, ceil(H/2), ceil(W/2), 2C)
            x = self.layers[i](x)
            if i in self.out_indices:
                y = getattr(self, f"norm{i}")(x)
                outputs[f"res{i + 2}"] = y.permute(0, 3, 1, 2).contiguous()  # (B, C, H, W)
        return outputs


@BACKBONE_REGISTRY.register()
class D2SwinTransformer(SwinTransformer, Backbone):
    """Swin Transformer as a Detectron2 backbone; outputs ``res2`` .. ``res5``.

    Built from ``cfg.MODEL.SWIN.*`` by ``build_backbone`` (``MODEL.BACKBONE.NAME:
    "D2SwinTransformer"``), or directly from keyword arguments.

    Args:
        out_features: names of the returned features, a subset of ``res2`` .. ``res{S + 1}``
            for S stages.
        **kwargs: keyword arguments of :class:`SwinTransformer` except ``out_indices``.
    """

    @configurable
    def __init__(
        self, *, out_features: Sequence[str] = ("res2", "res3", "res4", "res5"), **kwargs: Any
    ) -> None:
        num_stages = len(kwargs.get("depths", (2, 2, 6, 2)))
        names = [f"res{i + 2}" for i in range(num_stages)]
        unknown = [name for name in out_features if name not in names]
        if unknown or not out_features:
            raise ValueError(
                f"D2SwinTransformer: unknown OUT_FEATURES {unknown or list(out_features)}; "
                f"expected a non-empty subset of {names}"
            )
        super().__init__(out_indices=[names.index(name) for name in out_features], **kwargs)
        self._out_features = [name for name in names if name in out_features]
        self._out_feature_strides = {
            name: self.patch_size * 2**i for i, name in enumerate(names) if name in out_features
        }
        self._out_feature_channels = {
            name: self.num_features[i] for i, name in enumerate(names) if name in out_features
        }
        self._size_divisibility = self.patch_size * 2 ** (num_stages - 1)

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape: ShapeSpec) -> Dict[str, Any]:
        swin = cfg.MODEL.SWIN
        return {
            "pretrain_img_size": swin.PRETRAIN_IMG_SIZE,
            "patch_size": swin.PATCH_SIZE,
            "in_chans": input_shape.channels if input_shape.channels is not None else 3,
            "embed_dim": swin.EMBED_DIM,
            "depths": list(swin.DEPTHS),
            "num_heads": list(swin.NUM_HEADS),
            "window_size": swin.WINDOW_SIZE,
            "mlp_ratio": swin.MLP_RATIO,
            "qkv_bias": swin.QKV_BIAS,
            "qk_scale": swin.QK_SCALE,
            "drop_rate": swin.DROP_RATE,
            "attn_drop_rate": swin.ATTN_DROP_RATE,
            "drop_path_rate": swin.DROP_PATH_RATE,
            "ape": swin.APE,
            "patch_norm": swin.PATCH_NORM,
            "out_features": list(swin.OUT_FEATURES),
            "use_checkpoint": swin.USE_CHECKPOINT,
        }

    def output_shape(self) -> Dict[str, ShapeSpec]:
        """Returns the channels and stride of every output feature."""
        return {
            name: ShapeSpec(
                channels=self._out_feature_channels[name], stride=self._out_feature_strides[name]
            )
            for name in self._out_features
        }

    @property
    def size_divisibility(self) -> int:
        """Padding the input to a multiple of this (32 for the standard model) makes every
        output exactly input / stride."""
        return self._size_divisibility
