"""End-to-end behaviour of the MaskFormer meta-architecture on a tiny random model."""
import os
import pickle
import tempfile
import unittest
from collections import OrderedDict

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from mask2former_d2.checkpoint import MaskFormerCheckpointer
from mask2former_d2.config import get_maskformer_cfg
from tests.common import CheckpointFormatsMixin, check_training_losses, make_inputs, tiny_cfg


def build(*opts):
    torch.manual_seed(0)
    return build_model(tiny_cfg(*opts))


class TestInference(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.model = build().eval()

    def test_outputs_at_requested_size(self):
        # Odd input sizes, outputs requested at other sizes.
        inputs = make_inputs([(75, 99), (64, 50)], out_sizes=[(150, 198), (60, 47)])
        with torch.no_grad():
            outs = self.model(inputs)
        for (h, w), out in zip([(150, 198), (60, 47)], outs):
            self.assertEqual(out["sem_seg"].shape, (133, h, w))
            self.assertEqual(out["sem_seg"].dtype, torch.float32)
            # Probabilities: sum over classes of p(c) * sigmoid(m) lies in [0, Q].
            self.assertGreaterEqual(float(out["sem_seg"].min()), 0.0)
            seg, info = out["panoptic_seg"]
            self.assertEqual(seg.shape, (h, w))
            self.assertEqual(seg.dtype, torch.int32)
            self.assertEqual(set(seg.unique().tolist()) - {0}, {s["id"] for s in info})
            inst = out["instances"]
            self.assertEqual(inst.image_size, (h, w))
            self.assertEqual(inst.pred_masks.shape[1:], (h, w))
            self.assertLessEqual(len(inst), 100)
            self.assertEqual(inst.pred_boxes.tensor.shape, (len(inst), 4))
            # Panoptic model: instances only of thing classes (COCO: contiguous 0..79).
            self.assertTrue(bool((inst.pred_classes < 80).all()))

    def test_default_output_size_is_input_size(self):
        with torch.no_grad():
            out = self.model(make_inputs([(41, 57)]))[0]
        self.assertEqual(out["sem_seg"].shape[1:], (41, 57))

    def test_batch_equals_single(self):
        inputs = make_inputs([(64, 96), (64, 96)])
        with torch.no_grad():
            both = self.model(inputs)
            one = self.model(inputs[1:])
        torch.testing.assert_close(both[1]["sem_seg"], one[0]["sem_seg"], atol=1e-4, rtol=1e-4)

    def test_channels_last_backbone_input_changes_nothing_but_speed(self):
        """At CPU inference a ResNet gets its input channels-last; the outputs are those of the
        NCHW input up to float rounding. Training keeps the input as it is."""
        x = torch.randn(1, 3, 64, 96)
        self.assertTrue(self.model._backbone_input(x).is_contiguous(memory_format=torch.channels_last))
        self.assertIs(self.model.train()._backbone_input(x), x)
        self.model.eval()
        inputs = make_inputs([(75, 99)])
        with torch.no_grad():
            got = self.model(inputs)[0]
            self.model._backbone_input = lambda t: t  # instance attribute: NCHW as given
            try:
                expected = self.model(inputs)[0]
            finally:
                del self.model._backbone_input
        torch.testing.assert_close(got["sem_seg"], expected["sem_seg"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(
            got["instances"].scores, expected["instances"].scores, atol=1e-4, rtol=1e-4
        )

    def test_semantic_only(self):
        model = build(
            "MODEL.MASK_FORMER.TEST.INSTANCE_ON", False, "MODEL.MASK_FORMER.TEST.PANOPTIC_ON", False
        ).eval()
        with torch.no_grad():
            out = model(make_inputs([(70, 90)], out_sizes=[(35, 45)]))[0]
        self.assertEqual(set(out), {"sem_seg"})
        self.assertEqual(out["sem_seg"].shape, (133, 35, 45))

    def test_bad_image_is_named(self):
        with self.assertRaisesRegex(ValueError, r"batched_inputs\[0\]\['image'\] must be a \(3, H, W\)"):
            self.model([{"image": torch.zeros(64, 64)}])


class TestTraining(unittest.TestCase):
    def test_losses_and_every_param_gets_grad(self):
        model = build()
        model.train()
        with EventStorage():
            losses = model(make_inputs([(64, 96), (64, 95)], with_targets=True))
        # DEC_LAYERS 3: the prediction before the first layer + 2 layers, all but the last auxiliary.
        check_training_losses(self, model, losses, num_aux=2)

    def test_image_without_targets(self):
        model = build()
        model.train()
        batch = make_inputs([(64, 64)], with_targets=True)
        inst = batch[0]["instances"]
        batch[0]["instances"] = inst[torch.zeros(len(inst), dtype=torch.bool)]
        with EventStorage():
            losses = model(batch)
        self.assertTrue(all(torch.isfinite(v) for v in losses.values()))


class TestCheckpoints(CheckpointFormatsMixin, unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.model = build().eval()
        cls.inputs = make_inputs([(64, 80)])
        with torch.no_grad():
            cls.reference = cls.model(cls.inputs)[0]["sem_seg"]

    def check_checkpoint(self, path):
        fresh = build("MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", 8).eval()
        torch.manual_seed(123)
        for p in fresh.parameters():
            torch.nn.init.normal_(p)
        ck = MaskFormerCheckpointer(fresh)
        ck.load(path)
        inc = ck.last_incompatible
        self.assertEqual(inc.missing_keys, [])
        self.assertEqual(inc.unexpected_keys, [])
        with torch.no_grad():
            got = fresh(self.inputs)[0]["sem_seg"]
        torch.testing.assert_close(got, self.reference)

    def test_version1_layout_is_upgraded(self):
        # First-release MaskFormer checkpoints hold pixel-decoder keys directly under the head.
        sd = OrderedDict()
        for k, v in self.model.state_dict().items():
            sd[k.replace("sem_seg_head.pixel_decoder.", "sem_seg_head.")] = v.numpy()
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "v1.pkl")
            with open(path, "wb") as f:
                pickle.dump({"model": sd, "__author__": "test"}, f)
            self.check_checkpoint(path)

    def test_wrong_architecture_is_an_error(self):
        other = build("MODEL.SEM_SEG_HEAD.CONVS_DIM", 64, "MODEL.SEM_SEG_HEAD.MASK_DIM", 64)
        with tempfile.TemporaryDirectory() as d:
            DetectionCheckpointer(other, save_dir=d).save("other")
            path = os.path.join(d, "other.pth")
            with self.assertRaisesRegex(ValueError, r"other\.pth does not fit .*pixel_decoder"):
                MaskFormerCheckpointer(build()).load(path)

    def test_other_class_count_reinitialises_classifier(self):
        other = build("MODEL.SEM_SEG_HEAD.NUM_CLASSES", 20)
        with tempfile.TemporaryDirectory() as d:
            DetectionCheckpointer(other, save_dir=d).save("other")
            model = build()
            MaskFormerCheckpointer(model).load(os.path.join(d, "other.pth"))
            torch.testing.assert_close(
                model.sem_seg_head.predictor.query_feat.weight,
                other.sem_seg_head.predictor.query_feat.weight,
            )


class TestErrors(unittest.TestCase):
    def test_unknown_pixel_decoder(self):
        with self.assertRaisesRegex(KeyError, "PIXEL_DECODER_NAME='Nope'.*MSDeformAttnPixelDecoder"):
            build("MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME", "Nope")

    def test_unknown_transformer_decoder(self):
        with self.assertRaisesRegex(KeyError, "TRANSFORMER_DECODER_NAME='Nope'.*MultiScaleMasked"):
            build("MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME", "Nope")

    def test_unknown_transformer_in_feature(self):
        with self.assertRaisesRegex(ValueError, "TRANSFORMER_IN_FEATURE='res9'"):
            build("MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE", "res9")

    def test_unknown_config_key(self):
        msg = "unknown config key MODEL.MASK_FORMER.NUM_QUERIES; did you mean MODEL.MASK_FORMER.NUM_OBJECT_QUERIES"
        with self.assertRaisesRegex(KeyError, msg):
            tiny_cfg("MODEL.MASK_FORMER.NUM_QUERIES", 1)

    def test_unknown_key_in_file(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "bad.yaml")
            with open(path, "w") as f:
                f.write("MODEL:\n  MASK_FORMER:\n    DEC_LAYER: 3\n")
            msg = (r"bad\.yaml: unknown config key MODEL\.MASK_FORMER\.DEC_LAYER; "
                   r"did you mean MODEL\.MASK_FORMER\.DEC_LAYERS")
            with self.assertRaisesRegex(KeyError, msg):
                get_maskformer_cfg(path)

    def test_no_output_enabled(self):
        with self.assertRaisesRegex(ValueError, "SEMANTIC_ON, INSTANCE_ON and PANOPTIC_ON"):
            build(
                "MODEL.MASK_FORMER.TEST.SEMANTIC_ON", False,
                "MODEL.MASK_FORMER.TEST.INSTANCE_ON", False,
                "MODEL.MASK_FORMER.TEST.PANOPTIC_ON", False,
            )


if __name__ == "__main__":
    unittest.main()
