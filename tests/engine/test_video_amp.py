"""SOLVER.AMP.ENABLED for the video model: two iterations of the video quick-start config on the
CPU under bf16 autocast give the loss keys of Mask2Former-VIS, losses close to float32 training
of the same model on the same clips, and updated parameters."""
import itertools
import os
import tempfile
import unittest
from unittest import mock

import torch
from detectron2.utils.events import EventStorage

from mask2former_d2.accel import precision
from mask2former_d2.config import get_maskformer_cfg
from mask2former_d2.engine import VideoTrainer
from mask2former_d2.engine.amp import MaskFormerAMPTrainer
from tests.common import ROOT
from tests.modeling.video.common import make_clip

CONFIG = os.path.join(ROOT, "configs", "quickstart", "video_maskformer2_R18_tiny_toy_ytvis.yaml")
ITERS = 2
# As for the image model (tests/engine/test_amp.py): bf16 keeps 8 mantissa bits, ~0.4 % per
# rounding; the total loss of an iteration moved by under 0.05 % here.
LOSS_RTOL = 0.01


def _clips():
    """Batches of two 2-frame clips with two tracks each (one absent from the first frame)."""
    batches = [[make_clip(2, 64, 80, seed=2 * s + i, with_targets=True) for i in range(2)] for s in range(2)]
    for batch in batches:
        for clip in batch:
            for inst in clip["instances"]:
                inst.gt_classes = inst.gt_classes % 3  # the config's 3 classes
    return itertools.cycle(batches)


class _LoaderVideoTrainer(VideoTrainer):
    @classmethod
    def build_train_loader(cls, cfg):
        return _clips()


def _train(amp: bool, out_dir: str):
    """(trainer, per-iteration loss dicts, parameters before) of a seeded run."""
    cfg = get_maskformer_cfg(CONFIG, [
        "SOLVER.AMP.ENABLED", amp, "SOLVER.BASE_LR", 1e-4, "SOLVER.MAX_ITER", ITERS,
        "SOLVER.IMS_PER_BATCH", 2, "OUTPUT_DIR", out_dir,
    ])
    torch.manual_seed(0)
    # As on a CPU with bf16 units (this machine may have none; autocast runs either way).
    with mock.patch.object(precision, "_hardware_reason", return_value=None):
        trainer = _LoaderVideoTrainer(cfg)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    losses = []
    with EventStorage(0) as trainer.storage:
        for i in range(ITERS):
            torch.manual_seed(100 + i)  # the same point sampling in both runs
            trainer.iter = trainer.storage.iter = i
            trainer.run_step()
            losses.append({k: v.latest() for k, v in trainer.storage.histories().items() if k.startswith("loss")})
            losses[-1]["total_loss"] = trainer.storage.history("total_loss").latest()
    return trainer, losses, before


class TestVideoAMPTraining(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.amp = _train(True, os.path.join(cls.tmp.name, "amp"))
        cls.fp32 = _train(False, os.path.join(cls.tmp.name, "fp32"))

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_trainer_is_bf16_autocast(self):
        trainer = self.amp[0]
        self.assertEqual(type(trainer.model).__name__, "VideoMaskFormer")
        self.assertIsInstance(trainer._trainer, MaskFormerAMPTrainer)
        self.assertEqual(trainer._trainer.precision, torch.bfloat16)
        self.assertNotIsInstance(self.fp32[0]._trainer, MaskFormerAMPTrainer)

    def test_losses(self):
        # DEC_LAYERS 4: the final prediction and 3 auxiliary ones, each with the three losses.
        keys = {f"{k}{s}" for k in ("loss_ce", "loss_mask", "loss_dice") for s in ("", "_0", "_1", "_2")}
        for i, (amp, fp32) in enumerate(zip(self.amp[1], self.fp32[1])):
            with self.subTest(iteration=i):
                self.assertEqual(set(amp) - {"total_loss"}, keys)
                self.assertTrue(all(torch.isfinite(torch.tensor(v)) for v in amp.values()), amp)
                a, b = amp["total_loss"], fp32["total_loss"]
                self.assertLess(abs(a - b) / abs(b), LOSS_RTOL, f"bf16 {a} vs float32 {b}")
        # Not the same computation: autocast was on.
        self.assertNotEqual(self.amp[1][0]["total_loss"], self.fp32[1][0]["total_loss"])

    def test_parameters_updated(self):
        trainer, _, before = self.amp
        params = dict(trainer.model.named_parameters())
        unchanged = [n for n, p in before.items() if torch.equal(p, params[n].detach())]
        # Every trainable parameter moves (AdamW steps even tiny gradients by ~lr), in float32.
        self.assertEqual(unchanged, [])
        self.assertTrue(all(params[n].dtype == torch.float32 for n in before))


if __name__ == "__main__":
    unittest.main()
