#!/usr/bin/env python
"""Converts a Hugging Face Mask2Former or MaskFormer checkpoint folder into Detectron2 weights
plus a config that builds the matching model of this project.

The folder holds ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``), and
optionally ``preprocessor_config.json`` (its mean/std become ``MODEL.PIXEL_MEAN/STD``). Writes:

* ``OUTPUT`` (``.pkl``): every weight under this project's names;
* ``OUTPUT`` with ``.yaml``: the full config (backbone, sizes, queries, classes), with the class
  names of ``id2label`` listed at its top;
* ``OUTPUT`` with ``.report.txt``: every key mapped, skipped (and why) or not placed.

An architecture with no counterpart here is refused with one line naming the setting.

Usage:
    python tools/convert_hf_to_d2.py path/to/mask2former-swin-tiny-coco-panoptic out/m2f_swin_t.pkl \
        --task panoptic
    python train_net.py --eval-only --config-file out/m2f_swin_t.yaml MODEL.WEIGHTS out/m2f_swin_t.pkl \
        DATASETS.TEST '("coco_2017_val_panoptic_with_sem_seg",)'
"""
import argparse
import logging
import os
import sys
from typing import List, Optional, Sequence

from mask2former_d2.hf_conversion import UnsupportedArchitecture, hf_folder_to_d2
from mask2former_d2.weight_conversion import to_numpy, write_d2_weights

logger = logging.getLogger("convert_hf_to_d2")


def convert(folder: str, output: str, task: str = "semantic") -> List[str]:
    """Converts ``folder`` into ``output`` (.pkl), its ``.yaml`` and ``.report.txt``; returns the
    report lines."""
    cfg, state_dict, arch, report = hf_folder_to_d2(folder, task)
    stem = os.path.splitext(output)[0]
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    write_d2_weights({k: to_numpy(v) for k, v in state_dict.items()}, output, author="convert_hf_to_d2")
    header = [
        f"# Converted from the Hugging Face checkpoint {os.path.abspath(folder)}",
        f"# by tools/convert_hf_to_d2.py: {arch.kind}, {arch.backbone} backbone, {arch.num_classes} classes.",
        "# Class index: name (from id2label)",
    ] + [f"#   {i}: {name}" for i, name in enumerate(arch.class_names)]
    with open(stem + ".yaml", "w") as f:
        f.write("\n".join(header) + "\n" + cfg.dump())
    lines = report.lines()
    with open(stem + ".report.txt", "w") as f:
        f.write("\n".join(lines) + "\n")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="Hugging Face checkpoint folder (config.json + weights)")
    parser.add_argument("output", help="Detectron2 weight file to write (.pkl); the .yaml and .report.txt go beside it")
    parser.add_argument(
        "--task", default="semantic", choices=["semantic", "instance", "panoptic"],
        help="which inference outputs the config switches on (default: semantic)",
    )
    parser.add_argument("--verbose", action="store_true", help="print every report line, not only the summary")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        lines = convert(args.folder, args.output, args.task)
    except (UnsupportedArchitecture, FileNotFoundError, ValueError) as e:
        print(f"convert_hf_to_d2: {args.folder}: {e}", file=sys.stderr)
        return 2
    counts = {kind: sum(line.startswith(kind) for line in lines) for kind in ("mapped", "skipped", "unplaced")}
    if args.verbose:
        print("\n".join(lines))
    stem = os.path.splitext(args.output)[0]
    print(
        f"wrote {args.output}, {stem}.yaml and {stem}.report.txt: {counts['mapped']} mapped, "
        f"{counts['skipped']} skipped, {counts['unplaced']} unplaced"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
