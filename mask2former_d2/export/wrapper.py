"""The network part of a MaskFormer / Mask2Former as one traceable module.

:class:`ExportableMaskFormer` maps a batch of raw images to the two tensors the post-processing
reads: normalisation, backbone, pixel decoder and transformer decoder. Everything after that
(upsampling the masks, semantic / panoptic / instance inference) stays in Python and is run by
the meta-architecture itself (:meth:`MaskFormer.postprocess`) on the outputs of whatever runtime
executed the graph.

Shapes: B batch, H/W input size (a multiple of :data:`EXPORT_DIVISIBILITY`), Q queries, K classes.
"""

import contextlib
from typing import Iterator, Tuple

from torch import Tensor, nn

from ..layers.deform_conv import grid_sample_deform_conv
from ..modeling.meta_arch import MaskFormer

__all__ = [
    "EXPORT_DIVISIBILITY",
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "ExportableMaskFormer",
    "check_exportable",
    "export_mode",
]

INPUT_NAMES = ("image",)
OUTPUT_NAMES = ("pred_logits", "pred_masks")
# Input heights and widths an exported graph accepts are multiples of this: the coarsest
# feature level of every supported backbone has stride 32.
EXPORT_DIVISIBILITY = 32

# Module classes, by name, that have been made traceable with symbolic sizes.
_SUPPORTED = {
    "backbone": ("ResNet", "D2SwinTransformer", "D2STDCnet"),
    "sem_seg_head": ("MaskFormerHead",),
    "sem_seg_head.pixel_decoder": (
        "BasePixelDecoder",
        "TransformerEncoderPixelDecoder",
        "MSDeformAttnPixelDecoder",
        "PEM_Pixel_Decoder",
    ),
    "sem_seg_head.predictor": (
        "MultiScaleMaskedTransformerDecoder",
        "StandardTransformerDecoder",
        "PEMTransformerDecoder",
    ),
}


def check_exportable(model: nn.Module) -> None:
    """Raises ValueError, naming the module and the reason, if ``model`` is not an image
    MaskFormer built from supported parts."""
    if not isinstance(model, MaskFormer) or type(model).__name__ != "MaskFormer":
        raise ValueError(
            f"model ({type(model).__name__}): only the image meta-architecture MaskFormer "
            "(MODEL.META_ARCHITECTURE: MaskFormer) can be exported"
        )
    for path, supported in _SUPPORTED.items():
        module = model.get_submodule(path)
        name = type(module).__name__
        if name not in supported:
            raise ValueError(
                f"model.{path} ({name}): not exportable, no traceable formulation with dynamic "
                f"input sizes; supported: {', '.join(supported)}"
            )
    predictor = model.sem_seg_head.predictor
    if not getattr(predictor, "mask_classification", True):
        raise ValueError(
            f"model.sem_seg_head.predictor ({type(predictor).__name__}): built without mask "
            "classification, so it has no pred_logits to export"
        )


class ExportableMaskFormer(nn.Module):
    """``image`` (B, 3, H, W) float32, 0-255, ``INPUT.FORMAT`` channel order, H and W
    multiples of :data:`EXPORT_DIVISIBILITY` -> ``pred_logits`` (B, Q, K+1) and ``pred_masks``
    (B, Q, H/4, W/4): exactly what the meta-architecture computes on a batch of that padded
    size before its post-processing.

    Args:
        model: an image MaskFormer in eval mode (its modules are shared, not copied).
    """

    def __init__(self, model: MaskFormer) -> None:
        super().__init__()
        check_exportable(model)
        self.model = model
        self.eval()

    def forward(self, image: Tensor) -> Tuple[Tensor, Tensor]:
        model = self.model
        x = (image - model.pixel_mean) / model.pixel_std
        outputs = model.sem_seg_head(model.backbone(x))
        return outputs["pred_logits"], outputs["pred_masks"]


@contextlib.contextmanager
def export_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the duration of an export, restored on exit, with its
    deformable convolutions computed with ``grid_sample`` (:func:`.grid_sample_deform_conv`: ONNX
    Runtime has no deformable operators). (Modules whose fast formulation cannot be traced, e.g.
    :class:`~mask2former_d2.accel.ms_deform_attn.EmbeddingBagMSDeformAttn`, compute their reference
    formulation while torch.export traces.)"""
    was_training = model.training
    model.eval()  # an ExportableMaskFormer shares its modules: this puts it in eval mode too
    try:
        with grid_sample_deform_conv(model):
            yield model
    finally:
        model.train(was_training)
