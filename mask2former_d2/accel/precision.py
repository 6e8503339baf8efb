"""Inference precision (``MODEL.MASK_FORMER.TEST.PRECISION``): "fp32", "bf16" or "fp16".

In low precision the convolutions and linear layers of the backbone, the pixel decoder and the
transformer decoder run in bfloat16 / float16 under ``torch.autocast``, with the inputs cast
once at the stage boundaries (the padded image batch before the backbone) and the weights cast
once per forward (the frozen-BN-folded backbone weights are cached in the low precision). What
needs float32 stays float32: the normalisation statistics and softmaxes accumulate in float32
(as PyTorch's CPU and CUDA kernels do for half inputs), the deformable-attention sampling
(locations, attention weights, bilinear gathers) runs entirely in float32, the prediction heads
(final LayerNorm, class and mask-embedding MLP) and every mask logit (the attention masks and
the predicted masks) are float32, and post-processing receives float32 outputs.

A precision is only accepted where the device has the units that make it fast: a CPU with
AVX512-BF16 or AMX for bf16 (AMX-FP16 or AVX512-FP16 for fp16), a CUDA GPU with bf16 support
(compute capability 8.0+) or fp16 tensor cores (7.0+). Elsewhere the model raises a
``ValueError`` naming the key, since the same arithmetic would run slower than float32 (on an
AVX2-only CPU a bf16 matrix product is orders of magnitude slower).

:func:`emulate_low_precision` reproduces the numerics on a machine without those units (for
tests and benchmarks that measure the deviation from float32, not the speed).
"""
import contextlib
import contextvars
import functools
from typing import Iterator, Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "PRECISIONS",
    "precision_dtype",
    "unsupported_reason",
    "check_precision",
    "inference_precision",
    "low_precision_inference",
    "full_precision",
    "emulate_low_precision",
]

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
KEY = "MODEL.MASK_FORMER.TEST.PRECISION"

# The low-precision dtype of the inference running now, if any (see inference_precision).
_ACTIVE: contextvars.ContextVar[Optional[torch.dtype]] = contextvars.ContextVar(
    "mask2former_d2_inference_precision", default=None
)
_EMULATING: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "mask2former_d2_emulate_low_precision", default=False
)


def precision_dtype(precision: str) -> torch.dtype:
    """"fp32" / "bf16" / "fp16" -> its dtype; anything else is a ValueError naming the key."""
    if precision not in PRECISIONS:
        raise ValueError(f"{KEY}={precision!r}: expected one of {', '.join(map(repr, PRECISIONS))}")
    return PRECISIONS[precision]


@functools.lru_cache(maxsize=None)
def _hardware_reason(dtype: torch.dtype, device_type: str) -> Optional[str]:
    if dtype == torch.float32:
        return None
    name = "bf16" if dtype == torch.bfloat16 else "fp16"
    if device_type == "cpu":
        if dtype == torch.bfloat16:
            units = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
            onednn = torch.ops.mkldnn._is_mkldnn_bf16_supported()
            wanted = "AVX512-BF16 or AMX"
        else:
            caps = torch.cpu.get_capabilities()
            units = torch.cpu._is_amx_fp16_supported() or bool(caps.get("avx512_fp16", False))
            onednn = torch.ops.mkldnn._is_mkldnn_fp16_supported()
            wanted = "AMX-FP16 or AVX512-FP16"
        if units and onednn:
            return None
        return (
            f"this CPU (vector capability {torch.backends.cpu.get_cpu_capability()}) has no "
            f"{wanted} units, so {name} would run slower than fp32"
        )
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available"
        major, minor = torch.cuda.get_device_capability()
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported(including_emulation=False):
            return f"this GPU (compute capability {major}.{minor}) has no native bf16 support"
        if dtype == torch.float16 and major < 7:
            return f"this GPU (compute capability {major}.{minor}) has no fp16 tensor cores"
        return None
    return f"low precision is not implemented for device type {device_type!r}"


def unsupported_reason(precision: str, device_type: str) -> Optional[str]:
    """Why ``precision`` cannot run fast on ``device_type``, or None if it can (or is emulated)."""
    dtype = precision_dtype(precision)
    if dtype == torch.float32 or _EMULATING.get():
        return None
    return _hardware_reason(dtype, device_type)


def check_precision(precision: str, device_type: str) -> torch.dtype:
    """The dtype of ``precision``; a ValueError if the value is unknown or the device lacks the
    units for it."""
    dtype = precision_dtype(precision)
    reason = unsupported_reason(precision, device_type)
    if reason is not None:
        raise ValueError(f"{KEY}={precision!r} is not available on {device_type}: {reason}; use 'fp32'")
    return dtype


@contextlib.contextmanager
def inference_precision(dtype: torch.dtype, device_type: str) -> Iterator[None]:
    """Low-precision inference: autocast to ``dtype`` and mark it active for the modules that
    keep parts in float32 (:func:`low_precision_inference`)."""
    token = _ACTIVE.set(dtype)
    try:
        with torch.autocast(device_type=device_type, dtype=dtype):
            yield
    finally:
        _ACTIVE.reset(token)


def low_precision_inference() -> Optional[torch.dtype]:
    """The dtype of the low-precision inference running now, or None (float32 inference and
    training, with or without AMP)."""
    return _ACTIVE.get()


def full_precision(x: Tensor):
    """A context that turns autocast off on ``x``'s device (the float32 parts)."""
    return torch.autocast(device_type=x.device.type, enabled=False)


# Matrix products and convolutions: the ops that run on the low-precision units.
_MATRIX_OPS = None


def _matrix_ops():
    global _MATRIX_OPS
    if _MATRIX_OPS is None:
        aten = torch.ops.aten
        _MATRIX_OPS = {
            aten.convolution.default,
            aten.mm.default,
            aten.addmm.default,
            aten.bmm.default,
            aten.baddbmm.default,
            aten._scaled_dot_product_flash_attention_for_cpu.default,
        }
    return _MATRIX_OPS


class _RoundedMatrixOps(TorchDispatchMode):
    """Runs half-precision matrix ops in float32 on the (exact) half inputs, then rounds the
    result to the half dtype: the numerics of bf16/fp16 units with float32 accumulation."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _matrix_ops():
            return func(*args, **kwargs)
        half = [a.dtype for a in args if isinstance(a, Tensor) and a.dtype in (torch.bfloat16, torch.float16)]
        if not half:
            return func(*args, **kwargs)

        def up(a):
            return a.float() if isinstance(a, Tensor) and a.dtype == half[0] else a

        out = func(*[up(a) for a in args], **{k: up(v) for k, v in kwargs.items()})
        if isinstance(out, tuple):
            return tuple(o.to(half[0]) if isinstance(o, Tensor) and o.is_floating_point() else o for o in out)
        return out.to(half[0])


@contextlib.contextmanager
def emulate_low_precision() -> Iterator[None]:
    """Accepts every precision on every device and computes half-precision matrix products and
    convolutions in float32 from their half inputs, rounding the results to half: the outputs
    of a machine with bf16/fp16 units, at a fraction of this machine's float32 speed. For
    measuring the deviation of low precision from float32 where the units are missing; the
    model must be built and run inside the context."""
    token = _EMULATING.set(True)
    try:
        with _RoundedMatrixOps():
            yield
    finally:
        _EMULATING.reset(token)
