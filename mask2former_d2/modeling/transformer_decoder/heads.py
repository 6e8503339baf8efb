"""Pieces shared by the query decoders (MaskFormer's and Mask2Former's).

Shapes: B batch, Q queries, K classes (+1 = no-object), C channels (``hidden_dim``),
E mask-embedding channels (``mask_dim``).
"""

from typing import Any, Dict, List, Optional, Sequence

from detectron2.config import CfgNode
from torch import Tensor, nn

from ...layers.attention import MLP

__all__ = ["QueryHeadsMixin", "aux_predictions", "check_num_heads", "decoder_config"]


def check_num_heads(hidden_dim: int, num_heads: int) -> None:
    """Raises ValueError unless ``num_heads`` divides ``hidden_dim``."""
    if num_heads < 1 or hidden_dim % num_heads != 0:
        raise ValueError(f"hidden_dim={hidden_dim} is not divisible by num_heads={num_heads}")


def decoder_config(cfg: CfgNode, in_channels: int, mask_classification: bool) -> Dict[str, Any]:
    """The constructor arguments both query decoders read from ``cfg``.

    Args of the decoders they fill:
        in_channels: channels of the input features.
        mask_classification: predict class logits as well as masks.
        num_classes: number of classes K (the no-object class is added).
        hidden_dim: transformer channels C.
        num_queries: number of queries Q.
        num_heads: attention heads; must divide ``hidden_dim``.
        dim_feedforward: feed-forward width.
        pre_norm: pre-norm instead of post-norm layers.
        mask_dim: channels E of the mask features.
        enforce_input_project: keep the 1x1 input projection(s) even when
            ``in_channels == hidden_dim``.
    """
    mf = cfg.MODEL.MASK_FORMER
    return {
        "in_channels": in_channels,
        "mask_classification": mask_classification,
        "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
        "hidden_dim": mf.HIDDEN_DIM,
        "num_queries": mf.NUM_OBJECT_QUERIES,
        "num_heads": mf.NHEADS,
        "dim_feedforward": mf.DIM_FEEDFORWARD,
        "pre_norm": mf.PRE_NORM,
        "mask_dim": cfg.MODEL.SEM_SEG_HEAD.MASK_DIM,
        "enforce_input_project": mf.ENFORCE_INPUT_PROJ,
    }


class QueryHeadsMixin:
    """The prediction heads of a query decoder (an ``nn.Module`` mixin).

    ``from_config`` reads the shared constructor arguments and the decoder's own
    (``_own_config``). ``_init_query_heads`` registers ``class_embed`` (a linear layer to
    K+1 logits, only with mask classification) and ``mask_embed`` (a 3-layer MLP to E
    channels), the checkpoint names. ``_pack_predictions`` turns per-layer predictions into
    the decoder output dict.
    """

    @classmethod
    def from_config(cls, cfg: CfgNode, in_channels: int, mask_classification: bool) -> Dict[str, Any]:
        """:func:`decoder_config` plus the decoder's own arguments (``_own_config``)."""
        ret = decoder_config(cfg, in_channels, mask_classification)
        ret.update(cls._own_config(cfg.MODEL.MASK_FORMER))
        return ret

    @staticmethod
    def _own_config(mf: CfgNode) -> Dict[str, Any]:
        """The constructor arguments only this decoder reads from ``cfg.MODEL.MASK_FORMER``."""
        return {}

    def _init_query_heads(
        self, hidden_dim: int, num_classes: int, mask_dim: int, mask_classification: bool
    ) -> None:
        self.mask_classification = mask_classification
        if mask_classification:
            self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    @staticmethod
    def _pack_predictions(
        logits: Optional[Sequence[Tensor]], masks: Sequence[Tensor], with_aux: bool = True
    ) -> Dict[str, Any]:
        """``pred_masks`` (and ``pred_logits`` when ``logits`` is given) from the last entry;
        with ``with_aux``, ``aux_outputs`` from the others.

        Args:
            logits: per-layer (B, Q, K+1) class logits, or None without mask classification.
            masks: per-layer (B, Q, Hm, Wm) mask logits.
            with_aux: add the ``aux_outputs`` list.
        """
        out: Dict[str, Any] = {"pred_masks": masks[-1]}
        if logits is not None:
            out["pred_logits"] = logits[-1]
        if with_aux:
            out["aux_outputs"] = aux_predictions(logits, masks)
        return out


def aux_predictions(
    logits: Optional[Sequence[Tensor]], masks: Sequence[Tensor]
) -> List[Dict[str, Tensor]]:
    """Packs all but the last of a sequence of per-layer predictions into the
    ``aux_outputs`` list of dicts (``pred_logits`` only when ``logits`` is given)."""
    if logits is None:
        return [{"pred_masks": m} for m in masks[:-1]]
    if len(logits) != len(masks):
        raise ValueError(f"got {len(logits)} class predictions but {len(masks)} mask predictions")
    return [{"pred_logits": c, "pred_masks": m} for c, m in zip(logits[:-1], masks[:-1])]
