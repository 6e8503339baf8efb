"""Large-scale-jitter (LSJ) mappers for COCO ("coco_instance_lsj", "coco_panoptic_lsj").

Shapes: S = INPUT.IMAGE_SIZE. Training outputs: image (3, S, S) uint8, padding_mask (S, S)
bool (True on padded pixels), instances with gt_classes (N,) int64, gt_masks (N, S, S) bool
and gt_boxes (N, 4) XYXY tight around the masks.
"""

from typing import List

from detectron2.config import CfgNode
from detectron2.data import transforms as T

from .instance import MaskFormerInstanceDatasetMapper
from .panoptic import MaskFormerPanopticDatasetMapper
from .utils import AugmentationLike

__all__ = [
    "COCOInstanceNewBaselineDatasetMapper",
    "COCOPanopticNewBaselineDatasetMapper",
    "lsj_augmentations",
]


def lsj_augmentations(cfg: CfgNode) -> List[AugmentationLike]:
    """Flip (per ``INPUT.RANDOM_FLIP``), random rescale and a fixed-size crop/pad.

    The image is rescaled so that it fits an ``IMAGE_SIZE`` square, times a random factor in
    [``MIN_SCALE``, ``MAX_SCALE``]; then an ``IMAGE_SIZE`` square is cropped at random, or
    the image is padded (bottom/right, image with 128) up to it.
    """
    if cfg.INPUT.RANDOM_FLIP not in ("none", "horizontal", "vertical"):
        raise ValueError(
            f"INPUT.RANDOM_FLIP={cfg.INPUT.RANDOM_FLIP!r}; expected 'none', 'horizontal' or "
            "'vertical'"
        )
    size = cfg.INPUT.IMAGE_SIZE
    augs: List[AugmentationLike] = []
    if cfg.INPUT.RANDOM_FLIP != "none":
        horizontal = cfg.INPUT.RANDOM_FLIP == "horizontal"
        augs.append(T.RandomFlip(horizontal=horizontal, vertical=not horizontal))
    augs.append(
        T.ResizeScale(
            min_scale=cfg.INPUT.MIN_SCALE,
            max_scale=cfg.INPUT.MAX_SCALE,
            target_height=size,
            target_width=size,
        )
    )
    augs.append(T.FixedSizeCrop(crop_size=(size, size)))
    return augs


class _LSJMixin:
    """Training with :func:`lsj_augmentations` and no ``size_divisibility`` (the crop already
    fixes the size); mixed in before a mapper class."""

    @classmethod
    def from_config(cls, cfg: CfgNode, is_train: bool = True) -> dict:
        ret = super().from_config(cfg, is_train)
        ret["size_divisibility"] = -1
        return ret

    @classmethod
    def train_augmentations(cls, cfg: CfgNode, ignore_label: int) -> List[AugmentationLike]:
        return lsj_augmentations(cfg)


class COCOInstanceNewBaselineDatasetMapper(_LSJMixin, MaskFormerInstanceDatasetMapper):
    """Instance mapper with LSJ augmentation (Mask2Former's COCO instance recipe).

    Same targets as :class:`MaskFormerInstanceDatasetMapper` (crowd dropped, masks from
    polygons, RLE or bitmasks, empty instances removed, ``gt_boxes`` from the masks), plus
    ``padding_mask``. ``size_divisibility`` is not used in training: the crop already fixes
    the size. With ``is_train=False`` it resizes like the evaluation mapper instead.
    """

    with_padding_mask = True


class COCOPanopticNewBaselineDatasetMapper(_LSJMixin, MaskFormerPanopticDatasetMapper):
    """Panoptic mapper with LSJ augmentation (Mask2Former's COCO panoptic recipe).

    Targets come from the panoptic PNG as in :class:`MaskFormerPanopticDatasetMapper` (crowd
    dropped, segments cropped away removed), with ``gt_boxes`` from the masks and
    ``padding_mask``. ``sem_seg_file_name`` is ignored, as in the published mapper.
    """

    with_boxes = True
    with_padding_mask = True
    use_sem_seg_file = False
