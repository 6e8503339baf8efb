"""SOLVER.AMP.ENABLED on the CPU: MaskFormerAMPTrainer (bf16 autocast) follows float32 training
closely over the first iterations, and Trainer picks it (or float32 where the CPU has no bf16
units) instead of Detectron2's CUDA-only AMPTrainer."""
import itertools
import tempfile
import unittest
from unittest import mock

import torch
from detectron2.engine import SimpleTrainer
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from mask2former_d2.accel import precision
from mask2former_d2.engine import Trainer
from mask2former_d2.engine.amp import MaskFormerAMPTrainer
from mask2former_d2.solver import build_optimizer
from tests.common import make_inputs, tiny_cfg

ITERS = 2
# Relative difference of the total loss between bf16 autocast and float32 training, per
# iteration (bf16 keeps 8 bits of mantissa: ~0.4% per rounding; observed below 1%).
LOSS_RTOL = 0.03


def _cfg(*opts):
    return tiny_cfg("MODEL.MASK_FORMER.DROPOUT", 0.0, "SOLVER.BASE_LR", 1e-4, *opts)


def _batches():
    return itertools.cycle([make_inputs([(64, 64)], with_targets=True, seed=s) for s in range(2)])


def _train(trainer_cls, **kwargs):
    """Total loss of every iteration of a seeded tiny model."""
    cfg = _cfg()
    torch.manual_seed(0)
    model = build_model(cfg).train()
    trainer = trainer_cls(model, _batches(), build_optimizer(cfg, model), **kwargs)
    totals = []
    with EventStorage(0) as storage:
        for i in range(ITERS):
            torch.manual_seed(100 + i)  # the same point sampling in both runs
            storage.iter = trainer.iter = i
            trainer.run_step()
            totals.append(storage.history("total_loss").latest())
    return totals


class TestAMPLosses(unittest.TestCase):
    def test_bf16_losses_follow_fp32(self):
        fp32 = _train(SimpleTrainer)
        bf16 = _train(MaskFormerAMPTrainer, precision=torch.bfloat16)
        for i, (a, b) in enumerate(zip(fp32, bf16)):
            self.assertLess(abs(a - b) / abs(a), LOSS_RTOL, f"iteration {i}: fp32 {fp32} vs bf16 {bf16}")
        # The runs are not the same computation: bf16 autocast was really on.
        self.assertNotEqual(fp32, bf16)


class _LoaderTrainer(Trainer):
    @classmethod
    def build_train_loader(cls, cfg):
        return _batches()


class TestTrainerAMP(unittest.TestCase):
    def _trainer(self, reason):
        out = tempfile.mkdtemp()
        cfg = _cfg("SOLVER.AMP.ENABLED", True, "OUTPUT_DIR", out, "SOLVER.MAX_ITER", 2)
        with mock.patch.object(precision, "_hardware_reason", return_value=reason):
            return _LoaderTrainer(cfg)

    def _steps(self, trainer, n=2):
        before = [p.detach().clone() for p in trainer.model.parameters()]
        with EventStorage(0) as trainer.storage:
            for i in range(n):
                trainer.iter = i
                trainer.run_step()
            loss = trainer.storage.history("total_loss").latest()
        changed = any(not torch.equal(a, p) for a, p in zip(before, trainer.model.parameters()))
        return loss, changed

    def test_cpu_amp_trains_in_bf16(self):
        trainer = self._trainer(None)  # a CPU with bf16 units
        self.assertIsInstance(trainer._trainer, MaskFormerAMPTrainer)
        self.assertEqual(trainer._trainer.precision, torch.bfloat16)
        self.assertFalse(trainer._trainer.grad_scaler.is_enabled())  # no loss scaling for bf16
        loss, changed = self._steps(trainer)
        self.assertTrue(torch.isfinite(torch.tensor(loss)))
        self.assertTrue(changed)

    def test_cpu_without_bf16_units_trains_in_fp32(self):
        with self.assertLogs("mask2former_d2.engine.amp", "WARNING") as logs:
            trainer = self._trainer("no bf16 units")
        self.assertIn("training in float32", logs.output[0])
        self.assertIsNone(trainer._trainer.precision)
        loss, changed = self._steps(trainer, 1)
        self.assertTrue(changed)


if __name__ == "__main__":
    unittest.main()
