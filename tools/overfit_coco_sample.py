#!/usr/bin/env python
"""Overfit check: train a small Mask2Former on a few real COCO images and evaluate PQ on them.

It proves that the whole training loop learns — mapper, matcher, losses, optimizer, schedule,
panoptic inference and Detectron2's COCO panoptic evaluator — on real annotations:

    python tools/overfit_coco_sample.py --coco-root ../shared/data/coco [--iters 1500]

``--coco-root`` holds ``annotations/panoptic_val2017.json``, ``panoptic_val2017/*.png``,
``val2017/*.jpg`` (and optionally ``annotations/instances_val2017.json`` for mask AP) for the
images to overfit. Prints PQ (and AP) on those images and the time taken.
"""
import argparse
import json
import os
import sys
import time

from detectron2.data.datasets import register_coco_panoptic
from detectron2.data.datasets.builtin_meta import _get_builtin_metadata
from detectron2.utils.logger import setup_logger

from mask2former_d2 import get_maskformer_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "quickstart", "maskformer2_R18_tiny_coco_panoptic.yaml")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--coco-root", default=os.path.join(os.path.dirname(ROOT), "shared", "data", "coco"))
    ap.add_argument("--output", default=os.path.join(ROOT, "output", "overfit_coco_sample"))
    ap.add_argument("--iters", type=int, default=1500)
    ap.add_argument("--size", type=int, default=320, help="shortest image side, train and test")
    ap.add_argument("--eval-only", default="", metavar="WEIGHTS", help="evaluate these weights, no training")
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="extra KEY VALUE config overrides")
    args = ap.parse_args(argv)
    pan_json = os.path.join(args.coco_root, "annotations", "panoptic_val2017.json")
    if not os.path.isfile(pan_json):
        sys.exit(f"overfit_coco_sample: {pan_json} not found (see --coco-root)")
    inst_json = os.path.join(args.coco_root, "annotations", "instances_val2017.json")
    has_instances = os.path.isfile(inst_json)
    setup_logger(output=os.path.join(args.output, "log.txt"))
    setup_logger(name="mask2former_d2")

    name = "coco_sample_panoptic"
    register_coco_panoptic(
        name,
        _get_builtin_metadata("coco_panoptic_standard"),
        os.path.join(args.coco_root, "val2017"),
        os.path.join(args.coco_root, "panoptic_val2017"),
        pan_json,
        inst_json if has_instances else None,
    )
    opts = [
        "DATASETS.TRAIN", (name,),
        "DATASETS.TEST", (name,),
        "INPUT.DATASET_MAPPER_NAME", "mask_former_panoptic",
        "INPUT.MIN_SIZE_TRAIN", (args.size,),
        "INPUT.MAX_SIZE_TRAIN", args.size * 2,
        "INPUT.MIN_SIZE_TEST", args.size,
        "INPUT.MAX_SIZE_TEST", args.size * 2,
        "INPUT.CROP.ENABLED", False,
        "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", 50,
        "MODEL.MASK_FORMER.HIDDEN_DIM", 128,
        "MODEL.SEM_SEG_HEAD.CONVS_DIM", 128,
        "MODEL.SEM_SEG_HEAD.MASK_DIM", 128,
        "MODEL.MASK_FORMER.TEST.SEMANTIC_ON", False,  # the sample has no semantic PNGs
        "MODEL.MASK_FORMER.TEST.INSTANCE_ON", has_instances,
        "SOLVER.IMS_PER_BATCH", 2,
        "SOLVER.MAX_ITER", args.iters,
        "SOLVER.STEPS", (int(args.iters * 0.8),),
        "SOLVER.CHECKPOINT_PERIOD", args.iters,
        "OUTPUT_DIR", args.output,
    ] + list(args.opts)
    cfg = get_maskformer_cfg(CONFIG, opts)
    cfg.freeze()
    from mask2former_d2.engine import Trainer

    t0 = time.perf_counter()
    if args.eval_only:
        from mask2former_d2.checkpoint import MaskFormerCheckpointer

        model = Trainer.build_model(cfg)
        MaskFormerCheckpointer(model).load(args.eval_only)
        results = Trainer.test(cfg, model)
    else:
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()  # evaluates on the same images at the end
        results = trainer._last_eval_results
    seconds = time.perf_counter() - t0
    summary = {
        "PQ": results["panoptic_seg"]["PQ"],
        "SQ": results["panoptic_seg"]["SQ"],
        "RQ": results["panoptic_seg"]["RQ"],
        "mask AP": results.get("segm", {}).get("AP"),
        "iterations": args.iters,
        "seconds": round(seconds, 1),
    }
    with open(os.path.join(args.output, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"\noverfit on {args.coco_root}: " + ", ".join(
        f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
