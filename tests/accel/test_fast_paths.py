"""A whole model built with MODEL.MASK_FORMER.FAST_PATHS (folded frozen BN, channels-last ResNet
input, embedding_bag deformable attention in chunks, 1x1 convs as matrix products, banded
post-processing) gives the outputs of the same model built with the reference formulations."""
import unittest

import torch
from detectron2.layers import Conv2d
from detectron2.modeling import build_model

from mask2former_d2.accel.fold_bn import FoldedBNConv2d
from mask2former_d2.accel.ms_deform_attn import EmbeddingBagMSDeformAttn
from mask2former_d2.layers.deform_conv import ModulatedDeformConv
from tests.common import ROOT, make_inputs, tiny_cfg

PEM_TINY = f"{ROOT}/configs/quickstart/pem_STDC1_tiny_coco_panoptic.yaml"


class TestFastPathsEqualReference(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        torch.manual_seed(0)
        frozen = ("MODEL.RESNETS.NORM", "FrozenBN")
        cls.fast = build_model(tiny_cfg(*frozen)).eval()
        cls.reference = build_model(tiny_cfg(*frozen, "MODEL.MASK_FORMER.FAST_PATHS", False)).eval()
        cls.reference.load_state_dict(cls.fast.state_dict())

    def test_the_choice_is_made_at_build(self):
        def kinds(model):
            return {type(m) for m in model.modules()}

        self.assertIn(FoldedBNConv2d, kinds(self.fast))
        self.assertIn(EmbeddingBagMSDeformAttn, kinds(self.fast))
        self.assertNotIn(FoldedBNConv2d, kinds(self.reference))
        self.assertNotIn(EmbeddingBagMSDeformAttn, kinds(self.reference))
        self.assertIn(Conv2d, kinds(self.reference))
        self.assertEqual(self.fast.state_dict().keys(), self.reference.state_dict().keys())

    def test_same_outputs(self):
        inputs = make_inputs([(96, 128), (80, 101)], out_sizes=[(96, 128), (120, 150)])
        with torch.no_grad():
            expected = self.reference(inputs)
            got = self.fast(inputs)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g["sem_seg"], e["sem_seg"], rtol=0, atol=1e-4)
            seg, info = g["panoptic_seg"]
            ref_seg, ref_info = e["panoptic_seg"]
            self.assertEqual(info, ref_info)
            # Pixels where two queries tie up to float rounding may go either way.
            self.assertGreater(float((seg == ref_seg).float().mean()), 0.999)
            inst, ref_inst = g["instances"], e["instances"]
            self.assertEqual(inst.pred_classes.tolist(), ref_inst.pred_classes.tolist())
            torch.testing.assert_close(inst.scores, ref_inst.scores, rtol=0, atol=1e-4)
            agreement = (inst.pred_masks == ref_inst.pred_masks).float().mean()
            self.assertGreater(float(agreement), 0.999)


class TestPEMFastPathsEqualReference(unittest.TestCase):
    """PEM on the CPU: its deformable convolutions run as grid_sample + a matrix product (faster
    there than torchvision's kernel), its norms folded; same outputs as the reference build."""

    def test_same_outputs(self):
        torch.manual_seed(0)
        fast = build_model(tiny_cfg(config_file=PEM_TINY)).eval()
        reference = build_model(tiny_cfg("MODEL.MASK_FORMER.FAST_PATHS", False, config_file=PEM_TINY)).eval()
        reference.load_state_dict(fast.state_dict())
        with torch.no_grad():  # offsets of a few pixels, so that the sampling is really deformable
            for m in fast.modules():
                if hasattr(m, "dcn_offset"):
                    m.dcn_offset.bias.normal_(0, 2.0)
            reference.load_state_dict(fast.state_dict())

        def formulations(model):
            return {m.formulation for m in model.modules() if isinstance(m, ModulatedDeformConv)}

        self.assertEqual(formulations(fast), {"grid_sample"})
        self.assertEqual(formulations(reference), {"torchvision"})
        inputs = make_inputs([(96, 128), (80, 101)], out_sizes=[(96, 128), (120, 150)])
        with torch.no_grad():
            expected = reference(inputs)
            got = fast(inputs)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g["sem_seg"], e["sem_seg"], rtol=0, atol=1e-4)
            seg, info = g["panoptic_seg"]
            ref_seg, ref_info = e["panoptic_seg"]
            self.assertEqual(len(info), len(ref_info))
            self.assertGreater(float((seg == ref_seg).float().mean()), 0.999)


if __name__ == "__main__":
    unittest.main()
