"""Whole-clip inference and visualisation for the video model (Mask2Former-VIS).

``VideoPredictor`` turns the frames of one clip (BGR ``uint8`` arrays) into the model's per-video
output, the way :class:`~mask2former_d2.predictor.Predictor` does for one image.
``VideoVisualizationDemo`` draws that output frame by frame, one colour per track.

Shapes: T frames, H/W original frame size, P predictions (tracks).
"""

import logging
from typing import Any, Dict, Iterator, List, Sequence

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.utils.colormap import colormap
from detectron2.utils.visualizer import ColorMode, Visualizer

from .predictor import Predictor, _with_class_names, check_bgr_image, resize_transform

__all__ = ["VideoPredictor", "VideoVisualizationDemo"]

logger = logging.getLogger(__name__)


class VideoPredictor(Predictor):
    """Runs a video model built from ``cfg`` on all frames of a clip at once.

    Frames are resized as the test mapper does (``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``),
    converted to ``INPUT.FORMAT`` and passed as ``uint8`` tensors, so a clip costs one byte per
    pixel until the model normalises it chunk by chunk.

    Example::

        predictor = VideoPredictor(cfg)
        out = predictor([cv2.imread(p) for p in frame_paths])
        out["pred_scores"], out["pred_labels"], out["pred_masks"]  # P, P, P x (T, H, W) bool
    """

    def __call__(self, frames: Sequence[np.ndarray]) -> Dict[str, Any]:
        """Predicts one clip.

        Args:
            frames: T >= 1 (H, W, 3) ``uint8`` BGR arrays of one size.

        Returns:
            The model's per-video dict: ``image_size`` (H, W), ``pred_scores``, ``pred_labels``
            and ``pred_masks`` (boolean (T, H, W) per prediction, at the frames' size).

        Raises:
            ValueError: if there is no frame, a frame is not an (H, W, 3) ``uint8`` array, or the
                frames differ in size.
        """
        if len(frames) == 0:
            raise ValueError("expected at least one frame; got an empty clip")
        height, width = check_bgr_image(frames[0]).shape[:2]
        transform = None
        tensors: List[torch.Tensor] = []
        for i, frame in enumerate(frames):
            check_bgr_image(frame)
            if frame.shape[:2] != (height, width):
                raise ValueError(
                    f"frame {i} is {frame.shape[1]}x{frame.shape[0]} but frame 0 is {width}x{height}; "
                    "all frames of a clip must have one size"
                )
            image = frame[:, :, ::-1] if self.input_format == "RGB" else frame
            if self.aug is not None:
                # One transform for the clip, as the video test mapper does.
                transform = transform or resize_transform(self.aug, image)
                image = transform.apply_image(image)
            tensors.append(torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1))))
        with torch.no_grad():
            out = self.model([{"image": tensors, "height": height, "width": width}])
        return out[0] if isinstance(out, list) else out


class VideoVisualizationDemo:
    """Draws a video model's tracks on the frames of a clip.

    Each prediction is one track through the clip and keeps one colour in every frame; its label
    is the class name from the test dataset's metadata and its score.
    """

    def __init__(self, cfg: CfgNode, *, confidence_threshold: float = 0.5) -> None:
        """
        Args:
            cfg: the video model's config (see :class:`VideoPredictor`).
            confidence_threshold: tracks scoring below this are neither returned nor drawn;
                in [0, 1].

        Raises:
            ValueError: if ``confidence_threshold`` is not in [0, 1].
        """
        if not 0.0 <= confidence_threshold <= 1.0:
            raise ValueError(f"confidence_threshold must be in [0, 1]; got {confidence_threshold}")
        self.confidence_threshold = float(confidence_threshold)
        self.predictor = VideoPredictor(cfg)
        self.metadata = _with_class_names(self.predictor.metadata, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)

    def predict(self, frames: Sequence[np.ndarray]) -> Dict[str, Any]:
        """The predictor's output with the tracks scoring at least ``confidence_threshold``, best
        first, masks as CPU boolean tensors."""
        out = self.predictor(frames)
        scores = [float(s) for s in out["pred_scores"]]
        keep = sorted((i for i, s in enumerate(scores) if s >= self.confidence_threshold),
                      key=lambda i: -scores[i])
        return {
            "image_size": tuple(out["image_size"]),
            "pred_scores": [scores[i] for i in keep],
            "pred_labels": [int(out["pred_labels"][i]) for i in keep],
            "pred_masks": [torch.as_tensor(out["pred_masks"][i]).to("cpu", torch.bool) for i in keep],
        }

    def track_colors(self, num_tracks: int) -> List[np.ndarray]:
        """One colour (RGB in [0, 1]) per track, fixed by the track's rank."""
        palette = colormap(rgb=True, maximum=1)
        return [palette[i % len(palette)] for i in range(num_tracks)]

    def draw(self, frames: Sequence[np.ndarray], predictions: Dict[str, Any]) -> Iterator[np.ndarray]:
        """Yields each frame (BGR ``uint8``) with the tracks drawn on it."""
        names = self.metadata.get("thing_classes")
        labels = [f"{names[c] if c < len(names) else c} {s:.0%}"
                  for c, s in zip(predictions["pred_labels"], predictions["pred_scores"])]
        colors = self.track_colors(len(labels))
        for t, frame in enumerate(frames):
            visualizer = Visualizer(frame[:, :, ::-1], self.metadata, instance_mode=ColorMode.IMAGE)
            present = [i for i, m in enumerate(predictions["pred_masks"]) if bool(m[t].any())]
            if not present:
                yield frame
                continue
            vis = visualizer.overlay_instances(
                masks=[predictions["pred_masks"][i][t].numpy() for i in present],
                labels=[labels[i] for i in present],
                assigned_colors=[colors[i] for i in present],
            )
            yield np.ascontiguousarray(vis.get_image()[:, :, ::-1])
