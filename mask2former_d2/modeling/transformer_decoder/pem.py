"""PEM's transformer decoder: Mask2Former's decoder with prototype-based masked cross-attention.

Instead of a softmax over the pixels, each query picks, per head, the single most similar
unmasked pixel token (its *prototype*) and is updated from the prototype-query interaction
(Cavagnero et al., "PEM: Prototype-based Efficient MaskFormer", CVPR 2024). Self-attention,
feed-forward blocks, prediction heads, query embeddings and deep supervision are those of
:class:`MultiScaleMaskedTransformerDecoder`; only the cross-attention, the memory layout and the
attention mask differ (its three hooks).

Shapes: B batch, Q queries, C channels (``hidden_dim``), M heads, D = C / M channels per head,
H_l/W_l the size of the level a layer reads, N = H_l * W_l pixel tokens. Attention masks are
bool (B, Q, N), True = blocked, shared by all heads.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .build import TRANSFORMER_DECODER_REGISTRY
from .mask2former import MultiScaleMaskedTransformerDecoder

__all__ = ["LocalRepresentation", "PEMTransformerDecoder", "PrototypeCrossAttention"]


class LocalRepresentation(nn.Module):
    """Pixel tokens from a feature map: BatchNorm, depthwise 3x3 conv (with bias), then a
    linear layer per pixel. Children ``bn``, ``to_query_3x3``, ``out`` (PEM's names).

    Args:
        hidden_dim: C.
    """

    def __init__(self, hidden_dim: int) -> None:
        super().__init__()
        # PEM normalises with synchronised statistics across GPUs; one process (or eval) is
        # plain BatchNorm.
        self.bn = nn.SyncBatchNorm(hidden_dim)
        self.to_query_3x3 = nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, groups=hidden_dim)
        self.out = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, N, C)."""
        local = self.to_query_3x3(self.bn(x))  # (B, C, H, W)
        return self.out(local.flatten(2).transpose(1, 2))  # (B, C, N) -> (B, N, C) -> Linear


class PrototypeCrossAttention(nn.Module):
    """PEM's prototype-based masked cross-attention (``PEM_CA``), with its residual connection.

    Pixel tokens (``feature_proj`` of memory + position) and queries (``query_proj`` of the
    queries + their positions) are L2-normalised. Per head, the unmasked token with the largest
    dot product is the query's prototype slice; the slices of all heads form the prototype P.
    The update is ``final(normalize(proj(P * q), over the queries) * alpha + P)``, added to the
    queries. Nothing is averaged, so the cost is one similarity matrix and one gather.

    Args:
        hidden_dim: C.
        num_heads: M; must divide C.
    """

    def __init__(self, hidden_dim: int, num_heads: int) -> None:
        super().__init__()
        if hidden_dim % num_heads:
            raise ValueError(f"hidden_dim={hidden_dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.feature_proj = LocalRepresentation(hidden_dim)
        self.query_proj = nn.Sequential(nn.LayerNorm(hidden_dim), nn.Linear(hidden_dim, hidden_dim))
        self.proj = nn.Linear(hidden_dim, hidden_dim)
        self.final = nn.Linear(hidden_dim, hidden_dim)
        self.alpha = nn.Parameter(torch.ones(1, 1, hidden_dim))  # learned per-channel scale

    def prototypes(self, tokens: Tensor, queries: Tensor, attn_mask: Optional[Tensor]) -> Tensor:
        """Per head, the most similar unblocked token of each query.

        Args:
            tokens: (B, N, C) normalised pixel tokens.
            queries: (B, Q, C) normalised queries.
            attn_mask: optional bool (B, Q, N), True = blocked. A query whose row is fully
                blocked gets token 0 (the argmax of a row of -inf), as in the published model.

        Returns:
            (B, Q, C) prototypes.
        """
        b, n, c = tokens.shape
        q = queries.shape[1]
        m = self.num_heads
        tok = tokens.view(b, n, m, c // m).transpose(1, 2)  # (B, M, N, D)
        qry = queries.view(b, q, m, c // m).transpose(1, 2)  # (B, M, Q, D)
        sim = torch.matmul(qry, tok.transpose(-1, -2))  # (B, M, Q, N)
        if attn_mask is not None:
            sim = sim.masked_fill(attn_mask.unsqueeze(1), float("-inf"))  # heads share the mask
        index = sim.argmax(dim=-1)  # (B, M, Q)
        picked = tok.gather(2, index.unsqueeze(-1).expand(-1, -1, -1, c // m))  # (B, M, Q, D)
        return picked.transpose(1, 2).reshape(b, q, c)  # (B, Q, M, D) -> (B, Q, C)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        memory_keys: Tensor,
        query_pos: Optional[Tensor] = None,
        attn_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """One cross-attention step (the decoder's layer call).

        Args:
            tgt: queries (B, Q, C).
            memory: the level's map (B, C, H, W) (unused: the keys carry what is needed).
            memory_keys: the map plus its position encoding (B, C, H, W).
            query_pos: (B or 1, Q, C) added to the queries.
            attn_mask: bool (B, Q, N), True = blocked.

        Returns:
            (B, Q, C).
        """
        del memory
        tokens = F.normalize(self.feature_proj(memory_keys), dim=-1)  # (B, N, C)
        q = tgt if query_pos is None else tgt + query_pos
        queries = F.normalize(self.query_proj(q), dim=-1)  # (B, Q, C)
        proto = self.prototypes(tokens, queries, attn_mask)  # (B, Q, C)
        # The published model normalises the interaction over the queries (dim 1), not over the
        # channels; its checkpoints depend on it.
        interaction = F.normalize(self.proj(proto * queries), dim=1) * self.alpha
        return self.final(interaction + proto) + tgt


@TRANSFORMER_DECODER_REGISTRY.register()
class PEMTransformerDecoder(MultiScaleMaskedTransformerDecoder):
    """Mask2Former's decoder with PEM's prototype cross-attention.

    Parameter names are PEM's (its decoder is registered under Mask2Former's name, which PEM
    configs keep; see ``build_transformer_decoder``). The memory of a level stays a
    (B, C, H_l, W_l) map, because the cross-attention convolves it. A pixel is blocked for a
    query where the previous prediction's mask logit, resized to the level, is negative; the
    mask is dropped only for an image in which it blocks every pixel of every query.
    """

    def _make_cross_attention(self, hidden_dim: int, num_heads: int, pre_norm: bool) -> nn.Module:
        # PEM's cross-attention normalises its queries itself, whatever PRE_NORM says.
        del pre_norm
        return PrototypeCrossAttention(hidden_dim, num_heads)

    def _prepare_memory(self, lvl: int, feat: Tensor, batch: int, frames: int) -> Tuple[Tensor, Tensor]:
        """(memory, memory + position), both (B, C, H_l, W_l)."""
        if frames != 1:
            raise ValueError(f"{type(self).__name__} decodes images, not clips of {frames} frames")
        memory = self.input_proj[lvl](feat) + self.level_embed.weight[lvl][None, :, None, None]
        pos = self.pe_layer(feat[:1])  # (1, C, H_l, W_l): depends on the size only
        return memory, memory + pos

    def _attention_mask(self, mask_logits: Tensor) -> Optional[Tensor]:
        """Bool (B, Q, H_l*W_l), True where the logit is < 0; all False for an image where every
        pixel of every query would be blocked."""
        blocked = (mask_logits.detach() < 0).flatten(2)  # (B, Q, N)
        everything = blocked.flatten(1).all(dim=1)  # (B,)
        return blocked & ~everything[:, None, None]
