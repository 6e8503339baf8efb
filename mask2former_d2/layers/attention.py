"""Attention, feed-forward, MLP and projection blocks shared by the pixel decoders, the
transformer decoders and export.

Shapes: B batch, Q target (query) length, S source (memory) length, C channels
(``hidden_dim``), M heads, D = C / M channels per head, H/W spatial.
Every tensor here is batch-first: sequences are (B, Q, C) and (B, S, C).

Masks are boolean with ``True`` meaning *blocked* (the convention of
``nn.MultiheadAttention``): ``attn_mask`` is (B, Q, S) shared by all heads or
(B, M, Q, S); ``key_padding_mask`` is (B, S).
"""

from typing import Callable, Optional

import fvcore.nn.weight_init as weight_init
import torch
from detectron2.layers import Conv2d
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "MultiHeadAttention",
    "SelfAttentionLayer",
    "CrossAttentionLayer",
    "FFNLayer",
    "FeedForwardMixin",
    "MLP",
    "flatten_hw",
    "get_activation_fn",
    "input_projection",
    "make_dropout",
    "residual_block",
    "xavier_init_matrices",
]


def get_activation_fn(name: str) -> Callable[[Tensor], Tensor]:
    """Returns the activation function called ``name`` ("relu", "gelu" or "glu")."""
    table = {"relu": F.relu, "gelu": F.gelu, "glu": F.glu}
    if name not in table:
        raise ValueError(f"activation={name!r} is not supported; expected one of {sorted(table)}")
    return table[name]


def xavier_init_matrices(module: nn.Module) -> None:
    """Xavier-uniform initialisation of every parameter of ``module`` with 2+ dimensions.

    This is how DETR-style transformers (and the published Mask2Former layers) initialise
    projection and feed-forward weights; biases and norms keep their defaults.
    """
    for param in module.parameters():
        if param.dim() > 1:
            nn.init.xavier_uniform_(param)


def flatten_hw(x: Tensor) -> Tensor:
    """A feature map as a sequence: (B, C, H, W) -> (B, H*W, C), row-major over (H, W)."""
    return x.flatten(2).transpose(1, 2)


def input_projection(in_channels: int, hidden_dim: int, enforce: bool) -> nn.Module:
    """A Xavier-initialised 1x1 conv from ``in_channels`` to ``hidden_dim``, or an identity
    (an empty ``nn.Sequential``, as in the published checkpoints) when the widths match and
    ``enforce`` is False."""
    if in_channels == hidden_dim and not enforce:
        return nn.Sequential()
    proj = Conv2d(in_channels, hidden_dim, kernel_size=1)
    weight_init.c2_xavier_fill(proj)
    return proj


def make_dropout(p: float) -> nn.Module:
    """``nn.Dropout(p)``, or an identity when ``p`` is 0 (a zero dropout still costs a kernel
    call in training mode)."""
    return nn.Dropout(p) if p > 0.0 else nn.Identity()


def residual_block(
    x: Tensor,
    sublayer: Callable[[Tensor], Tensor],
    norm: nn.Module,
    dropout: nn.Module,
    normalize_before: bool,
) -> Tensor:
    """Wraps ``sublayer`` with a residual connection and a LayerNorm.

    Post-norm: ``norm(x + dropout(sublayer(x)))``; pre-norm: ``x + dropout(sublayer(norm(x)))``.
    """
    if normalize_before:
        return x + dropout(sublayer(norm(x)))
    return norm(x + dropout(sublayer(x)))


