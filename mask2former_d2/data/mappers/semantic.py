"""Mapper for semantic segmentation datasets ("mask_former_semantic").

Shapes: H/W size of the augmented, padded image; K classes present in the image (ignore
excluded). Outputs: image (3, H, W) uint8, sem_seg (H, W) int64, instances with gt_classes
(K,) int64 and gt_masks (K, H, W) bool (one binary mask per class present).
"""

from typing import Any, Dict, List

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import transforms as T

from .utils import AugmentationLike, MaskFormerMapperBase, pad_to_multiple

__all__ = ["MaskFormerSemanticDatasetMapper"]


class MaskFormerSemanticDatasetMapper(MaskFormerMapperBase):
    """Turns a semantic-segmentation dataset dict into MaskFormer training inputs.

    Reads ``file_name`` and ``sem_seg_file_name`` (a single-channel PNG of contiguous class
    ids, ``ignore_label`` for unlabeled pixels), applies the augmentations to both, pads them
    to ``size_divisibility`` (image with 128, labels with ``ignore_label``) and turns every class
    present into one binary mask.

    The returned dict is a copy of the input without ``sem_seg_file_name`` plus:

    * ``image``: (3, H, W) uint8 tensor in ``image_format`` channel order;
    * ``sem_seg``: (H, W) int64 tensor;
    * ``instances``: ``Instances`` with ``gt_classes`` (K,) int64 and ``gt_masks`` (K, H, W)
      bool, classes in increasing order.

    With ``is_train=False`` the ground truth is optional: a dict without
    ``sem_seg_file_name`` yields only ``image``.

    Unlike the published mapper, padding goes up to the next multiple of
    ``size_divisibility`` (the published one pads to exactly ``size_divisibility`` and would
    crop larger images); both agree for the published configs, whose crop size equals it.
    """

    @classmethod
    def train_augmentations(cls, cfg: CfgNode, ignore_label: int) -> List[AugmentationLike]:
        """Shortest-edge resize, optional category-area-constrained crop, colour aug, flip."""
        crop = cfg.INPUT.CROP
        return cls.resize_crop_flip(
            cfg,
            T.RandomCrop_CategoryAreaConstraint(
                crop.TYPE, crop.SIZE, crop.SINGLE_CATEGORY_MAX_AREA, ignore_label
            ),
        )

    def __call__(self, dataset_dict: Dict[str, Any]) -> Dict[str, Any]:
        """Maps one dataset dict (see the class docstring for the output keys)."""
        dataset_dict, image, image_file = self._start(dataset_dict)
        sem_seg_file = dataset_dict.pop("sem_seg_file_name", None)
        if sem_seg_file is None:
            if "annotations" in dataset_dict:
                raise ValueError(
                    f"{image_file}: the dict has instance 'annotations' but no "
                    "'sem_seg_file_name'; use INPUT.DATASET_MAPPER_NAME 'mask_former_instance'"
                )
            self._missing_ground_truth(dataset_dict, "sem_seg_file_name")
            return self._image_only(dataset_dict, image)

        original_hw = image.shape[:2]
        sem_seg = self._read_sem_seg(sem_seg_file, image_file, original_hw)
        image, sem_seg, transforms = self._augment(image, sem_seg)
        image_hw = self._finish(dataset_dict, image, transforms, original_hw)

        sem_seg_t = pad_to_multiple(
            torch.as_tensor(sem_seg.astype(np.int64)), self.size_divisibility, self.ignore_label
        )
        dataset_dict["sem_seg"] = sem_seg_t

        classes = torch.unique(sem_seg_t)  # sorted
        classes = classes[classes != self.ignore_label]
        masks = sem_seg_t[None] == classes[:, None, None]  # (K, H, W)
        dataset_dict["instances"] = self._instances(image_hw, classes, masks)
        return dataset_dict
