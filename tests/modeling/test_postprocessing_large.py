"""Large images: the semantic class ids computed band by band (postprocessing
``semantic_labels``, ``MaskFormer.semantic_labels``) equal the argmax of the probabilities, and the
demo's path never materialises a (K, H, W) tensor at the output size (a 6000x4000 photo took
16.9 GB for 133 classes)."""
import unittest

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.utils.visualizer import ColorMode, Visualizer
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from mask2former_d2.accel.postprocessing import MaskLogitRows, postprocess_masks, semantic_labels
from mask2former_d2.predictor import VisualizationDemo, _visualizer

from ..common import make_inputs, tiny_cfg


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operator returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


class TestSemanticLabels(unittest.TestCase):
    def test_labels_equal_argmax_of_probabilities(self):
        g = torch.Generator().manual_seed(0)
        mask_cls = torch.randn(12, 8, generator=g)  # 12 queries, 7 classes
        low = torch.randn(12, 24, 32, generator=g)
        masks = MaskLogitRows(low, (96, 128), (90, 120), (181, 239))
        probs = postprocess_masks(mask_cls, masks, semantic=True)["sem_seg"]
        labels = postprocess_masks(mask_cls, masks, semantic=True, semantic_labels=True)["sem_seg"]
        self.assertEqual((labels.shape, labels.dtype), ((181, 239), torch.int64))
        self.assertTrue(torch.equal(labels, probs.argmax(0)))

    def test_resized_labels_match_detectron2_resize(self):
        g = torch.Generator().manual_seed(1)
        prob = torch.rand(7, 40, 56, generator=g)
        labels = semantic_labels(prob, (333, 470))
        reference = sem_seg_postprocess(prob, (40, 56), 333, 470).argmax(0)
        self.assertEqual(labels.shape, reference.shape)
        # Equal up to float rounding of the (separable vs PyTorch's) bilinear weights.
        self.assertGreater((labels == reference).float().mean().item(), 0.999)
        self.assertTrue(torch.equal(semantic_labels(prob, (40, 56)), prob.argmax(0)))

    def test_model_labels(self):
        for before in (True, False):
            with self.subTest(sem_seg_postprocessing_before_inference=before):
                torch.manual_seed(0)
                model = build_model(tiny_cfg(
                    "MODEL.MASK_FORMER.TEST.INSTANCE_ON", False,
                    "MODEL.MASK_FORMER.TEST.PANOPTIC_ON", False,
                    "MODEL.MASK_FORMER.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE", before,
                )).eval()
                inputs = make_inputs([(64, 96)], out_sizes=[(150, 211)])
                with torch.no_grad():
                    probs = model(inputs)[0]["sem_seg"]
                    model.semantic_labels = True
                    labels = model(inputs)[0]["sem_seg"]
                self.assertEqual(labels.shape, (150, 211))
                agree = (labels == probs.argmax(0)).float().mean().item()
                self.assertEqual(agree, 1.0) if before else self.assertGreater(agree, 0.999)


class TestDemoDrawsWithoutFullProbabilities(unittest.TestCase):
    H, W = 720, 960

    def largest_tensor(self, *opts):
        cfg = tiny_cfg("INPUT.MIN_SIZE_TEST", 96, "INPUT.MAX_SIZE_TEST", 128, *opts)
        torch.manual_seed(0)
        demo = VisualizationDemo(cfg)
        image = np.random.RandomState(0).randint(0, 256, (self.H, self.W, 3), dtype=np.uint8)
        # Bands of rows and a few (H, W) maps, never one full-size plane per query (8 here) or,
        # 17 times more, per class (133): the (K, H, W) probabilities.
        self.full_planes = cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES * self.H * self.W
        with _LargestTensor() as mode:
            predictions, vis = demo.run_on_image(image)
        self.assertEqual(vis.get_image().shape, (self.H, self.W, 3))
        return mode.largest, predictions

    def test_panoptic_model(self):
        largest, predictions = self.largest_tensor()
        self.assertEqual(list(predictions), ["panoptic_seg"])  # only what is drawn
        self.assertLess(largest, self.full_planes)

    def test_semantic_model(self):
        for before in (True, False):
            with self.subTest(sem_seg_postprocessing_before_inference=before):
                largest, predictions = self.largest_tensor(
                    "MODEL.MASK_FORMER.TEST.INSTANCE_ON", False,
                    "MODEL.MASK_FORMER.TEST.PANOPTIC_ON", False,
                    "MODEL.MASK_FORMER.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE", before,
                )
                self.assertEqual(predictions["sem_seg"].shape, (self.H, self.W))  # class ids
                self.assertLess(largest, self.full_planes)

    def test_drawing_matches_detectron2(self):
        # The overlays are blended onto the photo outside matplotlib (no imshow of the photo).
        h, w = 120, 160
        image = np.random.RandomState(1).randint(0, 256, (h, w, 3), dtype=np.uint8)
        panoptic = torch.zeros(h, w, dtype=torch.int32)
        panoptic[10:60, 20:90] = 1
        panoptic[70:110, 30:150] = 2
        panoptic[80:100, 60:80] = 0  # a hole: Detectron2 draws this mask with imshow
        segments = [{"id": 1, "isthing": True, "category_id": 0}, {"id": 2, "isthing": False, "category_id": 3}]
        metadata = MetadataCatalog.get("coco_2017_val_panoptic")
        for mode in (ColorMode.IMAGE, ColorMode.IMAGE_BW):
            with self.subTest(mode=mode):
                drawings = []
                for visualizer in (Visualizer(image, metadata, instance_mode=mode),
                                   _visualizer(image, metadata, mode)):
                    np.random.seed(0)  # Detectron2 jitters the colours of things
                    drawings.append(visualizer.draw_panoptic_seg(panoptic, segments).get_image().astype(int))
                self.assertGreater(np.abs(drawings[0] - image).max(), 50)  # something is drawn
                self.assertLessEqual(np.abs(drawings[0] - drawings[1]).max(), 2)


if __name__ == "__main__":
    unittest.main()
