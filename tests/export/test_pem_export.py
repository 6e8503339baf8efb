"""PEM exported (dynamic height and width) to ONNX and torch.export: its deformable
convolutions are traced in their grid_sample formulation (ONNX Runtime has no deformable
convolution), and the exported graphs reproduce the PyTorch model on PEM's parity fixture, in
ONNX Runtime up to the fixture's own comparison (PARITY OK)."""
import os
import unittest

import torch

from mask2former_d2.export.exporter import export_program
from mask2former_d2.layers.deform_conv import ModulatedDeformConv
from tests.common import SHARED, make_inputs
from tests.export.test_onnx_runtime import (
    HAVE_ONNX,
    PARITY_TOOL,
    SIZES,
    TOLERANCE,
    _ExportCase,
    assert_onnx_parity,
    build_fixture_model,
    random_image,
    relative_deviation,
)

FIXTURE = os.path.join(SHARED, "fixtures", "parity_pem", "pem_stdc1_cityscapes_panoptic")
HAVE_FIXTURE = os.path.isfile(os.path.join(FIXTURE, "weights.pkl")) and os.path.isfile(PARITY_TOOL)


@unittest.skipUnless(HAVE_ONNX and HAVE_FIXTURE, "needs onnx/onnxruntime/onnxscript and the PEM parity fixture")
class TestPEMExport(_ExportCase, unittest.TestCase):
    @classmethod
    def build(cls):
        return build_fixture_model(FIXTURE)

    def test_graph_has_no_deformable_operator(self):
        import onnx

        ops = {node.op_type for node in onnx.load(self.onnx_path).graph.node}
        self.assertIn("GridSample", ops)
        self.assertFalse([op for op in ops if "deform" in op.lower()])
        targets = {str(node.target) for node in self.program.graph.nodes}
        self.assertFalse([t for t in targets if "deform_conv" in t])
        # The model computes with torchvision's operator again after the export.
        self.assertTrue(all(not m.export_formulation for m in self.model.modules()
                            if isinstance(m, ModulatedDeformConv)))

    def test_parity_through_onnx_runtime(self):
        assert_onnx_parity(self, FIXTURE)

    def test_postprocessed_outputs_match_the_pytorch_model(self):
        """Semantic and panoptic outputs (this config has no instance output) of a size that
        is not a multiple of 32, at another output size."""
        from mask2former_d2.export.onnx_runtime import OnnxRuntimeMaskFormer

        inputs = make_inputs([(70, 90)], num_classes=19, out_sizes=[(140, 181)], seed=3)
        with torch.no_grad():
            expected = self.model(inputs)[0]
        got = OnnxRuntimeMaskFormer(self.cfg, self.onnx_path)(inputs)[0]
        self.assertEqual(sorted(got), sorted(expected))
        torch.testing.assert_close(got["sem_seg"], expected["sem_seg"], atol=1e-4, rtol=1e-4)
        self.assertEqual(got["panoptic_seg"][1], expected["panoptic_seg"][1])
        self.assertTrue(torch.equal(got["panoptic_seg"][0], expected["panoptic_seg"][0]))

    def test_torch_export_program_reloads_and_equals_eager(self):
        path = os.path.join(self.tmp.name, "model.pt2")
        export_program(self.program, path, {"num_classes": 19})
        reloaded = torch.export.load(path).module()
        for h, w in SIZES[:2]:
            image = random_image(h, w, seed=h)
            with self.subTest(size=(h, w)), torch.no_grad():
                for g, e in zip(reloaded(image), self.network(image)):
                    self.assertLessEqual(relative_deviation(g, e), TOLERANCE)


if __name__ == "__main__":
    unittest.main()
