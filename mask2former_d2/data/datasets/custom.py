"""Datasets registered from files, without code: one spec string per dataset.

A spec is ``NAME:FORMAT:ARG,ARG,...``; the arguments are paths in the order of the format,
then optional ``key=value`` options::

    coco_instances   JSON,IMAGE_DIR                  COCO instances json + its images
    coco_panoptic    JSON,PNG_DIR,IMAGE_DIR          COCO panoptic json + PNGs + images
                     [,instances=JSON][,sem_seg=DIR]   (instance json / semantic PNGs: more evaluations)
    sem_seg          IMAGE_DIR,LABEL_DIR,CLASSES     images + label PNGs (value = class index) +
                     [,ignore_label=255]               a class file (one name per line)
                     [,image_suffix=.jpg][,label_suffix=.png]
    ytvis            JSON,FRAME_DIR                  YouTube-VIS json + <video>/<frame> folders

Specs come from the config (``DATASETS.CUSTOM``, a list of spec strings) or from the
``--dataset SPEC`` flag of the entry points (:func:`add_dataset_argument`). The flag's specs are
passed to every process of a run through the environment variable :data:`ENV_VAR`, and
:func:`register_custom_datasets` (called by ``get_maskformer_cfg``) adds them to
``DATASETS.CUSTOM`` and registers them: so a spawned DDP worker, which builds its config again,
registers the same datasets, and the run's saved ``config.yaml`` names them.

Metadata (class names, thing/stuff split, colours, id maps) is read from the files when the
spec is registered; the records are loaded lazily by the existing checked loaders.
"""

import argparse
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.colormap import colormap
from detectron2.utils.file_io import PathManager
from PIL import Image

from .utils import load_coco_instances_checked, panoptic_metadata, register_lazy, register_panoptic
from .ytvis import register_ytvis_instances, ytvis_metadata

__all__ = [
    "ENV_VAR",
    "FORMATS",
    "DatasetSpec",
    "add_dataset_argument",
    "check_num_classes",
    "load_sem_seg_folders",
    "parse_spec",
    "register_custom_datasets",
    "register_spec",
]

logger = logging.getLogger(__name__)

#: Environment variable carrying the ``--dataset`` specs (a JSON list) to child processes.
ENV_VAR = "MASK2FORMER_D2_DATASETS"

#: format -> (positional arguments, {option: default}) of its spec.
FORMATS: Dict[str, Tuple[Tuple[str, ...], Dict[str, str]]] = {
    "coco_instances": (("JSON", "IMAGE_DIR"), {}),
    "coco_panoptic": (("JSON", "PNG_DIR", "IMAGE_DIR"), {"instances": "", "sem_seg": ""}),
    "sem_seg": (
        ("IMAGE_DIR", "LABEL_DIR", "CLASSES"),
        {"ignore_label": "255", "image_suffix": "", "label_suffix": ".png"},
    ),
    "ytvis": (("JSON", "FRAME_DIR"), {}),
}
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
SPEC_SYNTAX = "NAME:FORMAT:ARG,ARG,...[,key=value]"

# name -> (format, paths, options) of the datasets registered here (a name given twice must mean one thing).
_REGISTERED: Dict[str, Tuple[Any, ...]] = {}


@dataclass(frozen=True)
class DatasetSpec:
    """One parsed spec: the dataset ``name``, its ``format``, the positional ``paths`` (absolute)
    and the ``options`` (every option of the format, defaults filled in)."""

    name: str
    format: str
    paths: Tuple[str, ...]
    options: Mapping[str, str] = field(default_factory=dict)
    text: str = ""


def _usage(fmt: str) -> str:
    positional, options = FORMATS[fmt]
    extra = "".join(f"[,{k}=...]" for k in options)
    return f"NAME:{fmt}:{','.join(positional)}{extra}"


