"""Mask2Former-VIS's transformer decoder: the image decoder over a clip of T frames.

Shapes: B clips, T frames per clip, Q queries (one track each), K classes (+1 = no-object),
C channels, E mask-embedding channels, H_l/W_l the size of feature level l, Hm/Wm the size of
the mask features. Frames arrive flattened into the batch, clip-major: (B*T, C, H_l, W_l).
"""
from typing import Any, Dict, Tuple

import torch
from detectron2.config import CfgNode, configurable
from torch import Tensor

from ...layers.position_encoding import PositionEmbeddingSine3D
from ..transformer_decoder.build import TRANSFORMER_DECODER_REGISTRY
from ..transformer_decoder.mask2former import MultiScaleMaskedTransformerDecoder

__all__ = ["VideoMultiScaleMaskedTransformerDecoder"]


@TRANSFORMER_DECODER_REGISTRY.register()
class VideoMultiScaleMaskedTransformerDecoder(MultiScaleMaskedTransformerDecoder):
    """:class:`MultiScaleMaskedTransformerDecoder` with one set of queries per clip.

    Each level's memory holds every frame of the clip (T*H_l*W_l keys, frame-major) with a 3-D
    sine position encoding; mask logits are (B, Q, T, Hm, Wm) and each frame's logits, resized to
    the level, give that frame's part of the attention mask. The sub-modules and parameter names
    are the image decoder's, so image (e.g. COCO instance) checkpoints load unchanged.

    In training the batch holds ``num_frames`` frames per clip (``INPUT.SAMPLING_FRAME_NUM``);
    in eval it is one clip of any length, as in the published model.
    """

    position_encoding = PositionEmbeddingSine3D

    @configurable
    def __init__(self, in_channels: int, mask_classification: bool = True, *, num_frames: int, **kwargs: Any):
        """
        Args:
            num_frames: frames per clip of a training batch.
            in_channels, mask_classification, kwargs: as for
                :class:`MultiScaleMaskedTransformerDecoder`.
        """
        super().__init__(in_channels, mask_classification, **kwargs)
        if num_frames < 1:
            raise ValueError(f"INPUT.SAMPLING_FRAME_NUM must be >= 1, got {num_frames}")
        self.num_frames = num_frames

    @classmethod
    def from_config(cls, cfg: CfgNode, in_channels: int, mask_classification: bool) -> Dict[str, Any]:
        ret = super().from_config(cfg, in_channels, mask_classification)
        ret["num_frames"] = cfg.INPUT.SAMPLING_FRAME_NUM
        return ret

    def _clip_layout(self, mask_features: Tensor) -> Tuple[int, int]:
        frames_total = mask_features.shape[0]
        if not self.training:
            return 1, frames_total
        if frames_total % self.num_frames:
            raise ValueError(
                f"{type(self).__name__}: a training batch of {frames_total} frames is not a whole "
                f"number of {self.num_frames}-frame clips (INPUT.SAMPLING_FRAME_NUM)"
            )
        return frames_total // self.num_frames, self.num_frames

    def _memory_position(self, feat: Tensor, frames: int) -> Tensor:
        pos = self.pe_layer(feat[:frames][None])  # (1, T, C, H_l, W_l)
        return pos.permute(0, 1, 3, 4, 2).flatten(1, 3)  # (1, T*H_l*W_l, C)

    def _mask_logits(self, embed: Tensor, mask_features: Tensor) -> Tensor:
        """(B, Q, T, Hm, Wm) from (B, Q, E) embeddings and (B*T, E, Hm, Wm) features."""
        clip_features = mask_features.unflatten(0, (embed.shape[0], -1))  # (B, T, E, Hm, Wm)
        return torch.einsum("bqe,btehw->bqthw", embed, clip_features)
