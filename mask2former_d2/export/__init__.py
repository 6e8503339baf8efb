"""Deployment: the network as an ONNX or ``torch.export`` graph, and running such a graph.

Importing this package needs only PyTorch; ``onnx`` / ``onnxruntime`` / ``onnxscript`` (the
``export`` extra: ``pip install .[export]``) are imported by the functions that use them.
"""

from . import wrapper
from .wrapper import *  # noqa: F401,F403  (the public names of the export wrapper)

__all__ = list(wrapper.__all__)
