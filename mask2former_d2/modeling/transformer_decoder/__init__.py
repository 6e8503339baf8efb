from . import mask2former, maskformer, pem  # noqa: F401  (registration)
from .build import TRANSFORMER_DECODER_REGISTRY, build_transformer_decoder

__all__ = ["TRANSFORMER_DECODER_REGISTRY", "build_transformer_decoder"]
