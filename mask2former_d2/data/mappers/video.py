"""Mapper for video instance segmentation (YouTube-VIS format; ``INPUT.DATASET_MAPPER_NAME: ytvis``).

Shapes: T frames of the video, T' sampled frames of the clip, H0/W0 the frame size on disk,
H/W the augmented (and possibly padded) size of a frame, N the tracks of the clip.

Training output, one dict per clip (the published ``YTVISDatasetMapper`` format)::

    image:      [T' (3, H, W) uint8 tensors]
    instances:  [T' Instances, each with the same N tracks in the same order]
                gt_classes (N,) int64, gt_ids (N,) int64 (-1 where the track is absent from
                that frame or its mask became empty), gt_masks (N, H, W) bool (empty where
                absent), gt_boxes (N, 4) XYXY boxes tight around the masks
    frame_idx:  [T' indices of the sampled frames], file_names: [T' paths]
    height, width, length, video_id: copied from the dataset dict

At test time every frame is returned, without ``instances``.
"""

import contextlib
import copy
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.config import CfgNode, configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, Instances

from ...config import get_maskformer_cfg
from ..datasets.ytvis import segmentation_to_rle
from .utils import (
    IMAGE_PAD_VALUE,
    AugmentationLike,
    MaskFormerMapperBase,
    image_to_tensor,
    pad_to_multiple,
    read_image_file,
)

__all__ = ["YTVISDatasetMapper", "build_clip_augmentations", "select_clip_frames"]

# INPUT.AUGMENTATIONS entries, in the order the published mapper applies them.
EXTRA_AUGMENTATIONS = ("brightness", "contrast", "saturation", "rotation")
_SAMPLING_STYLES = ("range", "choice", "range_by_clip", "choice_by_clip")
_FLIP_MODES = ("none", "horizontal", "vertical", "flip_by_clip")


def _video_input(cfg: CfgNode, key: str) -> Any:
    """``cfg.INPUT.<key>`` of the video keys, or its published default when the config was made
    without :func:`~mask2former_d2.config.add_maskformer2_video_config` (an image-only config)."""
    if key in cfg.INPUT:
        return cfg.INPUT[key]
    return get_maskformer_cfg().INPUT[key]


def build_clip_augmentations(cfg: CfgNode) -> List[Tuple[AugmentationLike, bool]]:
    """Training augmentations of a clip as ``(augmentation, clip_consistent)`` pairs, in order.

    As published: random crop (``INPUT.CROP``), shortest-edge resize, flip, then the
    ``INPUT.AUGMENTATIONS`` entries. The resize is drawn once per clip when
    ``INPUT.MIN_SIZE_TRAIN_SAMPLING`` ends in ``_by_clip``, else per frame; the flip once per clip
    for ``INPUT.RANDOM_FLIP: flip_by_clip``, else per frame. The crop and the extra
    augmentations are drawn once per clip (the published mapper draws them per frame, so that
    the frames of one clip could be cropped, rotated and recoloured differently).
    """
    sampling, flip = cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING, cfg.INPUT.RANDOM_FLIP
    if sampling not in _SAMPLING_STYLES:
        raise ValueError(f"INPUT.MIN_SIZE_TRAIN_SAMPLING={sampling!r}; expected one of {_SAMPLING_STYLES}")
    if flip not in _FLIP_MODES:
        raise ValueError(f"INPUT.RANDOM_FLIP={flip!r}; expected one of {_FLIP_MODES}")
    extra = _video_input(cfg, "AUGMENTATIONS")
    unknown = [a for a in extra if a not in EXTRA_AUGMENTATIONS]
    if unknown:
        raise ValueError(f"INPUT.AUGMENTATIONS has unknown entries {unknown}; valid: {list(EXTRA_AUGMENTATIONS)}")

    augs: List[Tuple[AugmentationLike, bool]] = []
    if cfg.INPUT.CROP.ENABLED:
        augs.append((T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE), True))
    # Detectron2's own resize + flip, from the per-frame spelling of the two options.
    d2_cfg = cfg.clone()
    d2_cfg.defrost()
    d2_cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING = sampling.replace("_by_clip", "")
    d2_cfg.INPUT.RANDOM_FLIP = "horizontal" if flip == "flip_by_clip" else flip
    for aug in utils.build_augmentation(d2_cfg, is_train=True):
        by_clip = sampling.endswith("_by_clip") if isinstance(aug, T.ResizeShortestEdge) else flip == "flip_by_clip"
        augs.append((aug, by_clip))
    extras = {
        "brightness": lambda: T.RandomBrightness(0.9, 1.1),
        "contrast": lambda: T.RandomContrast(0.9, 1.1),
        "saturation": lambda: T.RandomSaturation(0.9, 1.1),
        "rotation": lambda: T.RandomRotation(
            [-15, 15], expand=False, center=[(0.4, 0.4), (0.6, 0.6)], sample_style="range"
        ),
    }
    augs.extend((extras[name](), True) for name in EXTRA_AUGMENTATIONS if name in extra)
    return augs


