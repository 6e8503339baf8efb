"""Running an exported ONNX file with ONNX Runtime, post-processed by the meta-architecture.

:class:`OnnxRuntimeNetwork` runs the graph (image -> ``pred_logits``, ``pred_masks``) after
checking the input size against what the file was exported for. :class:`OnnxRuntimeMaskFormer`
is called like the PyTorch model (a list of ``{"image", "height", "width"}`` dicts -> one output
dict per image): it pads the images as the meta-architecture does, runs the graph and hands the
two tensors to :meth:`MaskFormer.postprocess`, so the outputs have Detectron2's format and the
PyTorch model's values.

Shapes: B batch, H/W image size, Hp/Wp padded size, Q queries, K classes.
"""

import json
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import CfgNode
from torch import Tensor, nn

from ..modeling.meta_arch import MaskFormer
from .exporter import METADATA_KEY
from .wrapper import INPUT_NAMES, OUTPUT_NAMES

__all__ = ["OnnxRuntimeMaskFormer", "OnnxRuntimeNetwork", "padded_size"]


def padded_size(height: int, width: int, size_divisibility: int, divisibility: int) -> Tuple[int, int]:
    """The size a (height, width) image is padded to before the graph: a multiple of the
    meta-architecture's ``size_divisibility`` that the graph accepts (a multiple of
    ``divisibility``)."""
    step = math.lcm(size_divisibility, divisibility) if size_divisibility > 0 else divisibility
    return -(-height // step) * step, -(-width // step) * step


class OnnxRuntimeNetwork:
    """An exported ONNX file in an ONNX Runtime session.

    Args:
        path: the ``.onnx`` file written by ``tools/export_model.py``.
        num_threads: intra-op threads (None: ONNX Runtime's default).
        providers: execution providers, CPU by default.

    Attributes:
        metadata: the description stored at export time (see ``export_metadata``).
    """

    def __init__(
        self, path: str, *, num_threads: Optional[int] = None, providers: Sequence[str] = ("CPUExecutionProvider",)
    ) -> None:
        import onnxruntime as ort

        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such ONNX file")
        options = ort.SessionOptions()
        if num_threads:
            options.intra_op_num_threads = num_threads
        try:
            self.session = ort.InferenceSession(path, options, providers=list(providers))
        except Exception as e:  # ONNX Runtime raises its own exception types
            raise ValueError(f"{path}: ONNX Runtime cannot load this file ({str(e).splitlines()[0]})") from None
        self.path = path
        meta = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in meta:
            raise ValueError(
                f"{path}: not an ONNX file written by tools/export_model.py (no '{METADATA_KEY}' metadata)"
            )
        self.metadata: Dict[str, Any] = json.loads(meta[METADATA_KEY])
        names = tuple(i.name for i in self.session.get_inputs()), tuple(o.name for o in self.session.get_outputs())
        if names != (INPUT_NAMES, OUTPUT_NAMES):
            raise ValueError(f"{path}: expected inputs {INPUT_NAMES} and outputs {OUTPUT_NAMES}; got {names}")

    def check_config(self, cfg: CfgNode) -> None:
        """Raises ValueError if the file was exported from a config with other classes,
        queries or input format than ``cfg``."""
        meta = self.metadata
        expected = {
            "MODEL.SEM_SEG_HEAD.NUM_CLASSES": (meta["num_classes"], cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES),
            "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES": (meta["num_queries"], cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES),
            "INPUT.FORMAT": (meta["input_format"], cfg.INPUT.FORMAT),
        }
        wrong = [f"{k}={mine!r} (file: {theirs!r})" for k, (theirs, mine) in expected.items() if theirs != mine]
        if wrong:
            raise ValueError(f"{self.path} was exported from another config: the config has {', '.join(wrong)}")

    def check_input(self, shape: Tuple[int, ...]) -> None:
        """Raises ValueError unless a (B, 3, H, W) input of ``shape`` is one the file takes."""
        meta = self.metadata
        if len(shape) != 4 or shape[1] != 3:
            raise ValueError(f"{self.path}: expected a (B, 3, H, W) image; got shape {tuple(shape)}")
        h, w = shape[2:]
        if meta["dynamic"]:
            d = meta["divisibility"]
            if h % d or w % d:
                raise ValueError(f"{self.path}: input {h}x{w}: height and width must be multiples of {d}")
        elif [h, w] != meta["image_size"]:
            size = "x".join(map(str, meta["image_size"]))
            raise ValueError(
                f"{self.path}: exported for {size} inputs only (static export); got {h}x{w} "
                "(export with --dynamic for any size)"
            )
        if meta["batch_size"] is not None and shape[0] != meta["batch_size"]:
            raise ValueError(
                f"{self.path}: exported for batch size {meta['batch_size']}; got {shape[0]} "
                "(export with --dynamic-batch for any batch size)"
            )

    def __call__(self, image: Tensor) -> Tuple[Tensor, Tensor]:
        """image (B, 3, H, W) float32 -> (pred_logits (B, Q, K+1), pred_masks (B, Q, H/4, W/4))."""
        self.check_input(tuple(image.shape))
        x = np.ascontiguousarray(image.detach().cpu().numpy(), dtype=np.float32)
        logits, masks = self.session.run(list(OUTPUT_NAMES), {INPUT_NAMES[0]: x})
        return torch.from_numpy(logits), torch.from_numpy(masks)


class _NetworkRunsElsewhere(nn.Module):
    """Stands for the backbone and the head of a :class:`MaskFormer` whose network is an
    exported graph: only what the post-processing reads."""

    def __init__(self, num_classes: int, size_divisibility: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.size_divisibility = size_divisibility


class OnnxRuntimeMaskFormer:
    """The model of ``cfg`` with its network run by ONNX Runtime from ``path``.

    Called like the PyTorch model in eval mode: ``model(batched_inputs)`` with dicts holding
    ``image`` (3, H, W) in ``INPUT.FORMAT`` and optionally ``height``/``width``; returns one
    output dict per image (``sem_seg``, ``panoptic_seg``, ``instances`` as configured).

    Args:
        cfg: the config the file was exported from (checked against the file's metadata).
        path: the ``.onnx`` file.
        num_threads: ONNX Runtime intra-op threads.
    """

    def __init__(self, cfg: CfgNode, path: str, *, num_threads: Optional[int] = None) -> None:
        self.network = OnnxRuntimeNetwork(path, num_threads=num_threads)
        self.network.check_config(cfg)
        meta = self.network.metadata
        options = MaskFormer.inference_options(cfg)
        options["size_divisibility"] = meta["size_divisibility"]
        stub = _NetworkRunsElsewhere(meta["num_classes"], meta["size_divisibility"])
        self.postprocessor = MaskFormer(backbone=stub, sem_seg_head=stub, criterion=None, **options).eval()

    def __call__(self, batched_inputs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        post = self.postprocessor
        mean = post.pixel_mean
        images = []
        for i, x in enumerate(batched_inputs):
            img = x.get("image") if isinstance(x, dict) else None
            if not isinstance(img, Tensor) or img.dim() != 3 or img.shape[0] != mean.shape[0]:
                got = tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__
                raise ValueError(f"batched_inputs[{i}]['image'] must be a (3, H, W) tensor; got {got}")
            images.append(img.float())
        sizes = [tuple(img.shape[-2:]) for img in images]
        meta = self.network.metadata
        hp, wp = padded_size(
            max(h for h, _ in sizes), max(w for _, w in sizes), meta["size_divisibility"], meta["divisibility"]
        )
        # Padded with the mean: normalised, the padding is exactly the zeros the
        # meta-architecture pads with.
        batch = mean.expand(len(images), -1, hp, wp).clone()
        for b, img in enumerate(images):
            batch[b, :, : img.shape[1], : img.shape[2]] = img
        pred_logits, pred_masks = self.network(batch)
        with torch.no_grad():
            return post.postprocess(pred_logits, pred_masks, (hp, wp), sizes, batched_inputs)
