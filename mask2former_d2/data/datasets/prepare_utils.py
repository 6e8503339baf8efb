"""Small helpers for the dataset preparation scripts in ``datasets/prepare_*.py``.

Shapes: H/W image height/width; panoptic PNGs are (H, W, 3) uint8 RGB encoding a segment id as
``R + 256 * G + 256**2 * B`` (COCO panoptic format, 0 = void).
"""

import argparse
import json
import logging
import os
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

__all__ = [
    "rgb2id",
    "id2rgb",
    "bbox_xywh",
    "convert_splits",
    "run_per_split",
    "run_script",
    "save_image_atomic",
    "save_json_atomic",
    "script_parser",
]

logger = logging.getLogger(__name__)


def rgb2id(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 panoptic PNG -> (H, W) int64 segment ids."""
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB panoptic array, got shape {rgb.shape}")
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id2rgb(ids: np.ndarray) -> np.ndarray:
    """(H, W) integer segment ids in [0, 2**24) -> (H, W, 3) uint8 panoptic PNG."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= 256**3):
        raise ValueError(f"segment ids must be in [0, 2**24), got [{ids.min()}, {ids.max()}]")
    return np.stack([ids % 256, ids // 256 % 256, ids // 256**2 % 256], axis=-1).astype(np.uint8)


def bbox_xywh(mask: np.ndarray) -> List[int]:
    """Tight ``[x, y, width, height]`` box of a non-empty (H, W) boolean mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("bbox of an empty mask")
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def _replace_from_tmp(path: str, write: Any) -> None:
    """Writes via ``write(tmp_path)`` and renames, so an interrupted run leaves no partial file
    that a later (idempotent) run would mistake for a finished one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_image_atomic(array: np.ndarray, path: str, image_format: Optional[str] = None) -> None:
    """Saves ``array`` with PIL to ``path`` (format from the extension unless given), atomically."""
    fmt = image_format or Image.registered_extensions().get(os.path.splitext(path)[1].lower())
    if fmt is None:
        raise ValueError(f"cannot tell the image format of {path!r}; pass image_format")
    _replace_from_tmp(path, lambda tmp: Image.fromarray(array).save(tmp, format=fmt))


def save_json_atomic(obj: Any, path: str) -> None:
    """Writes ``obj`` as JSON to ``path`` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f)

    _replace_from_tmp(path, write)


def script_parser(
    doc: str,
    dataset_dir: str,
    splits: Sequence[str],
    *,
    default_splits: Optional[Sequence[str]] = None,
    splits_help: Optional[str] = None,
) -> argparse.ArgumentParser:
    """The command line shared by the ``datasets/prepare_*.py`` scripts.

    Args:
        doc: the script's docstring; its first paragraph is the description.
        dataset_dir: the directory under ``--root`` the script reads (for the help text).
        splits: the choices of ``--splits``.
        default_splits: the default of ``--splits`` (all ``splits`` unless given; None with
            ``splits_help`` to let the script decide).
        splits_help: help text of ``--splits``.

    Returns:
        A parser with ``--root`` (default ``$DETECTRON2_DATASETS`` or ``./datasets``),
        ``--splits`` and ``--overwrite``; scripts may add more options.
    """
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument(
        "--root",
        default=os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")),
        help=f"directory holding {dataset_dir}/ (default: $DETECTRON2_DATASETS or ./datasets)",
    )
    if default_splits is None and splits_help is None:
        default_splits = list(splits)
    parser.add_argument(
        "--splits", nargs="+", default=default_splits, choices=list(splits), help=splits_help
    )
    parser.add_argument("--overwrite", action="store_true", help="rewrite existing outputs")
    return parser


def convert_splits(
    splits: Sequence[str], convert_split: Callable[[str], Tuple[int, int]]
) -> List[Tuple[int, int]]:
    """Runs ``convert_split(split)`` (returning the files written and kept) for each split,
    logging both counts; returns them in order."""
    results = []
    for split in splits:
        written, skipped = convert_split(split)
        logger.info("%s: wrote %d, kept %d existing", split, written, skipped)
        results.append((written, skipped))
    return results


def run_per_split(
    doc: str, dataset_dir: str, splits: Sequence[str], convert_split: Callable[[str, str, bool], Any],
    argv: Optional[Sequence[str]] = None,
) -> List[Any]:
    """Command line of a script that converts each split on its own: parses ``argv`` with
    :func:`script_parser` and returns ``[convert_split(<root>/<dataset_dir>, split, overwrite)]``."""
    args = script_parser(doc, dataset_dir, list(splits)).parse_args(argv)
    base = os.path.join(args.root, dataset_dir)
    return [convert_split(base, split, args.overwrite) for split in args.splits]


def run_script(main: Callable[[], Any]) -> None:
    """Entry point of a prepare script: plain INFO logging, then ``main()``."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
