"""Exporting :class:`ExportableMaskFormer` with ``torch.export`` (``.pt2``) and to ONNX.

Both go through one ``torch.export`` trace with symbolic height and width (multiples of
:data:`EXPORT_DIVISIBILITY`) unless a static export is asked for. The ONNX file carries its
description (classes, queries, input format, padding, sizes) in ``metadata_props`` so that the
runtime can refuse a file that does not belong to the config it is used with.
"""

import json
import logging
import os
from typing import Any, Dict, Optional, Tuple

import torch
from detectron2.config import CfgNode
from torch import Tensor

from ..modeling.meta_arch import MaskFormer
from .wrapper import EXPORT_DIVISIBILITY, INPUT_NAMES, OUTPUT_NAMES, ExportableMaskFormer, export_mode

__all__ = [
    "MAX_BATCH",
    "MAX_SIZE",
    "METADATA_KEY",
    "ONNX_OPSET",
    "export_metadata",
    "export_onnx",
    "export_program",
    "trace",
]

logger = logging.getLogger(__name__)

ONNX_OPSET = 18
# The largest height / width a dynamic export accepts.
MAX_SIZE = 8192
# The largest batch a dynamic-batch export accepts.
MAX_BATCH = 256
# The ONNX metadata_props key holding the JSON description written by :func:`export_metadata`.
METADATA_KEY = "mask2former_d2"


def export_metadata(
    model: MaskFormer, cfg: CfgNode, image_shape: Tuple[int, ...], dynamic: bool, dynamic_batch: bool = False
) -> Dict:
    """What a runtime needs to know about an exported graph (stored with it)."""
    head = model.sem_seg_head
    return {
        "num_classes": int(head.num_classes),
        "num_queries": int(model.num_queries),
        "input_format": cfg.INPUT.FORMAT,
        "pixel_mean": [float(v) for v in model.pixel_mean.flatten()],
        "pixel_std": [float(v) for v in model.pixel_std.flatten()],
        # The padding the meta-architecture applies (the backbone's when the config says < 0).
        "size_divisibility": int(model.size_divisibility),
        "divisibility": EXPORT_DIVISIBILITY,
        "dynamic": bool(dynamic),
        # (H, W) of a static export; null when any multiple of ``divisibility`` is accepted.
        "image_size": None if dynamic else [int(image_shape[2]), int(image_shape[3])],
        # The batch size of a file exported for one; null when any batch size is accepted.
        "batch_size": None if dynamic_batch else int(image_shape[0]),
        "architecture": {
            "backbone": type(model.backbone).__name__,
            "pixel_decoder": type(head.pixel_decoder).__name__,
            "transformer_decoder": type(head.predictor).__name__,
        },
    }


def _check_sample(image: Tensor) -> None:
    if image.dim() != 4 or image.shape[1] != 3 or image.dtype != torch.float32:
        raise ValueError(
            f"the sample image must be a float32 (B, 3, H, W) tensor; got {image.dtype} "
            f"{tuple(image.shape)}"
        )
    h, w = image.shape[-2:]
    if h % EXPORT_DIVISIBILITY or w % EXPORT_DIVISIBILITY:
        raise ValueError(
            f"the sample image is {h}x{w}; height and width must be multiples of "
            f"{EXPORT_DIVISIBILITY}"
        )


def _check_dynamic_batch(model: MaskFormer) -> None:
    """Raises for a network that is not exported with a dynamic batch size."""
    if _is_swin(model):
        raise ValueError(
            "model.backbone (D2SwinTransformer) is not exportable with a dynamic batch size: not "
            "supported for Swin backbones; export without it"
        )


