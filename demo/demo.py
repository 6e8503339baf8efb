#!/usr/bin/env python
"""Run a MaskFormer / Mask2Former model on images, a video file or a webcam and draw the results.

Examples::

    python demo/demo.py \
        --config-file configs/coco/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml \
        --input photos/ extra/*.jpg --output vis/ --opts MODEL.WEIGHTS model_final.pkl
    python demo/demo.py --config-file cfg.yaml --video-input clip.mp4 --output vis/clip.mp4 \
        --opts MODEL.WEIGHTS model_final.pkl

    python demo/demo.py --config-file cfg.yaml --onnx model.onnx --input photo.jpg --output vis/

Without ``--output`` the results are shown in OpenCV windows (press Esc to stop). With
``--onnx`` the network runs in ONNX Runtime from a file of ``tools/export_model.py``; the
post-processing is the PyTorch model's, so the drawings are the same.
"""

import argparse
import glob
import logging
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
import tqdm
import yaml
from detectron2.config import CfgNode
from detectron2.data.detection_utils import read_image
from detectron2.utils.logger import setup_logger

from mask2former_d2 import get_maskformer_cfg
from mask2former_d2.accel.precision import check_precision
from mask2former_d2.config import validate_cfg
from mask2former_d2.data.datasets.custom import add_dataset_argument
from mask2former_d2.engine.launch import overrides_after_opts, run_cli
from mask2former_d2.predictor import Predictor, VisualizationDemo

logger = logging.getLogger("mask2former_d2.demo")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# Codecs tried, in order, for each video container; the first one OpenCV can open is used.
VIDEO_CODECS: Dict[str, Sequence[str]] = {
    ".mp4": ("mp4v",),
    ".mkv": ("x264", "mp4v"),
    ".avi": ("MJPG", "XVID"),
}
WINDOW_NAME = "mask2former_d2"
_PROGRESS_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}]"
_ESC = 27


class DemoError(Exception):
    """A problem with the user's arguments or files; reported without a traceback."""


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Draw MaskFormer / Mask2Former predictions on images, a video or a webcam."
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="model config (YAML)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--input",
        nargs="+",
        metavar="PATH",
        help="image files, folders (their images, not recursive) or glob patterns; images are "
        f"files ending in {', '.join(IMAGE_EXTENSIONS)}",
    )
    source.add_argument("--webcam", action="store_true", help="read frames from webcam 0")
    source.add_argument("--video-input", metavar="FILE", help="a video file")
    parser.add_argument(
        "--output",
        metavar="PATH",
        help="where to save the drawings: a file or a folder (created if missing). With several "
        "input images it must be a folder. For a video, a .mp4/.mkv/.avi file or a folder (the "
        "result is then <folder>/<video name>.mp4). If omitted, results are shown in a window.",
    )
    parser.add_argument(
        "--confidence-threshold",
        type=float,
        default=0.5,
        help="instances scoring below this are not drawn (default: %(default)s). It applies to "
        "instance predictions only: panoptic segments have no score and are drawn as the model "
        "outputs them (see MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD). When the model outputs "
        "a panoptic segmentation, that is what gets drawn, so this threshold has no visible "
        "effect.",
    )
    parser.add_argument(
        "--onnx",
        metavar="FILE",
        help="run the network from this ONNX file (written by tools/export_model.py from the same "
        "config) in ONNX Runtime instead of PyTorch; MODEL.WEIGHTS is then not read",
    )
    add_dataset_argument(parser)  # class names of a dataset registered from files
    parser.add_argument(
        "--opts",
        default=[],
        nargs=argparse.REMAINDER,
        metavar="KEY VALUE",
        help="config overrides as KEY VALUE pairs, e.g. MODEL.WEIGHTS model.pkl; last on the line "
        "(--opts may be left out)",
    )
    return parser


