"""Deployment: the network as an ONNX or ``torch.export`` graph, and running such a graph.

Importing this package needs only PyTorch; ``onnx`` / ``onnxruntime`` / ``onnxscript`` (the
``export`` extra: ``pip install .[export]``) are imported by the functions that use them.
"""

from .ms_deform_attn import GridSampleMSDeformAttn, grid_sample_ms_deform_attn
from .wrapper import (
    EXPORT_DIVISIBILITY,
    INPUT_NAMES,
    OUTPUT_NAMES,
    ExportableMaskFormer,
    check_exportable,
    export_mode,
)

__all__ = [
    "EXPORT_DIVISIBILITY",
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "ExportableMaskFormer",
    "GridSampleMSDeformAttn",
    "check_exportable",
    "export_mode",
    "grid_sample_ms_deform_attn",
]
