"""Mapper for panoptic segmentation datasets ("mask_former_panoptic").

Shapes: H0/W0 size on disk, H/W size of the augmented, padded image, N non-crowd segments
that survive augmentation. Outputs: image (3, H, W) uint8, instances with gt_classes (N,)
int64 and gt_masks (N, H, W) bool, and sem_seg (H, W) int64 when the dict names a semantic
label file.
"""

from typing import Any, Dict, List, Optional

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import transforms as T

from .semantic import MaskFormerSemanticDatasetMapper
from .utils import (
    VOID_SEGMENT_ID,
    check_same_size,
    pad_to_multiple,
    panoptic_to_semantic,
    read_image_file,
    rgb2id,
)

__all__ = ["MaskFormerPanopticDatasetMapper", "DETRPanopticDatasetMapper"]


class MaskFormerPanopticDatasetMapper(MaskFormerSemanticDatasetMapper):
    """Turns a COCO-style panoptic dataset dict into MaskFormer training inputs.

    Expects ``pan_seg_file_name`` (an RGB PNG whose pixels encode segment ids as
    R + 256 G + 256^2 B) and ``segments_info`` (dicts with ``id``, contiguous ``category_id``
    and ``iscrowd``), and optionally ``sem_seg_file_name``. Uses the augmentations of the
    semantic mapper. Each non-crowd segment becomes one target mask; crowd segments are
    dropped, as are segments that augmentation (cropping) removed entirely. Padding fills
    the image with 128, the segment ids with 0 (void) and ``sem_seg`` with ``ignore_label``.

    The returned dict is a copy of the input without the ``*_file_name`` annotation keys and
    ``annotations`` plus ``image``, ``instances`` and, if the input named a semantic label
    file, ``sem_seg``. When the dict has no semantic file but an augmentation needs a label
    map (the category-area-constrained crop), one is derived from the panoptic PNG.

    With ``is_train=False`` the ground truth is optional: a dict without
    ``pan_seg_file_name`` yields only ``image`` (and ``sem_seg`` if it names one).
    """

    # Whether sem_seg_file_name is read and returned as "sem_seg" (the LSJ mapper skips it).
    use_sem_seg_file: bool = True

    def _segments(self, dataset_dict: Dict[str, Any], pan_seg_file: str) -> List[Dict[str, Any]]:
        """Validated ``segments_info`` of the dict."""
        segments = dataset_dict.get("segments_info")
        if segments is None:
            raise ValueError(
                f"{pan_seg_file}: dataset dict has 'pan_seg_file_name' but no 'segments_info'"
            )
        for segment in segments:
            if "id" not in segment or "category_id" not in segment:
                raise ValueError(
                    f"{pan_seg_file}: every segments_info entry needs 'id' and 'category_id'; "
                    f"got {segment}"
                )
        self._check_class_ids((s["category_id"] for s in segments), pan_seg_file)
        return segments

    def __call__(self, dataset_dict: Dict[str, Any]) -> Dict[str, Any]:
        """Maps one dataset dict (see the class docstring for the output keys)."""
        dataset_dict, image, image_file = self._start(dataset_dict)
        original_hw = image.shape[:2]
        pan_seg_file: Optional[str] = dataset_dict.pop("pan_seg_file_name", None)
        sem_seg_file: Optional[str] = dataset_dict.pop("sem_seg_file_name", None)
        if not self.use_sem_seg_file:
            sem_seg_file = None
        # The panoptic PNG is the ground truth; per-instance annotations would be redundant.
        dataset_dict.pop("annotations", None)

        if pan_seg_file is None:
            self._missing_ground_truth(dataset_dict, "pan_seg_file_name")
            if sem_seg_file is None:
                return self._image_only(dataset_dict, image)
            # Evaluation with only semantic labels: behave like the semantic mapper.
            dataset_dict["sem_seg_file_name"] = sem_seg_file
            return super().__call__(dataset_dict)

        segments = self._segments(dataset_dict, pan_seg_file)
        pan_rgb = read_image_file(pan_seg_file, "RGB")  # (H0, W0, 3) uint8
        check_same_size(pan_seg_file, pan_rgb.shape[:2], image_file, original_hw)

        if sem_seg_file is not None:
            sem_seg = self._read_sem_seg(sem_seg_file, image_file, original_hw)
        elif self._augs_need_sem_seg:
            sem_seg = panoptic_to_semantic(rgb2id(pan_rgb), segments, self.ignore_label)
        else:
            sem_seg = None

        image, sem_seg, transforms = self._augment(image, sem_seg)
        # RGB-encoded ids survive nearest-neighbour resizing, flips, crops and padding
        # (FixedSizeCrop pads with 255, i.e. id 256^3 - 1, which no segment uses).
        segment_ids = rgb2id(transforms.apply_segmentation(pan_rgb))  # (H, W)
        image_hw = self._finish(dataset_dict, image, transforms, original_hw)

        if sem_seg_file is not None:
            dataset_dict["sem_seg"] = pad_to_multiple(
                torch.as_tensor(sem_seg.astype(np.int64)), self.size_divisibility, self.ignore_label
            )

        ids_t = pad_to_multiple(
            torch.as_tensor(segment_ids.astype(np.int64)), self.size_divisibility, VOID_SEGMENT_ID
        )
        kept = [s for s in segments if not s.get("iscrowd", 0)]
        seg_ids = torch.tensor([s["id"] for s in kept], dtype=torch.int64)
        classes = torch.tensor([s["category_id"] for s in kept], dtype=torch.int64)
        masks = ids_t[None] == seg_ids[:, None, None]  # (N, H, W)
        dataset_dict["instances"] = self._instances(image_hw, classes, masks)
        return dataset_dict


class _OneOf(T.Augmentation):
    """Applies one of several augmentation pipelines, chosen uniformly at random."""

    def __init__(self, *pipelines: List[T.Augmentation]) -> None:
        super().__init__()
        self.pipelines = [T.AugmentationList(p) for p in pipelines]

    def __call__(self, aug_input: T.AugInput) -> T.Transform:
        return self.pipelines[np.random.randint(len(self.pipelines))](aug_input)


class DETRPanopticDatasetMapper(MaskFormerPanopticDatasetMapper):
    """"detr_panoptic" (MaskFormer's COCO panoptic configs): DETR's augmentation — flip, then
    either a shortest-edge resize, or a resize to 400-600 + random crop + shortest-edge resize."""

    @classmethod
    def train_augmentations(cls, cfg: CfgNode, ignore_label: int) -> List[T.Augmentation]:
        resize = T.ResizeShortestEdge(
            cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
        )
        if not cfg.INPUT.CROP.ENABLED:
            return [T.RandomFlip(), resize]
        crop = [
            T.ResizeShortestEdge([400, 500, 600], sample_style="choice"),
            T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE),
            resize,
        ]
        return [T.RandomFlip(), _OneOf([resize], crop)]
