"""Helpers shared by the dataset registrations: lazy, idempotent registration and loaders that
fail with a :class:`FileNotFoundError` naming the missing path and the expected layout.

Nothing here touches the disk at import time; files are only read when a registered loader runs
(``DatasetCatalog.get(name)``).
"""

import json
import logging
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import pycocotools.mask as mask_util
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json, load_sem_seg
from detectron2.utils.file_io import PathManager

logger = logging.getLogger(__name__)

__all__ = [
    "datasets_root",
    "require_path",
    "register_lazy",
    "load_sem_seg_checked",
    "load_panoptic_json",
    "load_coco_instances_checked",
    "check_coco_json",
    "compressed_rle",
]

README = "datasets/README.md"


def datasets_root() -> str:
    """The root every built-in dataset lives under: ``$DETECTRON2_DATASETS`` or ``./datasets``."""
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def require_path(path: str, what: str, dataset: str, layout: str, *, is_dir: bool) -> None:
    """Raises FileNotFoundError unless ``path`` is an existing directory (or file).

    Args:
        path: the path that must exist.
        what: what the path holds, for the message (e.g. "panoptic PNG directory").
        dataset: the registered dataset name, for the message.
        layout: the expected on-disk layout of the dataset, for the message.
        is_dir: whether ``path`` must be a directory (else a file).
    """
    found = PathManager.isdir(path) if is_dir else PathManager.isfile(path)
    if not found:
        raise FileNotFoundError(
            f"{dataset}: {what} not found: {path!r}. Expected layout under "
            f"$DETECTRON2_DATASETS: {layout} (see {README})."
        )


def panoptic_metadata(
    things: Sequence[Mapping[str, Any]],
    stuff: Sequence[Mapping[str, Any]],
    thing_ids: Mapping[int, int],
    stuff_ids: Mapping[int, int],
) -> Dict[str, Any]:
    """Detectron2's panoptic metadata: names and colours of the ``things`` and ``stuff``
    categories (dicts with ``name`` and ``color``) and the two dataset id -> contiguous id maps."""
    return {
        "thing_classes": [c["name"] for c in things],
        "thing_colors": [c["color"] for c in things],
        "stuff_classes": [c["name"] for c in stuff],
        "stuff_colors": [c["color"] for c in stuff],
        "thing_dataset_id_to_contiguous_id": dict(thing_ids),
        "stuff_dataset_id_to_contiguous_id": dict(stuff_ids),
    }


def semantic_metadata(classes: Sequence[Tuple[int, str]]) -> Dict[str, Any]:
    """Metadata of a semantic dataset without colours, from ``(dataset id, name)`` pairs in
    contiguous-id order."""
    return {
        "stuff_classes": [name for _, name in classes],
        "stuff_dataset_id_to_contiguous_id": {dataset_id: i for i, (dataset_id, _) in enumerate(classes)},
    }


def _record(kind: str, index: int, record: Mapping[str, Any]) -> str:
    """``images[3] (id 7)``: where a record is, for messages."""
    ident = record.get("id", record.get("image_id")) if isinstance(record, Mapping) else None
    return f"{kind}[{index}]" + (f" (id {ident})" if ident is not None else "")


def check_coco_json(json_file: str, content: Any, *, panoptic: bool = False) -> None:
    """Checks the structure of a COCO (or COCO panoptic) json before Detectron2 or pycocotools
    index it, which would fail with a bare ``KeyError: 'category_id'`` or an empty dataset.

    Args:
        json_file: the file, for messages.
        content: its parsed content.
        panoptic: the COCO panoptic format (``segments_info`` per annotation).

    Raises:
        ValueError: one line naming the file, the record (list and index, with its id) and the
            missing or wrong field.
    """
    if not isinstance(content, Mapping):
        raise ValueError(f"{json_file}: expected a JSON object with 'images', 'annotations' and 'categories'; "
                         f"got a {type(content).__name__}")
    # A panoptic json may leave 'images' out: the image is then named after the PNG.
    for key in ("annotations",) if panoptic and "images" not in content else ("images", "annotations"):
        if not isinstance(content.get(key), list):
            what = "is missing" if key not in content else f"is a {type(content[key]).__name__}, not a list"
            raise ValueError(f"{json_file}: the '{key}' list {what}; a COCO json lists its {key} there")
    image_ids = set()
    for i, image in enumerate(content.get("images", [])):
        for field in ("id", "file_name"):
            if not isinstance(image, Mapping) or field not in image:
                raise ValueError(f"{json_file}: {_record('images', i, image)} has no '{field}'")
        image_ids.add(image["id"])
    for i, ann in enumerate(content["annotations"]):
        where = f"{json_file}: {_record('annotations', i, ann)}"
        needed = ("image_id", "file_name", "segments_info") if panoptic else ("image_id", "category_id")
        for field in needed:
            if not isinstance(ann, Mapping) or field not in ann:
                raise ValueError(f"{where} has no '{field}'")
        if not panoptic and ann["image_id"] not in image_ids:
            raise ValueError(f"{where} has image_id {ann['image_id']!r}, which no entry of 'images' has")
        for j, segment in enumerate(ann.get("segments_info", []) if panoptic else []):
            for field in ("id", "category_id"):
                if not isinstance(segment, Mapping) or field not in segment:
                    raise ValueError(f"{where}: segments_info[{j}] has no '{field}'")


