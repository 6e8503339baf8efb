"""Pieces shared by the MaskFormer training dataset mappers.

Shapes: H/W height/width of the augmented (and possibly padded) image, H0/W0 the size on
disk, C image channels, N ground-truth segments of one image. Images stay HWC numpy arrays
until they become (C, H, W) uint8 tensors; label maps are (H, W); masks are (N, H, W) bool.
"""

import copy
import errno
import inspect
import logging
from typing import (
    Any,
    Collection,
    Dict,
    FrozenSet,
    Iterable,
    List,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import numpy as np
import torch
from detectron2.config import CfgNode, configurable
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.projects.point_rend.color_augmentation import ColorAugSSDTransform
from detectron2.structures import BitMasks, Instances
from PIL import UnidentifiedImageError
from torch import Tensor

try:
    from panopticapi.utils import rgb2id
except ImportError:  # panopticapi is optional; this is the COCO panoptic id encoding

    def rgb2id(color: np.ndarray) -> np.ndarray:
        """Segment ids of an (H, W, 3) COCO panoptic PNG: R + 256 G + 256^2 B."""
        color = np.asarray(color, dtype=np.int64)
        return color[..., 0] + 256 * color[..., 1] + 256 * 256 * color[..., 2]


__all__ = [
    "IMAGE_PAD_VALUE",
    "MaskFormerMapperBase",
    "check_same_size",
    "class_ids_from_metadata",
    "image_to_tensor",
    "pad_to_multiple",
    "panoptic_to_semantic",
    "read_image_file",
    "read_label_map",
    "rgb2id",
]

logger = logging.getLogger(__name__)

# Value written into padded image pixels (the published mappers pad with mid-grey).
IMAGE_PAD_VALUE = 128
# Panoptic segment id of unlabeled ("void") pixels in COCO-style PNGs.
VOID_SEGMENT_ID = 0

AugmentationLike = Union[T.Augmentation, T.Transform]


def read_image_file(file_name: str, image_format: Optional[str] = None) -> np.ndarray:
    """Reads an image or label PNG with Detectron2's ``read_image``, with clear errors.

    Args:
        file_name: path of the file.
        image_format: a format accepted by ``detection_utils.read_image`` ("BGR", "RGB", "L",
            ...), or None to keep the file's own mode (label maps).

    Returns:
        The decoded array: (H0, W0, C) for a colour format, (H0, W0) for single-channel files
        read with ``image_format=None``.

    Raises:
        FileNotFoundError: the file does not exist (its ``filename`` is ``file_name``).
        ValueError: the file exists but cannot be decoded (corrupt or not an image).
    """
    try:
        return utils.read_image(file_name, format=image_format)
    except FileNotFoundError as err:
        raise FileNotFoundError(errno.ENOENT, "image file not found", file_name) from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        # PIL reports broken files with any of these (truncated data, bad chunks, bad modes).
        raise ValueError(f"{file_name}: cannot decode image ({type(err).__name__}: {err})") from err


def check_same_size(
    annotation_file: str, annotation_hw: Sequence[int], image_file: str, image_hw: Sequence[int]
) -> None:
    """Raises ValueError unless an annotation map has the (H, W) of its image."""
    if tuple(annotation_hw) != tuple(image_hw):
        raise ValueError(
            f"{annotation_file}: annotation size (W, H) = ({annotation_hw[1]}, {annotation_hw[0]})"
            f" differs from image {image_file} size (W, H) = ({image_hw[1]}, {image_hw[0]})"
        )


def read_label_map(file_name: str, image_file: str, image_hw: Sequence[int]) -> np.ndarray:
    """Reads a single-channel label PNG (mode L, P, I or I;16) and checks its size.

    Args:
        file_name: label PNG path.
        image_file: path of the matching image (for error messages).
        image_hw: (H0, W0) of the decoded image.

    Returns:
        (H0, W0) integer label map, dtype as stored (uint8, uint16 or int32).
    """
    label = read_image_file(file_name)
    if label.ndim != 2:
        raise ValueError(
            f"{file_name}: expected a single-channel label map, got an array of shape "
            f"{tuple(label.shape)}; colour-coded labels must be converted to class ids first"
        )
    check_same_size(file_name, label.shape, image_file, image_hw)
    return label


def present_values(label: np.ndarray) -> np.ndarray:
    """Sorted distinct values of an integer label map (bincount: linear time for labels)."""
    flat = label.ravel()
    if flat.size and np.issubdtype(flat.dtype, np.integer) and flat.min() >= 0:
        return np.flatnonzero(np.bincount(flat))
    return np.unique(flat)


def image_to_tensor(image: np.ndarray) -> Tensor:
    """(H, W, C) array -> contiguous (C, H, W) tensor of the same dtype."""
    if image.ndim == 2:
        image = image[:, :, None]
    return torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))