def setup_cfg(config_file: str, opts: Sequence[str]) -> CfgNode:
    """Builds the frozen config: defaults, then ``config_file``, then ``opts``.

    ``MODEL.DEVICE`` falls back to "cpu" when CUDA is unavailable, unless ``opts`` sets it.

    Raises:
        DemoError: if the file is missing or a key/value is invalid.
    """
    if not os.path.isfile(config_file):
        raise DemoError(f"--config-file {config_file}: no such file")
    if len(opts) % 2:
        raise DemoError(f"--opts needs KEY VALUE pairs; got an odd number of items: {list(opts)}")
    try:
        cfg = get_maskformer_cfg(config_file, list(opts))
        validate_cfg(cfg, training=False)
    # Unknown keys: KeyError naming key and file; bad values: yacs' ValueError/AssertionError.
    except (KeyError, ValueError, AssertionError, FileNotFoundError, yaml.YAMLError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise DemoError(f"invalid config ({config_file}, --opts {list(opts)}): {msg}") from None
    device_set = "MODEL.DEVICE" in list(opts)[::2]
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        if device_set:
            raise DemoError(f"MODEL.DEVICE={cfg.MODEL.DEVICE} but CUDA is not available")
        logger.info("CUDA is not available: running on the CPU")
        cfg.MODEL.DEVICE = "cpu"
    try:
        check_precision(cfg.MODEL.MASK_FORMER.TEST.PRECISION, torch.device(cfg.MODEL.DEVICE).type)
    except ValueError as e:
        raise DemoError(str(e)) from None
    cfg.freeze()
    return cfg


def _is_image_file(path: str) -> bool:
    return os.path.isfile(path) and path.lower().endswith(IMAGE_EXTENSIONS)


def _images_in_folder(folder: str) -> List[str]:
    return [p for p in (os.path.join(folder, n) for n in os.listdir(folder)) if _is_image_file(p)]


def expand_inputs(patterns: Sequence[str]) -> List[str]:
    """Turns ``--input`` values into a sorted list of image files without duplicates.

    A file is taken as given; a folder contributes its image files; anything else is a glob
    pattern whose matching image files (and images in matching folders) are taken.

    Raises:
        DemoError: naming a value that matches no image.
    """
    found = set()
    for pattern in patterns:
        path = os.path.expanduser(pattern)
        if os.path.isfile(path):
            matches = [path]
        elif os.path.isdir(path):
            matches = _images_in_folder(path)
        elif any(c in path for c in "*?["):
            matches = []
            for m in glob.glob(path):
                matches.extend(_images_in_folder(m) if os.path.isdir(m) else [m])
            matches = [m for m in matches if _is_image_file(m)]
        else:
            raise DemoError(f"--input {pattern}: no such file or folder")
        if not matches:
            raise DemoError(f"--input {pattern}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
        found.update(os.path.normpath(m) for m in matches)
    return sorted(found)


def _check_output_parent(output: str) -> None:
    """Fails when a folder ``--output`` needs is an existing file (or cannot be created)."""
    parent = os.path.dirname(os.path.abspath(output))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise DemoError(f"--output {output}: {parent} is a file, but a folder is needed there")


def _makedirs(folder: str, output: str) -> None:
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise DemoError(f"--output {output}: cannot create the folder {folder} ({e.strerror})") from None


def _names_a_folder(output: str) -> bool:
    """Whether ``--output`` means a folder: an existing one, a trailing slash or no extension."""
    return (
        os.path.isdir(output) or output.endswith(("/", os.sep)) or not os.path.splitext(output)[1]
    )


def image_output_paths(inputs: Sequence[str], output: str) -> List[str]:
    """Where each input image's drawing is saved; creates the needed folders.

    Raises:
        DemoError: if several inputs go to a file, two inputs would write the same file, or
            the file's extension is not an image format.
    """
    _check_output_parent(output)
    if len(inputs) > 1 and not _names_a_folder(output):
        raise DemoError(
            f"--output {output}: must be a folder when several inputs are given "
            f"({len(inputs)} images)"
        )
    if _names_a_folder(output):
        if os.path.isfile(output):
            raise DemoError(f"--output {output}: is a file, but a folder is expected here")
        paths = [os.path.join(output, os.path.basename(p)) for p in inputs]
        if len(set(paths)) != len(paths):
            clashing = sorted({os.path.basename(p) for p in paths if paths.count(p) > 1})
            raise DemoError(
                f"several inputs share a file name {clashing}; they would overwrite each other"
            )
    elif not output.lower().endswith(IMAGE_EXTENSIONS):
        raise DemoError(
            f"--output {output}: an image output must end in {', '.join(IMAGE_EXTENSIONS)}"
        )
    else:
        paths = [output]
    overwritten = [p for p, q in zip(inputs, paths) if os.path.abspath(p) == os.path.abspath(q)]
    if overwritten:
        raise DemoError(f"--output {output}: would overwrite the input image {overwritten[0]}")
    for folder in {os.path.dirname(os.path.abspath(p)) for p in paths}:
        _makedirs(folder, output)
    return paths


def _odd(size: Optional[Tuple[int, int]]) -> bool:
    return size is not None and (size[0] % 2 == 1 or size[1] % 2 == 1)


def video_output_path(output: str, source_name: str, size: Optional[Tuple[int, int]] = None) -> str:
    """The file a visualised video of frames of ``size`` (width, height) is written to; creates
    the needed folders. A folder gets ``<name>.mp4``, or ``<name>.avi`` for an odd frame size:
    OpenCV's MP4/MKV encoders round odd sizes down to even ones, its own AVI writer keeps them.

    Raises:
        DemoError: if the extension is not a supported container, the source would be
            overwritten, or an .mp4/.mkv file is asked for frames of an odd size.
    """
    _check_output_parent(output)
    if _names_a_folder(output):
        if os.path.isfile(output):
            raise DemoError(f"--output {output}: is a file, but a folder is expected here")
        stem = os.path.splitext(os.path.basename(source_name))[0]
        path = os.path.join(output, stem + (".avi" if _odd(size) else ".mp4"))
    elif os.path.splitext(output)[1].lower() in VIDEO_CODECS:
        path = output
        if _odd(size) and not output.lower().endswith(".avi"):
            raise DemoError(
                f"--output {output}: the frames are {size[0]}x{size[1]}, and OpenCV's "
                f"{os.path.splitext(output)[1]} encoders only write even sizes (it would write "
                f"{size[0] // 2 * 2}x{size[1] // 2 * 2}); use an .avi output (or a folder), which keeps the size"
            )
    else:
        raise DemoError(f"--output {output}: a video output must end in {', '.join(VIDEO_CODECS)}")
    if os.path.abspath(path) == os.path.abspath(source_name):
        raise DemoError(f"--output {output}: would overwrite the input video {source_name}")
    _makedirs(os.path.dirname(os.path.abspath(path)), output)
    return path


def open_video_writer(path: str, fps: float, width: int, height: int) -> cv2.VideoWriter:
    """An opened writer for ``path``, trying the codecs of its container in turn. An .avi of
    an odd frame size is written by OpenCV's own MJPEG writer: its FFmpeg encoders would round
    the size down to an even one."""
    if path.lower().endswith(".avi") and _odd((width, height)):
        writer = cv2.VideoWriter(path, cv2.CAP_OPENCV_MJPEG, cv2.VideoWriter_fourcc(*"MJPG"), fps, (width, height))
        if writer.isOpened():
            return writer
        writer.release()
    codecs = VIDEO_CODECS[os.path.splitext(path)[1].lower()]
    for codec in codecs:
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*codec), fps, (width, height))
        if writer.isOpened():
            return writer
        writer.release()
    raise DemoError(f"OpenCV cannot write video {path} (tried codecs {', '.join(codecs)})")


