"""MaskFormer and Mask2Former for Detectron2.

Importing the package registers the meta-architecture, backbones, heads, pixel and
transformer decoders, dataset mappers and datasets with Detectron2.
"""
from . import (
    data,  # noqa: F401  (registers datasets)
    model_zoo,  # noqa: F401  (registers zoo:// with Detectron2's PathManager)
    modeling,  # noqa: F401  (registers models)
)
from .config import add_maskformer2_config, add_maskformer2_video_config, get_maskformer_cfg

__all__ = ["add_maskformer2_config", "add_maskformer2_video_config", "get_maskformer_cfg"]
__version__ = "0.1.0"
