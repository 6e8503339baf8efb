#!/usr/bin/env python
"""Train and evaluate MaskFormer / Mask2Former with Detectron2.

    python train_net.py --config-file configs/coco/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml --num-gpus 8
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS model_final.pkl
    python train_net.py --config-file ... --num-gpus 2 MODEL.DEVICE cpu    # two CPU processes (gloo)
"""
from mask2former_d2 import engine
from mask2former_d2.engine import Trainer, default_argument_parser, launch_main

setup = engine.setup


def main(args):
    return engine.main(args, Trainer)


if __name__ == "__main__":
    launch_main(default_argument_parser().parse_args(), main)