def compressed_rle(
    segm: Mapping[str, Any], height: int, width: int, where: str, of: str = "the image"
) -> Dict[str, Any]:
    """A COCO RLE segmentation checked against (height, width) of ``of`` and returned compressed
    (uncompressed ones, with a list of counts, are what COCO crowd annotations and the released
    YouTube-VIS train jsons hold).

    Raises:
        ValueError: naming ``where``, for an RLE without ``counts``/``size`` or of another size.
    """
    if "counts" not in segm or "size" not in segm:
        raise ValueError(f"{where}: RLE segmentation needs 'counts' and 'size', got {sorted(segm)}")
    if list(segm["size"]) != [height, width]:
        raise ValueError(
            f"{where}: RLE size (H, W) = {tuple(segm['size'])} does not match {of} (H, W) = ({height}, {width})"
        )
    if isinstance(segm["counts"], list):
        return mask_util.frPyObjects(segm, height, width)
    return dict(segm)


def register_lazy(name: str, loader: Callable[[], List[Dict[str, Any]]], **metadata: Any) -> bool:
    """Registers ``loader`` under ``name`` and sets its metadata, unless ``name`` is registered.

    The loader is only called when the dataset is requested, so registering reads no file.

    Returns:
        True if ``name`` was registered now, False if it already was (nothing is changed then).
    """
    if name in DatasetCatalog.list():
        return False
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(**metadata)
    return True


def load_sem_seg_checked(
    dataset: str,
    image_root: str,
    sem_seg_root: str,
    layout: str,
    *,
    image_ext: str = "jpg",
    gt_ext: str = "png",
) -> List[Dict[str, Any]]:
    """Detectron2's :func:`load_sem_seg` after checking that both directories exist and hold files.

    Returns:
        One ``{"file_name", "sem_seg_file_name"}`` record per image that has an annotation.
    """
    require_path(image_root, "image directory", dataset, layout, is_dir=True)
    require_path(sem_seg_root, "semantic annotation directory", dataset, layout, is_dir=True)
    if not any(f.endswith("." + gt_ext) for f in PathManager.ls(sem_seg_root)):
        raise FileNotFoundError(
            f"{dataset}: no *.{gt_ext} annotation in {sem_seg_root!r}. Expected layout under "
            f"$DETECTRON2_DATASETS: {layout} (see {README})."
        )
    return load_sem_seg(sem_seg_root, image_root, gt_ext=gt_ext, image_ext=image_ext)


def _convert_segment(
    segment: Mapping[str, Any],
    thing_ids: Mapping[int, int],
    stuff_ids: Mapping[int, int],
    where: str,
) -> Dict[str, Any]:
    """A copy of one ``segments_info`` entry with a contiguous ``category_id`` and ``isthing``."""
    out = dict(segment)
    dataset_id = segment["category_id"]
    if dataset_id in thing_ids:
        out["category_id"], out["isthing"] = thing_ids[dataset_id], True
    elif dataset_id in stuff_ids:
        out["category_id"], out["isthing"] = stuff_ids[dataset_id], False
    else:
        raise ValueError(
            f"{where}: segment {segment.get('id')} has category_id {dataset_id}, which is not a "
            f"category of this dataset (known ids: {sorted(set(thing_ids) | set(stuff_ids))})"
        )
    return out


