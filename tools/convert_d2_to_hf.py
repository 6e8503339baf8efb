#!/usr/bin/env python
"""Converts a model of this project (config + weights) into a Hugging Face checkpoint folder that
``transformers``' ``Mask2FormerForUniversalSegmentation`` / ``MaskFormerForInstanceSegmentation``
``from_pretrained`` load.

The weights are read as training and evaluation read them (``.pkl``/``.pth``, ``zoo://`` names,
URLs). Class names come from ``--class-names`` (a text file, one per line), else from the
metadata of the config's first test dataset, else the list that ``tools/convert_hf_to_d2.py``
writes at the top of its YAML, else ``class_<i>``. Writes ``config.json``,
``model.safetensors``, ``preprocessor_config.json`` (the config's pixel mean/std and test size)
and ``conversion_report.txt`` (every key mapped, skipped or not placed) into the output folder.

A config with no counterpart in ``transformers`` (another pixel or transformer decoder, the
DeepLab ResNet stem of R101c, ResNeXt, the video model, ...) is refused with one line.

Usage:
    python tools/convert_d2_to_hf.py \
        --config-file configs/coco/panoptic-segmentation/swin/maskformer2_swin_tiny_bs16_50ep.yaml \
        --weights zoo://coco/panoptic/swin_tiny --output out/hf_m2f_swin_t
"""
import argparse
import logging
import os
import re
import sys
from typing import List, Optional, Sequence

from mask2former_d2.hf_conversion import UnsupportedArchitecture, arch_from_d2_cfg, d2_to_hf_model

logger = logging.getLogger("convert_d2_to_hf")


def names_from_yaml_header(config_file: str) -> List[str]:
    """The class names that ``tools/convert_hf_to_d2.py`` lists at the top of its YAML files."""
    names, in_list = [], False
    with open(config_file) as f:
        for line in f:
            if not line.startswith("#"):
                break
            if line.startswith("# Class index: name"):
                in_list = True
                continue
            m = re.match(r"#\s+(\d+): (.*)$", line.rstrip("\n"))
            if in_list and m and int(m.group(1)) == len(names):
                names.append(m.group(2))
    return names


def class_names_for(cfg, path: Optional[str], config_file: str = "") -> Optional[List[str]]:
    """The class names: from ``path`` (one per line), else the first test dataset's metadata
    (``stuff_classes`` or ``thing_classes``, whichever has NUM_CLASSES entries), else the list at
    the top of a YAML written by ``convert_hf_to_d2.py``, else None."""
    num = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    if path:
        with open(path) as f:
            names = [line.strip() for line in f if line.strip()]
        if len(names) != num:
            raise ValueError(f"{path}: {len(names)} class names, expected MODEL.SEM_SEG_HEAD.NUM_CLASSES={num}")
        return names
    if cfg.DATASETS.TEST:
        from detectron2.data import MetadataCatalog

        meta = MetadataCatalog.get(cfg.DATASETS.TEST[0])
        for key in ("stuff_classes", "thing_classes"):
            names = meta.get(key, None)
            if names is not None and len(names) == num:
                return list(names)
    names = names_from_yaml_header(config_file) if config_file else []
    return names if len(names) == num else None


def convert(
    cfg, weights: str, output: str, class_names_file: Optional[str] = None, config_file: str = ""
) -> List[str]:
    """Writes the Hugging Face folder ``output`` for ``cfg`` with ``weights``; returns the report."""
    import transformers as tf
    from detectron2.modeling import build_model

    from mask2former_d2.checkpoint import MaskFormerCheckpointer

    arch_from_d2_cfg(cfg)  # refuses an architecture transformers cannot express before any work
    model = build_model(cfg).eval()
    MaskFormerCheckpointer(model).load(weights)
    names = class_names_for(cfg, class_names_file, config_file)
    hf_model, arch, report = d2_to_hf_model(cfg, model.state_dict(), names)
    os.makedirs(output, exist_ok=True)
    hf_model.save_pretrained(output)
    processor_cls = tf.Mask2FormerImageProcessor if arch.kind == "mask2former" else tf.MaskFormerImageProcessor
    processor_cls(
        image_mean=[m / 255.0 for m in cfg.MODEL.PIXEL_MEAN], image_std=[s / 255.0 for s in cfg.MODEL.PIXEL_STD],
        size={"shortest_edge": cfg.INPUT.MIN_SIZE_TEST, "longest_edge": cfg.INPUT.MAX_SIZE_TEST},
        size_divisor=32, ignore_index=cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
    ).save_pretrained(output)
    lines = report.lines()
    with open(os.path.join(output, "conversion_report.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, help="this project's config of the model")
    parser.add_argument("--weights", required=True, help="weights: .pkl/.pth file, zoo://<name> or URL")
    parser.add_argument("--output", required=True, help="Hugging Face folder to write")
    parser.add_argument("--class-names", help="text file with one class name per line (default: dataset metadata)")
    parser.add_argument("--verbose", action="store_true", help="print every report line, not only the summary")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from mask2former_d2.config import get_maskformer_cfg

    try:
        cfg = get_maskformer_cfg(args.config_file, list(args.opts) + ["MODEL.DEVICE", "cpu"])
        lines = convert(cfg, args.weights, args.output, args.class_names, args.config_file)
    except (UnsupportedArchitecture, FileNotFoundError, KeyError, ValueError, OSError) as e:
        print(f"convert_d2_to_hf: {args.config_file}: {e}", file=sys.stderr)
        return 2
    counts = {kind: sum(line.startswith(kind) for line in lines) for kind in ("mapped", "skipped", "unplaced")}
    if args.verbose:
        print("\n".join(lines))
    print(
        f"wrote {args.output} (conversion_report.txt inside): {counts['mapped']} mapped, "
        f"{counts['skipped']} skipped, {counts['unplaced']} unplaced"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
