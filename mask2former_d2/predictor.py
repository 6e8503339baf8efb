"""Single-image inference and visualisation for MaskFormer / Mask2Former models.

``Predictor`` turns one BGR ``uint8`` image into the model's output dict, the way
Detectron2's ``DefaultPredictor`` does, but checks its input. ``VisualizationDemo`` wraps a
``Predictor`` and draws its output with Detectron2's visualizers, for one image or for the
frames of an OpenCV video stream.

Shapes: H/W original image size, K classes, N instances.
"""

import logging
import math
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import cv2
import matplotlib.figure as mplfigure
import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import Metadata, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.structures import Instances
from detectron2.utils.video_visualizer import VideoVisualizer
from detectron2.utils.visualizer import ColorMode, VisImage, Visualizer
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg

from .checkpoint import MaskFormerCheckpointer

__all__ = [
    "Predictor",
    "VisualizationDemo",
    "check_bgr_image",
    "filter_instances",
    "resize_transform",
    "video_frames",
]

logger = logging.getLogger(__name__)

_INPUT_FORMATS = ("BGR", "RGB")


def video_frames(video: Union[str, cv2.VideoCapture], limit: Optional[int] = None) -> Iterator[np.ndarray]:
    """The (H, W, 3) BGR frames of a video, read lazily until the stream ends or ``limit``
    frames have been read.

    Args:
        video: a file, opened and released here, or an opened ``cv2.VideoCapture``, read but
            not released.
        limit: the most frames to read; None reads them all.

    Raises:
        ValueError: naming the file, if OpenCV cannot open it as a video (when iteration starts).
    """
    capture = cv2.VideoCapture(video) if isinstance(video, str) else video
    try:
        if isinstance(video, str) and not capture.isOpened():
            raise ValueError(f"{video}: OpenCV cannot open this file as a video")
        count = 0
        while limit is None or count < limit:
            ok, frame = capture.read()
            if not ok:
                return
            count += 1
            yield frame
    finally:
        if isinstance(video, str):
            capture.release()


def check_bgr_image(image: Any) -> np.ndarray:
    """Checks that ``image`` is what :class:`Predictor` accepts and returns it unchanged.

    Args:
        image: the candidate image.

    Returns:
        ``image``, an (H, W, 3) ``uint8`` array with H, W > 0.

    Raises:
        ValueError: if ``image`` is not an ndarray, has another shape or another dtype.
    """
    if not isinstance(image, np.ndarray):
        raise ValueError(
            f"expected a BGR image as a numpy array of shape (H, W, 3) and dtype uint8; "
            f"got a {type(image).__name__}"
        )
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(
            f"expected a BGR image of shape (H, W, 3) with H, W > 0; got shape {image.shape}"
        )
    if image.dtype != np.uint8:
        raise ValueError(f"expected a BGR image of dtype uint8; got dtype {image.dtype}")
    return image


def filter_instances(instances: Instances, threshold: float) -> Instances:
    """Keeps the instances whose ``scores`` are at least ``threshold``.

    Args:
        instances: predictions with a ``scores`` field (other fields are kept as they are).
        threshold: minimum score; a value above 1 keeps nothing.

    Returns:
        The kept instances, in their original order.
    """
    if not instances.has("scores"):
        return instances
    return instances[instances.scores >= threshold]


def _class_ids(sem_seg: torch.Tensor) -> torch.Tensor:
    """(K, H, W) probabilities -> (H, W) class ids; class ids are returned as they are."""
    return sem_seg.argmax(dim=0) if sem_seg.dim() == 3 else sem_seg


