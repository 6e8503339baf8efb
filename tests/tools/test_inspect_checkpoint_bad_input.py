"""tools/inspect_checkpoint.py on the wrong files: one line naming the file and what it is (the
explanations of mask2former_d2.checkpoint), and a torchvision classification checkpoint called by
its name with the converter to run, not "loads partially"."""
import contextlib
import io
import os
import tempfile
import unittest

import torch

from ..common import TINY_CONFIG, load_script
from ..test_checkpoint import _torchvision_resnet_state_dict

inspect_checkpoint = load_script(os.path.join("tools", "inspect_checkpoint.py"))


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = inspect_checkpoint.main(argv)
    return code, out.getvalue(), err.getvalue()


class TestInspectBadFiles(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.torchvision = os.path.join(cls.tmp.name, "resnet18.pth")
        torch.save(_torchvision_resnet_state_dict(), cls.torchvision)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_text_file(self):
        path = os.path.join(self.tmp.name, "notes.pth")
        with open(path, "w") as f:
            f.write("hello world\n")  # was "KeyError: 101"
        code, out, err = _run([path])
        self.assertEqual(code, 1)
        self.assertEqual(out, "")
        self.assertEqual(
            err.strip(),
            f"inspect_checkpoint: {path}: not a readable checkpoint (it is a text file, not a weight file "
            "(it starts with 'hello world\\n'))",
        )

    def test_torchvision_checkpoint_without_config(self):
        code, out, _ = _run([self.torchvision])
        self.assertEqual(code, 0)
        self.assertIn(f"note: {self.torchvision} is a torchvision ImageNet classification checkpoint", out)
        self.assertIn("tools/convert_torchvision_to_d2.py", out)

    def test_torchvision_checkpoint_against_a_model(self):
        code, out, _ = _run([self.torchvision, "--config-file", TINY_CONFIG])
        self.assertEqual(code, 0)
        verdict = out.strip().splitlines()[-1]
        self.assertTrue(
            verdict.startswith(f"verdict: does not fit: {self.torchvision} is a torchvision ImageNet "
                               "classification checkpoint"),
            verdict,
        )
        self.assertIn("convert it first with python tools/convert_torchvision_to_d2.py", verdict)
        self.assertNotIn("loads partially", out)


if __name__ == "__main__":
    unittest.main()
