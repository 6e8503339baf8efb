"""Mapper for instance segmentation datasets in COCO format ("mask_former_instance").

Shapes: H0/W0 size on disk, H/W size of the augmented, padded image, N non-crowd instances
whose mask is not empty after augmentation. Outputs: image (3, H, W) uint8, instances with
gt_classes (N,) int64, gt_masks (N, H, W) bool and gt_boxes (N, 4) XYXY tight around the masks.
"""

import importlib.util
import logging
from typing import Any, Dict, List, Sequence

import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.config import CfgNode
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BoxMode
from detectron2.utils.logger import log_first_n

from ..datasets.utils import compressed_rle
from .utils import AugmentationLike, MaskFormerMapperBase, pad_to_multiple

__all__ = ["MaskFormerInstanceDatasetMapper"]

# Detectron2 crops polygons with shapely; without it, polygons are rasterised before cropping.
_HAS_SHAPELY = importlib.util.find_spec("shapely") is not None


def _polygons_to_rle(polygons: List[List[float]], height: int, width: int) -> Dict[str, Any]:
    """Compressed RLE of the union of ``polygons`` (an empty list gives an empty mask)."""
    if not polygons:
        return mask_util.encode(np.zeros((height, width), dtype=np.uint8, order="F"))
    return mask_util.merge(mask_util.frPyObjects(polygons, height, width))


class MaskFormerInstanceDatasetMapper(MaskFormerMapperBase):
    """Turns a COCO-format instance dataset dict into MaskFormer training inputs.

    Each entry of ``annotations`` needs a contiguous ``category_id`` and a ``segmentation``:
    polygons (list of flat coordinate lists), COCO RLE (compressed or uncompressed dict) or an
    (H0, W0) binary numpy mask. Crowd annotations (``iscrowd`` 1) are dropped. Masks are
    transformed with Detectron2's ``transform_instance_annotations`` (polygons are transformed
    as polygons and rasterised at the output size), padded with 0, and instances whose mask is
    empty after augmentation are removed. ``bbox`` is not required: it is derived from the
    segmentation when absent, and the returned ``gt_boxes`` are always recomputed from the
    masks.

    The returned dict is a copy of the input without ``annotations`` plus ``image`` and
    ``instances`` (``gt_classes``, ``gt_masks``, ``gt_boxes``). With ``is_train=False`` a dict
    without ``annotations`` yields only ``image``.
    """

    # Tight boxes come for free here and are what Detectron2's instance tooling expects.
    with_boxes = True

    @classmethod
    def train_augmentations(cls, cfg: CfgNode, ignore_label: int) -> List[AugmentationLike]:
        """Shortest-edge resize, optional random crop, optional colour aug, flip."""
        return cls.resize_crop_flip(cfg, T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE))

    def _normalize_annotation(
        self, anno: Dict[str, Any], image_file: str, image_hw: Sequence[int]
    ) -> Dict[str, Any]:
        """Brings one annotation into the form ``transform_instance_annotations`` accepts.

        Bitmasks and uncompressed RLE become compressed RLE, degenerate polygons are dropped,
        a missing ``bbox`` is derived from the segmentation, and keypoints are removed.
        """
        if "segmentation" not in anno:
            raise ValueError(
                f"{image_file}: annotation without 'segmentation' (keys {sorted(anno)}); "
                "MaskFormer trains on masks"
            )
        h0, w0 = image_hw
        segm = anno["segmentation"]
        if isinstance(segm, np.ndarray):
            if segm.shape != (h0, w0):
                raise ValueError(
                    f"{image_file}: bitmask segmentation of shape {segm.shape} does not match "
                    f"the image (H, W) = ({h0}, {w0})"
                )
            segm = mask_util.encode(np.asfortranarray(segm.astype(np.uint8)))
        elif isinstance(segm, dict):
            segm = compressed_rle(segm, h0, w0, image_file)
        elif isinstance(segm, list):
            # A polygon needs at least 3 points; COCO has a few degenerate ones.
            segm = [p for p in segm if len(p) % 2 == 0 and len(p) >= 6]
        else:
            raise ValueError(
                f"{image_file}: unsupported segmentation type {type(segm).__name__}; expected "
                "polygons (list), COCO RLE (dict) or a 2-D numpy mask"
            )
        anno["segmentation"] = segm
        anno.pop("keypoints", None)
        if "bbox" not in anno:
            rle = _polygons_to_rle(segm, h0, w0) if isinstance(segm, list) else segm
            anno["bbox"] = mask_util.toBbox(rle).tolist()
            anno["bbox_mode"] = BoxMode.XYWH_ABS
        # COCO json boxes are XYWH; Detectron2's loaders always set the mode explicitly.
        anno.setdefault("bbox_mode", BoxMode.XYWH_ABS)
        return anno

    def __call__(self, dataset_dict: Dict[str, Any]) -> Dict[str, Any]:
        """Maps one dataset dict (see the class docstring for the output keys)."""
        dataset_dict, image, image_file = self._start(dataset_dict)
        original_hw = image.shape[:2]
        annos = dataset_dict.pop("annotations", None)
        if annos is None:
            self._missing_ground_truth(dataset_dict, "annotations")
            return self._image_only(dataset_dict, image)

        missing = [a for a in annos if "category_id" not in a]
        if missing:
            raise ValueError(f"{image_file}: annotation without 'category_id': {missing[0]}")
        self._check_class_ids((a["category_id"] for a in annos), image_file)
        annos = [
            self._normalize_annotation(a, image_file, original_hw)
            for a in annos
            if int(a.get("iscrowd", 0)) == 0
        ]

        image, _, transforms = self._augment(image)
        hw = image.shape[:2]
        if not _HAS_SHAPELY and any(isinstance(t, T.CropTransform) for t in transforms.transforms):
            log_first_n(
                logging.WARNING,
                "shapely is not installed: polygons are rasterised before cropping "
                "(pip install shapely to crop them as polygons)",
                n=1,
            )
            for anno in annos:
                if isinstance(anno["segmentation"], list):
                    anno["segmentation"] = _polygons_to_rle(anno["segmentation"], *original_hw)
        annos = [utils.transform_instance_annotations(a, transforms, hw) for a in annos]
        for anno in annos:
            if isinstance(anno["segmentation"], np.ndarray):
                # Transformed bitmasks: padding writes the segmentation pad value (255 in
                # FixedSizeCrop), which must not count as foreground.
                anno["segmentation"] = anno["segmentation"] == 1
        instances = utils.annotations_to_instances(annos, hw, mask_format="bitmask")
        if instances.has("gt_masks"):
            masks = instances.gt_masks.tensor.to(torch.bool)
        else:  # no annotations left
            masks = torch.zeros((0, *hw), dtype=torch.bool)

        image_hw = self._finish(dataset_dict, image, transforms, original_hw)
        masks = pad_to_multiple(masks, self.size_divisibility, False)
        dataset_dict["instances"] = self._instances(image_hw, instances.gt_classes, masks)
        return dataset_dict
