from .build import PIXEL_DECODER_REGISTRY, build_pixel_decoder
from . import fpn, msdeformattn  # noqa: F401  (registration)

__all__ = ["PIXEL_DECODER_REGISTRY", "build_pixel_decoder"]
