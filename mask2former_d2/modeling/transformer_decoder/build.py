"""Registry of transformer decoders, selected by ``MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME``."""
from detectron2.config import CfgNode
from detectron2.utils.registry import Registry
from torch import nn

# The published project calls this registry "TRANSFORMER_MODULE"; the name is kept.
TRANSFORMER_DECODER_REGISTRY = Registry("TRANSFORMER_MODULE")
TRANSFORMER_DECODER_REGISTRY.__doc__ = """
Transformer decoders turn queries and pixel-decoder features into class and mask
predictions. A registered class is built as
``cls(cfg, in_channels, mask_classification)`` and is called as
``decoder(x, mask_features, mask)`` returning a dict with ``pred_logits``,
``pred_masks`` and ``aux_outputs``.
"""


# (pixel decoder, transformer decoder) named together in a config -> the decoder built. PEM's
# published code registers its own decoder under Mask2Former's name, so PEM's YAML files name
# "MultiScaleMaskedTransformerDecoder"; they are recognised by PEM's pixel decoder.
DECODER_FOR_PIXEL_DECODER = {
    ("PEM_Pixel_Decoder", "MultiScaleMaskedTransformerDecoder"): "PEMTransformerDecoder",
}


def transformer_decoder_name(cfg: CfgNode) -> str:
    """The registered name of the transformer decoder ``cfg`` builds:
    ``MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME``, unless ``DECODER_FOR_PIXEL_DECODER`` maps
    it together with ``MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME`` to another decoder."""
    name = cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME
    return DECODER_FOR_PIXEL_DECODER.get((cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME, name), name)


def build_transformer_decoder(
    cfg: CfgNode, in_channels: int, mask_classification: bool = True
) -> nn.Module:
    """Builds the transformer decoder named by ``MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME``
    (see :func:`transformer_decoder_name`)."""
    name = transformer_decoder_name(cfg)
    if name not in TRANSFORMER_DECODER_REGISTRY:
        known = sorted(k for k, _ in TRANSFORMER_DECODER_REGISTRY)
        raise KeyError(
            f"MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME={name!r} is not a registered transformer "
            f"decoder; expected one of {known}"
        )
    return TRANSFORMER_DECODER_REGISTRY.get(name)(cfg, in_channels, mask_classification)
