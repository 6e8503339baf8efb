"""Deployment: the network as an ONNX or ``torch.export`` graph, and running such a graph.

Importing this package needs only PyTorch; ``onnx`` / ``onnxruntime`` / ``onnxscript`` (the
``export`` extra: ``pip install .[export]``) are imported by the functions that use them.
"""

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
    "check_exportable",
    "export_mode",
]
