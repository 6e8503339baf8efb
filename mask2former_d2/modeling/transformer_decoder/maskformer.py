"""MaskFormer's transformer decoder: DETR's transformer on one feature map.

Shapes: B batch, Q queries, K classes (+1 = no-object), C channels (``hidden_dim``),
E mask-embedding channels (``mask_dim``), N decoder outputs, H/W spatial size of the
decoder input, Hm/Wm spatial size of the mask features (1/4 of the image).
"""

from typing import Any, Dict, Optional

import torch
from detectron2.config import CfgNode, configurable
from torch import Tensor, nn
from torch.nn import functional as F

from ...layers.attention import input_projection
from ...layers.detr_transformer import Transformer
from ...layers.position_encoding import PositionEmbeddingSine
from .build import TRANSFORMER_DECODER_REGISTRY
from .heads import QueryHeadsMixin, check_num_heads

__all__ = ["StandardTransformerDecoder"]


@TRANSFORMER_DECODER_REGISTRY.register()
class StandardTransformerDecoder(QueryHeadsMixin, nn.Module):
    """Decodes learned queries with a DETR transformer and predicts a class and a mask each.

    In eval mode only the last decoder layer's masks are computed (the auxiliary
    predictions serve the training losses) unless ``aux_outputs_in_eval`` is set.
    """

    @configurable
    def __init__(
        self,
        in_channels: int,
        mask_classification: bool = True,
        *,
        num_classes: int, hidden_dim: int, num_queries: int, num_heads: int, dropout: float,
        dim_feedforward: int, enc_layers: int, dec_layers: int, pre_norm: bool,
        deep_supervision: bool, mask_dim: int, enforce_input_project: bool,
        aux_outputs_in_eval: bool = False,
    ) -> None:
        """
        Args:
            in_channels, mask_classification, num_classes, hidden_dim, num_queries, num_heads,
                dim_feedforward, pre_norm, mask_dim, enforce_input_project: as filled by
                :func:`.heads.decoder_config`.
            dropout: dropout probability inside the transformer.
            enc_layers: transformer encoder layers (0 = none).
            dec_layers: transformer decoder layers (>= 1).
            deep_supervision: also predict after every decoder layer (``aux_outputs``).
            aux_outputs_in_eval: also compute the auxiliary predictions in eval mode.
        """
        super().__init__()
        check_num_heads(hidden_dim, num_heads)
        if dec_layers < 1:
            raise ValueError(f"StandardTransformerDecoder needs dec_layers >= 1, got {dec_layers}")
        self.num_queries, self.deep_supervision = num_queries, deep_supervision
        self.aux_outputs_in_eval = aux_outputs_in_eval

        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        self.transformer = Transformer(
            hidden_dim, num_heads, enc_layers, dec_layers, dim_feedforward, dropout,
            normalize_before=pre_norm, return_intermediate_dec=deep_supervision,
        )
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.input_proj = input_projection(in_channels, hidden_dim, enforce_input_project)
        self._init_query_heads(hidden_dim, num_classes, mask_dim, mask_classification)

    @staticmethod
    def _own_config(mf: CfgNode) -> Dict[str, Any]:
        return {
            "dropout": mf.DROPOUT,
            "enc_layers": mf.ENC_LAYERS,
            "dec_layers": mf.DEC_LAYERS,
            "deep_supervision": mf.DEEP_SUPERVISION,
        }

    def forward(
        self, x: Tensor, mask_features: Tensor, mask: Optional[Tensor] = None
    ) -> Dict[str, Any]:
        """Predicts classes and masks.

        Args:
            x: (B, in_channels, H, W) decoder input.
            mask_features: (B, E, Hm, Wm) per-pixel embeddings.
            mask: optional bool padding mask (B, Hi, Wi), True = padding; resized to (H, W).

        Returns:
            ``pred_logits`` (B, Q, K+1) (only with mask classification), ``pred_masks``
            (B, Q, Hm, Wm) and, with deep supervision, ``aux_outputs``: a list with the same
            keys for every decoder layer but the last (empty in eval mode unless
            ``aux_outputs_in_eval``).
        """
        if mask is not None:
            mask = F.interpolate(mask[None].float(), size=x.shape[-2:]).to(torch.bool)[0]
            pos = self.pe_layer(x, mask)  # (B, C, H, W)
        else:
            pos = self.pe_layer(x[:1])  # (1, C, H, W): the same for every image
        hs, _ = self.transformer(self.input_proj(x), mask, self.query_embed.weight, pos)
        # hs: (N, B, Q, C)

        with_aux = self.deep_supervision and (self.training or self.aux_outputs_in_eval)
        if not with_aux:
            hs = hs[-1:]
        logits = self.class_embed(hs) if self.mask_classification else None  # (N, B, Q, K+1)
        embeds = self.mask_embed(hs)  # (N, B, Q, E)
        masks = torch.einsum("nbqe,behw->nbqhw", embeds, mask_features)  # (N, B, Q, Hm, Wm)

        out = self._pack_predictions(logits, masks, with_aux=with_aux)
        if self.deep_supervision and not with_aux:
            # No op on the empty rest of the layers (an exported program with an unbind into no
            # outputs does not reload).
            out["aux_outputs"] = []
        return out
