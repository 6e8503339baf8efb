"""Mixed-precision training (``SOLVER.AMP.ENABLED``) on the CPU as on the GPU.

Detectron2's ``AMPTrainer`` requires CUDA (it asserts so before the first iteration, and the
published configs enable AMP). :class:`MaskFormerAMPTrainer` is the same loop under
``torch.autocast`` of the model's device: float16 with a ``GradScaler`` on CUDA (Detectron2's
behaviour), bfloat16 without loss scaling on the CPU (bf16 has float32's exponent range). The
model keeps its matcher and criterion in float32 (``MaskFormer.forward``) and the deformable
pixel decoder in float32, as the published model does under AMP.

A CPU without bf16 units (AVX512-BF16 or AMX) would run the bf16 arithmetic far slower than
float32: there the trainer says so in the log and trains in float32.
"""
import logging
import time
from typing import Optional

import torch
from detectron2.engine import AMPTrainer
from detectron2.utils.events import get_event_storage

from ..accel import precision as _precision

__all__ = ["MaskFormerAMPTrainer", "default_amp_dtype"]

logger = logging.getLogger(__name__)


def default_amp_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype of AMP training on ``device_type``: float16 on CUDA, bfloat16 on a
    CPU with bf16 units, None (float32) on a CPU without them."""
    if device_type == "cuda":
        return torch.float16
    reason = _precision.unsupported_reason("bf16", device_type)
    if reason is None:
        return torch.bfloat16
    logger.warning("SOLVER.AMP.ENABLED: %s; training in float32", reason)
    return None


class MaskFormerAMPTrainer(AMPTrainer):
    """Detectron2's ``AMPTrainer`` for any device (see the module docstring).

    Args:
        model, data_loader, optimizer, gather_metric_period, zero_grad_before_forward,
            log_grad_scaler, async_write_metrics: as in Detectron2's ``AMPTrainer``.
        grad_scaler: default: a ``GradScaler`` for float16 on CUDA, a disabled one otherwise.
        precision: the autocast dtype; default :func:`default_amp_dtype` of the model's device.
    """

    def __init__(
        self,
        model,
        data_loader,
        optimizer,
        gather_metric_period: int = 1,
        zero_grad_before_forward: bool = False,
        grad_scaler=None,
        precision: Optional[torch.dtype] = None,
        log_grad_scaler: bool = False,
        async_write_metrics: bool = False,
    ) -> None:
        self.device_type = next(model.parameters()).device.type
        if precision is None:
            precision = default_amp_dtype(self.device_type)
        if grad_scaler is None:
            scaled = self.device_type == "cuda" and precision == torch.float16
            grad_scaler = torch.amp.GradScaler(self.device_type, enabled=scaled)
        super().__init__(
            model, data_loader, optimizer, gather_metric_period=gather_metric_period,
            zero_grad_before_forward=zero_grad_before_forward, grad_scaler=grad_scaler, precision=precision,
            log_grad_scaler=log_grad_scaler, async_write_metrics=async_write_metrics,
        )

    def run_step(self) -> None:
        """One iteration: forward under autocast, (scaled) backward, optimizer step."""
        assert self.model.training, "[MaskFormerAMPTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start

        if self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        enabled = self.precision is not None
        with torch.autocast(self.device_type, dtype=self.precision, enabled=enabled):
            loss_dict = self.model(data)
            if isinstance(loss_dict, torch.Tensor):
                losses = loss_dict
                loss_dict = {"total_loss": loss_dict}
            else:
                losses = sum(loss_dict.values())
        if not self.zero_grad_before_forward:
            self.optimizer.zero_grad()

        self.grad_scaler.scale(losses).backward()
        if self.log_grad_scaler:
            get_event_storage().put_scalar("[metric]grad_scaler", self.grad_scaler.get_scale())
        self.after_backward()
        if self.async_write_metrics:
            self.concurrent_executor.submit(self._write_metrics, loss_dict, data_time, iter=self.iter)
        else:
            self._write_metrics(loss_dict, data_time)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()