def load_panoptic_json(
    dataset: str,
    json_file: str,
    image_root: str,
    panoptic_root: str,
    layout: str,
    *,
    thing_ids: Mapping[int, int],
    stuff_ids: Mapping[int, int],
    sem_seg_root: Optional[str] = None,
    image_ext: str = ".jpg",
) -> List[Dict[str, Any]]:
    """Loads a panoptic dataset in COCO panoptic format into Detectron2's standard records.

    Args:
        dataset: the registered name, for error messages.
        json_file: the panoptic json (``images``, ``annotations`` with ``segments_info``).
        image_root: directory of the images.
        panoptic_root: directory of the panoptic PNGs named by ``annotations[i]["file_name"]``.
        layout: the expected on-disk layout, for error messages.
        thing_ids / stuff_ids: dataset category id -> contiguous id; a segment whose id is in
            ``thing_ids`` becomes a thing, else it must be in ``stuff_ids``.
        sem_seg_root: if given, each record also gets ``sem_seg_file_name`` (same PNG name).
        image_ext: image extension used when the json has no ``images`` entry for an image.

    Returns:
        Records with ``file_name``, ``image_id``, ``pan_seg_file_name``, ``segments_info`` (each
        segment with a contiguous ``category_id`` and ``isthing``), ``height``/``width`` when the
        json gives them, and ``sem_seg_file_name`` when ``sem_seg_root`` is given.
    """
    require_path(json_file, "panoptic json", dataset, layout, is_dir=False)
    require_path(image_root, "image directory", dataset, layout, is_dir=True)
    require_path(panoptic_root, "panoptic PNG directory", dataset, layout, is_dir=True)
    if sem_seg_root is not None:
        require_path(sem_seg_root, "semantic annotation directory", dataset, layout, is_dir=True)

    with PathManager.open(json_file) as f:
        content = json.load(f)
    check_coco_json(json_file, content, panoptic=True)
    images = {im["id"]: im for im in content.get("images", [])}

    records = []
    for ann in content["annotations"]:
        image_id = ann["image_id"]
        image = images.get(image_id, {})
        stem = os.path.splitext(ann["file_name"])[0]
        record = {
            "file_name": os.path.join(image_root, image.get("file_name", stem + image_ext)),
            "image_id": image_id,
            "pan_seg_file_name": os.path.join(panoptic_root, ann["file_name"]),
            "segments_info": [
                _convert_segment(s, thing_ids, stuff_ids, f"{json_file} (image {image_id})")
                for s in ann["segments_info"]
            ],
        }
        if "height" in image and "width" in image:
            record["height"], record["width"] = image["height"], image["width"]
        if sem_seg_root is not None:
            record["sem_seg_file_name"] = os.path.join(sem_seg_root, ann["file_name"])
        records.append(record)

    if not records:
        raise ValueError(f"{dataset}: {json_file!r} has no annotations")
    # A wrong layout shows on the first record already; stat-ing every file would be slow.
    first = records[0]
    require_path(first["file_name"], "image", dataset, layout, is_dir=False)
    require_path(first["pan_seg_file_name"], "panoptic PNG", dataset, layout, is_dir=False)
    if sem_seg_root is not None:
        require_path(first["sem_seg_file_name"], "semantic PNG", dataset, layout, is_dir=False)
    logger.info("Loaded %d images in panoptic format from %s", len(records), json_file)
    return records


def register_panoptic(
    name: str,
    layout: str,
    metadata: Mapping[str, Any],
    *,
    evaluator_type: str,
    ignore_label: int = 255,
    label_divisor: int = 1000,
    **paths: str,
) -> bool:
    """Lazily registers a panoptic dataset read by :func:`load_panoptic_json`.

    Args:
        name: the dataset name.
        layout: the expected on-disk layout, for error messages.
        metadata: class names, colours and the ``thing_/stuff_dataset_id_to_contiguous_id``
            maps; set on the dataset's metadata.
        evaluator_type, ignore_label, label_divisor: metadata for the evaluators and mappers.
        paths: ``image_root``, ``panoptic_root``, ``panoptic_json``, optional ``sem_seg_root``
            and ``json_file`` (instance annotations); all are set on the metadata.

    Returns:
        As :func:`register_lazy`.
    """

    def load() -> List[Dict[str, Any]]:
        return load_panoptic_json(
            name,
            paths["panoptic_json"],
            paths["image_root"],
            paths["panoptic_root"],
            layout,
            thing_ids=metadata["thing_dataset_id_to_contiguous_id"],
            stuff_ids=metadata["stuff_dataset_id_to_contiguous_id"],
            sem_seg_root=paths.get("sem_seg_root"),
        )

    return register_lazy(
        name,
        load,
        evaluator_type=evaluator_type,
        ignore_label=ignore_label,
        label_divisor=label_divisor,
        **paths,
        **metadata,
    )


def load_coco_instances_checked(
    dataset: str, json_file: str, image_root: str, layout: str
) -> List[Dict[str, Any]]:
    """Detectron2's :func:`load_coco_json` after checking that the json and images exist."""
    require_path(json_file, "instance json", dataset, layout, is_dir=False)
    require_path(image_root, "image directory", dataset, layout, is_dir=True)
    with PathManager.open(json_file) as f:
        check_coco_json(json_file, json.load(f))
    return load_coco_json(json_file, image_root, dataset)