def select_clip_frames(length: int, num_frames: int, frame_range: int, shuffle: bool) -> List[int]:
    """Frame indices of a training clip, as published.

    A reference frame is drawn uniformly; the other ``num_frames - 1`` are drawn (with
    replacement) among the frames within ``frame_range`` of it, the reference excluded (it is
    repeated when the video has a single frame). Indices are sorted, then shuffled if asked.
    """
    ref = int(np.random.randint(length))
    candidates = [i for i in range(max(0, ref - frame_range), min(length, ref + frame_range + 1)) if i != ref]
    others = np.random.choice(candidates, num_frames - 1).tolist() if candidates else [ref] * (num_frames - 1)
    selected = sorted([ref] + [int(i) for i in others])
    if shuffle:
        np.random.shuffle(selected)
    return selected


@contextlib.contextmanager
def _numpy_seed(seed: Optional[int]) -> Iterator[None]:
    """Runs the block with numpy's global RNG seeded by ``seed`` (None: untouched), then restores it."""
    if seed is None:
        yield
        return
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def _decode_segmentation(segm: Any, h: int, w: int, where: str) -> np.ndarray:
    """(h, w) bool mask of a frame segmentation: polygons, (un)compressed RLE or a bitmask."""
    if isinstance(segm, np.ndarray):
        if segm.shape != (h, w):
            raise ValueError(f"{where}: bitmask of shape {segm.shape} in a frame of size ({h}, {w})")
        return segm.astype(bool)
    return mask_util.decode(segmentation_to_rle(segm, h, w, where)).astype(bool)


