"""YouTube-VIS 2019 / 2021 video instance segmentation datasets.

Registered names (published layout under ``$DETECTRON2_DATASETS``)::

    ytvis_2019_{train,val,test}   ytvis_2019/{train,valid,test}/JPEGImages/<video>/<frame>.jpg
                                  ytvis_2019/{train,valid,test}.json
    ytvis_2021_{train,val,test}   the same under ytvis_2021/

The 40 categories of each year (published ids, names, colours) are the data files
``ytvis_{2019,2021}_categories.json`` next to this module.

One record per video (see :func:`load_ytvis_json`): ``file_names`` (T frame paths), ``height``,
``width``, ``length`` (T), ``video_id`` and ``annotations``, a list of T per-frame lists of
``{"id": track id, "category_id": contiguous id, "iscrowd", "segmentation", "bbox",
"bbox_mode"}``; a track that is absent from a frame has no entry in that frame's list.
"""

import json
import logging
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import pycocotools.mask as mask_util
from detectron2.data import MetadataCatalog
from detectron2.structures import BoxMode
from detectron2.utils.file_io import PathManager

from .utils import compressed_rle, register_lazy, require_path

__all__ = [
    "YTVIS_SPLITS",
    "load_ytvis_json",
    "register_all_ytvis",
    "register_ytvis_instances",
    "segmentation_to_rle",
    "ytvis_categories",
    "ytvis_metadata",
]

logger = logging.getLogger(__name__)

#: name -> (image root, json file) relative to the datasets root, as published.
YTVIS_SPLITS: Dict[str, tuple] = {
    f"ytvis_{year}_{split}": (f"ytvis_{year}/{folder}/JPEGImages", f"ytvis_{year}/{folder}.json")
    for year in ("2019", "2021")
    for split, folder in (("train", "train"), ("val", "valid"), ("test", "test"))
}

YTVIS_LAYOUT = (
    "ytvis_{2019,2021}/{train,valid,test}/JPEGImages/<video>/<frame>.jpg, "
    "ytvis_{2019,2021}/{train,valid,test}.json"
)

_CATEGORY_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ytvis_{year}_categories.json")


def ytvis_categories(year: str) -> List[Dict[str, Any]]:
    """The 40 published categories of YouTube-VIS ``year`` ("2019" or "2021"), in id order.

    Each is ``{"id", "name", "isthing", "color"}``, read from the data file shipped with the
    package.
    """
    if str(year) not in ("2019", "2021"):
        raise ValueError(f"YouTube-VIS year must be '2019' or '2021', got {year!r}")
    with open(_CATEGORY_FILE.format(year=year)) as f:
        return json.load(f)


