#!/usr/bin/env python
"""The quick-start: generate a dataset, train a tiny Mask2Former on the CPU, evaluate, run the demo.

Needs no download: the dataset is generated in COCO panoptic format (images, panoptic PNGs and
json, instance json, semantic PNGs), and the model trains from random initialisation. It runs
the same code as a real job — ``train_net.Trainer`` with the LSJ panoptic mapper, Detectron2's
COCO panoptic, COCO instance and semantic evaluators, and the demo's ``VisualizationDemo``.

    python tools/quickstart.py --output output/quickstart [--iters 600]
"""
import argparse
import json
import logging
import os
import sys
import time

import cv2
import torch
from detectron2.utils.logger import setup_logger

from mask2former_d2 import get_maskformer_cfg
from mask2former_d2.data.toy import make_toy_panoptic_dataset, register_toy_panoptic
from mask2former_d2.predictor import VisualizationDemo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "quickstart", "maskformer2_R18_tiny_coco_panoptic.yaml")


def quickstart_cfg(output: str, iters: int, extra=()):
    train, val = register_toy_panoptic(os.path.join(output, "toy_dataset"), prefix="quickstart_toy")
    opts = [
        "DATASETS.TRAIN", (train,),
        "DATASETS.TEST", (val,),
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES", 5,
        "SOLVER.MAX_ITER", iters,
        "SOLVER.STEPS", (int(iters * 0.85),),
        "SOLVER.CHECKPOINT_PERIOD", max(iters // 2, 1),
        "OUTPUT_DIR", os.path.join(output, "train"),
        "INPUT.IMAGE_SIZE", 160,
        "INPUT.MIN_SCALE", 0.6,
        "INPUT.MAX_SCALE", 1.6,
        "INPUT.MIN_SIZE_TEST", 160,
        "INPUT.MAX_SIZE_TEST", 256,
        "TEST.DETECTIONS_PER_IMAGE", 20,
    ]
    return get_maskformer_cfg(CONFIG, opts + list(extra))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", default=os.path.join(ROOT, "output", "quickstart"))
    ap.add_argument("--iters", type=int, default=600, help="training iterations (batch of 4)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="extra KEY VALUE config overrides")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.output, exist_ok=True)
    setup_logger(output=os.path.join(args.output, "log.txt"))
    setup_logger(name="mask2former_d2")
    log = logging.getLogger("quickstart")
    from mask2former_d2.engine import Trainer

    t0 = time.perf_counter()
    make_toy_panoptic_dataset(os.path.join(args.output, "toy_dataset"))
    cfg = quickstart_cfg(args.output, args.iters, args.opts)
    cfg.freeze()
    t_data = time.perf_counter()

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()  # evaluates on DATASETS.TEST when training ends
    results = trainer._last_eval_results
    t_eval = time.perf_counter()

    demo_cfg = cfg.clone()
    demo_cfg.defrost()
    demo_cfg.MODEL.WEIGHTS = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    demo = VisualizationDemo(demo_cfg, confidence_threshold=0.5)
    image_path = os.path.join(args.output, "toy_dataset", "images", "val", "val_00001.jpg")
    _, vis = demo.run_on_image(cv2.imread(image_path))
    demo_path = os.path.join(args.output, "demo.png")
    cv2.imwrite(demo_path, vis.get_image()[:, :, ::-1])
    t_demo = time.perf_counter()

    summary = {
        "PQ": results.get("panoptic_seg", {}).get("PQ"),
        "SQ": results.get("panoptic_seg", {}).get("SQ"),
        "RQ": results.get("panoptic_seg", {}).get("RQ"),
        "mask AP": results.get("segm", {}).get("AP"),
        "box AP": results.get("bbox", {}).get("AP"),
        "mIoU": results.get("sem_seg", {}).get("mIoU"),
        "seconds": {
            "dataset": round(t_data - t0, 1),
            "train + evaluate": round(t_eval - t_data, 1),
            "demo": round(t_demo - t_eval, 1),
            "total": round(t_demo - t0, 1),
        },
        "demo_image": demo_path,
    }
    with open(os.path.join(args.output, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    log.info("quick-start summary:\n%s", json.dumps(summary, indent=1))
    print("\n".join(
        ["", "== quick-start results (generated val split, 8 images)"]
        + [f"{k:>8}: {v:.1f}" for k, v in summary.items() if isinstance(v, float)]
        + [f"    time: {summary['seconds']}", f"    demo: {demo_path}"]
    ))
    return 0


if __name__ == "__main__":
    sys.exit(main())