def parse_spec(text: str) -> DatasetSpec:
    """Parses ``NAME:FORMAT:ARG,ARG,...[,key=value]`` (see the module docstring).

    Raises:
        ValueError: one line naming the spec and what was expected.
    """
    parts = str(text).split(":", 2)
    if len(parts) != 3 or not parts[0] or not parts[2]:
        raise ValueError(f"dataset spec {text!r}: expected {SPEC_SYNTAX} (formats: {', '.join(FORMATS)})")
    name, fmt, rest = parts
    if fmt not in FORMATS:
        raise ValueError(f"dataset spec {text!r}: unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    positional, defaults = FORMATS[fmt]
    args = [a for a in rest.split(",") if a != ""]
    paths = [a for a in args if "=" not in a]
    given = dict(a.split("=", 1) for a in args if "=" in a)
    unknown = sorted(set(given) - set(defaults))
    if unknown or len(paths) != len(positional):
        what = f"unknown option {unknown[0]!r}" if unknown else f"{len(paths)} paths"
        raise ValueError(f"dataset spec {text!r}: {what}; expected {_usage(fmt)}")
    options = {**defaults, **given}
    if fmt == "sem_seg":
        try:
            int(options["ignore_label"])
        except ValueError:
            raise ValueError(
                f"dataset spec {text!r}: ignore_label must be an integer; got {options['ignore_label']!r}"
            ) from None
    for key in ("instances", "sem_seg"):
        if options.get(key):
            options[key] = os.path.abspath(os.path.expanduser(options[key]))
    return DatasetSpec(
        name=name,
        format=fmt,
        paths=tuple(os.path.abspath(os.path.expanduser(p)) for p in paths),
        options=options,
        text=str(text),
    )


def _require(spec: DatasetSpec, path: str, what: str, *, is_dir: bool) -> None:
    found = PathManager.isdir(path) if is_dir else PathManager.isfile(path)
    if not found:
        kind = "folder" if is_dir else "file"
        raise FileNotFoundError(
            f"dataset {spec.name!r} ({spec.format}): {what} {kind} not found: {path!r} "
            f"(spec {_usage(spec.format)})"
        )


def _read_json(spec: DatasetSpec, path: str, what: str) -> Dict[str, Any]:
    try:
        with PathManager.open(path) as f:
            content = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"dataset {spec.name!r}: {path}: not a valid JSON file ({e})") from None
    if not isinstance(content, dict):
        raise ValueError(
            f"dataset {spec.name!r}: {path}: expected a JSON object ({what}); got a {type(content).__name__}"
        )
    return content


def _categories(
    spec: DatasetSpec, path: str, content: Mapping[str, Any], *, need_isthing: bool
) -> List[Dict[str, Any]]:
    """The json's categories sorted by id, each with a ``color`` (its own or a palette colour)."""
    cats = content.get("categories")
    if not isinstance(cats, list) or not cats:
        raise ValueError(f"dataset {spec.name!r}: {path}: has no 'categories' list; the class names come from it")
    for c in cats:
        if not isinstance(c, dict) or "id" not in c or "name" not in c:
            raise ValueError(f"dataset {spec.name!r}: {path}: category {c!r} lacks 'id' or 'name'")
        if need_isthing and "isthing" not in c:
            raise ValueError(
                f"dataset {spec.name!r}: {path}: category {c['id']} ({c['name']}) lacks 'isthing' "
                "(1: thing, counted instance by instance; 0: stuff)"
            )
    ids = [c["id"] for c in cats]
    if len(set(ids)) != len(ids):
        raise ValueError(f"dataset {spec.name!r}: {path}: category ids repeat: {sorted(ids)}")
    palette = _palette(len(cats))
    return [
        {**c, "color": list(c.get("color") or palette[i])}
        for i, c in enumerate(sorted(cats, key=lambda c: c["id"]))
    ]


def _palette(n: int) -> List[List[int]]:
    """``n`` distinct RGB colours (0..255), Detectron2's palette repeated."""
    colors = colormap(rgb=True, maximum=255)
    return [[int(v) for v in colors[i % len(colors)]] for i in range(n)]


def _listing_categories(
    spec: DatasetSpec, json_file: str, fmt: str, list_key: str, *, need_isthing: bool
) -> List[Dict[str, Any]]:
    """:func:`_categories` of a json that must also hold a ``list_key`` list (its records),
    read here only to reject files of another format early."""
    content = _read_json(spec, json_file, fmt)
    if not isinstance(content.get(list_key), list):
        raise ValueError(f"dataset {spec.name!r}: {json_file}: has no {list_key!r} list ({fmt} format)")
    return _categories(spec, json_file, content, need_isthing=need_isthing)