def open_video_file(path: str) -> cv2.VideoCapture:
    """Opens a video file after checking that OpenCV can decode at least one frame.

    Raises:
        DemoError: naming the file if it is missing, cannot be opened or has no decodable frame.
    """
    if not os.path.isfile(path):
        raise DemoError(f"--video-input {path}: no such file")
    probe = cv2.VideoCapture(path)
    try:
        if not probe.isOpened():
            raise DemoError(f"--video-input {path}: OpenCV cannot open this file as a video")
        ok, _ = probe.read()
        if not ok:
            raise DemoError(f"--video-input {path}: OpenCV cannot decode any frame of this file")
    finally:
        probe.release()
    # Reopened so that processing starts from the first frame without relying on seeking.
    video = cv2.VideoCapture(path)
    if not video.isOpened():
        raise DemoError(f"--video-input {path}: OpenCV cannot open this file as a video")
    return video


def _capture_size(video: cv2.VideoCapture) -> Optional[Tuple[int, int]]:
    """(width, height) of a capture's frames, None when OpenCV does not know it."""
    width, height = int(video.get(cv2.CAP_PROP_FRAME_WIDTH)), int(video.get(cv2.CAP_PROP_FRAME_HEIGHT))
    return (width, height) if width > 0 and height > 0 else None


