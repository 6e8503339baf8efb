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


def build_transformer_decoder(
    cfg: CfgNode, in_channels: int, mask_classification: bool = True
) -> nn.Module:
    """Builds the transformer decoder named by ``MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME``."""
    name = cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME
    if name not in TRANSFORMER_DECODER_REGISTRY:
        known = sorted(k for k, _ in TRANSFORMER_DECODER_REGISTRY)
        raise KeyError(
            f"MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME={name!r} is not a registered transformer "
            f"decoder; expected one of {known}"
        )
    return TRANSFORMER_DECODER_REGISTRY.get(name)(cfg, in_channels, mask_classification)