def _padded_size(size: Tuple[int, int], divisor: int) -> Tuple[int, int]:
    """(h, w) rounded up to multiples of ``divisor`` (unchanged for ``divisor`` <= 1), as
    Detectron2's ``ImageList.from_tensors`` pads a batch."""
    if divisor <= 1:
        return size
    return tuple(-(-s // divisor) * divisor for s in size)


def resize_transform(aug: T.ResizeShortestEdge, image: np.ndarray) -> T.Transform:
    """``aug``'s resize of ``image``, with each side at least one pixel: the shortest edge's
    target capped by the longest edge's rounds a 1 x 4000 image to 0 rows, which PIL refuses."""
    transform = aug.get_transform(image)
    if isinstance(transform, T.ResizeTransform) and min(transform.new_h, transform.new_w) < 1:
        transform = T.ResizeTransform(
            transform.h, transform.w, max(1, transform.new_h), max(1, transform.new_w), transform.interp
        )
    return transform


def _metadata_for(cfg: CfgNode) -> Metadata:
    """Metadata of the first test dataset, else of the first training dataset."""
    names = list(cfg.DATASETS.TEST) or list(cfg.DATASETS.TRAIN)
    return MetadataCatalog.get(names[0]) if names else Metadata(name="__unnamed__")


def _with_class_names(metadata: Metadata, num_classes: int) -> Metadata:
    """Returns ``metadata``, or a copy with placeholder class names if it has none.

    Detectron2's visualizers index ``thing_classes`` / ``stuff_classes`` by class id; a model
    run without a registered dataset would otherwise fail while drawing.
    """
    if metadata.get("thing_classes") is not None and metadata.get("stuff_classes") is not None:
        return metadata
    names = [f"class_{i}" for i in range(num_classes)]
    fields = {k: v for k, v in metadata.as_dict().items() if k != "name"}
    fields.setdefault("thing_classes", names)
    fields.setdefault("stuff_classes", names)
    # A private object: registered metadata is shared and must not be modified here.
    filled = Metadata(name=f"{metadata.name}+placeholder_classes")
    filled.set(**fields)
    return filled


class Predictor:
    """Runs a model built from ``cfg`` on one BGR image at a time.

    Like Detectron2's ``DefaultPredictor``, it builds the model in eval mode, loads
    ``MODEL.WEIGHTS`` with :class:`MaskFormerCheckpointer`, resizes the shortest edge to
    ``INPUT.MIN_SIZE_TEST`` (longest at most ``INPUT.MAX_SIZE_TEST``; 0 disables resizing),
    converts the channels to
    ``INPUT.FORMAT`` and asks for outputs at the original size.

    With ``backend="onnxruntime"``, the network runs from an ONNX file written by
    ``tools/export_model.py`` (``model_file``) in ONNX Runtime, and the model's own
    post-processing turns its outputs into the same output dict; ``MODEL.WEIGHTS`` is not read.

    Attributes:
        cfg: a frozen copy of the config.
        model: the model, in eval mode (an ``OnnxRuntimeMaskFormer`` for ONNX Runtime).
        metadata: metadata of ``DATASETS.TEST[0]`` (else ``DATASETS.TRAIN[0]``).
        input_format: "BGR" or "RGB".

    Example::

        predictor = Predictor(cfg)
        outputs = predictor(cv2.imread("input.jpg"))
        onnx_predictor = Predictor(cfg, backend="onnxruntime", model_file="model.onnx")
    """

    BACKENDS = ("pytorch", "onnxruntime")

    def __init__(self, cfg: CfgNode, backend: str = "pytorch", model_file: Optional[str] = None) -> None:
        """
        Args:
            cfg: a full Detectron2 config with the MaskFormer keys.
            backend: "pytorch" (the model built from ``cfg``) or "onnxruntime".
            model_file: the ``.onnx`` file, for the "onnxruntime" backend.

        Raises:
            ValueError: if ``INPUT.FORMAT`` or the test sizes are not usable, or the backend
                or model file does not fit.
        """
        if backend not in self.BACKENDS:
            raise ValueError(f"backend must be one of {self.BACKENDS}; got {backend!r}")
        if (backend == "onnxruntime") != (model_file is not None):
            raise ValueError(f"model_file is needed by, and only by, the onnxruntime backend (backend={backend!r})")
        self.cfg = cfg.clone()
        self.cfg.freeze()
        self.input_format = self.cfg.INPUT.FORMAT
        if self.input_format not in _INPUT_FORMATS:
            raise ValueError(
                f"INPUT.FORMAT must be one of {_INPUT_FORMATS}; got {self.input_format!r}"
            )
        min_size, max_size = self.cfg.INPUT.MIN_SIZE_TEST, self.cfg.INPUT.MAX_SIZE_TEST
        if min_size < 0:
            raise ValueError(f"INPUT.MIN_SIZE_TEST must be >= 0 (0: no resizing); got {min_size}")
        # As in Detectron2, MIN_SIZE_TEST = 0 feeds images at their own size.
        self.aug = T.ResizeShortestEdge([min_size, min_size], max_size) if min_size else None

        self.metadata = _metadata_for(self.cfg)
        if backend == "onnxruntime":
            from .export.onnx_runtime import OnnxRuntimeMaskFormer

            self.model = OnnxRuntimeMaskFormer(self.cfg, model_file)
            self.batchable = False
            return
        self.batchable = True
        self.model = build_model(self.cfg)
        self.model.eval()
        if self.cfg.MODEL.WEIGHTS:
            # The weights are used as they are: a head that does not fit the config is an error.
            MaskFormerCheckpointer(self.model, for_inference=True).load(self.cfg.MODEL.WEIGHTS)
        else:
            logger.warning("MODEL.WEIGHTS is empty: the model keeps its random initialisation")

    def __call__(self, original_image: Union[np.ndarray, Sequence[np.ndarray]]) -> Any:
        """Predicts one image, or a list of images as a batch (see :meth:`predict_batch`).

        Args:
            original_image: (H, W, 3) ``uint8`` array in BGR order (as from ``cv2.imread``), or
                a list of them.

        Returns:
            The model's output dict for this image, at H x W (``sem_seg``, ``panoptic_seg``
            and/or ``instances``, as the config enables them); for a list, one per image.

        Raises:
            ValueError: if ``original_image`` is not an (H, W, 3) ``uint8`` array.
        """
        if isinstance(original_image, (list, tuple)):
            return self.predict_batch(original_image)
        inputs = self.preprocess(original_image)
        with torch.no_grad():
            return self.model([inputs])[0]

    def predict_batch(self, images: Sequence[np.ndarray]) -> List[Dict[str, Any]]:
        """Predicts several BGR ``uint8`` images, batched; each output equals the image's own.

        The model pads a batch to its largest image, and padding changes what the network
        computes near it (normalisation statistics, attention over the padded area). So the
        images are batched by the size the model pads each one to alone (its resized size
        rounded up to ``size_divisibility``): an image then sees exactly the padding it would
        alone, and its outputs are cropped from the padded batch as they are alone. Frames of
        one video, or photos of one camera, make one batch; other sizes make their own.

        Args:
            images: (H, W, 3) ``uint8`` BGR arrays, of any sizes.

        Returns:
            One output dict per image, in input order, each at its image's size.

        Raises:
            ValueError: if an image is not an (H, W, 3) ``uint8`` array (naming its index).
        """
        inputs = []
        for i, image in enumerate(images):
            try:
                inputs.append(self.preprocess(image))
            except ValueError as e:
                raise ValueError(f"images[{i}]: {e}") from None
        # An exported graph has a fixed batch size: it runs one image at a time.
        divisor = getattr(self.model, "size_divisibility", 0) if self.batchable else None
        groups: Dict[Tuple[int, ...], List[int]] = {}
        for i, x in enumerate(inputs):
            key = (i,) if divisor is None else _padded_size(tuple(x["image"].shape[-2:]), divisor)
            groups.setdefault(key, []).append(i)
        outputs: List[Optional[Dict[str, Any]]] = [None] * len(inputs)
        with torch.no_grad():
            for indices in groups.values():
                for i, out in zip(indices, self.model([inputs[i] for i in indices])):
                    outputs[i] = out
        return outputs

    def preprocess(self, original_image: np.ndarray) -> Dict[str, Any]:
        """The model's input dict for one BGR ``uint8`` image: ``image`` (3, H', W') float32
        resized and in ``INPUT.FORMAT``, with ``height``/``width`` the original size."""
        image = check_bgr_image(original_image)
        if self.input_format == "RGB":
            image = image[:, :, ::-1]
        height, width = image.shape[:2]
        resized = resize_transform(self.aug, image).apply_image(image) if self.aug else image
        # (H', W', 3) uint8 -> (3, H', W') float32, the layout the model expects.
        tensor = torch.as_tensor(
            np.ascontiguousarray(resized.transpose(2, 0, 1)), dtype=torch.float32
        )
        return {"image": tensor, "height": height, "width": width}


def _compute_drawn_output_only(model: Any) -> None:
    """Makes a MaskFormer that a :class:`VisualizationDemo` built compute only the output it
    draws: the panoptic segmentation if enabled, else the instances, else the semantic class
    ids (``MaskFormer.semantic_labels``). The others are skipped rather than computed at the
    image's full size and dropped: (K, H, W) probabilities of a 6000x4000 photo are ~13 GB."""
    if not all(hasattr(model, a) for a in ("panoptic_on", "instance_on", "semantic_labels")):
        return  # another model: left as it is
    if model.panoptic_on:
        model.instance_on = model.semantic_on = False
    elif model.instance_on:
        model.semantic_on = False
    else:
        model.semantic_labels = True


class _BlendingAxes(Axes):
    """Matplotlib axes whose ``imshow`` hands the image to ``self.overlay._blend`` (an
    :class:`_OverlayImage`) instead of keeping it for rendering. Detectron2 draws a mask with
    holes as an ``imshow`` of a full-size float RGBA array, kept until rendering (16 bytes per
    pixel each); it is blended into the photo at once instead."""

    overlay: "_OverlayImage"

    def imshow(self, X, *args, **kwargs) -> None:
        self.overlay._blend(np.asarray(X))


class _OverlayImage(VisImage):
    """Detectron2's ``VisImage`` that leaves the photo out of matplotlib: only the overlays are
    rendered (on a transparent canvas, axes :class:`_BlendingAxes`) and :meth:`get_image`
    blends them onto the photo, band by band. Same drawing up to rounding; matplotlib renders
    an ``imshow``-ed photo through float RGBA copies, ~2.3 GB more at 6000x4000."""

    def _setup_figure(self, img: np.ndarray) -> None:
        # Detectron2's figure (one inch per dpi pixels, plus a margin against matplotlib's
        # truncation), with axes of the blending class.
        fig = mplfigure.Figure(frameon=False)
        self.dpi = fig.get_dpi()
        fig.set_size_inches((self.width * self.scale + 1e-2) / self.dpi, (self.height * self.scale + 1e-2) / self.dpi)
        self.canvas = FigureCanvasAgg(fig)
        self.ax = fig.add_axes([0.0, 0.0, 1.0, 1.0], axes_class=_BlendingAxes)
        self.ax.overlay = self
        self.ax.axis("off")
        self.fig = fig
        self.reset_image(img)

    def reset_image(self, img: np.ndarray) -> None:
        self.img = np.array(img, dtype=np.uint8)  # a copy: overlays may be blended into it
        # The pixel coordinates imshow's extent would give the axes.
        self.ax.set_xlim(0, self.width)
        self.ax.set_ylim(self.height, 0)

    def _blend(self, rgba: np.ndarray, **kwargs) -> None:
        if rgba.shape != (self.height, self.width, 4):
            raise ValueError(f"expected a full-size (H, W, 4) overlay; got {rgba.shape}")
        for r0 in range(0, self.height, 256):
            band = rgba[r0 : r0 + 256]
            alpha = band[:, :, 3:].astype(np.float32)
            blended = band[:, :, :3] * 255 * alpha + self.img[r0 : r0 + 256] * (1 - alpha)
            self.img[r0 : r0 + 256] = np.rint(blended)

    def get_image(self) -> np.ndarray:
        buffer, (width, height) = self.canvas.print_to_buffer()
        rgba = np.frombuffer(buffer, dtype=np.uint8).reshape(height, width, 4)  # not premultiplied
        out = np.empty((height, width, 3), dtype=np.uint8)
        for r0 in range(0, height, 256):
            band = rgba[r0 : r0 + 256]
            alpha = band[:, :, 3:].astype(np.float32) / 255
            blended = band[:, :, :3] * alpha + self.img[r0 : r0 + 256] * (1 - alpha)
            out[r0 : r0 + 256] = np.rint(blended)
        return out


def _visualizer(image_rgb: np.ndarray, metadata: Metadata, instance_mode: ColorMode) -> Visualizer:
    """Detectron2's ``Visualizer`` drawing onto an :class:`_OverlayImage`."""
    visualizer = Visualizer(image_rgb, metadata, instance_mode=instance_mode)
    visualizer.output = _OverlayImage(visualizer.img, scale=visualizer.output.scale)
    return visualizer


class VisualizationDemo:
    """Draws a model's predictions on images and video frames.

    One overlay is drawn per image, chosen from what the model outputs: the panoptic
    segmentation if present, else the instances, else the semantic segmentation.

    A demo that builds its own predictor has the model compute only the drawn output (see
    :func:`_compute_drawn_output_only`), so its predictions hold that one output (``sem_seg``
    as (H, W) class ids); a given ``predictor`` is used as it is.

    The confidence threshold applies to instance predictions only. Panoptic segments carry no
    score and are drawn as the model produced them (their filtering is controlled by
    ``MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD`` / ``OVERLAP_THRESHOLD``).
    """

    def __init__(
        self,
        cfg: CfgNode,
        *,
        confidence_threshold: float = 0.5,
        instance_mode: ColorMode = ColorMode.IMAGE,
        predictor: Optional[Predictor] = None,
    ) -> None:
        """
        Args:
            cfg: the model config (see :class:`Predictor`).
            confidence_threshold: instances scoring below this are neither returned nor drawn.
            instance_mode: Detectron2 colour mode of the overlay.
            predictor: an existing predictor to reuse; built from ``cfg`` when None.

        Raises:
            ValueError: if ``confidence_threshold`` is NaN.
        """
        if math.isnan(confidence_threshold):
            raise ValueError("confidence_threshold must be a number; got nan")
        self.confidence_threshold = float(confidence_threshold)
        self.instance_mode = instance_mode
        if predictor is None:
            predictor = Predictor(cfg)
            _compute_drawn_output_only(predictor.model)
        self.predictor = predictor
        num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        self.metadata = _with_class_names(self.predictor.metadata, num_classes)
        self.cpu = torch.device("cpu")

    def predict(self, image: np.ndarray) -> Dict[str, Any]:
        """Runs the predictor and brings its outputs to the CPU.

        Args:
            image: (H, W, 3) ``uint8`` BGR image.

        Returns:
            The model's outputs with tensors on the CPU; ``instances`` only holds those scoring
            at least ``confidence_threshold``.
        """
        outputs = dict(self.predictor(image))
        if "instances" in outputs:
            instances = outputs["instances"].to(self.cpu)
            outputs["instances"] = filter_instances(instances, self.confidence_threshold)
        if "panoptic_seg" in outputs:
            panoptic_seg, segments_info = outputs["panoptic_seg"]
            outputs["panoptic_seg"] = (panoptic_seg.to(self.cpu), segments_info)
        if "sem_seg" in outputs:
            outputs["sem_seg"] = outputs["sem_seg"].to(self.cpu)
        return outputs

    def run_on_image(self, image: np.ndarray) -> Tuple[Dict[str, Any], VisImage]:
        """Predicts one image and draws the result.

        Args:
            image: (H, W, 3) ``uint8`` BGR image.

        Returns:
            ``(predictions, vis)``: the CPU predictions of :meth:`predict` and the overlay, a
            ``VisImage`` of size H x W (``vis.get_image()`` is RGB).
        """
        predictions = self.predict(image)
        visualizer = _visualizer(image[:, :, ::-1], self.metadata, self.instance_mode)
        if "panoptic_seg" in predictions:
            panoptic_seg, segments_info = predictions["panoptic_seg"]
            vis = visualizer.draw_panoptic_seg(panoptic_seg, segments_info)
        elif "instances" in predictions:
            vis = visualizer.draw_instance_predictions(predictions["instances"])
        elif "sem_seg" in predictions:
            vis = visualizer.draw_sem_seg(_class_ids(predictions["sem_seg"]))
        else:
            logger.warning("the model returned none of panoptic_seg/instances/sem_seg")
            vis = visualizer.output
        return predictions, vis

    def run_on_video(self, video: cv2.VideoCapture) -> Iterator[np.ndarray]:
        """Predicts and draws the frames of a video stream, one at a time.

        Frames are read lazily, so memory use does not grow with the length of the clip.
        Instance colours are kept stable across frames by Detectron2's ``VideoVisualizer``.

        Args:
            video: an opened ``cv2.VideoCapture``; it is read until it yields no frame and is
                not released here.

        Returns:
            A lazy iterator over the visualised frames, each an (H, W, 3) ``uint8`` BGR array
            of the frame's size.

        Raises:
            ValueError: if ``instance_mode`` is not one ``VideoVisualizer`` supports.
        """
        if self.instance_mode not in (ColorMode.IMAGE, ColorMode.IMAGE_BW):
            raise ValueError(
                f"run_on_video supports ColorMode.IMAGE and IMAGE_BW; got {self.instance_mode}"
            )
        # The check above runs at call time; the frames are produced by a separate generator.
        return self._iter_frames(video, VideoVisualizer(self.metadata, self.instance_mode))

    def _iter_frames(
        self, video: cv2.VideoCapture, video_visualizer: VideoVisualizer
    ) -> Iterator[np.ndarray]:
        for frame in video_frames(video):
            yield self._draw_frame(video_visualizer, frame)

    def _draw_frame(self, video_visualizer: VideoVisualizer, frame: np.ndarray) -> np.ndarray:
        predictions = self.predict(frame)
        rgb = frame[:, :, ::-1]
        if "panoptic_seg" in predictions:
            panoptic_seg, segments_info = predictions["panoptic_seg"]
            vis = video_visualizer.draw_panoptic_seg_predictions(rgb, panoptic_seg, segments_info)
        elif "instances" in predictions:
            vis = video_visualizer.draw_instance_predictions(rgb, predictions["instances"])
        elif "sem_seg" in predictions:
            vis = video_visualizer.draw_sem_seg(rgb, _class_ids(predictions["sem_seg"]))
        else:
            return frame
        return cv2.cvtColor(vis.get_image(), cv2.COLOR_RGB2BGR)