class YTVISDatasetMapper(MaskFormerMapperBase):
    """Turns a YouTube-VIS video record (:func:`~mask2former_d2.data.datasets.load_ytvis_json`)
    into a training clip or, with ``is_train=False``, the whole video (see the module docstring).

    Clip-consistent augmentations draw their random parameters once per clip and compute each
    frame's transform with them (so e.g. the saturation blend uses each frame's own grey image);
    per-frame ones draw anew for every frame.
    """

    with_boxes = True

    @configurable
    def __init__(
        self, is_train: bool = True, *, augmentations: Sequence[AugmentationLike], image_format: str,
        sampling_frame_num: int = 2, sampling_frame_range: int = 5, sampling_frame_shuffle: bool = False,
        clip_consistent: Optional[Sequence[bool]] = None, **kwargs: Any,
    ) -> None:
        """
        Args:
            is_train, augmentations, image_format, ignore_label, size_divisibility, class_ids:
                as in :class:`MaskFormerMapperBase`.
            sampling_frame_num: frames per training clip (``INPUT.SAMPLING_FRAME_NUM``).
            sampling_frame_range: max distance of a clip frame to the reference frame
                (``INPUT.SAMPLING_FRAME_RANGE``).
            sampling_frame_shuffle: shuffle the clip's frames (``INPUT.SAMPLING_FRAME_SHUFFLE``).
            clip_consistent: one flag per augmentation, True to draw it once per clip (default:
                all True).
        """
        super().__init__(is_train, augmentations=augmentations, image_format=image_format, **kwargs)
        if sampling_frame_num < 1:
            raise ValueError(f"INPUT.SAMPLING_FRAME_NUM must be >= 1, got {sampling_frame_num}")
        self.sampling_frame_num = int(sampling_frame_num)
        self.sampling_frame_range = int(sampling_frame_range)
        self.sampling_frame_shuffle = bool(sampling_frame_shuffle)
        flags = [True] * len(self.augmentations) if clip_consistent is None else list(clip_consistent)
        if len(flags) != len(self.augmentations):
            raise ValueError(f"clip_consistent has {len(flags)} flags for {len(self.augmentations)} augmentations")
        self.clip_consistent = flags

    @classmethod
    def from_config(cls, cfg: CfgNode, is_train: bool = True) -> Dict[str, Any]:
        ret = super().from_config(cfg, is_train)
        if is_train:
            pairs = build_clip_augmentations(cfg)
            ret["augmentations"] = [a for a, _ in pairs]
            ret["clip_consistent"] = [c for _, c in pairs]
        ret.update(
            sampling_frame_num=_video_input(cfg, "SAMPLING_FRAME_NUM"),
            sampling_frame_range=_video_input(cfg, "SAMPLING_FRAME_RANGE"),
            sampling_frame_shuffle=_video_input(cfg, "SAMPLING_FRAME_SHUFFLE"),
        )
        return ret

    @classmethod
    def train_augmentations(cls, cfg: CfgNode, ignore_label: int) -> List[AugmentationLike]:
        return [a for a, _ in build_clip_augmentations(cfg)]

    # ------------------------------------------------------------------ helpers
    def _augment_frame(self, image: np.ndarray, seeds: Sequence[Optional[int]]) -> Tuple[np.ndarray, T.TransformList]:
        """Augments one frame; ``seeds`` (one per augmentation, drawn once per clip) replay the
        random draws of the clip-consistent augmentations, None draws anew."""
        aug_input = T.AugInput(image)
        transforms = []
        for aug, seed in zip(self.augmentations, seeds):
            with _numpy_seed(seed):
                transforms.append(T.AugmentationList([aug])(aug_input))
        return aug_input.image, T.TransformList(transforms)

    def _read_frame(self, dataset_dict: Dict[str, Any], file_name: str) -> np.ndarray:
        image = read_image_file(file_name, self.image_format)
        utils.check_image_size({"file_name": file_name, **{k: dataset_dict[k] for k in ("height", "width")
                                                           if k in dataset_dict}}, image)
        return image

    def _clip_tracks(self, frame_annos: Sequence[List[Dict[str, Any]]], source: str) -> Dict[int, int]:
        """Track id -> contiguous class of the non-crowd tracks present in the clip, by track id."""
        tracks: Dict[int, int] = {}
        for annos in frame_annos:
            for anno in annos:
                if int(anno.get("iscrowd", 0)) == 0:
                    if "id" not in anno or "category_id" not in anno:
                        raise ValueError(f"{source}: video annotation without 'id'/'category_id': {sorted(anno)}")
                    tracks.setdefault(int(anno["id"]), int(anno["category_id"]))
        self._check_class_ids(tracks.values(), source)
        return dict(sorted(tracks.items()))

    def _frame_instances(
        self,
        annos: Sequence[Dict[str, Any]],
        tracks: Dict[int, int],
        transforms: T.TransformList,
        original_hw: Tuple[int, int],
        hw: Tuple[int, int],
        where: str,
    ) -> Instances:
        """One frame's Instances over all ``tracks`` (absent ones: id -1, empty mask)."""
        index = {track_id: i for i, track_id in enumerate(tracks)}
        masks = np.zeros((len(tracks), *hw), dtype=bool)
        ids = torch.full((len(tracks),), -1, dtype=torch.int64)
        for anno in annos:
            track_id = int(anno.get("id", -1))
            if track_id not in index:  # crowd
                continue
            mask = _decode_segmentation(anno["segmentation"], *original_hw, where)
            mask = transforms.apply_segmentation(mask.astype(np.uint8)) == 1
            masks[index[track_id]] = mask
            if mask.any():  # a track cropped away counts as absent, as published
                ids[index[track_id]] = track_id
        padded = pad_to_multiple(torch.from_numpy(masks), self.size_divisibility, False)
        instances = Instances(tuple(padded.shape[-2:]))
        instances.gt_classes = torch.tensor(list(tracks.values()), dtype=torch.int64)
        instances.gt_ids = ids
        instances.gt_masks = padded
        instances.gt_boxes = BitMasks(padded).get_bounding_boxes()
        return instances

    def __call__(self, dataset_dict: Dict[str, Any]) -> Dict[str, Any]:
        """Maps one video record (see the module docstring for the output keys)."""
        dataset_dict = copy.deepcopy(dataset_dict)  # the caller's dict stays untouched
        file_names = dataset_dict.pop("file_names", None)
        if not file_names:
            raise ValueError(f"video dataset dict without 'file_names' (keys {sorted(dataset_dict)})")
        video_annos = dataset_dict.pop("annotations", None)
        length = int(dataset_dict.get("length", len(file_names)))
        if self.is_train:
            if video_annos is None:
                self._missing_ground_truth({"file_name": file_names[0], **dataset_dict}, "annotations")
            selected = select_clip_frames(
                length, self.sampling_frame_num, self.sampling_frame_range, self.sampling_frame_shuffle
            )
        else:
            selected = list(range(length))

        # One frame at a time: only the augmented frames of a (long) video are kept.
        seeds = [int(np.random.randint(2**31)) if c else None for c in self.clip_consistent]
        images, clip_transforms, sizes = [], [], []
        for t in selected:
            frame = self._read_frame(dataset_dict, file_names[t])
            original_hw = frame.shape[:2]
            image, transforms = self._augment_frame(frame, seeds)
            images.append(pad_to_multiple(image_to_tensor(image), self.size_divisibility, IMAGE_PAD_VALUE))
            clip_transforms.append(transforms)
            sizes.append(image.shape[:2])  # before padding
        dataset_dict["frame_idx"] = selected
        dataset_dict["file_names"] = [file_names[t] for t in selected]
        dataset_dict["image"] = images
        if not self.is_train:
            return dataset_dict

        source = f"video {dataset_dict.get('video_id')} ({file_names[0]})"
        tracks = self._clip_tracks([video_annos[t] for t in selected], source)
        dataset_dict["instances"] = [
            self._frame_instances(video_annos[t], tracks, transforms, original_hw, hw, file_names[t])
            for t, transforms, hw in zip(selected, clip_transforms, sizes)
        ]
        return dataset_dict