def _require_display() -> None:
    """Fails early, with a hint, where OpenCV windows cannot be shown."""
    if sys.platform.startswith("linux") and not (
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    ):
        raise DemoError("no display available to show results; pass --output to save them")
    try:
        cv2.namedWindow(WINDOW_NAME, cv2.WINDOW_NORMAL)
    except cv2.error as e:
        raise DemoError(
            f"OpenCV cannot open a window ({e}); pass --output to save results"
        ) from None


def run_images(
    demo: VisualizationDemo, inputs: Sequence[str], out_paths: Optional[Sequence[str]]
) -> int:
    """Draws each image and saves it to ``out_paths`` (or shows it when None).

    Returns:
        The number of images that could not be read or written.
    """
    failures = 0
    for i, path in enumerate(inputs):
        try:
            image = read_image(path, format="BGR")
        except OSError as e:
            logger.error(f"{path}: cannot read the image ({e})")
            failures += 1
            continue
        start = time.perf_counter()
        predictions, vis = demo.run_on_image(image)
        logger.info(f"{path}: {_describe(predictions)} in {time.perf_counter() - start:.2f}s")
        drawing = cv2.cvtColor(vis.get_image(), cv2.COLOR_RGB2BGR)
        if out_paths is None:
            cv2.imshow(WINDOW_NAME, drawing)
            if cv2.waitKey(0) == _ESC:
                break
        elif not cv2.imwrite(out_paths[i], drawing):
            logger.error(f"{out_paths[i]}: OpenCV could not write the image")
            failures += 1
    return failures


def _describe(predictions: Dict) -> str:
    parts = []
    if "panoptic_seg" in predictions:
        parts.append(f"{len(predictions['panoptic_seg'][1])} panoptic segments")
    if "instances" in predictions:
        parts.append(f"{len(predictions['instances'])} instances")
    if "sem_seg" in predictions:
        parts.append("semantic segmentation")
    return ", ".join(parts) or "no outputs"