def pad_to_multiple(tensor: Tensor, divisor: int, value: Union[int, float, bool]) -> Tensor:
    """Pads the last two dims (bottom/right) of ``tensor`` up to multiples of ``divisor``.

    Args:
        tensor: (..., H, W) tensor of any dtype.
        divisor: target multiple; values <= 0 disable padding.
        value: fill value of the padded pixels.

    Returns:
        (..., ceil(H / divisor) * divisor, ceil(W / divisor) * divisor) tensor; ``tensor``
        itself when no padding is needed.
    """
    if divisor <= 0:
        return tensor
    h, w = tensor.shape[-2:]
    h_pad = -(-h // divisor) * divisor
    w_pad = -(-w // divisor) * divisor
    if (h_pad, w_pad) == (h, w):
        return tensor
    out = tensor.new_full((*tensor.shape[:-2], h_pad, w_pad), value)
    out[..., :h, :w] = tensor
    return out


def panoptic_to_semantic(
    segment_ids: np.ndarray, segments_info: Iterable[Dict[str, Any]], ignore_label: int
) -> np.ndarray:
    """(H0, W0) panoptic segment ids -> (H0, W0) float64 category map (``ignore_label`` = void).

    Every listed segment, crowd included, gets its category, as in the semantic labels that
    Mask2Former's COCO preparation derives from panoptic PNGs.
    """
    semantic = np.full(segment_ids.shape, ignore_label, dtype=np.float64)
    for segment in segments_info:
        semantic[segment_ids == segment["id"]] = segment["category_id"]
    return semantic


def class_ids_from_metadata(metadata: Any, num_classes: Optional[int]) -> Optional[FrozenSet[int]]:
    """The contiguous class ids that a dataset's dicts may contain.

    Args:
        metadata: a Detectron2 ``Metadata`` (or None).
        num_classes: fallback when the metadata has no id maps (``MODEL.SEM_SEG_HEAD.NUM_CLASSES``).

    Returns:
        The union of the values of ``thing_dataset_id_to_contiguous_id`` and
        ``stuff_dataset_id_to_contiguous_id`` when the metadata has either, else
        ``range(num_classes)``; None (no check) when neither is known.
    """
    ids: set = set()
    found = False
    for key in ("thing_dataset_id_to_contiguous_id", "stuff_dataset_id_to_contiguous_id"):
        mapping = getattr(metadata, key, None) if metadata is not None else None
        if mapping:
            ids.update(int(v) for v in mapping.values())
            found = True
    if found:
        return frozenset(ids)
    if num_classes is not None and num_classes > 0:
        return frozenset(range(int(num_classes)))
    return None


def _describe_ids(ids: Collection[int]) -> str:
    """Compact text for a set of class ids: "0..132" when contiguous."""
    ordered = sorted(ids)
    if ordered and ordered == list(range(ordered[0], ordered[-1] + 1)):
        return f"{ordered[0]}..{ordered[-1]}"
    head = ", ".join(str(i) for i in ordered[:20])
    return f"{{{head}{', ...' if len(ordered) > 20 else ''}}}"


def _needs_sem_seg(augmentation: AugmentationLike) -> bool:
    """Whether an augmentation reads the semantic label map (e.g. the category-area crop)."""
    if not isinstance(augmentation, T.Augmentation):
        return False
    if augmentation.input_args is not None:
        return "sem_seg" in augmentation.input_args
    return "sem_seg" in inspect.signature(augmentation.get_transform).parameters


def _metadata_for(cfg: CfgNode, is_train: bool) -> Any:
    """Metadata of the first train (or test) dataset named in ``cfg``, or None."""
    names = cfg.DATASETS.TRAIN if is_train else cfg.DATASETS.TEST
    return MetadataCatalog.get(names[0]) if len(names) else None


class MaskFormerMapperBase:
    """Common part of the MaskFormer mappers: reading, augmenting, padding, target building.

    Subclasses implement ``__call__`` for one annotation type and ``train_augmentations``.

    Class attributes that subclasses may override:
        with_boxes: also store ``gt_boxes`` (tight boxes around the masks) in the instances.
        with_padding_mask: also return ``padding_mask``, a (H, W) bool tensor that is True
            on pixels added by augmentation or padding.
    """

    with_boxes: bool = False
    with_padding_mask: bool = False

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        augmentations: Sequence[AugmentationLike],
        image_format: str,
        ignore_label: int = 255,
        size_divisibility: int = -1,
        class_ids: Optional[Collection[int]] = None,
    ) -> None:
        """
        Args:
            is_train: training (ground truth required) or evaluation (ground truth optional).
            augmentations: Detectron2 augmentations or deterministic transforms, in order.
            image_format: image format for ``detection_utils.read_image`` (e.g. "RGB", "BGR").
            ignore_label: label of unlabeled pixels in semantic label maps.
            size_divisibility: pad image and targets (bottom/right) to a multiple of this;
                <= 0 disables padding.
            class_ids: contiguous class ids allowed in the ground truth; anything else raises
                ValueError. None disables the check.
        """
        self.is_train = is_train
        self.augmentations: List[AugmentationLike] = list(augmentations)
        self.image_format = image_format
        self.ignore_label = int(ignore_label)
        self.size_divisibility = int(size_divisibility)
        self.class_ids: Optional[FrozenSet[int]] = (
            None if class_ids is None else frozenset(int(c) for c in class_ids)
        )
        self._augs_need_sem_seg = any(_needs_sem_seg(a) for a in self.augmentations)
        mode = "training" if is_train else "inference"
        logger.info(f"[{type(self).__name__}] augmentations used in {mode}: {self.augmentations}")

    @classmethod
    def from_config(cls, cfg: CfgNode, is_train: bool = True) -> Dict[str, Any]:
        metadata = _metadata_for(cfg, is_train)
        ignore_label = int(getattr(metadata, "ignore_label", cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE))
        if is_train:
            augmentations = cls.train_augmentations(cfg, ignore_label)
            size_divisibility = cfg.INPUT.SIZE_DIVISIBILITY
        else:
            augmentations = cls.test_augmentations(cfg)
            # The model pads batches itself and relies on the true image size at inference.
            size_divisibility = -1
        return {
            "is_train": is_train,
            "augmentations": augmentations,
            "image_format": cfg.INPUT.FORMAT,
            "ignore_label": ignore_label,
            "size_divisibility": size_divisibility,
            "class_ids": class_ids_from_metadata(metadata, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES),
        }

    @classmethod
    def train_augmentations(cls, cfg: CfgNode, ignore_label: int) -> List[AugmentationLike]:
        """Training augmentations built from ``cfg.INPUT``."""
        raise NotImplementedError

    @classmethod
    def test_augmentations(cls, cfg: CfgNode) -> List[AugmentationLike]:
        """Evaluation augmentations: the usual deterministic shortest-edge resize."""
        if cfg.INPUT.MIN_SIZE_TEST <= 0:
            return []
        return [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "choice")]

    @staticmethod
    def resize_crop_flip(cfg: CfgNode, crop: AugmentationLike) -> List[AugmentationLike]:
        """Shortest-edge resize, ``crop`` (if ``INPUT.CROP.ENABLED``), SSD colour augmentation
        (if ``INPUT.COLOR_AUG_SSD``), random flip: the MaskFormer training recipe."""
        augs: List[AugmentationLike] = [
            T.ResizeShortestEdge(
                cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
            )
        ]
        if cfg.INPUT.CROP.ENABLED:
            augs.append(crop)
        if cfg.INPUT.COLOR_AUG_SSD:
            augs.append(ColorAugSSDTransform(img_format=cfg.INPUT.FORMAT))
        augs.append(T.RandomFlip())
        return augs

    # ------------------------------------------------------------------ helpers
    def _start(self, dataset_dict: Dict[str, Any]) -> Tuple[Dict[str, Any], np.ndarray, str]:
        """A copy of ``dataset_dict`` (the caller's dict stays untouched), its image (checked
        by :meth:`_read_image`) and the image's file name."""
        dataset_dict = copy.deepcopy(dataset_dict)
        return dataset_dict, self._read_image(dataset_dict), dataset_dict["file_name"]

    def _read_image(self, dataset_dict: Dict[str, Any]) -> np.ndarray:
        """Reads ``file_name``; checks and fills in ``height``/``width``."""
        if "file_name" not in dataset_dict:
            raise ValueError(f"dataset dict has no 'file_name': keys {sorted(dataset_dict)}")
        image = read_image_file(dataset_dict["file_name"], self.image_format)
        utils.check_image_size(dataset_dict, image)
        return image

    def _missing_ground_truth(self, dataset_dict: Dict[str, Any], key: str) -> None:
        """Raises in training when the ground-truth entry ``key`` is absent."""
        if self.is_train:
            raise ValueError(
                f"{dataset_dict['file_name']}: {type(self).__name__} needs '{key}' in the "
                f"dataset dict for training (keys: {sorted(dataset_dict)}); check "
                "INPUT.DATASET_MAPPER_NAME against the dataset's annotation type"
            )

    def _check_class_ids(self, ids: Iterable[int], source: str) -> None:
        """Raises ValueError naming ``source`` when an id is not a class id of the dataset."""
        if self.class_ids is None:
            return
        bad = sorted({int(i) for i in ids} - self.class_ids)
        if bad:
            raise ValueError(
                f"{source}: category id(s) {bad} are not contiguous class ids of the dataset "
                f"(expected {_describe_ids(self.class_ids)}); dataset dicts must hold the "
                "contiguous ids of the metadata's *_dataset_id_to_contiguous_id maps"
            )

    def _read_sem_seg(self, file_name: str, image_file: str, image_hw: Sequence[int]) -> np.ndarray:
        """Reads and validates a semantic label PNG; returns an (H0, W0) float64 map.

        float64 because Detectron2's resize is not implemented for uint16 tensors.
        """
        label = read_label_map(file_name, image_file, image_hw)
        values = present_values(label)
        self._check_class_ids(values[values != self.ignore_label], file_name)
        return label.astype(np.float64)

    def _augment(
        self, image: np.ndarray, sem_seg: Optional[np.ndarray] = None
    ) -> Tuple[np.ndarray, Optional[np.ndarray], T.TransformList]:
        """Runs the augmentations on the image (and label map); returns them and the transforms."""
        aug_input = T.AugInput(image, sem_seg=sem_seg)
        transforms = aug_input.apply_augmentations(self.augmentations)
        return aug_input.image, aug_input.sem_seg, transforms

    def _finish(
        self,
        dataset_dict: Dict[str, Any],
        image: np.ndarray,
        transforms: T.TransformList,
        original_hw: Tuple[int, int],
    ) -> Tuple[int, int]:
        """Stores the padded (C, H, W) image (and padding mask); returns (H, W)."""
        image_t = pad_to_multiple(image_to_tensor(image), self.size_divisibility, IMAGE_PAD_VALUE)
        dataset_dict["image"] = image_t
        if self.with_padding_mask:
            # Push an all-ones map through the same transforms: whatever is not 1 afterwards
            # was added by padding (FixedSizeCrop fills label maps with 255).
            valid = transforms.apply_segmentation(np.ones(original_hw, dtype=np.uint8)) == 1
            padding = torch.from_numpy(np.ascontiguousarray(~valid))
            dataset_dict["padding_mask"] = pad_to_multiple(padding, self.size_divisibility, True)
        return tuple(image_t.shape[-2:])

    def _image_only(self, dataset_dict: Dict[str, Any], image: np.ndarray) -> Dict[str, Any]:
        """Evaluation without ground truth: only the augmented image (and padding mask)."""
        original_hw = image.shape[:2]
        image, _, transforms = self._augment(image)
        self._finish(dataset_dict, image, transforms, original_hw)
        return dataset_dict

    def _instances(self, image_hw: Tuple[int, int], classes: Tensor, masks: Tensor) -> Instances:
        """Builds the target ``Instances``; segments whose mask became empty are dropped.

        Args:
            image_hw: (H, W) of the (padded) image.
            classes: (N,) int64 contiguous class ids.
            masks: (N, H, W) masks.

        Returns:
            Instances with ``gt_classes`` (N',) int64, ``gt_masks`` (N', H, W) bool and, if
            ``with_boxes``, ``gt_boxes`` (N', 4) XYXY boxes tight around the masks.
        """
        assert masks.shape[0] == classes.shape[0] and tuple(masks.shape[1:]) == tuple(image_hw)
        instances = Instances(image_hw)
        instances.gt_classes = classes.to(torch.int64)
        instances.gt_masks = BitMasks(masks.to(torch.bool))
        # Cropping can remove a segment entirely; an empty target mask only adds noise.
        instances = utils.filter_empty_instances(instances, by_box=False, by_mask=True)
        if self.with_boxes:
            instances.gt_boxes = instances.gt_masks.get_bounding_boxes()
        instances.gt_masks = instances.gt_masks.tensor
        return instances
