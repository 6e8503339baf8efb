"""Mask2Former's masked-attention transformer decoder.

Shapes: B batch, Q queries, K classes (+1 = no-object), C channels (``hidden_dim``),
E mask-embedding channels (``mask_dim``), M heads, L = 3 feature levels (1/32, 1/16,
1/8 of the image, lowest resolution first), H_l/W_l and S_l = H_l*W_l the size of level
l, Hm/Wm the size of the mask features (1/4 of the image). Sequences are batch-first:
queries (B, Q, C), level memories (B, S_l, C). Attention masks are bool (B, Q, S_l) with
True = blocked, shared by all heads.
"""

import contextlib
import logging
from typing import Any, Dict, List, Optional, Tuple

import torch
from detectron2.config import CfgNode, configurable
from torch import Tensor, nn
from torch.nn import functional as F

from ...accel.layout import resize_per_channel
from ...accel.precision import full_precision, low_precision_inference
from ...layers.attention import (
    CrossAttentionLayer,
    FFNLayer,
    SelfAttentionLayer,
    flatten_hw,
    input_projection,
)
from ...layers.position_encoding import PositionEmbeddingSine
from .build import TRANSFORMER_DECODER_REGISTRY
from .heads import QueryHeadsMixin, check_num_heads

__all__ = ["MultiScaleMaskedTransformerDecoder"]

logger = logging.getLogger(__name__)


