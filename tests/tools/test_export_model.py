"""tools/export_model.py: a torch.export run end to end, and one-line errors for bad input."""
import io
import json
import os
import tempfile
import unittest
from contextlib import redirect_stderr, redirect_stdout

import torch
from detectron2.modeling import build_model

from mask2former_d2.export import ExportableMaskFormer, check_exportable
from tests.common import TINY_CONFIG, load_script, tiny_cfg

# The tiny test model of tests.common, as command-line overrides.
TINY_OPTS = [
    "MODEL.WEIGHTS", "",
    "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32",
    "MODEL.SEM_SEG_HEAD.MASK_DIM", "32",
    "MODEL.MASK_FORMER.HIDDEN_DIM", "32",
    "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "8",
    "MODEL.MASK_FORMER.DIM_FEEDFORWARD", "64",
    "MODEL.MASK_FORMER.DEC_LAYERS", "2",
    "INPUT.MIN_SIZE_TEST", "64",
]


export_model = load_script(os.path.join("tools", "export_model.py"))


class TestExportModelTool(unittest.TestCase):
    def run_cli(self, *argv):
        """Runs the tool's command line; returns (exit status, stdout)."""
        out = io.StringIO()
        with redirect_stdout(out), self.assertRaises(SystemExit) as exit_:
            export_model.cli(list(argv))
        return exit_.exception.code, out.getvalue()

    def test_torch_export_static_size_any_batch(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.pt2")
            code, out = self.run_cli(
                "--config-file", TINY_CONFIG, "--format", "torch_export", "--output", path, "--dynamic-batch",
                *TINY_OPTS,
            )
            self.assertEqual(code, 0, out)
            report = json.loads(out.strip().splitlines()[-1])
            self.assertEqual(report["sample_shape"], [1, 3, 64, 64])
            for v in report["max_abs_deviation_relative_to_range"].values():
                self.assertLessEqual(v, 1e-4)
            extra = {"mask2former_d2.json": ""}
            program = torch.export.load(path, extra_files=extra)
            meta = json.loads(extra["mask2former_d2.json"])
            self.assertEqual(
                (meta["num_queries"], meta["image_size"], meta["dynamic"], meta["batch_size"]),
                (8, [64, 64], False, None),
            )
            self.assertTrue(report["dynamic_batch"])
            for b in (1, 3):
                logits, masks = program.module()(torch.zeros(b, 3, 64, 64))
                self.assertEqual(tuple(logits.shape), (b, 8, 134))
                self.assertEqual(tuple(masks.shape), (b, 8, 16, 16))

    def test_bad_arguments_are_one_line_errors(self):
        cases = [
            (["--format", "onnx", "--output", "model.pt2"], "must end in .onnx"),
            (["--format", "torch_export", "--output", "m.pt2", "--sample-image", "/no/such.jpg"],
             "--sample-image /no/such.jpg: no such file"),
            (["--format", "torch_export", "--output", "m.pt2", "MODEL.NO_SUCH_KEY", "1"], "MODEL.NO_SUCH_KEY"),
        ]
        for argv, message in cases:
            with self.subTest(argv=argv):
                err = io.StringIO()
                try:
                    with redirect_stderr(err):
                        code, _ = self.run_cli("--config-file", TINY_CONFIG, *argv)
                except SystemExit as e:  # argparse errors exit from parse_args
                    code = e.code
                text = str(code) + err.getvalue()
                self.assertNotEqual(code, 0)
                self.assertIn(message, text)
                self.assertNotIn("Traceback", text)

    def test_unexportable_module_is_named(self):
        torch.manual_seed(0)
        model = build_model(tiny_cfg()).eval()
        check_exportable(model)  # the supported parts pass
        model.sem_seg_head.pixel_decoder = torch.nn.Identity()
        with self.assertRaisesRegex(ValueError, r"model\.sem_seg_head\.pixel_decoder \(Identity\): not exportable"):
            ExportableMaskFormer(model)
        with self.assertRaisesRegex(ValueError, r"model \(Linear\): only the image meta-architecture"):
            check_exportable(torch.nn.Linear(1, 1))


if __name__ == "__main__":
    unittest.main()
