"""MaskFormer's transformer decoder: DETR's transformer on one feature map.

Shapes: B batch, Q queries, K classes (+1 = no-object), C channels (``hidden_dim``),
E mask-embedding channels (``mask_dim``), N decoder outputs, H/W spatial size of the
decoder input, Hm/Wm spatial size of the mask features (1/4 of the image).
"""

from typing import Any, Dict, Optional

import fvcore.nn.weight_init as weight_init
import torch
from detectron2.config import CfgNode, configurable
from detectron2.layers import Conv2d
from torch import Tensor, nn
from torch.nn import functional as F

from .build import TRANSFORMER_DECODER_REGISTRY
from .layers import MLP, aux_predictions
from .position_encoding import PositionEmbeddingSine
from .transformer import Transformer

__all__ = ["StandardTransformerDecoder"]


@TRANSFORMER_DECODER_REGISTRY.register()
class StandardTransformerDecoder(nn.Module):
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
        num_classes: int,
        hidden_dim: int,
        num_queries: int,
        num_heads: int,
        dropout: float,
        dim_feedforward: int,
        enc_layers: int,
        dec_layers: int,
        pre_norm: bool,
        deep_supervision: bool,
        mask_dim: int,
        enforce_input_project: bool,
        aux_outputs_in_eval: bool = False,
    ) -> None:
        """
        Args:
            in_channels: channels of the input feature map.
            mask_classification: predict class logits as well as masks.
            num_classes: number of classes K (the no-object class is added).
            hidden_dim: transformer channels C.
            num_queries: number of queries Q.
            num_heads: attention heads; must divide ``hidden_dim``.
            dropout: dropout probability inside the transformer.
            dim_feedforward: feed-forward width.
            enc_layers: transformer encoder layers (0 = none).
            dec_layers: transformer decoder layers (>= 1).
            pre_norm: pre-norm instead of post-norm layers.
            deep_supervision: also predict after every decoder layer (``aux_outputs``).
            mask_dim: channels E of the mask features.
            enforce_input_project: keep the 1x1 input projection even when
                ``in_channels == hidden_dim``.
            aux_outputs_in_eval: also compute the auxiliary predictions in eval mode.
        """
        super().__init__()
        if dec_layers < 1:
            raise ValueError(f"StandardTransformerDecoder needs dec_layers >= 1, got {dec_layers}")
        if hidden_dim % num_heads != 0:
            raise ValueError(f"hidden_dim={hidden_dim} is not divisible by num_heads={num_heads}")
        self.mask_classification = mask_classification
        self.num_queries = num_queries
        self.aux_loss = deep_supervision
        self.aux_outputs_in_eval = aux_outputs_in_eval

        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        self.transformer = Transformer(
            hidden_dim=hidden_dim,
            num_heads=num_heads,
            num_encoder_layers=enc_layers,
            num_decoder_layers=dec_layers,
            dim_feedforward=dim_feedforward,
            dropout=dropout,
            normalize_before=pre_norm,
            return_intermediate_dec=deep_supervision,
        )
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        if in_channels != hidden_dim or enforce_input_project:
            self.input_proj = Conv2d(in_channels, hidden_dim, kernel_size=1)
            weight_init.c2_xavier_fill(self.input_proj)
        else:
            self.input_proj = nn.Sequential()
        if mask_classification:
            self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    @classmethod
    def from_config(
        cls, cfg: CfgNode, in_channels: int, mask_classification: bool
    ) -> Dict[str, Any]:
        mf = cfg.MODEL.MASK_FORMER
        return {
            "in_channels": in_channels,
            "mask_classification": mask_classification,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "hidden_dim": mf.HIDDEN_DIM,
            "num_queries": mf.NUM_OBJECT_QUERIES,
            "num_heads": mf.NHEADS,
            "dropout": mf.DROPOUT,
            "dim_feedforward": mf.DIM_FEEDFORWARD,
            "enc_layers": mf.ENC_LAYERS,
            "dec_layers": mf.DEC_LAYERS,
            "pre_norm": mf.PRE_NORM,
            "deep_supervision": mf.DEEP_SUPERVISION,
            "mask_dim": cfg.MODEL.SEM_SEG_HEAD.MASK_DIM,
            "enforce_input_project": mf.ENFORCE_INPUT_PROJ,
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

        with_aux = self.aux_loss and (self.training or self.aux_outputs_in_eval)
        if not with_aux:
            hs = hs[-1:]
        logits = self.class_embed(hs) if self.mask_classification else None  # (N, B, Q, K+1)
        embeds = self.mask_embed(hs)  # (N, B, Q, E)
        masks = torch.einsum("nbqe,behw->nbqhw", embeds, mask_features)  # (N, B, Q, Hm, Wm)

        out: Dict[str, Any] = {"pred_masks": masks[-1]}
        if logits is not None:
            out["pred_logits"] = logits[-1]
        if self.aux_loss:
            out["aux_outputs"] = aux_predictions(logits, masks)
        return out
