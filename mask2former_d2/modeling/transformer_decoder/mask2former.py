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

import fvcore.nn.weight_init as weight_init
import torch
from detectron2.config import CfgNode, configurable
from detectron2.layers import Conv2d
from torch import Tensor, nn
from torch.nn import functional as F

from ...layers.pointwise_conv import is_channels_last
from ..precision import full_precision, low_precision_inference
from .build import TRANSFORMER_DECODER_REGISTRY
from .layers import MLP, CrossAttentionLayer, FFNLayer, SelfAttentionLayer, aux_predictions
from .position_encoding import PositionEmbeddingSine

__all__ = ["MultiScaleMaskedTransformerDecoder"]

logger = logging.getLogger(__name__)


def _flatten(x: Tensor) -> Tensor:
    """(B, C, H, W) -> contiguous (B, H*W, C)."""
    return x.flatten(2).transpose(1, 2).contiguous()


@TRANSFORMER_DECODER_REGISTRY.register()
class MultiScaleMaskedTransformerDecoder(nn.Module):
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
            in_channels: channels of the multi-scale input features.
            mask_classification: predict class logits as well as masks.
            num_classes: number of classes K (the no-object class is added).
            hidden_dim: transformer channels C.
            num_queries: number of queries Q.
            num_heads: attention heads M; must divide ``hidden_dim``.
            dim_feedforward: feed-forward width.
            num_layers: decoder layers built (``MODEL.MASK_FORMER.DEC_LAYERS - 1``: the
                prediction from the learned queries counts as one more).
            pre_norm: pre-norm instead of post-norm layers.
            mask_dim: channels E of the mask features.
            enforce_input_project: keep the 1x1 input projections even when
                ``in_channels == hidden_dim``.
            aux_outputs_in_eval: also return the auxiliary predictions in eval mode.
        """
        super().__init__()
        if num_layers < 0:
            raise ValueError(f"num_layers must be >= 0, got {num_layers}")
        if hidden_dim % num_heads != 0:
            raise ValueError(f"hidden_dim={hidden_dim} is not divisible by num_heads={num_heads}")
        self.mask_classification = mask_classification
        self.num_heads = num_heads
        self.num_layers = num_layers
        self.num_queries = num_queries
        self.aux_outputs_in_eval = aux_outputs_in_eval

        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        # Mask2Former uses no dropout in its decoder.
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, num_heads, normalize_before=pre_norm)
            for _ in range(num_layers)
        )
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, num_heads, normalize_before=pre_norm)
            for _ in range(num_layers)
        )
        self.transformer_ffn_layers = nn.ModuleList(
            FFNLayer(hidden_dim, dim_feedforward, normalize_before=pre_norm)
            for _ in range(num_layers)
        )
        self.decoder_norm = nn.LayerNorm(hidden_dim)

        self.query_feat = nn.Embedding(num_queries, hidden_dim)  # learned query features
        self.query_embed = nn.Embedding(num_queries, hidden_dim)  # learned query positions
        self.level_embed = nn.Embedding(self.num_feature_levels, hidden_dim)
        self.input_proj = nn.ModuleList()
        for _ in range(self.num_feature_levels):
            if in_channels != hidden_dim or enforce_input_project:
                proj = Conv2d(in_channels, hidden_dim, kernel_size=1)
                weight_init.c2_xavier_fill(proj)
                self.input_proj.append(proj)
            else:
                self.input_proj.append(nn.Sequential())

        if mask_classification:
            self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    @classmethod
    def from_config(
        cls, cfg: CfgNode, in_channels: int, mask_classification: bool
    ) -> Dict[str, Any]:
        mf = cfg.MODEL.MASK_FORMER
        if mf.DEC_LAYERS < 1:
            raise ValueError(
                f"MODEL.MASK_FORMER.DEC_LAYERS={mf.DEC_LAYERS}; Mask2Former needs at least 1 "
                "(the prediction from the learned queries counts as the first)"
            )
        return {
            "in_channels": in_channels,
            "mask_classification": mask_classification,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "hidden_dim": mf.HIDDEN_DIM,
            "num_queries": mf.NUM_OBJECT_QUERIES,
            "num_heads": mf.NHEADS,
            "dim_feedforward": mf.DIM_FEEDFORWARD,
            # One auxiliary loss per DEC_LAYERS: the learned queries give one prediction.
            "num_layers": mf.DEC_LAYERS - 1,
            "pre_norm": mf.PRE_NORM,
            "mask_dim": cfg.MODEL.SEM_SEG_HEAD.MASK_DIM,
            "enforce_input_project": mf.ENFORCE_INPUT_PROJ,
        }

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
        self, x: List[Tensor], mask_features: Tensor, mask: Optional[Tensor] = None
    ) -> Dict[str, Any]:
        """Predicts classes and masks.

        Args:
            x: three feature maps (B, in_channels, H_l, W_l), lowest resolution first.
            mask_features: (B, E, Hm, Wm) per-pixel embeddings.
            mask: ignored; padded pixels are not masked (as in the published model).

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
        sizes: List[Tuple[int, int]] = []
        memories, keys = [], []
        for lvl, feat in enumerate(x):
            sizes.append((feat.shape[-2], feat.shape[-1]))
            # The position encoding does not depend on the image: compute it for one.
            pos = _flatten(self.pe_layer(feat[:1]))  # (1, S_l, C)
            memory = self.input_proj[lvl](feat).flatten(2)  # (B, C, S_l)
            memory = _flatten(memory + self.level_embed.weight[lvl][:, None])  # (B, S_l, C)
            memories.append(memory)
            keys.append(memory + pos)  # keys carry the position encoding, values do not

        batch = mask_features.shape[0]
        query_pos = self.query_embed.weight.unsqueeze(0)  # (1, Q, C)
        output = self.query_feat.weight.unsqueeze(0).expand(batch, -1, -1)  # (B, Q, C)

        keep_all = self.training or self.aux_outputs_in_eval
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
                attn_mask = self._predict(
                    output.float() if fp32_heads else output, mask_features, keep_all or last,
                    None if last else i % self.num_feature_levels, sizes, level_mask_features,
                    logits, masks,
                )
            if last:
                break

        out: Dict[str, Any] = {
            "pred_masks": masks[-1],
            "aux_outputs": aux_predictions(logits if self.mask_classification else None, masks),
        }
        if self.mask_classification:
            out["pred_logits"] = logits[-1]
        return out


    def _predict(
        self,
        output: Tensor,
        mask_features: Tensor,
        keep: bool,
        next_level: Optional[int],
        sizes: List[Tuple[int, int]],
        level_mask_features: Dict[int, Tensor],
        logits: List[Tensor],
        masks: List[Tensor],
    ) -> Optional[Tensor]:
        """Decodes the queries ``output`` (B, Q, C): with ``keep`` appends the class logits
        and the mask logits to ``logits`` / ``masks``; returns the attention mask for the layer
        reading ``next_level`` (None for none). ``level_mask_features`` caches the mask features
        resized to a level."""
        decoded = self.decoder_norm(output)  # (B, Q, C)
        embed = self.mask_embed(decoded)  # (B, Q, E)
        mask_logits = None
        if keep:
            if self.mask_classification:
                logits.append(self.class_embed(decoded))  # (B, Q, K+1)
            mask_logits = torch.einsum("bqe,behw->bqhw", embed, mask_features)
            masks.append(mask_logits)  # (B, Q, Hm, Wm)
        if next_level is None:
            return None
        # Attention mask for the next layer, at the resolution of the level it reads.
        if mask_logits is not None:
            low = F.interpolate(
                mask_logits, size=sizes[next_level], mode="bilinear", align_corners=False
            )  # (B, Q, H_l, W_l)
        else:
            if next_level not in level_mask_features:
                level_mask_features[next_level] = _resize_per_channel(mask_features, sizes[next_level])
            low = torch.einsum("bqe,behw->bqhw", embed, level_mask_features[next_level])
        return _attention_mask(low)


def _attention_mask(mask_logits: Tensor) -> Tensor:
    """Masked-attention mask from mask logits (B, Q, h, w): bool (B, Q, h*w), True where
    the predicted probability is below 0.5, except for queries that would be fully
    blocked, which attend everywhere."""
    blocked = (mask_logits.detach().sigmoid() < 0.5).flatten(2)  # (B, Q, h*w)
    return blocked & ~blocked.all(dim=-1, keepdim=True)


def _resize_per_channel(x: Tensor, size: Tuple[int, int]) -> Tensor:
    """Bilinear resize (align_corners=False) of (B, E, H, W) to (B, E, *size).

    Resizing the channels as separate single-channel images gives the same values as
    ``F.interpolate(x, size)`` (up to rounding) without the full-size layout copy the CPU
    kernel makes for many-channel inputs.
    """
    if is_channels_last(x):
        # Channels-last is the layout the CPU kernel wants: no copy to avoid.
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    b, e = x.shape[:2]
    flat = x.reshape(b * e, 1, x.shape[-2], x.shape[-1])  # (B*E, 1, H, W)
    out = F.interpolate(flat, size=size, mode="bilinear", align_corners=False)
    return out.view(b, e, size[0], size[1])