def run_video(
    demo: VisualizationDemo, video: cv2.VideoCapture, name: str, out_path: Optional[str]
) -> int:
    """Draws every frame of ``video`` and writes them to ``out_path`` (or shows them when None).

    The output has the source's frame rate and frame size.

    Returns:
        The number of frames processed.
    """
    fps = video.get(cv2.CAP_PROP_FPS)
    if not fps or not math.isfinite(fps) or fps <= 0:
        logger.warning(f"{name}: the frame rate is unknown; writing at 30 frames/s")
        fps = 30.0
    total = int(video.get(cv2.CAP_PROP_FRAME_COUNT))
    writer = None
    count = 0
    progress = tqdm.tqdm(
        demo.run_on_video(video),
        total=total if total > 0 else None,
        desc=name,
        unit="frame",
        # Always frames/s, even below one frame per second (tqdm would switch to s/frame).
        bar_format=_PROGRESS_FORMAT,
    )
    try:
        for frame in progress:
            count += 1
            if out_path is None:
                cv2.imshow(WINDOW_NAME, frame)
                if cv2.waitKey(1) == _ESC:
                    break
                continue
            if writer is None:
                # Sized from the first drawn frame, which has the source frame's size.
                height, width = frame.shape[:2]
                writer = open_video_writer(out_path, fps, width, height)
            writer.write(np.ascontiguousarray(frame))
    except KeyboardInterrupt:
        logger.info(f"{name}: interrupted after {count} frames")
    finally:
        video.release()
        if writer is not None:
            writer.release()
    if out_path is not None and writer is not None:
        logger.info(f"{name}: wrote {count} frames at {fps:g} frames/s to {out_path}")
    return count


def setup_loggers() -> None:
    """fvcore's, Detectron2's and this package's log messages to the console (both demos)."""
    setup_logger(name="fvcore")
    setup_logger(name="detectron2")
    setup_logger(name="mask2former_d2", abbrev_name="m2f")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_parser().parse_args(overrides_after_opts(argv))
    setup_loggers()
    logger.info(f"arguments: {args}")
    if not 0.0 <= args.confidence_threshold <= 1.0:  # also rejects nan
        raise DemoError(
            f"--confidence-threshold must be a score in [0, 1]; got {args.confidence_threshold:g}"
        )

    cfg = setup_cfg(args.config_file, args.opts)
    # Inputs and outputs are checked before the (slow) model construction.
    if args.input:
        inputs = expand_inputs(args.input)
        out_paths = image_output_paths(inputs, args.output) if args.output else None
    elif args.video_input:
        name = args.video_input
        source = open_video_file(name)
        out_path = video_output_path(args.output, name, _capture_size(source)) if args.output else None
    else:
        name = "webcam"
        source = cv2.VideoCapture(0)
        if not source.isOpened():
            raise DemoError("--webcam: OpenCV cannot open camera 0")
        out_path = video_output_path(args.output, name, _capture_size(source)) if args.output else None
    if args.output is None:
        _require_display()

    predictor = None
    if args.onnx:
        if not os.path.isfile(args.onnx):
            raise DemoError(f"--onnx {args.onnx}: no such file")
        try:
            predictor = Predictor(cfg, backend="onnxruntime", model_file=args.onnx)
        except ImportError as e:
            raise DemoError(f"--onnx needs the export extra (pip install .[export]): {e}") from None
        except (ValueError, FileNotFoundError) as e:
            raise DemoError(f"--onnx {args.onnx}: {e}") from None
    try:
        demo = VisualizationDemo(cfg, confidence_threshold=args.confidence_threshold, predictor=predictor)
    except (ValueError, FileNotFoundError) as e:  # e.g. MODEL.WEIGHTS missing, unreadable, unfit
        raise DemoError(f"cannot build the model: {e}") from None
    if args.input:
        failures = run_images(demo, inputs, out_paths)
        if failures:
            raise DemoError(f"{failures} of {len(inputs)} images failed (see the log above)")
    elif run_video(demo, source, name, out_path) == 0:
        raise DemoError(f"{name}: no frame could be decoded")
    if args.output is None:
        cv2.destroyAllWindows()
    return 0


def cli(argv: Optional[Sequence[str]] = None) -> None:
    """Runs :func:`main` and exits; a :class:`DemoError` becomes one line on stderr and exit
    status 1, without a traceback."""
    run_cli(main, argv, "demo.py", (DemoError,))


if __name__ == "__main__":
    cli()