@TRANSFORMER_DECODER_REGISTRY.register()
class MultiScaleMaskedTransformerDecoder(QueryHeadsMixin, nn.Module):
    """Decodes learned queries with masked attention over three feature levels.

    Each layer does masked cross-attention to one feature level (round robin, lowest
    resolution first), then self-attention among the queries, then a feed-forward block.
    Before the first layer and after every layer the queries are decoded into class
    logits and mask logits; the mask logits, resized to the next layer's level, decide
    which pixels each query may attend to (sigmoid >= 0.5; a query with no such pixel
    attends everywhere).

    In eval mode only the final prediction is materialised at mask-feature resolution
    (the intermediate ones only feed the attention masks and the training losses) unless
    ``aux_outputs_in_eval`` is set; the attention masks are then computed from mask
    features resized to each level, which is the same linear map in a cheaper order.
    """

    _version = 2
    num_feature_levels = 3
    # Position encoding of the memory (subclasses with a time axis use the 3-D one).
    position_encoding = PositionEmbeddingSine

    @configurable
    def __init__(
        self,
        in_channels: int,
        mask_classification: bool = True,
        *,
        num_classes: int,
        hidden_dim: int,
        num_queries: int,
        num_heads: int,
        dim_feedforward: int,
        num_layers: int,
        pre_norm: bool,
        mask_dim: int,
        enforce_input_project: bool,
        aux_outputs_in_eval: bool = False,
    ) -> None:
        """
        Args:
            in_channels, mask_classification, num_classes, hidden_dim, num_queries, num_heads,
                dim_feedforward, pre_norm, mask_dim, enforce_input_project: as filled by
                :func:`.heads.decoder_config` (one input projection per feature level).
            num_layers: decoder layers built (``MODEL.MASK_FORMER.DEC_LAYERS - 1``: the
                prediction from the learned queries counts as one more).
            aux_outputs_in_eval: also return the auxiliary predictions in eval mode.
        """
        super().__init__()
        if num_layers < 0:
            raise ValueError(f"num_layers must be >= 0, got {num_layers}")
        check_num_heads(hidden_dim, num_heads)
        self.num_heads = num_heads
        self.num_layers = num_layers
        self.num_queries = num_queries
        self.aux_outputs_in_eval = aux_outputs_in_eval

        self.pe_layer = self.position_encoding(hidden_dim // 2, normalize=True)
        # Mask2Former uses no dropout in its decoder.
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, num_heads, normalize_before=pre_norm)
            for _ in range(num_layers)
        )
        self.transformer_cross_attention_layers = nn.ModuleList(
            self._make_cross_attention(hidden_dim, num_heads, pre_norm) for _ in range(num_layers)
        )
        self.transformer_ffn_layers = nn.ModuleList(
            FFNLayer(hidden_dim, dim_feedforward, normalize_before=pre_norm)
            for _ in range(num_layers)
        )
        self.decoder_norm = nn.LayerNorm(hidden_dim)

        self.query_feat = nn.Embedding(num_queries, hidden_dim)  # learned query features
        self.query_embed = nn.Embedding(num_queries, hidden_dim)  # learned query positions
        self.level_embed = nn.Embedding(self.num_feature_levels, hidden_dim)
        self.input_proj = nn.ModuleList(
            input_projection(in_channels, hidden_dim, enforce_input_project)
            for _ in range(self.num_feature_levels)
        )
        self._init_query_heads(hidden_dim, num_classes, mask_dim, mask_classification)

    @staticmethod
    def _own_config(mf: CfgNode) -> Dict[str, Any]:
        if mf.DEC_LAYERS < 1:
            raise ValueError(
                f"MODEL.MASK_FORMER.DEC_LAYERS={mf.DEC_LAYERS}; Mask2Former needs at least 1 "
                "(the prediction from the learned queries counts as the first)"
            )
        # One auxiliary loss per DEC_LAYERS: the learned queries give one prediction.
        return {"num_layers": mf.DEC_LAYERS - 1}

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # Checkpoints older than version 2 call the query features "static_query".
        version = local_metadata.get("version", None)
        if version is None or version < 2:
            old = prefix + "static_query."
            renamed = [k for k in list(state_dict) if k.startswith(old)]
            for k in renamed:
                state_dict[prefix + "query_feat." + k[len(old) :]] = state_dict.pop(k)
            if renamed:
                logger.warning(
                    "%s: renamed %sstatic_query.* to query_feat.*; re-save the checkpoint to "
                    "silence this warning",
                    type(self).__name__,
                    prefix,
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(
        self,
        x: List[Tensor],
        mask_features: Tensor,
        mask: Optional[Tensor] = None,
        *,
        final_masks: bool = True,
    ) -> Dict[str, Any]:
        """Predicts classes and masks.

        Args:
            x: three feature maps (B, in_channels, H_l, W_l), lowest resolution first.
            mask_features: (B, E, Hm, Wm) per-pixel embeddings.
            mask: ignored; padded pixels are not masked (as in the published model).
            final_masks: False (eval mode only) returns the final mask embeddings
                ``pred_mask_embed`` (B, Q, E) instead of ``pred_masks``, for callers that need
                the masks of a few queries only (``pred_masks`` = their product with
                ``mask_features``).

        Returns:
            ``pred_logits`` (B, Q, K+1) (only with mask classification), ``pred_masks``
            (B, Q, Hm, Wm), and ``aux_outputs``: the same keys for the prediction from the
            learned queries and for every layer but the last (``num_layers`` entries; empty
            in eval mode unless ``aux_outputs_in_eval``).
        """
        del mask
        if len(x) != self.num_feature_levels:
            raise ValueError(
                f"{type(self).__name__} expects {self.num_feature_levels} feature maps, "
                f"got {len(x)}"
            )
        batch, frames = self._clip_layout(mask_features)
        sizes: List[Tuple[int, int]] = []
        memories, keys = [], []
        for lvl, feat in enumerate(x):
            sizes.append((feat.shape[-2], feat.shape[-1]))
            memory, key = self._prepare_memory(lvl, feat, batch, frames)
            memories.append(memory)
            keys.append(key)
        # The input maps are not needed any more: a caller that kept no reference to them (long
        # video clips) gets their memory back during decoding.
        del x, feat

        query_pos = self.query_embed.weight.unsqueeze(0)  # (1, Q, C)
        output = self.query_feat.weight.unsqueeze(0).expand(batch, -1, -1)  # (B, Q, C)

        keep_all = self.training or self.aux_outputs_in_eval
        if not final_masks and keep_all:
            raise ValueError("final_masks=False is for eval mode without aux_outputs_in_eval")
        # At low-precision inference the prediction heads and all mask logits are float32.
        fp32_heads = low_precision_inference() is not None
        if fp32_heads:
            mask_features = mask_features.float()
        heads_context = full_precision(mask_features) if fp32_heads else contextlib.nullcontext()
        level_mask_features: Dict[int, Tensor] = {}
        logits: List[Tensor] = []
        masks: List[Tensor] = []
        attn_mask: Optional[Tensor] = None
        for i in range(self.num_layers + 1):
            if i > 0:
                lvl = (i - 1) % self.num_feature_levels
                output = self.transformer_cross_attention_layers[i - 1](
                    output, memories[lvl], keys[lvl], query_pos, attn_mask
                )
                output = self.transformer_self_attention_layers[i - 1](output, query_pos)
                output = self.transformer_ffn_layers[i - 1](output)

            last = i == self.num_layers
            with heads_context:
                decoded = self.decoder_norm(output.float() if fp32_heads else output)  # (B, Q, C)
                embed = self.mask_embed(decoded)  # (B, Q, E)
                mask_logits = None
                if keep_all or last:
                    if self.mask_classification:
                        logits.append(self.class_embed(decoded))  # (B, Q, K+1)
                    if not last or final_masks:
                        mask_logits = self._mask_logits(embed, mask_features)
                        masks.append(mask_logits)  # (B, Q, [T,] Hm, Wm)
                if last:
                    break

                # Attention mask for the next layer, at the resolution of the level it reads.
                lvl = i % self.num_feature_levels
                if mask_logits is not None:
                    # Frames (if any) are resized as separate maps: (B, Q*T, Hm, Wm).
                    low = F.interpolate(
                        mask_logits.flatten(1, -3), size=sizes[lvl], mode="bilinear", align_corners=False
                    ).view(mask_logits.shape[:-2] + sizes[lvl])  # (B, Q, [T,] H_l, W_l)
                else:
                    if lvl not in level_mask_features:
                        level_mask_features[lvl] = resize_per_channel(mask_features, sizes[lvl])
                    low = self._mask_logits(embed, level_mask_features[lvl])
                attn_mask = self._attention_mask(low)

        if not final_masks:
            out = {"pred_mask_embed": embed, "aux_outputs": []}
            if self.mask_classification:
                out["pred_logits"] = logits[-1]
            return out
        return self._pack_predictions(logits if self.mask_classification else None, masks)

    # Hooks for decoders that attend differently (e.g. PEM): each replaces one step of the
    # layer, while the call ``layer(output, memory, key, query_pos, attn_mask)`` stays the same.
    def _make_cross_attention(self, hidden_dim: int, num_heads: int, pre_norm: bool) -> nn.Module:
        """One layer's masked cross-attention (called ``num_layers`` times by ``__init__``)."""
        return CrossAttentionLayer(hidden_dim, num_heads, normalize_before=pre_norm)

    def _prepare_memory(self, lvl: int, feat: Tensor, batch: int, frames: int) -> Tuple[Tensor, Tensor]:
        """``(memory, key)`` of level ``lvl`` from its (B*T, C_in, H_l, W_l) input map, in the
        layout the cross-attention layer takes: here values (B, S_l, C) with S_l = T*H_l*W_l
        (frame-major) and keys = values + position encoding (values carry no position)."""
        pos = self._memory_position(feat, frames)  # (1, S_l, C)
        memory = self.input_proj[lvl](feat).flatten(2)  # (B*T, C, H_l*W_l)
        memory = memory + self.level_embed.weight[lvl][:, None]
        # One sequence per clip, frame-major: (B, T, C, H_l*W_l) -> (B, T*H_l*W_l, C).
        memory = memory.unflatten(0, (batch, frames)).transpose(2, 3).reshape(batch, -1, memory.shape[1])
        return memory, memory + pos

    def _attention_mask(self, mask_logits: Tensor) -> Optional[Tensor]:
        """The cross-attention's ``attn_mask`` from mask logits (B, Q, [T,] H_l, W_l) at the size
        of the level the next layer reads (see :func:`_blocked_pixels`)."""
        return _blocked_pixels(mask_logits)

    # Hooks for subclasses whose batch items are clips of T frames (see the video decoder); an
    # image is a clip of one frame without a time axis.
    def _clip_layout(self, mask_features: Tensor) -> Tuple[int, int]:
        """(B, T): clips and frames per clip of the (B*T, E, Hm, Wm) frame batch."""
        return mask_features.shape[0], 1

    def _memory_position(self, feat: Tensor, frames: int) -> Tensor:
        """(1, S_l, C) position encoding of one clip's memory at a level, from its
        (B*T, C, H_l, W_l) features; it does not depend on the clip's content."""
        # Contiguous: the keys (memory + pos) then keep the layout of the memory.
        return flatten_hw(self.pe_layer(feat[:1])).contiguous()

    def _mask_logits(self, embed: Tensor, mask_features: Tensor) -> Tensor:
        """(B, Q, Hm, Wm) mask logits from (B, Q, E) embeddings and (B, E, Hm, Wm) features."""
        return torch.einsum("bqe,behw->bqhw", embed, mask_features)


def _blocked_pixels(mask_logits: Tensor) -> Tensor:
    """Masked-attention mask from mask logits (B, Q, h, w) (or (B, Q, T, h, w)): bool
    (B, Q, h*w) (or (B, Q, T*h*w), frame-major), True where the predicted probability is
    below 0.5, except for queries that would be fully blocked, which attend everywhere."""
    blocked = (mask_logits.detach().sigmoid() < 0.5).flatten(2)  # (B, Q, [T*]h*w)
    return blocked & ~blocked.all(dim=-1, keepdim=True)