def _register_coco_instances(spec: DatasetSpec) -> None:
    json_file, image_root = spec.paths
    _require(spec, json_file, "instance json", is_dir=False)
    _require(spec, image_root, "image", is_dir=True)
    cats = _categories(spec, json_file, _read_json(spec, json_file, "COCO instances"), need_isthing=False)
    # The names and id map load_coco_json derives (categories sorted by id), so it agrees.
    meta = {
        "thing_classes": [c["name"] for c in cats],
        "thing_colors": [c["color"] for c in cats],
        "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(cats)},
    }
    layout = _usage(spec.format)
    register_lazy(
        spec.name,
        lambda: load_coco_instances_checked(spec.name, json_file, image_root, layout),
        json_file=json_file, image_root=image_root, evaluator_type="coco", **meta,
    )


def _register_coco_panoptic(spec: DatasetSpec) -> None:
    json_file, panoptic_root, image_root = spec.paths
    _require(spec, json_file, "panoptic json", is_dir=False)
    _require(spec, panoptic_root, "panoptic PNG", is_dir=True)
    _require(spec, image_root, "image", is_dir=True)
    cats = _listing_categories(spec, json_file, "COCO panoptic", "annotations", need_isthing=True)
    paths = {"image_root": image_root, "panoptic_root": panoptic_root, "panoptic_json": json_file}
    if spec.options["instances"]:
        _require(spec, spec.options["instances"], "instance json", is_dir=False)
        paths["json_file"] = spec.options["instances"]
    if spec.options["sem_seg"]:
        _require(spec, spec.options["sem_seg"], "semantic PNG", is_dir=True)
        paths["sem_seg_root"] = spec.options["sem_seg"]
    # Contiguous ids run over all classes (things and stuff) in id order, and both name lists
    # hold every class so that they are indexed by that id (the visualizer and the instance
    # evaluator rely on it). Every class is in the stuff map: semantic evaluation scores all.
    meta = panoptic_metadata(
        cats,
        cats,
        {c["id"]: i for i, c in enumerate(cats) if c["isthing"]},
        {c["id"]: i for i, c in enumerate(cats)},
    )
    register_panoptic(spec.name, _usage(spec.format), meta, evaluator_type="coco_panoptic_seg", **paths)


def _read_class_file(spec: DatasetSpec, path: str) -> List[str]:
    """One class name per line; line i names label value i. Trailing empty lines are ignored."""
    with PathManager.open(path) as f:
        lines = [line.rstrip("\r\n") for line in f]
    while lines and not lines[-1].strip():
        lines.pop()
    empty = [i + 1 for i, line in enumerate(lines) if not line.strip()]
    if not lines or empty:
        where = f"line {empty[0]} is empty" if empty else "it is empty"
        raise ValueError(f"dataset {spec.name!r}: class file {path}: {where}; expected one class name per line")
    return [line.strip() for line in lines]


def load_sem_seg_folders(
    dataset: str, image_root: str, label_root: str, *, image_suffix: str = "", label_suffix: str = ".png"
) -> List[Dict[str, Any]]:
    """Pairs the images under ``image_root`` (recursively) with the label PNGs under
    ``label_root`` by relative path: ``rel/stem + image_suffix`` <-> ``rel/stem + label_suffix``.

    Args:
        dataset: the dataset name, for messages.
        image_root / label_root: the two folders.
        image_suffix: what image names end with ("" = any image extension); e.g.
            "_leftImg8bit.png" for Cityscapes.
        label_suffix: what label names end with, e.g. "_gtFine_labelTrainIds.png".

    Returns:
        ``{"file_name", "sem_seg_file_name"}`` records sorted by image path.

    Raises:
        ValueError: if no image has a label (naming both folders and the suffixes).
    """
    def walk(root: str, suffixes: Sequence[str]) -> Dict[str, str]:
        found = {}
        for folder, _, names in os.walk(root):
            for n in names:
                for suffix in suffixes:
                    if n.lower().endswith(suffix.lower()) and len(n) > len(suffix):
                        rel = os.path.relpath(os.path.join(folder, n[: len(n) - len(suffix)]), root)
                        found[rel] = os.path.join(folder, n)
                        break
        return found

    images = walk(image_root, [image_suffix] if image_suffix else _IMAGE_SUFFIXES)
    labels = walk(label_root, [label_suffix])
    keys = sorted(set(images) & set(labels))
    if not keys:
        raise ValueError(
            f"dataset {dataset!r}: no image in {image_root} (names ending in "
            f"{image_suffix or '/'.join(_IMAGE_SUFFIXES)}) has a label in {label_root} (same relative "
            f"path, ending in {label_suffix}); found {len(images)} images and {len(labels)} labels "
            "(set image_suffix= / label_suffix= in the spec when the names differ by more than the extension)"
        )
    if len(keys) < len(images):
        left_out = len(images) - len(keys)
        logger.warning("%s: %d of %d images have no label and are left out", dataset, left_out, len(images))
    return [{"file_name": images[k], "sem_seg_file_name": labels[k]} for k in keys]


