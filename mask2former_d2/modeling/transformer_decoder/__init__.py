from .build import TRANSFORMER_DECODER_REGISTRY, build_transformer_decoder
from . import mask2former, maskformer  # noqa: F401  (registration)

__all__ = ["TRANSFORMER_DECODER_REGISTRY", "build_transformer_decoder"]