class MultiHeadAttention(nn.Module):
    """Batch-first multi-head attention with ``nn.MultiheadAttention``'s parameters.

    The parameters are named and packed like ``nn.MultiheadAttention``'s
    (``in_proj_weight`` = [W_q; W_k; W_v] of shape (3C, C), ``in_proj_bias``,
    ``out_proj``), so published checkpoints load unchanged and the arithmetic is the
    same. The attention itself runs through ``F.scaled_dot_product_attention`` without
    materialising averaged attention weights, and a mask shared by all heads is
    broadcast instead of repeated per head.

    Args:
        embed_dim: channels C of queries, keys and values.
        num_heads: number of heads M; must divide ``embed_dim``.
        dropout: dropout probability on the attention weights (training only).
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # Same scheme as nn.MultiheadAttention.
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def _split_heads(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        # (B, N, C) -> (B, N, M, D) -> (B, M, N, D)
        return x.view(b, n, self.num_heads, -1).transpose(1, 2)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attn_mask: Optional[Tensor] = None,
        key_padding_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """Attends from ``query`` (B, Q, C) to ``key``/``value`` (B, S, C).

        Args:
            query: (B or 1, Q, C).
            key: (B or 1, S, C). Passing the same tensor object as ``query`` fuses their
                projections into one matmul.
            value: (B or 1, S, C).
            attn_mask: optional bool mask, True = blocked, (B, Q, S) or (B, M, Q, S).
            key_padding_mask: optional bool (B, S), True = padding.

        Returns:
            (B, Q, C).
        """
        c = self.embed_dim
        w, b = self.in_proj_weight, self.in_proj_bias
        if key is query:
            q, k = F.linear(query, w[: 2 * c], b[: 2 * c]).chunk(2, dim=-1)
        else:
            q = F.linear(query, w[:c], b[:c])
            k = F.linear(key, w[c : 2 * c], b[c : 2 * c])
        v = F.linear(value, w[2 * c :], b[2 * c :])
        batch = max(q.shape[0], k.shape[0])
        q = self._split_heads(q.expand(batch, -1, -1))  # (B, M, Q, D)
        k = self._split_heads(k.expand(batch, -1, -1))  # (B, M, S, D)
        v = self._split_heads(v.expand(batch, -1, -1))  # (B, M, S, D)

        blocked = None
        if attn_mask is not None:
            if attn_mask.dtype != torch.bool:
                raise TypeError(f"attn_mask must be bool (True = blocked), got {attn_mask.dtype}")
            # A (B, Q, S) mask is shared by the heads: (B, 1, Q, S) broadcasts over M.
            blocked = attn_mask.unsqueeze(1) if attn_mask.dim() == 3 else attn_mask
        if key_padding_mask is not None:
            padding = key_padding_mask[:, None, None, :]  # (B, 1, 1, S)
            blocked = padding if blocked is None else blocked | padding
        bias = None
        if blocked is not None:
            # An additive mask in q's dtype: SDPA would otherwise convert a bool mask itself,
            # with an extra pass over it.
            bias = torch.zeros(blocked.shape, dtype=q.dtype, device=q.device)
            bias.masked_fill_(blocked, float("-inf"))

        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0
        )  # (B, M, Q, D)
        out = out.transpose(1, 2).flatten(2)  # (B, Q, C)
        return self.out_proj(out)


class FeedForwardMixin:
    """The two-layer feed-forward block of a transformer layer, as flat attributes.

    Transformer layers keep ``linear1``/``linear2`` next to their attention and norms (those
    are the checkpoint names), so the block is a mixin for ``nn.Module`` subclasses rather
    than a submodule. ``_init_feed_forward`` registers ``linear1``, ``dropout`` (after the
    activation), ``linear2`` and the activation; ``_feed_forward`` is the computation
    ``linear2(dropout(activation(linear1(x))))`` on (..., C) -> (..., C).
    """

    def _init_feed_forward(
        self, hidden_dim: int, dim_feedforward: int, dropout: float, activation: str = "relu"
    ) -> None:
        self.linear1 = nn.Linear(hidden_dim, dim_feedforward)
        self.dropout = make_dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, hidden_dim)
        self.activation = get_activation_fn(activation)

    def _feed_forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))


class _AttentionLayer(nn.Module):
    """Multi-head attention with a residual connection and LayerNorm (base of the two below).

    The attention module is registered under ``attention_name`` (the checkpoint name).

    Args:
        hidden_dim: channels C.
        num_heads: attention heads M.
        dropout: dropout on the attention weights and the residual branch.
        normalize_before: pre-norm instead of post-norm.
    """

    attention_name = "attn"

    def __init__(
        self,
        hidden_dim: int,
        num_heads: int,
        *,
        dropout: float = 0.0,
        normalize_before: bool = False,
    ) -> None:
        super().__init__()
        attention = MultiHeadAttention(hidden_dim, num_heads, dropout=dropout)
        self.add_module(self.attention_name, attention)
        self.norm = nn.LayerNorm(hidden_dim)
        self.dropout = make_dropout(dropout)
        self.normalize_before = normalize_before
        xavier_init_matrices(self)

    def _residual(self, tgt: Tensor, attend: Callable[[Tensor], Tensor]) -> Tensor:
        return residual_block(tgt, attend, self.norm, self.dropout, self.normalize_before)


class SelfAttentionLayer(_AttentionLayer):
    """Self-attention among the queries with a residual connection and LayerNorm.

    Queries and keys get ``query_pos`` added; values do not. Arguments as ``_AttentionLayer``:
    ``hidden_dim``, ``num_heads``, keyword-only ``dropout`` and ``normalize_before``.
    """

    attention_name = "self_attn"

    def forward(
        self,
        tgt: Tensor,
        query_pos: Optional[Tensor] = None,
        attn_mask: Optional[Tensor] = None,
        key_padding_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """tgt: (B, Q, C); query_pos: (B or 1, Q, C). Returns (B, Q, C)."""

        def attend(x: Tensor) -> Tensor:
            qk = x if query_pos is None else x + query_pos
            return self.self_attn(qk, qk, x, attn_mask, key_padding_mask)

        return self._residual(tgt, attend)


class CrossAttentionLayer(_AttentionLayer):
    """Attention from the queries to a memory, with a residual connection and LayerNorm.

    Queries get ``query_pos`` added, keys get the memory's position encoding, values
    are the plain memory. Arguments as ``_AttentionLayer``: ``hidden_dim``, ``num_heads``,
    keyword-only ``dropout`` and ``normalize_before``.
    """

    attention_name = "multihead_attn"

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        memory_keys: Optional[Tensor] = None,
        query_pos: Optional[Tensor] = None,
        attn_mask: Optional[Tensor] = None,
        key_padding_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """Cross-attention step.

        Args:
            tgt: queries (B, Q, C).
            memory: attention values (B, S, C).
            memory_keys: memory plus its position encoding (B or 1, S, C); callers that
                reuse one memory in several layers compute it once. Defaults to ``memory``.
            query_pos: (B or 1, Q, C) added to the queries.
            attn_mask: bool (B, Q, S) or (B, M, Q, S), True = blocked.
            key_padding_mask: bool (B, S), True = padding.

        Returns:
            (B, Q, C).
        """
        keys = memory if memory_keys is None else memory_keys

        def attend(x: Tensor) -> Tensor:
            q = x if query_pos is None else x + query_pos
            return self.multihead_attn(q, keys, memory, attn_mask, key_padding_mask)

        return self._residual(tgt, attend)


class FFNLayer(FeedForwardMixin, nn.Module):
    """Two-layer feed-forward block with a residual connection and LayerNorm.

    Args:
        hidden_dim: channels C.
        dim_feedforward: inner width F.
        dropout: dropout after the activation and on the residual branch.
        activation: "relu", "gelu" or "glu".
        normalize_before: pre-norm instead of post-norm.
    """

    def __init__(
        self,
        hidden_dim: int,
        dim_feedforward: int = 2048,
        *,
        dropout: float = 0.0,
        activation: str = "relu",
        normalize_before: bool = False,
    ) -> None:
        super().__init__()
        self._init_feed_forward(hidden_dim, dim_feedforward, dropout, activation)
        self.norm = nn.LayerNorm(hidden_dim)
        self.normalize_before = normalize_before
        xavier_init_matrices(self)

    def forward(self, tgt: Tensor) -> Tensor:
        """tgt: (B, Q, C) -> (B, Q, C)."""
        return residual_block(
            tgt, self._feed_forward, self.norm, self.dropout, self.normalize_before
        )


class MLP(nn.Module):
    """A stack of ``num_layers`` linear layers with ReLU between them (none after the last).

    Args:
        input_dim: input channels.
        hidden_dim: width of the hidden layers.
        output_dim: output channels.
        num_layers: number of linear layers (>= 1).
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"MLP needs num_layers >= 1, got {num_layers}")
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., input_dim) -> (..., output_dim)."""
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = F.relu(x)
        return x
