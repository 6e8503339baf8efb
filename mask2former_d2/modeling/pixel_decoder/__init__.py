from . import fpn, msdeformattn, pem  # noqa: F401  (registration)
from .build import PIXEL_DECODER_REGISTRY, build_pixel_decoder

__all__ = ["PIXEL_DECODER_REGISTRY", "build_pixel_decoder"]
