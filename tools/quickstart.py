#!/usr/bin/env python
"""The quick-start: generate a dataset, train a tiny model on the CPU, evaluate, run the demo.

Needs no download: the dataset is generated and the model trains from random initialisation. It
runs the same code as a real job.

* Images (default): a COCO-panoptic-format dataset (images, panoptic PNGs and json, instance
  json, semantic PNGs), a tiny Mask2Former trained by ``mask2former_d2.engine.Trainer`` (the
  engine of ``train_net.py``) with the LSJ panoptic mapper, Detectron2's COCO panoptic, COCO
  instance and semantic evaluators, and the demo's ``VisualizationDemo`` (``demo.png``).
* ``--video``: a YouTube-VIS-format dataset (moving, appearing and disappearing shapes, RLE per
  frame), a tiny Mask2Former-VIS trained by ``VideoTrainer`` (the engine of
  ``train_net_video.py``) with the YouTube-VIS clip mapper and ``YTVISEvaluator``, and the video
  demo's tracks drawn on a validation clip (``demo.mp4``).

    python tools/quickstart.py --output output/quickstart [--iters 600]
    python tools/quickstart.py --video --output output/quickstart_video [--iters 500]
    python tools/quickstart.py --config pem_STDC1_tiny_coco_panoptic.yaml --output output/quickstart_pem

``--config`` picks another model for the same run (a file of ``configs/quickstart/`` or a path),
e.g. the tiny PEM.
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs", "quickstart")


def image_cfg(output: str, iters: int, extra=(), config: str = "maskformer2_R18_tiny_coco_panoptic.yaml"):
    from mask2former_d2.data.toy import make_toy_panoptic_dataset, register_toy_panoptic

    make_toy_panoptic_dataset(os.path.join(output, "toy_dataset"))
    train, val = register_toy_panoptic(os.path.join(output, "toy_dataset"), prefix="quickstart_toy")
    opts = [
        "DATASETS.TRAIN", (train,),
        "DATASETS.TEST", (val,),
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES", 5,
        "SOLVER.STEPS", (int(iters * 0.85),),
        "INPUT.IMAGE_SIZE", 160,
        "INPUT.MIN_SCALE", 0.6,
        "INPUT.MAX_SCALE", 1.6,
        "INPUT.MIN_SIZE_TEST", 160,
        "INPUT.MAX_SIZE_TEST", 256,
        "TEST.DETECTIONS_PER_IMAGE", 20,
    ]
    return _cfg(config, output, iters, opts + list(extra))


def video_cfg(output: str, iters: int, extra=(), config: str = "video_maskformer2_R18_tiny_toy_ytvis.yaml"):
    from mask2former_d2.data.toy_video import make_toy_ytvis_dataset, register_toy_ytvis

    make_toy_ytvis_dataset(os.path.join(output, "toy_ytvis"))
    train, val = register_toy_ytvis(os.path.join(output, "toy_ytvis"), prefix="quickstart_toy_ytvis")
    opts = ["DATASETS.TRAIN", (train,), "DATASETS.TEST", (val,), "SOLVER.STEPS", (int(iters * 0.8),)]
    return _cfg(config, output, iters, opts + list(extra))


def _cfg(name: str, output: str, iters: int, opts):
    common = [
        "SOLVER.MAX_ITER", iters,
        "SOLVER.CHECKPOINT_PERIOD", max(iters // 2, 1),
        "OUTPUT_DIR", os.path.join(output, "train"),
    ]
    path = name if os.path.isfile(name) else os.path.join(CONFIGS, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config {name}: no such file here or in {CONFIGS}")
    cfg = get_maskformer_cfg(path, common + list(opts))
    cfg.freeze()
    return cfg


def image_demo(cfg, output: str) -> str:
    """Draws the trained model's output on a validation image; returns the picture's path."""
    from mask2former_d2.predictor import VisualizationDemo

    demo = VisualizationDemo(cfg, confidence_threshold=0.5)
    image_path = os.path.join(output, "toy_dataset", "images", "val", "val_00001.jpg")
    _, vis = demo.run_on_image(cv2.imread(image_path))
    path = os.path.join(output, "demo.png")
    cv2.imwrite(path, vis.get_image()[:, :, ::-1])
    return path


def video_demo(cfg, output: str) -> str:
    """Draws the trained model's tracks on a validation clip; returns the video's path."""
    from mask2former_d2.video_predictor import VideoVisualizationDemo

    demo = VideoVisualizationDemo(cfg, confidence_threshold=0.5)
    clip = os.path.join(output, "toy_ytvis", "valid", "JPEGImages", "val_0001")
    frames = [cv2.imread(os.path.join(clip, n)) for n in sorted(os.listdir(clip))]
    path = os.path.join(output, "demo.mp4")
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), 5.0, (width, height))
    for drawn in demo.draw(frames, demo.predict(frames)):
        writer.write(drawn)
    writer.release()
    return path


def image_metrics(results):
    pan = results.get("panoptic_seg", {})
    return {
        "PQ": pan.get("PQ"), "SQ": pan.get("SQ"), "RQ": pan.get("RQ"),
        "mask AP": results.get("segm", {}).get("AP"),
        "box AP": results.get("bbox", {}).get("AP"),
        "mIoU": results.get("sem_seg", {}).get("mIoU"),
    }


def video_metrics(results):
    segm = results.get("segm", {})
    return {k: segm.get(k) for k in ("AP", "AP50", "AP75", "AR1", "AR10")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--video", action="store_true", help="the video quick-start (Mask2Former-VIS)")
    ap.add_argument("--output", default=None, help="default: output/quickstart (output/quickstart_video)")
    ap.add_argument("--iters", type=int, default=None,
                    help="training iterations (batch of 4 images / clips); default 600 (video: 500)")
    ap.add_argument("--config", default=None,
                    help="model config: a file of configs/quickstart/ (e.g. pem_STDC1_tiny_coco_panoptic.yaml) "
                         "or a path; default: the tiny Mask2Former (video: Mask2Former-VIS)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="extra KEY VALUE config overrides")
    args = ap.parse_args(argv)
    output = args.output or os.path.join(ROOT, "output", "quickstart_video" if args.video else "quickstart")
    iters = args.iters or (500 if args.video else 600)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(output, exist_ok=True)
    setup_logger(output=os.path.join(output, "log.txt"))
    setup_logger(name="mask2former_d2")
    log = logging.getLogger("quickstart")
    from mask2former_d2.engine import Trainer, VideoTrainer

    t0 = time.perf_counter()
    config = {"config": args.config} if args.config else {}
    cfg = (video_cfg if args.video else image_cfg)(output, iters, args.opts, **config)
    t_data = time.perf_counter()

    trainer = (VideoTrainer if args.video else Trainer)(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()  # evaluates on DATASETS.TEST when training ends
    results = trainer._last_eval_results
    t_eval = time.perf_counter()

    demo_cfg = cfg.clone()
    demo_cfg.defrost()
    demo_cfg.MODEL.WEIGHTS = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    demo_path = (video_demo if args.video else image_demo)(demo_cfg, output)
    t_demo = time.perf_counter()

    summary = {
        **(video_metrics if args.video else image_metrics)(results),
        "seconds": {
            "dataset": round(t_data - t0, 1),
            "train + evaluate": round(t_eval - t_data, 1),
            "demo": round(t_demo - t_eval, 1),
            "total": round(t_demo - t0, 1),
        },
        "demo_video" if args.video else "demo_image": demo_path,
    }
    with open(os.path.join(output, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    log.info("quick-start summary:\n%s", json.dumps(summary, indent=1))
    split = "6 videos of 8 frames" if args.video else "8 images"
    print("\n".join(
        ["", f"== {'video ' if args.video else ''}quick-start results (generated val split, {split})"]
        + [f"{k:>8}: {v:.1f}" for k, v in summary.items() if isinstance(v, float)]
        + [f"    time: {summary['seconds']}", f"    demo: {demo_path}"]
    ))
    return 0


if __name__ == "__main__":
    sys.exit(main())
