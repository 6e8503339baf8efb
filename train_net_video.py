#!/usr/bin/env python
"""Train and evaluate Mask2Former-VIS (video instance segmentation) with Detectron2.

    python train_net_video.py --config-file configs/youtubevis_2019/video_maskformer2_R50_bs16_8ep.yaml --num-gpus 8
    python train_net_video.py --config-file ... --eval-only MODEL.WEIGHTS model_final.pkl
    python train_net_video.py --config-file ... --num-gpus 2 MODEL.DEVICE cpu    # two CPU processes (gloo)

Same engine as train_net.py (``--resume``, AMP, multi-machine ``launch``); only the data side
differs (``VideoTrainer``). Evaluation writes ``results.json`` for the YouTube-VIS server.
"""
from mask2former_d2 import engine
from mask2former_d2.engine import VideoTrainer, default_argument_parser, launch_main

setup = engine.setup


def main(args):
    return engine.main(args, VideoTrainer)


if __name__ == "__main__":
    launch_main(default_argument_parser().parse_args(), main)
