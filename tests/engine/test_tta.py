"""``Trainer.test_with_TTA``: evaluation of the test-time-augmented model (``TEST.AUG``) against
an augmentation written out here with Detectron2's transforms, on a small generated dataset."""
import os
import tempfile
import unittest

import torch
from detectron2.data import transforms as T
from detectron2.evaluation import SemSegEvaluator
from detectron2.modeling import build_model
from torch import nn

from mask2former_d2.data.toy import TOY_CATEGORIES, make_toy_panoptic_dataset, register_toy_panoptic
from mask2former_d2.engine.trainer import Trainer
from mask2former_d2.test_time_augmentation import SemanticSegmentorWithTTA
from tests.common import tiny_cfg

PREFIX = "m2f_test_tta"


class NaiveTTA(nn.Module):
    """Semantic probabilities averaged over the sizes ``min_sizes`` (shortest edge, longest at
    most ``max_size``) and, with ``flip``, their mirror images, each computed from the image at
    its original size and flipped back; outputs at the original size."""

    def __init__(self, model, min_sizes, max_size, flip):
        super().__init__()
        self.model, self.min_sizes, self.max_size, self.flip = model, min_sizes, max_size, flip

    def forward(self, batched_inputs):
        return [self._one(x) for x in batched_inputs]

    def _one(self, x):
        h, w = x["height"], x["width"]
        image = x["image"].permute(1, 2, 0).numpy()  # as the test loader resized it
        original = T.ResizeTransform(image.shape[0], image.shape[1], h, w).apply_image(image)
        total = []
        for size in self.min_sizes:
            resized = T.ResizeShortestEdge(size, self.max_size).get_transform(original).apply_image(original)
            for flipped in (False, True) if self.flip else (False,):
                img = resized[:, ::-1] if flipped else resized
                tensor = torch.as_tensor(img.copy()).permute(2, 0, 1)
                with torch.no_grad():
                    prob = self.model([{"image": tensor, "height": h, "width": w}])[0]["sem_seg"]
                total.append(prob.flip(2) if flipped else prob)
        return {"sem_seg": torch.stack(total).mean(0)}


class TestTestWithTTA(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        root = os.path.join(cls.tmp.name, "toy")
        make_toy_panoptic_dataset(root, splits={"train": 1, "val": 3}, height=96, width=128)
        register_toy_panoptic(root, prefix=PREFIX)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def _cfg(self, min_sizes, flip):
        cfg = tiny_cfg(
            "MODEL.SEM_SEG_HEAD.NUM_CLASSES", len(TOY_CATEGORIES),
            "MODEL.MASK_FORMER.TEST.INSTANCE_ON", False,
            "MODEL.MASK_FORMER.TEST.PANOPTIC_ON", False,
            "DATASETS.TEST", (f"{PREFIX}_val",),
            "INPUT.MIN_SIZE_TEST", 96, "INPUT.MAX_SIZE_TEST", 160,
            "TEST.AUG.ENABLED", True, "TEST.AUG.MIN_SIZES", min_sizes, "TEST.AUG.MAX_SIZE", 160,
            "TEST.AUG.FLIP", flip,
            "DATALOADER.NUM_WORKERS", 0,
            "OUTPUT_DIR", os.path.join(self.tmp.name, f"out_{len(min_sizes)}_{flip}"),
        )
        torch.manual_seed(0)
        return cfg, build_model(cfg).eval()

    def _naive_results(self, cfg, model):
        evaluator = SemSegEvaluator(cfg.DATASETS.TEST[0], distributed=False)
        naive = NaiveTTA(model, cfg.TEST.AUG.MIN_SIZES, cfg.TEST.AUG.MAX_SIZE, cfg.TEST.AUG.FLIP)
        return Trainer.test(cfg, naive, [evaluator])

    def test_sizes_and_flip(self):
        cfg, model = self._cfg((64, 96, 128), True)
        results = Trainer.test_with_TTA(cfg, model)
        expected = self._naive_results(cfg, model)
        self.assertEqual(set(results), {"sem_seg_TTA"})
        for key, value in expected["sem_seg"].items():
            self.assertAlmostEqual(results["sem_seg_TTA"][key], value, places=4, msg=key)
        # Written beside the plain evaluation's folder, not over it.
        self.assertTrue(os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "inference_TTA", "sem_seg_predictions.json")))
        self.assertFalse(os.path.exists(os.path.join(cfg.OUTPUT_DIR, "inference")))

    def test_wrapper_probabilities(self):
        # The averaged probabilities themselves, on one image of the loader.
        cfg, model = self._cfg((64, 128), True)
        loader = Trainer.build_test_loader(cfg, cfg.DATASETS.TEST[0])
        x = next(iter(loader))
        got = SemanticSegmentorWithTTA(cfg, model)(x)[0]["sem_seg"]
        expected = NaiveTTA(model, (64, 128), 160, True)(x)[0]["sem_seg"]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
        with torch.no_grad():
            plain = model(x)[0]["sem_seg"]
        self.assertGreater(float((got - plain).abs().max()), 1e-3)  # the augmentation changed something

    def test_one_size_without_flip_is_plain_evaluation(self):
        cfg, model = self._cfg((96,), False)
        results = Trainer.test_with_TTA(cfg, model)
        plain = Trainer.test(cfg, model)
        self.assertEqual(results, {k + "_TTA": v for k, v in plain.items()})


if __name__ == "__main__":
    unittest.main()
