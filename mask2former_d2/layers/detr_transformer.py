"""DETR-style transformer encoder/decoder used by MaskFormer.

Shapes: B batch, Q queries, C channels (``hidden_dim``), H/W spatial, S = H*W memory
length, N decoder layers returned. Sequences are batch-first, (B, Q, C) and (B, S, C).
Padding masks are bool (B, H, W) or (B, S) with ``True`` = padding.

Submodule names (``encoder.layers.{i}.self_attn``, ``decoder.layers.{i}.norm3``, ...)
are those of the published MaskFormer checkpoints.
"""

from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .attention import (
    FeedForwardMixin,
    MultiHeadAttention,
    flatten_hw,
    make_dropout,
    residual_block,
    xavier_init_matrices,
)

__all__ = [
    "Transformer",
    "TransformerEncoderOnly",
    "TransformerEncoder",
    "TransformerDecoder",
    "TransformerEncoderLayer",
    "TransformerDecoderLayer",
]


class _DETRLayer(FeedForwardMixin, nn.Module):
    """Base of DETR's encoder and decoder layers: attention sublayer(s), then feed-forward,
    each wrapped by a residual connection with ``norm{i}`` and ``dropout{i}`` (i = 1, 2, ...).

    Args:
        hidden_dim: channels C.
        num_heads: attention heads.
        dim_feedforward: inner width of the feed-forward block.
        dropout: dropout probability everywhere in the layer.
        activation: "relu", "gelu" or "glu".
        normalize_before: pre-norm instead of post-norm.
    """

    cross_attention = False

    def __init__(
        self,
        hidden_dim: int,
        num_heads: int,
        dim_feedforward: int = 2048,
        *,
        dropout: float = 0.1,
        activation: str = "relu",
        normalize_before: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(hidden_dim, num_heads, dropout=dropout)
        if self.cross_attention:
            self.multihead_attn = MultiHeadAttention(hidden_dim, num_heads, dropout=dropout)
        self._init_feed_forward(hidden_dim, dim_feedforward, dropout, activation)
        num_sublayers = 3 if self.cross_attention else 2
        for i in range(1, num_sublayers + 1):
            self.add_module(f"norm{i}", nn.LayerNorm(hidden_dim))
        for i in range(1, num_sublayers + 1):
            self.add_module(f"dropout{i}", make_dropout(dropout))
        self.normalize_before = normalize_before

    def _sublayer(self, i: int, x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        """Residual sublayer ``i`` (1-based) applied to ``x``."""
        norm, dropout = getattr(self, f"norm{i}"), getattr(self, f"dropout{i}")
        return residual_block(x, fn, norm, dropout, self.normalize_before)


class TransformerEncoderLayer(_DETRLayer):
    """Self-attention then feed-forward, each with a residual connection and LayerNorm.

    Arguments as ``_DETRLayer``.
    """

    def forward(
        self,
        src: Tensor,
        pos: Optional[Tensor] = None,
        key_padding_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """src: (B, S, C); pos: (B or 1, S, C); key_padding_mask: (B, S). Returns (B, S, C)."""

        def attend(x: Tensor) -> Tensor:
            qk = x if pos is None else x + pos
            return self.self_attn(qk, qk, x, key_padding_mask=key_padding_mask)

        src = self._sublayer(1, src, attend)
        return self._sublayer(2, src, self._feed_forward)


class TransformerDecoderLayer(_DETRLayer):
    """Self-attention, cross-attention to the memory, feed-forward (each residual + norm).

    Arguments as ``_DETRLayer``.
    """

    cross_attention = True

    def forward(
        self, tgt: Tensor, memory: Tensor, memory_keys: Optional[Tensor] = None,
        query_pos: Optional[Tensor] = None, memory_key_padding_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """One decoder step.

        Args:
            tgt: queries (B, Q, C).
            memory: encoder output, the attention values (B, S, C).
            memory_keys: memory plus its position encoding (B, S, C); defaults to memory.
            query_pos: (B or 1, Q, C) added to queries (and self-attention keys).
            memory_key_padding_mask: bool (B, S), True = padding.

        Returns:
            (B, Q, C).
        """
        keys = memory if memory_keys is None else memory_keys

        def self_attend(x: Tensor) -> Tensor:
            qk = x if query_pos is None else x + query_pos
            return self.self_attn(qk, qk, x)

        def cross_attend(x: Tensor) -> Tensor:
            q = x if query_pos is None else x + query_pos
            return self.multihead_attn(q, keys, memory, key_padding_mask=memory_key_padding_mask)

        tgt = self._sublayer(1, tgt, self_attend)
        tgt = self._sublayer(2, tgt, cross_attend)
        return self._sublayer(3, tgt, self._feed_forward)


class TransformerEncoder(nn.Module):
    """A stack of encoder layers, optionally followed by a LayerNorm (used with pre-norm).

    Args:
        layers: the encoder layers, applied in order.
        norm: optional final norm.
    """

    def __init__(self, layers: List[TransformerEncoderLayer], norm: Optional[nn.Module] = None):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.num_layers = len(layers)
        self.norm = norm

    def forward(self, src: Tensor, pos: Optional[Tensor] = None, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """src: (B, S, C); pos: (B or 1, S, C); key_padding_mask: (B, S). Returns (B, S, C)."""
        for layer in self.layers:
            src = layer(src, pos=pos, key_padding_mask=key_padding_mask)
        if self.norm is not None:
            src = self.norm(src)
        return src


class TransformerDecoder(nn.Module):
    """A stack of decoder layers with a final LayerNorm.

    Args:
        layers: the decoder layers, applied in order.
        norm: the final norm, also applied to every intermediate output.
        return_intermediate: return the normalised output of every layer, not just the last.
    """

    def __init__(
        self,
        layers: List[TransformerDecoderLayer],
        norm: nn.Module,
        return_intermediate: bool = False,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.num_layers = len(layers)
        self.norm = norm
        self.return_intermediate = return_intermediate

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        pos: Optional[Tensor] = None,
        query_pos: Optional[Tensor] = None,
        memory_key_padding_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """Decodes ``tgt`` (B, Q, C) against ``memory`` (B, S, C).

        Returns:
            (N, B, Q, C): every layer's normalised output if ``return_intermediate``,
            otherwise only the last one (N = 1).
        """
        # The keys are the same in every layer: add the position encoding once.
        keys = memory if pos is None else memory + pos
        outputs = []
        for layer in self.layers:
            tgt = layer(tgt, memory, keys, query_pos, memory_key_padding_mask)
            if self.return_intermediate:
                outputs.append(self.norm(tgt))
        if not self.return_intermediate:
            outputs.append(self.norm(tgt))
        return torch.stack(outputs)


class TransformerEncoderOnly(nn.Module):
    """DETR's transformer encoder applied to a feature map (no decoder).

    Args:
        hidden_dim: channels C.
        num_heads: attention heads.
        num_encoder_layers: encoder depth (0 = the memory is the input itself).
        dim_feedforward: feed-forward width.
        dropout: dropout probability.
        activation: "relu", "gelu" or "glu".
        normalize_before: pre-norm instead of post-norm.
    """

    def __init__(
        self, hidden_dim: int = 512, num_heads: int = 8, num_encoder_layers: int = 6,
        dim_feedforward: int = 2048, dropout: float = 0.1, activation: str = "relu",
        normalize_before: bool = False,
    ) -> None:
        super().__init__()
        layer_args = dict(dropout=dropout, activation=activation, normalize_before=normalize_before)
        layers = [
            TransformerEncoderLayer(hidden_dim, num_heads, dim_feedforward, **layer_args)
            for _ in range(num_encoder_layers)
        ]
        # A final norm is only needed when the residual stream was never normalised.
        final_norm = nn.LayerNorm(hidden_dim) if normalize_before else None
        self.encoder = TransformerEncoder(layers, final_norm)
        self.hidden_dim = hidden_dim
        self.num_heads = num_heads
        xavier_init_matrices(self)

    def _encode(
        self, src: Tensor, mask: Optional[Tensor], pos_embed: Tensor
    ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """Flattens and encodes: returns memory (B, S, C), pos (B or 1, S, C), padding (B, S)."""
        pos = flatten_hw(pos_embed)
        padding = None if mask is None else mask.flatten(1)
        return self.encoder(flatten_hw(src), pos=pos, key_padding_mask=padding), pos, padding

    def forward(self, src: Tensor, mask: Optional[Tensor], pos_embed: Tensor) -> Tensor:
        """src: (B, C, H, W); mask: optional bool (B, H, W), True = padding; pos_embed:
        (B or 1, C, H, W). Returns the encoded map, (B, C, H, W)."""
        memory, _, _ = self._encode(src, mask, pos_embed)
        return memory.transpose(1, 2).reshape(src.shape)  # (B, S, C) -> (B, C, H, W)


class Transformer(TransformerEncoderOnly):
    """DETR's encoder-decoder transformer, decoding learned queries from a feature map.

    Args: those of ``TransformerEncoderOnly``, plus ``num_decoder_layers`` (decoder depth) and
    ``return_intermediate_dec`` (return every decoder layer's output).
    """

    def __init__(
        self,
        hidden_dim: int = 512,
        num_heads: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str = "relu",
        normalize_before: bool = False,
        return_intermediate_dec: bool = False,
    ) -> None:
        super().__init__(
            hidden_dim, num_heads, num_encoder_layers, dim_feedforward, dropout, activation,
            normalize_before,
        )
        layer_args = dict(dropout=dropout, activation=activation, normalize_before=normalize_before)
        decoder_layers = [
            TransformerDecoderLayer(hidden_dim, num_heads, dim_feedforward, **layer_args)
            for _ in range(num_decoder_layers)
        ]
        self.decoder = TransformerDecoder(
            decoder_layers, nn.LayerNorm(hidden_dim), return_intermediate=return_intermediate_dec
        )
        xavier_init_matrices(self.decoder)

    def forward(
        self, src: Tensor, mask: Optional[Tensor], query_embed: Tensor, pos_embed: Tensor
    ) -> Tuple[Tensor, Tensor]:
        """Encodes ``src`` and decodes the queries.

        Args:
            src: (B, C, H, W) input features.
            mask: optional bool (B, H, W), True = padding.
            query_embed: (Q, C) query position embeddings (the queries start at zero).
            pos_embed: (B or 1, C, H, W) position encoding of ``src``.

        Returns:
            hs: (N, B, Q, C) decoder outputs (N = decoder layers if intermediate outputs
                are returned, else 1).
            memory: (B, C, H, W) encoder output.
        """
        memory, pos, padding = self._encode(src, mask, pos_embed)  # (B, S, C)
        query_pos = query_embed.unsqueeze(0)  # (1, Q, C)
        tgt = torch.zeros_like(query_pos).expand(src.shape[0], -1, -1)  # (B, Q, C)
        hs = self.decoder(
            tgt, memory, pos=pos, query_pos=query_pos, memory_key_padding_mask=padding
        )
        return hs, memory.transpose(1, 2).reshape(src.shape)