def _register_sem_seg(spec: DatasetSpec) -> None:
    image_root, label_root, class_file = spec.paths
    _require(spec, image_root, "image", is_dir=True)
    _require(spec, label_root, "label PNG", is_dir=True)
    _require(spec, class_file, "class list", is_dir=False)
    classes = _read_class_file(spec, class_file)
    options = spec.options
    ignore_label = int(options["ignore_label"])
    if 0 <= ignore_label < len(classes):
        raise ValueError(
            f"dataset {spec.name!r}: ignore_label={ignore_label} is also the label of class "
            f"{classes[ignore_label]!r} (line {ignore_label + 1} of {class_file}); choose a value >= {len(classes)}"
        )

    def load() -> List[Dict[str, Any]]:
        records = load_sem_seg_folders(
            spec.name, image_root, label_root,
            image_suffix=options["image_suffix"], label_suffix=options["label_suffix"],
        )
        # Labels in another convention (e.g. raw ADE20K, 0 = other) show on the first file.
        first = records[0]["sem_seg_file_name"]
        values = set(np.unique(np.asarray(Image.open(first))).tolist()) - {ignore_label}
        if values and max(values) >= len(classes):
            raise ValueError(
                f"dataset {spec.name!r}: {first} has label value {max(values)}, but {class_file} lists "
                f"{len(classes)} classes (values 0..{len(classes) - 1}, ignore_label={ignore_label})"
            )
        return records

    register_lazy(
        spec.name,
        load,
        stuff_classes=classes,
        stuff_colors=_palette(len(classes)),
        stuff_dataset_id_to_contiguous_id={i: i for i in range(len(classes))},
        image_root=image_root,
        sem_seg_root=label_root,
        evaluator_type="sem_seg",
        ignore_label=ignore_label,
    )


def _register_ytvis(spec: DatasetSpec) -> None:
    json_file, frame_root = spec.paths
    _require(spec, json_file, "YouTube-VIS json", is_dir=False)
    _require(spec, frame_root, "frame", is_dir=True)
    cats = _listing_categories(spec, json_file, "YouTube-VIS", "videos", need_isthing=False)
    register_ytvis_instances(spec.name, ytvis_metadata(cats), json_file, frame_root)


_REGISTER = {
    "coco_instances": _register_coco_instances,
    "coco_panoptic": _register_coco_panoptic,
    "sem_seg": _register_sem_seg,
    "ytvis": _register_ytvis,
}


def register_spec(spec: DatasetSpec) -> bool:
    """Registers the dataset of ``spec`` (metadata read now, records when first loaded).

    Returns:
        True if registered now, False if this spec was registered before in this process.

    Raises:
        ValueError: the name is registered already with another meaning, or a file is malformed.
        FileNotFoundError: a path of the spec does not exist.
    """
    key = (spec.format, spec.paths, tuple(sorted(spec.options.items())))
    previous = _REGISTERED.get(spec.name)
    if previous is not None:
        if previous == key:
            return False
        raise ValueError(f"dataset {spec.name!r} is given twice with different files ({spec.text!r})")
    if spec.name in DatasetCatalog.list():
        raise ValueError(
            f"dataset spec {spec.text!r}: the name {spec.name!r} is taken by a registered dataset; choose another name"
        )
    try:
        _REGISTER[spec.format](spec)
    except BaseException:
        # A half-registered name would make the next attempt report the wrong problem.
        if spec.name in DatasetCatalog.list():
            DatasetCatalog.remove(spec.name)
            MetadataCatalog.remove(spec.name)
        raise
    _REGISTERED[spec.name] = key
    MetadataCatalog.get(spec.name).set(custom_format=spec.format)
    logger.info("Registered dataset %r (%s) from %s", spec.name, spec.format, ", ".join(spec.paths))
    return True


def _flag_specs() -> List[str]:
    text = os.environ.get(ENV_VAR, "")
    if not text:
        return []
    try:
        specs = json.loads(text)
    except json.JSONDecodeError:
        specs = None
    if not isinstance(specs, list) or not all(isinstance(s, str) for s in specs):
        raise ValueError(f"environment variable {ENV_VAR}: expected a JSON list of dataset specs; got {text!r}")
    return specs


