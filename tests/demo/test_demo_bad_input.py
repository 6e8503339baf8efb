"""demo/demo.py on a user's mistakes: one line (``demo.py: error: ...``, exit status 1) naming the
argument or file and what is expected, before the model is built where possible."""
import contextlib
import io
import os
import tempfile
import unittest

import cv2
import numpy as np
import torch

from ..common import TINY_CONFIG, load_script
from ..test_checkpoint import _torchvision_resnet_state_dict

demo = load_script(os.path.join("demo", "demo.py"))


class TestDemoBadInput(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.image = os.path.join(cls.tmp.name, "image.jpg")
        cv2.imwrite(cls.image, np.random.RandomState(0).randint(0, 256, (40, 60, 3), dtype=np.uint8))
        cls.a_file = os.path.join(cls.tmp.name, "notes.txt")
        with open(cls.a_file, "w") as f:
            f.write("not a folder\n")

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def error(self, *argv: str) -> str:
        """What ``demo.py`` prints before exiting with status 1."""
        stderr = io.StringIO()
        with self.assertRaises(SystemExit) as ctx, contextlib.redirect_stderr(stderr):
            demo.cli(["--config-file", TINY_CONFIG, *argv])
        message = ctx.exception.code
        self.assertIsInstance(message, str)
        self.assertTrue(message.startswith("demo.py: error: "), message)
        self.assertEqual(len(message.splitlines()), 1, message)
        self.assertNotIn("Traceback", stderr.getvalue())
        return message[len("demo.py: error: "):]

    def test_confidence_threshold_outside_0_1(self):
        for value in ("5", "-1", "nan"):
            with self.subTest(value=value):
                message = self.error("--input", self.image, "--output", self.tmp.name + "/out/",
                                     "--confidence-threshold", value)
                self.assertEqual(message, f"--confidence-threshold must be a score in [0, 1]; got {value}")

    def test_output_under_a_file(self):
        for output in (os.path.join(self.a_file, "x.jpg"), os.path.join(self.a_file, "sub", "dir/")):
            with self.subTest(output=output):
                message = self.error("--input", self.image, "--output", output)
                self.assertEqual(message, f"--output {output}: {self.a_file} is a file, but a folder is needed there")
        video_out = os.path.join(self.a_file, "clip.mp4")
        with self.assertRaisesRegex(demo.DemoError, f"{self.a_file} is a file, but a folder is needed there"):
            demo.video_output_path(video_out, "clip.avi")

    def test_unknown_meta_architecture_and_dataset(self):
        message = self.error("--input", self.image, "--output", self.tmp.name + "/out/",
                             "--opts", "MODEL.META_ARCHITECTURE", "MaskFormr")
        self.assertIn(
            "MODEL.META_ARCHITECTURE: unknown name 'MaskFormr'; did you mean MaskFormer, VideoMaskFormer?", message
        )
        message = self.error("--input", self.image, "--output", self.tmp.name + "/out/",
                             "--opts", "DATASETS.TEST", "('coco_2017_val_panoptc',)")
        self.assertIn("unknown dataset 'coco_2017_val_panoptc'; did you mean coco_2017_val_panoptic", message)

    def test_overrides_with_or_without_opts(self):
        out = self.tmp.name + "/out/"
        for argv in (["--opts", "MODEL.META_ARCHITECTURE", "MaskFormr"], ["MODEL.META_ARCHITECTURE", "MaskFormr"]):
            with self.subTest(argv=argv):
                message = self.error("--input", self.image, "--output", out, *argv)
                self.assertIn("MODEL.META_ARCHITECTURE: unknown name 'MaskFormr'", message)

    def test_weights_of_another_class_count(self):
        from detectron2.modeling import build_model

        from mask2former_d2.checkpoint import MaskFormerCheckpointer
        from tests.common import tiny_cfg

        folder = os.path.join(self.tmp.name, "three_classes")
        os.makedirs(folder)
        MaskFormerCheckpointer(build_model(tiny_cfg("MODEL.SEM_SEG_HEAD.NUM_CLASSES", 3)), folder).save("model")
        weights = os.path.join(folder, "model.pth")
        out = os.path.join(self.tmp.name, "three_out/")
        message = self.error("--input", self.image, "--output", out, "MODEL.WEIGHTS", weights,
                             "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32", "MODEL.SEM_SEG_HEAD.MASK_DIM", "32",
                             "MODEL.MASK_FORMER.HIDDEN_DIM", "32", "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "8",
                             "MODEL.MASK_FORMER.DIM_FEEDFORWARD", "64", "MODEL.MASK_FORMER.DEC_LAYERS", "3")
        self.assertIn(f"cannot build the model: {weights} was trained for 3 classes, but the config expects "
                      "MODEL.SEM_SEG_HEAD.NUM_CLASSES 133", message)
        self.assertFalse(os.listdir(out))  # nothing drawn

    def test_torchvision_weights(self):
        # Was: ~150 "not found" warnings, then exit 0 with a drawing of a random model.
        path = os.path.join(self.tmp.name, "resnet18.pth")
        torch.save(_torchvision_resnet_state_dict(), path)
        out = os.path.join(self.tmp.name, "tv_out/")
        message = self.error("--input", self.image, "--output", out, "--opts", "MODEL.WEIGHTS", path)
        self.assertIn(f"{path} is a torchvision ImageNet classification checkpoint", message)
        self.assertIn("tools/convert_torchvision_to_d2.py", message)
        self.assertFalse(os.listdir(out))  # nothing drawn


if __name__ == "__main__":
    unittest.main()