def ytvis_metadata(categories: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """Detectron2 metadata (``thing_classes``, ``thing_colors``, id map) of ``categories``.

    Contiguous ids follow the order of the categories sorted by dataset id.
    """
    cats = sorted((c for c in categories if c.get("isthing", 1)), key=lambda c: c["id"])
    meta = {
        "thing_classes": [c["name"] for c in cats],
        "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(cats)},
    }
    if all("color" in c for c in cats):
        meta["thing_colors"] = [list(c["color"]) for c in cats]
    return meta


def _read_json(json_file: str) -> Dict[str, Any]:
    """The parsed YouTube-VIS json; ValueError naming the file when it is not one."""
    try:
        with PathManager.open(json_file) as f:
            content = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{json_file}: not a valid JSON file ({err})") from None
    if not isinstance(content, dict) or not isinstance(content.get("videos"), list):
        keys = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise ValueError(
            f"{json_file}: not a YouTube-VIS json (expected an object with 'videos', 'categories' "
            f"and, with ground truth, 'annotations'; got {keys})"
        )
    return content


def segmentation_to_rle(segm: Any, height: int, width: int, where: str) -> Dict[str, Any]:
    """One frame's segmentation (compressed or uncompressed COCO RLE, or polygons) as compressed RLE.

    Raises:
        ValueError: naming ``where``, for another type, an RLE without ``counts``/``size`` or
            one whose size is not (height, width).
    """
    if isinstance(segm, dict):
        return compressed_rle(segm, height, width, where, of="the video")
    if isinstance(segm, list):
        if not segm:
            return mask_util.encode(np.zeros((height, width), dtype=np.uint8, order="F"))
        return mask_util.merge(mask_util.frPyObjects(segm, height, width))
    raise ValueError(
        f"{where}: unsupported segmentation type {type(segm).__name__}; expected COCO RLE (dict) or "
        "polygons (list of coordinate lists)"
    )


def _frame_segmentation(segm: Any, height: int, width: int, where: str) -> Any:
    """One frame's segmentation as stored in a record: compressed RLE, or the valid polygons
    (fewer than 3 points dropped; None when none is left)."""
    if isinstance(segm, list):
        return [p for p in segm if len(p) % 2 == 0 and len(p) >= 6] or None
    return segmentation_to_rle(segm, height, width, where)


def _check_frames_exist(records: List[Dict[str, Any]], dataset: str) -> None:
    """Raises FileNotFoundError naming the first frame file that does not exist.

    Lists each video folder once instead of stat-ing every frame.
    """
    listed: Dict[str, set] = {}
    for record in records:
        for path in record["file_names"]:
            folder, name = os.path.split(path)
            if folder not in listed:
                listed[folder] = set(PathManager.ls(folder)) if PathManager.isdir(folder) else set()
            if name not in listed[folder]:
                raise FileNotFoundError(
                    f"{dataset}: frame file not found: {path!r} (video {record['video_id']}). "
                    f"Expected layout: {YTVIS_LAYOUT}"
                )


def load_ytvis_json(
    json_file: str,
    image_root: str,
    dataset_name: Optional[str] = None,
    extra_annotation_keys: Optional[Sequence[str]] = None,
) -> List[Dict[str, Any]]:
    """Loads a YouTube-VIS json into one Detectron2-style record per video.

    Args:
        json_file: the YouTube-VIS json (``videos``, ``categories``, optional ``annotations``
            with per-frame ``segmentations`` / ``bboxes``).
        image_root: directory the videos' ``file_names`` are relative to.
        dataset_name: registered name; when its metadata has a
            ``thing_dataset_id_to_contiguous_id`` map, category ids are mapped with it, else the
            map is made from the json's categories (sorted by id) and stored in the metadata.
        extra_annotation_keys: more per-track keys copied into every frame's annotation.

    Returns:
        Records with ``file_names``, ``height``, ``width``, ``length``, ``video_id`` and
        ``annotations`` (T per-frame lists; segmentations as compressed RLE or polygons, boxes
        ``XYWH_ABS``, derived from the mask when the json has none).

    Raises:
        FileNotFoundError: the json, the image root or a frame file does not exist.
        ValueError: the json cannot be parsed or is not in YouTube-VIS format, or an annotation
            has a category id that is not one of the categories.
    """
    where = dataset_name or json_file
    require_path(json_file, "YouTube-VIS json", where, YTVIS_LAYOUT, is_dir=False)
    require_path(image_root, "frame directory", where, YTVIS_LAYOUT, is_dir=True)
    content = _read_json(json_file)

    meta = MetadataCatalog.get(dataset_name) if dataset_name is not None else None
    id_map = getattr(meta, "thing_dataset_id_to_contiguous_id", None) if meta is not None else None
    if not id_map:
        json_meta = ytvis_metadata(content.get("categories", []))
        id_map = json_meta["thing_dataset_id_to_contiguous_id"]
        if meta is not None and id_map:
            meta.set(**json_meta)

    videos = sorted(content["videos"], key=lambda v: v["id"])
    anns_by_video: Dict[Any, List[Dict[str, Any]]] = {v["id"]: [] for v in videos}
    orphans = 0
    for ann in content.get("annotations") or []:
        if ann.get("video_id") in anns_by_video:
            anns_by_video[ann["video_id"]].append(ann)
        else:
            orphans += 1
    if orphans:
        logger.warning(f"{json_file}: {orphans} annotations refer to videos that are not in 'videos'")

    keys = ["id", "category_id", "iscrowd"] + list(extra_annotation_keys or [])
    records = []
    for video in videos:
        length = int(video.get("length", len(video["file_names"])))
        if len(video["file_names"]) != length:
            raise ValueError(
                f"{json_file}: video {video['id']} has length {length} but {len(video['file_names'])} file_names"
            )
        h, w = int(video["height"]), int(video["width"])
        frames: List[List[Dict[str, Any]]] = [[] for _ in range(length)]
        for ann in anns_by_video[video["id"]]:
            if ann.get("category_id") not in id_map:
                raise ValueError(
                    f"{json_file}: annotation {ann.get('id')} (video {video['id']}) has category_id "
                    f"{ann.get('category_id')!r}, which is not in the categories (known ids: {sorted(id_map)})"
                )
            segms = ann.get("segmentations") or [None] * length
            boxes = ann.get("bboxes") or [None] * length
            if len(segms) != length:
                raise ValueError(
                    f"{json_file}: annotation {ann.get('id')} has {len(segms)} segmentations for a video of "
                    f"{length} frames (video {video['id']})"
                )
            for t in range(length):
                if not segms[t]:
                    continue  # the track is absent from this frame
                where_t = f"{json_file} (annotation {ann.get('id')}, frame {t})"
                segm = _frame_segmentation(segms[t], h, w, where_t)
                if segm is None:
                    continue
                obj = {k: ann[k] for k in keys if k in ann}
                obj.setdefault("iscrowd", 0)
                obj["category_id"] = id_map[ann["category_id"]]
                obj["segmentation"] = segm
                box = boxes[t] if t < len(boxes) else None
                if not box:
                    box = mask_util.toBbox(segmentation_to_rle(segm, h, w, where_t)).tolist()
                obj["bbox"] = [float(x) for x in box]
                obj["bbox_mode"] = BoxMode.XYWH_ABS
                frames[t].append(obj)
        records.append({
            "file_names": [os.path.join(image_root, f) for f in video["file_names"]],
            "height": h,
            "width": w,
            "length": length,
            "video_id": video["id"],
            "annotations": frames,
        })
    if not records:
        raise ValueError(f"{where}: {json_file!r} has no videos")
    _check_frames_exist(records, where)
    logger.info(f"Loaded {len(records)} videos in YouTube-VIS format from {json_file}")
    return records


def register_ytvis_instances(name: str, metadata: Mapping[str, Any], json_file: str, image_root: str) -> bool:
    """Registers a YouTube-VIS-format dataset (lazy and idempotent; see ``register_lazy``).

    The metadata also gets ``json_file``, ``image_root`` and ``evaluator_type="ytvis"``.
    """
    return register_lazy(
        name,
        lambda: load_ytvis_json(json_file, image_root, name),
        json_file=json_file,
        image_root=image_root,
        evaluator_type="ytvis",
        **metadata,
    )


def register_all_ytvis(root: str) -> None:
    """Registers ``ytvis_{2019,2021}_{train,val,test}`` with paths under ``root``."""
    metas = {year: ytvis_metadata(ytvis_categories(year)) for year in ("2019", "2021")}
    for name, (image_root, json_file) in YTVIS_SPLITS.items():
        year = name.split("_")[1]
        register_ytvis_instances(name, metas[year], os.path.join(root, json_file), os.path.join(root, image_root))
