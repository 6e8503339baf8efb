#!/usr/bin/env python
"""Run a Mask2Former-VIS model on a video (or a folder of frames) and write the tracks as a video.

Examples::

    python demo/demo_video.py \
        --config-file configs/youtubevis_2019/video_maskformer2_R50_bs16_8ep.yaml \
        --video-input clip.mp4 --output vis/clip.mp4 --opts MODEL.WEIGHTS model_final.pkl
    python demo/demo_video.py --config-file cfg.yaml --input frames_dir/ --fps 6 --output vis/

The whole clip is one input of the model: every prediction is a track, drawn in one colour in
every frame. The output keeps the source's frame size and frame rate.
"""

import argparse
import logging
import math
import os
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np
import tqdm
from detectron2.data.detection_utils import read_image

from demo import (  # the image demo beside this file: its argument checks and video I/O
    _PROGRESS_FORMAT,
    DemoError,
    expand_inputs,
    open_video_file,
    open_video_writer,
    setup_cfg,
    setup_loggers,
    video_output_path,
)
from mask2former_d2.data.datasets.custom import add_dataset_argument
from mask2former_d2.engine.launch import overrides_after_opts, run_cli
from mask2former_d2.video_predictor import VideoVisualizationDemo

logger = logging.getLogger("mask2former_d2.demo")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Draw Mask2Former-VIS tracks on a video.")
    parser.add_argument("--config-file", required=True, metavar="FILE", help="video model config (YAML)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--video-input", metavar="FILE", help="a video file")
    source.add_argument("--input", nargs="+", metavar="PATH",
                        help="the frames of one clip: a folder of images or image files, in name order")
    parser.add_argument("--output", required=True, metavar="PATH",
                        help="a .mp4/.mkv/.avi file, or a folder (the result is <folder>/<clip name>.mp4)")
    parser.add_argument("--fps", type=float, default=None,
                        help="frame rate of the output (default: the source's; 5 for a folder of frames)")
    parser.add_argument("--confidence-threshold", type=float, default=0.5,
                        help="tracks scoring below this are not drawn; in [0, 1] (default: %(default)s)")
    parser.add_argument("--window-size", type=int, default=0, metavar="W",
                        help="long-video mode: run the model on windows of W frames and link the tracks of "
                        "overlapping windows (changes the outputs; default 0: the whole clip at once)")
    parser.add_argument("--window-overlap", type=int, default=None, metavar="O",
                        help="frames shared by consecutive windows in long-video mode (default: W // 4)")
    add_dataset_argument(parser)  # class names of a dataset registered from files
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, metavar="KEY VALUE",
                        help="config overrides as KEY VALUE pairs, e.g. MODEL.WEIGHTS model.pkl; last on the "
                        "line (--opts may be left out)")
    return parser


def read_video(path: str) -> Tuple[List[np.ndarray], float]:
    """All frames of a video file (BGR) and its frame rate (0 when unknown)."""
    video = open_video_file(path)
    fps = video.get(cv2.CAP_PROP_FPS)
    frames = []
    try:
        while True:
            ok, frame = video.read()
            if not ok:
                break
            frames.append(frame)
    finally:
        video.release()
    return frames, fps if fps and math.isfinite(fps) and fps > 0 else 0.0


def read_frames(paths: Sequence[str]) -> List[np.ndarray]:
    """The images ``paths`` (BGR), which must all have one size."""
    frames = []
    for path in paths:
        try:
            frames.append(read_image(path, format="BGR"))
        except OSError as e:
            raise DemoError(f"{path}: cannot read the image ({e})") from None
        if frames[-1].shape != frames[0].shape:
            raise DemoError(f"{path}: is {frames[-1].shape[1]}x{frames[-1].shape[0]} but {paths[0]} is "
                            f"{frames[0].shape[1]}x{frames[0].shape[0]}; the frames of a clip must have one size")
    return frames


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_parser().parse_args(overrides_after_opts(argv))
    setup_loggers()
    if not 0.0 <= args.confidence_threshold <= 1.0:  # also rejects nan
        raise DemoError(f"--confidence-threshold must be in [0, 1]; got {args.confidence_threshold}")
    if args.window_size < 0:
        raise DemoError(f"--window-size must be >= 0 (0: whole clip); got {args.window_size}")
    if args.fps is not None and not args.fps > 0:
        raise DemoError(f"--fps must be > 0; got {args.fps}")
    opts = list(args.opts)
    if args.window_size:
        overlap = args.window_size // 4 if args.window_overlap is None else args.window_overlap
        if not 0 <= overlap < args.window_size:
            raise DemoError(f"--window-overlap must be in [0, --window-size); got {overlap}")
        opts += ["MODEL.MASK_FORMER.TEST.WINDOW_SIZE", str(args.window_size),
                 "MODEL.MASK_FORMER.TEST.WINDOW_OVERLAP", str(overlap)]
    cfg = setup_cfg(args.config_file, opts)

    # Inputs and output are checked before the (slow) model construction.
    if args.video_input:
        name = args.video_input
        open_video_file(name).release()  # a missing or undecodable file is named first
        video_output_path(args.output, name)  # a wrong --output is named before decoding
        frames, fps = read_video(name)
    else:
        paths = expand_inputs(args.input)
        name = os.path.basename(os.path.normpath(args.input[0])) if len(args.input) == 1 else "frames"
        video_output_path(args.output, name)
        frames, fps = read_frames(paths), 0.0
    if not frames:
        raise DemoError(f"{name}: no frame could be decoded")
    # The output keeps the frames' size (an odd one too: see video_output_path).
    out_path = video_output_path(args.output, name, (frames[0].shape[1], frames[0].shape[0]))
    fps = args.fps or fps or 5.0

    demo = VideoVisualizationDemo(cfg, confidence_threshold=args.confidence_threshold)
    logger.info(f"{name}: running the model on {len(frames)} frames of {frames[0].shape[1]}x{frames[0].shape[0]}")
    predictions = demo.predict(frames)
    summary = ", ".join(f"{demo.metadata.thing_classes[c] if c < len(demo.metadata.thing_classes) else c} {s:.2f}"
                        for c, s in zip(predictions["pred_labels"], predictions["pred_scores"]))
    logger.info(f"{name}: {len(predictions['pred_scores'])} tracks >= {args.confidence_threshold}: {summary or '-'}")
    height, width = frames[0].shape[:2]
    writer = open_video_writer(out_path, fps, width, height)
    try:
        for drawn in tqdm.tqdm(demo.draw(frames, predictions), total=len(frames), desc=name, unit="frame",
                               bar_format=_PROGRESS_FORMAT):
            writer.write(drawn)
    finally:
        writer.release()
    logger.info(f"{name}: wrote {len(frames)} frames at {fps:g} frames/s to {out_path}")
    return 0


def cli(argv: Optional[Sequence[str]] = None) -> None:
    """Runs :func:`main`; a user error becomes one line on stderr and exit status 1."""
    run_cli(main, argv, "demo_video.py", (DemoError, ValueError))


if __name__ == "__main__":
    cli()
