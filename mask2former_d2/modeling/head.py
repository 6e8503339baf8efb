"""MaskFormerHead: a pixel decoder followed by a transformer decoder."""
import logging
from typing import Any, Dict, List, Optional, Tuple

from detectron2.config import CfgNode, configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from torch import Tensor, nn

from .pixel_decoder.build import build_pixel_decoder
from .transformer_decoder.build import build_transformer_decoder

logger = logging.getLogger(__name__)

# Values of MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE that name a pixel-decoder output rather
# than a backbone feature.
_DECODER_INPUTS = ("multi_scale_pixel_decoder", "transformer_encoder", "pixel_embedding")


@SEM_SEG_HEADS_REGISTRY.register()
class MaskFormerHead(nn.Module):
    """Pixel decoder + transformer decoder, returning per-query class and mask predictions.

    The head's state_dict layout is ``pixel_decoder.*`` and ``predictor.*`` (version 2).
    Checkpoints of the first MaskFormer release kept the pixel decoder's weights directly
    under the head (version 1); they are renamed on load.
    """

    _version = 2

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        num_classes: int,
        pixel_decoder: nn.Module,
        transformer_predictor: nn.Module,
        transformer_in_feature: str,
    ) -> None:
        """
        Args:
            input_shape: the backbone features the head reads, with their shapes.
            num_classes: number of categories (without no-object).
            pixel_decoder: module with ``forward_features(features)``.
            transformer_predictor: the transformer decoder.
            transformer_in_feature: what the transformer decoder reads, one of
                ``multi_scale_pixel_decoder``, ``transformer_encoder``, ``pixel_embedding``
                or a backbone feature name from ``input_shape``.
        """
        super().__init__()
        if transformer_in_feature not in _DECODER_INPUTS and transformer_in_feature not in input_shape:
            raise ValueError(
                f"MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE={transformer_in_feature!r}: expected one of "
                f"{list(_DECODER_INPUTS)} or a backbone feature in {sorted(input_shape)}"
            )
        self.num_classes = num_classes
        self.pixel_decoder = pixel_decoder
        self.predictor = transformer_predictor
        self.transformer_in_feature = transformer_in_feature

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape: Dict[str, ShapeSpec]) -> Dict[str, Any]:
        head_cfg = cfg.MODEL.SEM_SEG_HEAD
        in_feature = cfg.MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE
        missing = [k for k in head_cfg.IN_FEATURES if k not in input_shape]
        if missing:
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.IN_FEATURES names {missing}, which the backbone does not "
                f"produce; it produces {sorted(input_shape)}"
            )
        if in_feature in ("transformer_encoder", "multi_scale_pixel_decoder"):
            predictor_channels = head_cfg.CONVS_DIM
        elif in_feature == "pixel_embedding":
            predictor_channels = head_cfg.MASK_DIM
        elif in_feature in input_shape:
            predictor_channels = input_shape[in_feature].channels
        else:
            raise ValueError(
                f"MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE={in_feature!r}: expected one of "
                f"{list(_DECODER_INPUTS)} or a backbone feature in {sorted(input_shape)}"
            )
        return {
            "input_shape": {k: v for k, v in input_shape.items() if k in head_cfg.IN_FEATURES},
            "num_classes": head_cfg.NUM_CLASSES,
            "pixel_decoder": build_pixel_decoder(cfg, input_shape),
            "transformer_predictor": build_transformer_decoder(
                cfg, predictor_channels, mask_classification=True
            ),
            "transformer_in_feature": in_feature,
        }

    def _load_from_state_dict(
        self, state_dict: Dict[str, Tensor], prefix: str, local_metadata: Dict[str, Any],
        strict: bool, missing_keys: List[str], unexpected_keys: List[str], error_msgs: List[str],
    ) -> None:
        version = local_metadata.get("version", None)
        if version is None or version < 2:
            # Version-1 checkpoints hold pixel-decoder weights directly under the head. Without
            # version metadata (e.g. model-zoo .pkl files) the keys may well be in the new layout
            # already: only keys in neither sub-module are moved.
            keep = (prefix + "pixel_decoder.", prefix + "predictor.")
            old = [k for k in state_dict if k.startswith(prefix) and not k.startswith(keep)]
            for k in old:
                state_dict[prefix + "pixel_decoder." + k[len(prefix) :]] = state_dict.pop(k)
            if old:
                msg = "%s: moved %d version-1 keys under %spixel_decoder.; re-save the checkpoint to upgrade it"
                logger.warning(msg, type(self).__name__, len(old), prefix)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, features: Dict[str, Tensor], mask: Optional[Tensor] = None) -> Dict[str, Any]:
        """
        Args:
            features: backbone features by name.
            mask: optional padding mask passed to the transformer decoder.

        Returns:
            the transformer decoder's dict: ``pred_logits`` (B, Q, K+1), ``pred_masks``
            (B, Q, H/4, W/4) and ``aux_outputs``.
        """
        x, mask_features = self.decoder_inputs(features)
        return self.predictor(x, mask_features, mask)

    def decoder_inputs(self, features: Dict[str, Tensor]) -> Tuple[Any, Tensor]:
        """Runs the pixel decoder: ``(x, mask_features)``, what the transformer decoder reads
        (a list of feature maps or one map, per ``transformer_in_feature``) and the
        (B, MASK_DIM, H/4, W/4) per-pixel embeddings. Every image of the batch is independent
        here, so a batch may be processed in parts."""
        mask_features, encoder_features, multi_scale_features = self.pixel_decoder.forward_features(
            features
        )
        source = self.transformer_in_feature
        if source == "multi_scale_pixel_decoder":
            x = multi_scale_features
        elif source == "transformer_encoder":
            if encoder_features is None:
                raise ValueError(
                    "TRANSFORMER_IN_FEATURE='transformer_encoder' needs a pixel decoder with a "
                    f"transformer encoder; {type(self.pixel_decoder).__name__} returned none "
                    "(use TransformerEncoderPixelDecoder)"
                )
            x = encoder_features
        elif source == "pixel_embedding":
            x = mask_features
        else:
            x = features[source]
        return x, mask_features
