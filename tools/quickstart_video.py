#!/usr/bin/env python
"""The video quick-start: generate a YouTube-VIS-format dataset, train a tiny Mask2Former-VIS on
the CPU, evaluate it, and draw its tracks on a clip.

Needs no download: the toy videos (moving, appearing and disappearing shapes, RLE per frame, in
the real YouTube-VIS json layout) are generated, and the model trains from random
initialisation. It runs the same code as a real job: ``VideoTrainer`` (the engine of
``train_net_video.py``) with the YouTube-VIS clip mapper, ``YTVISEvaluator`` and the video demo.

    python tools/quickstart_video.py --output output/quickstart_video [--iters 500]
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
from mask2former_d2.data.toy_video import make_toy_ytvis_dataset, register_toy_ytvis
from mask2former_d2.engine import VideoTrainer
from mask2former_d2.video_predictor import VideoVisualizationDemo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "quickstart", "video_maskformer2_R18_tiny_toy_ytvis.yaml")


def quickstart_cfg(output: str, iters: int, extra=()):
    train, val = register_toy_ytvis(os.path.join(output, "toy_ytvis"), prefix="quickstart_toy_ytvis")
    opts = [
        "DATASETS.TRAIN", (train,),
        "DATASETS.TEST", (val,),
        "SOLVER.MAX_ITER", iters,
        "SOLVER.STEPS", (int(iters * 0.8),),
        "SOLVER.CHECKPOINT_PERIOD", max(iters // 2, 1),
        "OUTPUT_DIR", os.path.join(output, "train"),
    ]
    return get_maskformer_cfg(CONFIG, opts + list(extra))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", default=os.path.join(ROOT, "output", "quickstart_video"))
    ap.add_argument("--iters", type=int, default=500, help="training iterations (batch of 4 clips)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="extra KEY VALUE config overrides")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.output, exist_ok=True)
    setup_logger(output=os.path.join(args.output, "log.txt"))
    setup_logger(name="mask2former_d2")
    log = logging.getLogger("quickstart_video")

    t0 = time.perf_counter()
    root = make_toy_ytvis_dataset(os.path.join(args.output, "toy_ytvis"))
    cfg = quickstart_cfg(args.output, args.iters, args.opts)
    cfg.freeze()
    t_data = time.perf_counter()

    trainer = VideoTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()  # evaluates on DATASETS.TEST when training ends
    results = trainer._last_eval_results
    t_eval = time.perf_counter()

    demo_cfg = cfg.clone()
    demo_cfg.defrost()
    demo_cfg.MODEL.WEIGHTS = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    demo = VideoVisualizationDemo(demo_cfg, confidence_threshold=0.5)
    clip = os.path.join(root, "valid", "JPEGImages", "val_0001")
    frames = [cv2.imread(os.path.join(clip, n)) for n in sorted(os.listdir(clip))]
    predictions = demo.predict(frames)
    demo_path = os.path.join(args.output, "demo.mp4")
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(demo_path, cv2.VideoWriter_fourcc(*"mp4v"), 5.0, (width, height))
    for drawn in demo.draw(frames, predictions):
        writer.write(drawn)
    writer.release()
    t_demo = time.perf_counter()

    segm = results.get("segm", {})
    summary = {
        **{k: segm.get(k) for k in ("AP", "AP50", "AP75", "AR1", "AR10")},
        "demo_tracks": len(predictions["pred_scores"]),
        "seconds": {
            "dataset": round(t_data - t0, 1),
            "train + evaluate": round(t_eval - t_data, 1),
            "demo": round(t_demo - t_eval, 1),
            "total": round(t_demo - t0, 1),
        },
        "demo_video": demo_path,
    }
    with open(os.path.join(args.output, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    log.info("video quick-start summary:\n%s", json.dumps(summary, indent=1))
    print("\n".join(
        ["", "== video quick-start results (generated val split, 6 videos of 8 frames)"]
        + [f"{k:>8}: {v:.1f}" for k, v in summary.items() if isinstance(v, float)]
        + [f"    time: {summary['seconds']}", f"    demo: {demo_path} ({summary['demo_tracks']} tracks)"]
    ))
    return 0


if __name__ == "__main__":
    sys.exit(main())