def dataset_num_classes(name: str) -> Optional[int]:
    """The number of classes a model trained on the custom dataset ``name`` predicts (None for a
    dataset not registered from a spec)."""
    meta = MetadataCatalog.get(name)
    fmt = meta.get("custom_format")
    if fmt is None:
        return None
    key = "thing_classes" if fmt in ("coco_instances", "ytvis") else "stuff_classes"
    return len(meta.get(key))


def check_num_classes(cfg: CfgNode, *, set_from_data: bool) -> None:
    """Checks ``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` against the custom datasets of
    ``DATASETS.TRAIN`` / ``DATASETS.TEST``, or sets it from them (``set_from_data``).

    Raises:
        ValueError: the datasets disagree, or (when not setting) the key differs from them.
    """
    counts = {n: dataset_num_classes(n) for n in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)}
    counts = {n: k for n, k in counts.items() if k is not None}
    if not counts:
        return
    if len(set(counts.values())) > 1:
        raise ValueError(f"the custom datasets of DATASETS.TRAIN/TEST have different class counts: {counts}")
    (num,) = set(counts.values())
    key = "MODEL.SEM_SEG_HEAD.NUM_CLASSES"
    current = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    names = ", ".join(counts)
    if current == num:
        logger.info("%s = %d matches the classes of %s", key, num, names)
    elif set_from_data:
        cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = num
        logger.warning("%s set to %d (was %d) from the classes of %s", key, num, current, names)
    else:
        raise ValueError(
            f"{key} is {current}, but dataset {names} has {num} classes; set {key} {num}, or "
            "DATASETS.SET_NUM_CLASSES True to take it from the data"
        )


def register_custom_datasets(cfg: CfgNode) -> List[str]:
    """Adds the ``--dataset`` specs of this run (see :data:`ENV_VAR`) to ``DATASETS.CUSTOM``,
    registers every spec there, then checks (or, with ``DATASETS.SET_NUM_CLASSES``, sets)
    ``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` against the custom datasets the config uses.

    Args:
        cfg: a mutable config with the ``DATASETS.CUSTOM`` key.

    Returns:
        The names of the datasets of ``DATASETS.CUSTOM``.
    """
    specs = list(cfg.DATASETS.CUSTOM)
    specs += [s for s in _flag_specs() if s not in specs]
    if specs != list(cfg.DATASETS.CUSTOM):
        cfg.DATASETS.CUSTOM = specs
    names = []
    for text in specs:
        spec = parse_spec(text)
        register_spec(spec)
        names.append(spec.name)
    check_num_classes(cfg, set_from_data=cfg.DATASETS.SET_NUM_CLASSES)
    return names


class _DatasetAction(argparse.Action):
    """Collects ``--dataset`` specs and hands them to this process's child processes."""

    def __call__(self, parser, namespace, value, option_string=None):
        specs = list(getattr(namespace, self.dest, None) or [])
        specs.append(value)
        setattr(namespace, self.dest, specs)
        inherited = _flag_specs()
        os.environ[ENV_VAR] = json.dumps(inherited + [s for s in specs if s not in inherited])


def _spec_type(text: str) -> str:
    try:
        parse_spec(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_dataset_argument(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds ``--dataset NAME:FORMAT:ARG,...`` (repeatable) to ``parser``; returns ``parser``.

    The specs are registered when the config is built (``get_maskformer_cfg``), in this
    process and in the processes it starts; see the module docstring for the formats.
    """
    parser.add_argument(
        "--dataset",
        action=_DatasetAction,
        type=_spec_type,
        default=[],
        metavar="NAME:FORMAT:ARGS",
        help="register a dataset from files, repeatable: NAME:coco_instances:JSON,IMAGE_DIR | "
        "NAME:coco_panoptic:JSON,PNG_DIR,IMAGE_DIR[,instances=JSON][,sem_seg=DIR] | "
        "NAME:sem_seg:IMAGE_DIR,LABEL_DIR,CLASSES_TXT[,ignore_label=255] | NAME:ytvis:JSON,FRAME_DIR "
        "(see docs/custom_datasets.md); then use NAME in DATASETS.TRAIN / DATASETS.TEST",
    )
    return parser
