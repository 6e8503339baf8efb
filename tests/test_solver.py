"""Optimizer parameter groups, gradient clipping and semantic test-time augmentation."""
import unittest

import numpy as np
import torch
from detectron2.modeling import build_model

from mask2former_d2.solver import build_optimizer
from mask2former_d2.test_time_augmentation import SemanticSegmentorWithTTA
from tests.common import tiny_cfg


class TestOptimizer(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.cfg = tiny_cfg(
            "SOLVER.BASE_LR", 1e-3, "SOLVER.WEIGHT_DECAY", 0.05, "SOLVER.WEIGHT_DECAY_NORM", 0.0,
            "SOLVER.WEIGHT_DECAY_EMBED", 0.0, "SOLVER.BACKBONE_MULTIPLIER", 0.1,
        )
        torch.manual_seed(0)
        cls.model = build_model(cls.cfg)

    def _hyper(self, optimizer):
        out = {}
        for g in optimizer.param_groups:
            for p in g["params"]:
                out[p] = (g["lr"], g["weight_decay"])
        return out

    def test_groups(self):
        opt = build_optimizer(self.cfg, self.model)
        hyper = self._hyper(opt)
        named = dict(self.model.named_parameters())
        self.assertEqual(set(hyper), {p for p in named.values() if p.requires_grad})
        pd = "sem_seg_head.pixel_decoder."
        pred = "sem_seg_head.predictor."
        cases = {
            # backbone conv: lr x 0.1, weight decay
            "backbone.res3.0.conv1.weight": (1e-4, 0.05),
            # backbone norm (GN in the tiny config): lr x 0.1, no weight decay
            "backbone.res3.0.conv1.norm.weight": (1e-4, 0.0),
            pd + "transformer.level_embed": (1e-3, 0.0),  # embedding parameter
            pred + "query_feat.weight": (1e-3, 0.0),  # nn.Embedding
            pred + "decoder_norm.weight": (1e-3, 0.0),  # LayerNorm
            pred + "class_embed.weight": (1e-3, 0.05),
        }
        for name, expected in cases.items():
            with self.subTest(name=name):
                lr, wd = hyper[named[name]]
                self.assertAlmostEqual(lr, expected[0])
                self.assertAlmostEqual(wd, expected[1])

    def test_full_model_clipping(self):
        cfg = self.cfg.clone()
        cfg.merge_from_list([
            "SOLVER.CLIP_GRADIENTS.ENABLED", True, "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "full_model",
            "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", 0.01, "SOLVER.OPTIMIZER", "SGD",
            "SOLVER.MOMENTUM", 0.0, "SOLVER.WEIGHT_DECAY", 0.0, "SOLVER.BACKBONE_MULTIPLIER", 1.0,
        ])
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
        opt = build_optimizer(cfg, model)
        before = [p.detach().clone() for p in model.parameters()]
        for p in model.parameters():
            p.grad = torch.full_like(p, 10.0)
        opt.step()
        # SGD step = lr * clipped gradient: the whole model's gradient norm is clipped to 0.01.
        steps = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])
        self.assertAlmostEqual(float(steps.norm()) / cfg.SOLVER.BASE_LR, 0.01, places=4)

    def test_unknown_optimizer(self):
        cfg = self.cfg.clone()
        cfg.SOLVER.OPTIMIZER = "LAMB"
        with self.assertRaisesRegex(ValueError, "SOLVER.OPTIMIZER='LAMB'"):
            build_optimizer(cfg, self.model)


class TestSemanticTTA(unittest.TestCase):
    def test_average_of_augmented_predictions(self):
        cfg = tiny_cfg(
            "MODEL.MASK_FORMER.TEST.INSTANCE_ON", False, "MODEL.MASK_FORMER.TEST.PANOPTIC_ON", False,
            "TEST.AUG.MIN_SIZES", (48, 64), "TEST.AUG.MAX_SIZE", 200, "TEST.AUG.FLIP", True,
        )
        torch.manual_seed(0)
        model = build_model(cfg).eval()
        image = torch.from_numpy(np.random.RandomState(0).randint(0, 256, (3, 40, 56)).astype(np.uint8))
        out = SemanticSegmentorWithTTA(cfg, model)([{"image": image, "height": 40, "width": 56}])[0]
        self.assertEqual(out["sem_seg"].shape, (133, 40, 56))
        # Reference: each resized/flipped copy run separately, flipped back, averaged.
        from detectron2.data import transforms as T

        probs = []
        with torch.no_grad():
            for size in (48, 64):
                for flip in (False, True):
                    hwc = image.permute(1, 2, 0).numpy()
                    img = T.ResizeShortestEdge(size, 200).get_transform(hwc).apply_image(hwc)
                    if flip:
                        img = img[:, ::-1]
                    t = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
                    p = model([{"image": t, "height": 40, "width": 56}])[0]["sem_seg"]
                    probs.append(p.flip(2) if flip else p)
        torch.testing.assert_close(out["sem_seg"], sum(probs) / 4, atol=1e-5, rtol=1e-4)


if __name__ == "__main__":
    unittest.main()
