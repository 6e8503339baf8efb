"""tools/export_model.py on the tiny PEM: a torch.export program whose outputs the tool itself
checks against the PyTorch model, then reloaded and run at the exported size."""
import io
import json
import os
import tempfile
import unittest
from contextlib import redirect_stdout

import torch

from tests.common import ROOT, load_script

export_model = load_script(os.path.join("tools", "export_model.py"))
PEM_TINY = os.path.join(ROOT, "configs", "quickstart", "pem_STDC1_tiny_coco_panoptic.yaml")


class TestExportPEM(unittest.TestCase):
    def test_torch_export(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "pem.pt2")
            out = io.StringIO()
            with redirect_stdout(out), self.assertRaises(SystemExit) as exit_:
                export_model.cli(["--config-file", PEM_TINY, "--format", "torch_export", "--output", path,
                                  "MODEL.WEIGHTS", "", "INPUT.MIN_SIZE_TEST", "64"])
            self.assertEqual(exit_.exception.code, 0, out.getvalue())
            report = json.loads(out.getvalue().strip().splitlines()[-1])
            for name, deviation in report["max_abs_deviation_relative_to_range"].items():
                self.assertLessEqual(deviation, 1e-4, name)
            extra = {"mask2former_d2.json": ""}
            program = torch.export.load(path, extra_files=extra)
            meta = json.loads(extra["mask2former_d2.json"])
            self.assertEqual(meta["architecture"], {"backbone": "D2STDCnet", "pixel_decoder": "PEM_Pixel_Decoder",
                                                    "transformer_decoder": "PEMTransformerDecoder"})
            logits, masks = program.module()(torch.zeros(1, 3, 64, 64))
            self.assertEqual(tuple(logits.shape), (1, 20, 134))
            self.assertEqual(tuple(masks.shape), (1, 20, 16, 16))


if __name__ == "__main__":
    unittest.main()