def _swin_trace_size(backbone: torch.nn.Module) -> Tuple[int, int]:
    """(H, W) to trace a Swin backbone at for a dynamic export: at every stage at least two
    windows per axis and a grid that needs padding, so that no window count of 1 and no zero
    padding is specialised into the graph; H != W, so that the two sizes stay separate symbols."""
    strides = [backbone.patch_size * 2**i for i in range(len(backbone.layers))]
    windows = [stage.window_size for stage in backbone.layers]

    def generic(size: int) -> bool:
        return all(size // r > ws and (size // r) % ws for r, ws in zip(strides, windows))

    sizes = [s for s in range(EXPORT_DIVISIBILITY, MAX_SIZE + 1, EXPORT_DIVISIBILITY) if generic(s)]
    if len(sizes) < 2:
        raise ValueError(f"model.backbone: no trace size for windows {windows} at strides {strides}")
    return sizes[0], sizes[1]


def trace(
    model: MaskFormer, image: Tensor, *, dynamic: bool = True, dynamic_batch: bool = False
) -> torch.export.ExportedProgram:
    """``torch.export`` of the network on the sample ``image`` (B, 3, H, W), with the
    export formulations (:func:`export_mode`). With ``dynamic``, height and width are symbolic
    multiples of :data:`EXPORT_DIVISIBILITY` up to :data:`MAX_SIZE`; with ``dynamic_batch`` the
    batch size is symbolic (1 to :data:`MAX_BATCH`; a sample of one image is traced as two,
    since an exporter specialises a dimension of size 1), else it is that of ``image``.

    A Swin backbone with ``dynamic`` is traced on a random image of a size chosen by
    :func:`_swin_trace_size`, and the program's tracer guards are dropped: they record the
    layout decisions seen at that size (window counts of 1 or more, padding or none), which
    would refuse other sizes although the traced operations compute the same values there
    (tested against eager at sizes with one window per axis and without padding). The input
    range and divisibility checks stay."""
    _check_sample(image)
    swin = dynamic and _is_swin(model)
    if swin:
        h, w = _swin_trace_size(model.backbone)
        generator = torch.Generator().manual_seed(0)
        image = torch.rand((image.shape[0], 3, h, w), generator=generator) * 255
    if dynamic_batch:
        _check_dynamic_batch(model)
        if image.shape[0] == 1:
            image = image.expand(2, -1, -1, -1).clone()
    wrapper = ExportableMaskFormer(model)
    dims: Dict[int, Any] = {}
    if dynamic:
        top = MAX_SIZE // EXPORT_DIVISIBILITY
        h = torch.export.Dim("height_div32", min=1, max=top)
        w = torch.export.Dim("width_div32", min=1, max=top)
        dims.update({2: EXPORT_DIVISIBILITY * h, 3: EXPORT_DIVISIBILITY * w})
    if dynamic_batch:
        dims[0] = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    dynamic_shapes = {"image": dims} if dims else None
    with torch.no_grad(), export_mode(model):
        program = torch.export.export(wrapper, (image,), dynamic_shapes=dynamic_shapes, strict=False)
    if swin:
        program._guards_code = []
    return program


def _is_swin(model: MaskFormer) -> bool:
    from ..modeling.backbone.swin import D2SwinTransformer

    return isinstance(model.backbone, D2SwinTransformer)


def export_program(program: torch.export.ExportedProgram, path: str, metadata: Optional[Dict] = None) -> str:
    """Saves an ExportedProgram as ``.pt2`` (reload with ``torch.export.load``), with
    ``metadata`` as the extra file ``mask2former_d2.json``."""
    extra = {f"{METADATA_KEY}.json": json.dumps(metadata, sort_keys=True)} if metadata else None
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    torch.export.save(program, path, extra_files=extra)
    return path


def export_onnx(
    program: torch.export.ExportedProgram,
    path: str,
    metadata: Dict,
    *,
    opset: int = ONNX_OPSET,
    optimize: bool = True,
) -> str:
    """Converts a traced network (:func:`trace`) to an ONNX file at ``path``, stores
    ``metadata`` in its ``metadata_props`` and checks it with ``onnx.checker``."""
    import onnx

    if opset < 17:
        raise ValueError(f"ONNX opset {opset}: at least 17 is needed (GridSample, LayerNormalization)")
    onnx_program = torch.onnx.export(
        program,
        dynamo=True,
        input_names=list(INPUT_NAMES),
        output_names=list(OUTPUT_NAMES),
        opset_version=opset,
        optimize=optimize,
        verbose=False,
    )
    proto = onnx_program.model_proto
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata, sort_keys=True)
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    onnx.save(proto, path)
    # By path: the checker then also handles files above protobuf's 2 GB in-memory limit.
    onnx.checker.check_model(path, full_check=False)
    return path
