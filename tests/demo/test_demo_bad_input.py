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

from mask2former_d2.predictor import video_frames

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


class TestUnusualInputs(unittest.TestCase):
    """Inputs that must simply work: extreme aspect ratios through Predictor and demo.py, frames
    of odd sizes through demo_video.py (the output keeps the size), and the overlay drawing that
    blends masks into the photo agrees with Detectron2's own drawing."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_extreme_aspect_ratios_through_predictor(self):
        from mask2former_d2.predictor import Predictor
        from tests.common import tiny_cfg

        predictor = Predictor(tiny_cfg())
        for h, w in ((20, 10000), (10000, 20), (1, 4000), (4000, 1)):
            with self.subTest(size=(h, w)):
                image = np.random.RandomState(h).randint(0, 256, (h, w, 3), dtype=np.uint8)
                out = predictor(image)
                self.assertEqual(tuple(out["panoptic_seg"][0].shape), (h, w))
                self.assertEqual(tuple(out["sem_seg"].shape[-2:]), (h, w))
                self.assertEqual(out["instances"].image_size, (h, w))

    def test_extreme_aspect_ratios_through_the_demo(self):
        for h, w in ((1, 4000), (20, 10000)):
            with self.subTest(size=(h, w)):
                path = os.path.join(self.tmp.name, f"strip_{h}x{w}.png")
                cv2.imwrite(path, np.random.RandomState(w).randint(0, 256, (h, w, 3), dtype=np.uint8))
                out = os.path.join(self.tmp.name, "strips/")
                with self.assertRaises(SystemExit) as ctx:
                    demo.cli(["--config-file", TINY_CONFIG, "--input", path, "--output", out])
                self.assertEqual(ctx.exception.code, 0)
                self.assertEqual(cv2.imread(os.path.join(out, os.path.basename(path))).shape, (h, w, 3))

    def test_overlay_matches_detectron2_drawing(self):
        # A stuff segment with a hole: Detectron2 draws it as an imshow of an RGBA overlay,
        # which the demo's axes blend into the photo instead of keeping it for rendering.
        import random
        from unittest import mock

        from detectron2.data import MetadataCatalog
        from detectron2.utils.visualizer import ColorMode, Visualizer

        from mask2former_d2.predictor import _OverlayImage, _visualizer

        meta = MetadataCatalog.get("coco_2017_val_panoptic_with_sem_seg")
        image = np.random.RandomState(0).randint(0, 256, (70, 97, 3), dtype=np.uint8)
        seg = torch.zeros(70, 97, dtype=torch.int32)
        seg[10:60, 10:90] = 1
        seg[25:40, 30:50] = 2
        info = [{"id": 1, "category_id": 100, "isthing": False}, {"id": 2, "category_id": 0, "isthing": True}]
        np.random.seed(0)
        random.seed(0)  # Detectron2 jitters colours at random
        reference = Visualizer(image, meta, instance_mode=ColorMode.IMAGE).draw_panoptic_seg(seg, info).get_image()
        np.random.seed(0)
        random.seed(0)
        with mock.patch.object(_OverlayImage, "_blend", autospec=True, side_effect=_OverlayImage._blend) as blend:
            ours = _visualizer(image, meta, ColorMode.IMAGE).draw_panoptic_seg(seg, info).get_image()
        self.assertEqual(blend.call_count, 1)
        self.assertEqual(ours.shape, reference.shape)
        self.assertLessEqual(np.abs(ours.astype(int) - reference.astype(int)).max(), 2)  # rounding only

    def test_odd_frame_size_is_kept(self):
        import sys
        from unittest import mock

        from tests.common import ROOT

        # demo_video.py imports the image demo beside it as "demo", as when run as a script.
        with mock.patch.object(sys, "path", [os.path.join(ROOT, "demo")] + sys.path), \
                mock.patch.dict(sys.modules, {"demo": demo}):
            demo_video = load_script(os.path.join("demo", "demo_video.py"))
        frames = os.path.join(self.tmp.name, "odd_clip")
        os.makedirs(frames)
        for i in range(3):
            cv2.imwrite(os.path.join(frames, f"{i:05d}.png"),
                        np.random.RandomState(i).randint(0, 256, (33, 97, 3), dtype=np.uint8))
        video_config = os.path.join(os.path.dirname(TINY_CONFIG), "video_maskformer2_R18_tiny_toy_ytvis.yaml")
        out = os.path.join(self.tmp.name, "odd_out/")
        with self.assertRaises(SystemExit) as ctx:
            demo_video.cli(["--config-file", video_config, "--input", frames, "--output", out])
        self.assertEqual(ctx.exception.code, 0)
        sizes = [frame.shape for frame in video_frames(os.path.join(out, "odd_clip.avi"))]
        self.assertEqual(sizes, [(33, 97, 3)] * 3)
        # An .mp4 cannot keep it: said before the model runs, naming the way that does.
        stderr = io.StringIO()
        with self.assertRaises(SystemExit) as ctx, contextlib.redirect_stderr(stderr):
            demo_video.cli(["--config-file", video_config, "--input", frames, "--output", out + "clip.mp4"])
        self.assertIn("the frames are 97x33, and OpenCV's .mp4 encoders only write even sizes (it would write "
                      "96x32); use an .avi output (or a folder), which keeps the size", ctx.exception.code)
