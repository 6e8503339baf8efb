"""Registry of pixel decoders, selected by ``MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME``."""
from typing import Any, Dict

from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from detectron2.utils.registry import Registry
from torch import nn

PIXEL_DECODER_REGISTRY = Registry("PIXEL_DECODER")
PIXEL_DECODER_REGISTRY.__doc__ = """
Pixel decoders turn backbone features into per-pixel mask features and the
multi-scale features read by the transformer decoder. A registered class is
built as ``cls(cfg, input_shape)`` and implements
``forward_features(features) -> (mask_features, transformer_encoder_features, multi_scale_features)``.
"""


def common_decoder_args(cfg: CfgNode, input_shape: Dict[str, ShapeSpec]) -> Dict[str, Any]:
    """The ``from_config`` arguments every convolutional pixel decoder reads from
    ``MODEL.SEM_SEG_HEAD``: its input features (filtered by ``IN_FEATURES``), widths and norm."""
    head = cfg.MODEL.SEM_SEG_HEAD
    return {
        "input_shape": {k: v for k, v in input_shape.items() if k in head.IN_FEATURES},
        "conv_dim": head.CONVS_DIM,
        "mask_dim": head.MASK_DIM,
        "norm": head.NORM,
    }


def build_pixel_decoder(cfg: CfgNode, input_shape: Dict[str, ShapeSpec]) -> nn.Module:
    """Builds the pixel decoder named by ``MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME``.

    Decoders registered in Detectron2's ``SEM_SEG_HEADS_REGISTRY`` (where the published
    project registers them) are found too, so users' own decoders keep working.
    """
    name = cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME
    if name in PIXEL_DECODER_REGISTRY:
        cls = PIXEL_DECODER_REGISTRY.get(name)
    elif name in SEM_SEG_HEADS_REGISTRY:
        cls = SEM_SEG_HEADS_REGISTRY.get(name)
    else:
        known = sorted(k for k, _ in PIXEL_DECODER_REGISTRY)
        raise KeyError(
            f"MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME={name!r} is not a registered pixel decoder; "
            f"expected one of {known}"
        )
    model = cls(cfg, input_shape)
    if not callable(getattr(model, "forward_features", None)):
        raise ValueError(
            f"pixel decoder {name!r} has no forward_features(features) method; "
            "MaskFormerHead needs (mask_features, transformer_encoder_features, multi_scale_features)"
        )
    return model
