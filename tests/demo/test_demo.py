"""Tests of mask2former_d2.predictor and demo/demo.py.

The model is a tiny randomly initialised Mask2Former (ResNet-18, 10 queries, 32 channels)
written to a temporary YAML file; the demo script runs in a subprocess, as users run it.
"""

import contextlib
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unittest
from unittest import mock

import cv2
import numpy as np
import torch
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.projects.deeplab import add_deeplab_config
from detectron2.structures import Boxes, Instances
from detectron2.utils.visualizer import Visualizer

from mask2former_d2 import add_maskformer2_config
from mask2former_d2.predictor import Predictor, VisualizationDemo, filter_instances, video_frames
from tests.common import DATA
from tests.common import ROOT as REPO_ROOT

DEMO_SCRIPT = os.path.join(REPO_ROOT, "demo", "demo.py")
SHARED_IMAGE = os.path.join(DATA, "coco", "val2017", "000000142238.jpg")
SHARED_VIDEO = os.path.join(DATA, "video", "mmpose_demo.mp4")
NO_SHARED_IMAGE = f"shared test image {SHARED_IMAGE} not found (set M2F_DATA)"
NO_SHARED_VIDEO = f"shared test video {SHARED_VIDEO} not found (set M2F_DATA)"

# A tiny Mask2Former: small enough to build and run on a CPU in about a second.
TINY_CONFIG = """\
MODEL:
  META_ARCHITECTURE: "MaskFormer"
  DEVICE: "cpu"
  WEIGHTS: ""
  BACKBONE:
    NAME: "build_resnet_backbone"
    FREEZE_AT: 0
  RESNETS:
    DEPTH: 18
    RES2_OUT_CHANNELS: 64
    STEM_TYPE: "basic"
    STRIDE_IN_1X1: False
    RES5_MULTI_GRID: [1, 1, 1]
    OUT_FEATURES: ["res2", "res3", "res4", "res5"]
  SEM_SEG_HEAD:
    NAME: "MaskFormerHead"
    NUM_CLASSES: 133
    NORM: "GN"
    IN_FEATURES: ["res2", "res3", "res4", "res5"]
    PIXEL_DECODER_NAME: "MSDeformAttnPixelDecoder"
    DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES: ["res3", "res4", "res5"]
    DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS: 4
    CONVS_DIM: 32
    MASK_DIM: 32
    TRANSFORMER_ENC_LAYERS: 1
  MASK_FORMER:
    TRANSFORMER_DECODER_NAME: "MultiScaleMaskedTransformerDecoder"
    TRANSFORMER_IN_FEATURE: "multi_scale_pixel_decoder"
    HIDDEN_DIM: 32
    NUM_OBJECT_QUERIES: 10
    DEC_LAYERS: 3
    DIM_FEEDFORWARD: 64
    NHEADS: 4
    DROPOUT: 0.0
    TEST:
      SEMANTIC_ON: True
      PANOPTIC_ON: True
      INSTANCE_ON: True
DATASETS:
  TRAIN: ()
  TEST: ("coco_2017_val_panoptic",)
TEST:
  DETECTIONS_PER_IMAGE: 10
INPUT:
  MIN_SIZE_TEST: 128
  MAX_SIZE_TEST: 192
VERSION: 2
"""


def tiny_cfg(config_file, **overrides):
    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_maskformer2_config(cfg)
    cfg.merge_from_file(config_file)
    for key, value in overrides.items():
        cfg.merge_from_list([key, value])
    return cfg


def random_image(height, width, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)


class _TempDirCase(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="test_demo_")
        cls.config_file = os.path.join(cls.tmp, "tiny.yaml")
        with open(cls.config_file, "w") as f:
            f.write(TINY_CONFIG)
        # These tiny models run several times faster on one thread on a shared machine.
        cls.num_threads = torch.get_num_threads()
        torch.set_num_threads(1)

    @classmethod
    def tearDownClass(cls):
        torch.set_num_threads(cls.num_threads)
        shutil.rmtree(cls.tmp, ignore_errors=True)


class _RecordingModel(torch.nn.Module):
    """Stands in for a model: records its inputs and returns an empty output dict."""

    def __init__(self):
        super().__init__()
        self.inputs = []

    def forward(self, batched_inputs):
        self.inputs.extend(batched_inputs)
        return [{} for _ in batched_inputs]


class TestPredictor(_TempDirCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        torch.manual_seed(0)
        cls.predictor = Predictor(tiny_cfg(cls.config_file))

    def test_model_in_eval_mode_with_test_metadata(self):
        self.assertFalse(self.predictor.model.training)
        self.assertEqual(self.predictor.metadata.name, "coco_2017_val_panoptic")
        self.assertTrue(self.predictor.cfg.is_frozen())

    def test_rejects_bad_images(self):
        bad = {
            "float32": (np.zeros((32, 32, 3), np.float32), "float32"),
            "gray": (np.zeros((32, 32), np.uint8), "(32, 32)"),
            "rgba": (np.zeros((32, 32, 4), np.uint8), "(32, 32, 4)"),
            "chw": (np.zeros((3, 32, 32), np.uint8), "(3, 32, 32)"),
            "empty": (np.zeros((0, 32, 3), np.uint8), "(0, 32, 3)"),
            "tensor": (torch.zeros(32, 32, 3, dtype=torch.uint8), "Tensor"),
        }
        for name, (image, mentioned) in bad.items():
            with self.subTest(name), self.assertRaises(ValueError) as ctx:
                self.predictor(image)
            self.assertIn(mentioned, str(ctx.exception))

    def test_outputs_at_original_size(self):
        for height, width in [(100, 150), (61, 47)]:
            with self.subTest(size=(height, width)):
                out = self.predictor(random_image(height, width))
                self.assertEqual(tuple(out["sem_seg"].shape), (133, height, width))
                panoptic_seg, segments_info = out["panoptic_seg"]
                self.assertEqual(tuple(panoptic_seg.shape), (height, width))
                self.assertEqual(out["instances"].image_size, (height, width))

    def test_resize_and_channel_order(self):
        cfg = tiny_cfg(self.config_file)
        for fmt in ("BGR", "RGB"):
            with self.subTest(fmt):
                cfg.defrost()
                cfg.INPUT.FORMAT = fmt
                with mock.patch(
                    "mask2former_d2.predictor.build_model", lambda c: _RecordingModel()
                ):
                    predictor = Predictor(cfg)
                image = np.zeros((100, 150, 3), np.uint8)
                image[..., 0] = 10  # blue
                image[..., 2] = 200  # red
                predictor(image)
                (inputs,) = predictor.model.inputs
                # Shortest edge 100 -> 128, longest 150 -> 192 (<= MAX_SIZE_TEST).
                self.assertEqual(tuple(inputs["image"].shape), (3, 128, 192))
                self.assertEqual(inputs["image"].dtype, torch.float32)
                self.assertEqual((inputs["height"], inputs["width"]), (100, 150))
                first = 10.0 if fmt == "BGR" else 200.0
                self.assertTrue(torch.all(inputs["image"][0] == first))
        cfg.INPUT.MIN_SIZE_TEST = 0  # no resizing
        with mock.patch("mask2former_d2.predictor.build_model", lambda c: _RecordingModel()):
            predictor = Predictor(cfg)
        predictor(np.zeros((100, 150, 3), np.uint8))
        self.assertEqual(tuple(predictor.model.inputs[0]["image"].shape), (3, 100, 150))

    def test_rejects_unknown_input_format(self):
        cfg = tiny_cfg(self.config_file, **{"INPUT.FORMAT": "YUV"})
        with self.assertRaisesRegex(ValueError, "YUV"):
            Predictor(cfg)

    def test_confidence_threshold(self):
        demo = VisualizationDemo(
            self.predictor.cfg, confidence_threshold=0.0, predictor=self.predictor
        )
        image = random_image(90, 120, seed=1)
        raw = self.predictor(image)["instances"]
        self.assertGreater(len(raw), 0)
        threshold = float(raw.scores.median())
        demo.confidence_threshold = threshold
        kept, _ = demo.run_on_image(image)
        self.assertEqual(len(kept["instances"]), int((raw.scores >= threshold).sum()))
        self.assertTrue(torch.all(kept["instances"].scores >= threshold))
        self.assertEqual(kept["instances"].scores.device.type, "cpu")
        demo.confidence_threshold = 1.01
        none, vis = demo.run_on_image(image)
        self.assertEqual(len(none["instances"]), 0)
        self.assertEqual(vis.get_image().shape, (90, 120, 3))


def _instances(height, width, scores, boxes):
    inst = Instances((height, width))
    masks = torch.zeros(len(scores), height, width, dtype=torch.bool)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        masks[i, y0:y1, x0:x1] = True
    inst.pred_masks = masks
    inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    inst.scores = torch.tensor(scores)
    inst.pred_classes = torch.tensor([0] * len(scores))
    return inst


class _FixedPredictor:
    """Stands in for a Predictor: returns the same outputs for every image."""

    def __init__(self, outputs):
        self.outputs = outputs
        self.metadata = MetadataCatalog.get("coco_2017_val_panoptic")
        self.calls = 0

    def __call__(self, image):
        self.calls += 1
        return dict(self.outputs)


class _FakeCapture:
    """A cv2.VideoCapture look-alike that counts the frames read."""

    def __init__(self, frames):
        self.frames = list(frames)
        self.reads = 0

    def read(self):
        if self.reads >= len(self.frames):
            return False, None
        self.reads += 1
        return True, self.frames[self.reads - 1]


class TestVideoFrames(_TempDirCase):
    def test_capture_is_read_lazily_up_to_the_limit_and_not_released(self):
        frames = [np.full((2, 3, 3), t, np.uint8) for t in range(5)]
        capture = _FakeCapture(frames)
        stream = video_frames(capture, limit=3)
        self.assertEqual(capture.reads, 0)
        self.assertEqual([int(f[0, 0, 0]) for f in stream], [0, 1, 2])
        self.assertEqual(capture.reads, 3)
        self.assertEqual(len(list(video_frames(capture))), 2)  # the rest, to the end

    @unittest.skipUnless(os.path.isfile(SHARED_VIDEO), NO_SHARED_VIDEO)
    def test_file_frames_equal_opencv(self):
        capture = cv2.VideoCapture(SHARED_VIDEO)
        expected = [capture.read()[1] for _ in range(4)]
        capture.release()
        got = list(video_frames(SHARED_VIDEO, 4))
        self.assertEqual(len(got), 4)
        for a, b in zip(got, expected):
            np.testing.assert_array_equal(a, b)

    def test_unreadable_file_is_named(self):
        path = os.path.join(self.tmp, "not_a_video.mp4")
        with open(path, "w") as f:
            f.write("text")
        with self.assertRaisesRegex(ValueError, f"{re.escape(path)}: OpenCV cannot open this file as a video"):
            list(video_frames(path))


class TestVisualizationDemo(_TempDirCase):
    H, W = 60, 80

    def make_demo(self, outputs, threshold=0.5):
        cfg = tiny_cfg(self.config_file)
        return VisualizationDemo(
            cfg, confidence_threshold=threshold, predictor=_FixedPredictor(outputs)
        )

    def outputs(self):
        panoptic = torch.zeros(self.H, self.W, dtype=torch.int32)
        panoptic[10:30, 10:40] = 1
        sem_seg = torch.zeros(133, self.H, self.W)
        sem_seg[5, :, : self.W // 2] = 1.0
        sem_seg[7, :, self.W // 2 :] = 1.0
        return {
            "panoptic_seg": (panoptic, [{"id": 1, "isthing": True, "category_id": 0}]),
            "instances": _instances(self.H, self.W, [0.9, 0.3], [(0, 0, 20, 20), (50, 30, 80, 60)]),
            "sem_seg": sem_seg,
        }

    def test_filter_instances(self):
        inst = _instances(10, 10, [0.2, 0.5, 0.9, 0.7], [(0, 0, 2, 2)] * 4)
        kept = filter_instances(inst, 0.5)
        self.assertTrue(torch.equal(kept.scores, torch.tensor([0.5, 0.9, 0.7])))
        self.assertEqual(len(filter_instances(inst, 1.01)), 0)

    def test_overlay_priority(self):
        full = self.outputs()
        cases = [
            (full, "draw_panoptic_seg"),
            ({k: full[k] for k in ("instances", "sem_seg")}, "draw_instance_predictions"),
            ({"sem_seg": full["sem_seg"]}, "draw_sem_seg"),
        ]
        image = random_image(self.H, self.W)
        for outputs, expected in cases:
            with self.subTest(expected):
                demo = self.make_demo(outputs)
                spies = {
                    name: mock.patch.object(
                        Visualizer, name, autospec=True, side_effect=getattr(Visualizer, name)
                    )
                    for name in ("draw_panoptic_seg", "draw_instance_predictions", "draw_sem_seg")
                }
                mocks = {name: p.start() for name, p in spies.items()}
                try:
                    predictions, vis = demo.run_on_image(image)
                finally:
                    for p in spies.values():
                        p.stop()
                called = [name for name, m in mocks.items() if m.called]
                self.assertEqual(called, [expected])
                self.assertEqual(vis.get_image().shape, (self.H, self.W, 3))
                if expected == "draw_sem_seg":
                    drawn = mocks["draw_sem_seg"].call_args[0][1]
                    want = torch.zeros(self.H, self.W, dtype=torch.long)
                    want[:, : self.W // 2] = 5
                    want[:, self.W // 2 :] = 7
                    self.assertTrue(torch.equal(drawn, want))

    def test_threshold_hides_instances_in_drawing(self):
        image = random_image(self.H, self.W, seed=3)
        outputs = {"instances": self.outputs()["instances"]}
        predictions, vis = self.make_demo(outputs, threshold=1.01).run_on_image(image)
        self.assertEqual(len(predictions["instances"]), 0)
        # Nothing drawn: the overlay is the input image (RGB).
        diff = np.abs(vis.get_image().astype(int) - image[:, :, ::-1].astype(int))
        self.assertLessEqual(diff.max(), 1)

        predictions, vis = self.make_demo(outputs, threshold=0.5).run_on_image(image)
        self.assertTrue(torch.equal(predictions["instances"].scores, torch.tensor([0.9])))
        drawn = np.abs(vis.get_image().astype(int) - image[:, :, ::-1].astype(int)).sum(-1) > 3
        self.assertGreater(drawn[0:20, 0:20].mean(), 0.5)  # the kept instance
        self.assertEqual(drawn[45:60, 65:80].mean(), 0.0)  # inside the dropped one, off its label

    def test_run_on_video_streams(self):
        frames = [random_image(self.H, self.W, seed=i) for i in range(3)]
        for outputs in (self.outputs(), {"instances": self.outputs()["instances"]}):
            capture = _FakeCapture(frames)
            demo = self.make_demo(outputs)
            stream = demo.run_on_video(capture)
            self.assertEqual(capture.reads, 0)  # nothing read before it is asked for
            first = next(stream)
            self.assertEqual(capture.reads, 1)
            rest = list(stream)
            self.assertEqual(capture.reads, 3)
            self.assertEqual(demo.predictor.calls, 3)
            for frame in [first] + rest:
                self.assertEqual((frame.shape, frame.dtype), ((self.H, self.W, 3), np.uint8))
            self.assertGreater(np.abs(first.astype(int) - frames[0].astype(int)).max(), 0)

    def test_placeholder_class_names_without_dataset(self):
        cfg = tiny_cfg(self.config_file, **{"DATASETS.TEST": "()"})
        predictor = _FixedPredictor({"sem_seg": self.outputs()["sem_seg"]})
        predictor.metadata = MetadataCatalog.get("__test_demo_no_classes__")
        demo = VisualizationDemo(cfg, predictor=predictor)
        self.assertEqual(len(demo.metadata.stuff_classes), 133)
        self.assertFalse(MetadataCatalog.get("__test_demo_no_classes__").get("stuff_classes"))
        _, vis = demo.run_on_image(random_image(self.H, self.W))
        self.assertEqual(vis.get_image().shape, (self.H, self.W, 3))


def run_demo(*args, timeout=300):
    """Runs demo/demo.py in a subprocess without a display."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("DISPLAY", None)
    env.pop("WAYLAND_DISPLAY", None)
    return subprocess.run(
        [sys.executable, DEMO_SCRIPT, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO_ROOT,
    )


def load_demo_module():
    """Imports demo/demo.py (not a package) so that its functions can be called in-process."""
    spec = importlib.util.spec_from_file_location("mask2former_d2_demo_script", DEMO_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class TestDemoScript(_TempDirCase):
    """One run in a subprocess, as users run the script; the rest in-process, which is faster
    (each new interpreter re-imports torch and detectron2)."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.demo = load_demo_module()

    def run_main(self, *args):
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            self.assertEqual(self.demo.main(["--config-file", self.config_file, *args]), 0)
        return stderr.getvalue()

    def assert_demo_error(self, *args, mentioned=()):
        with self.assertRaises(self.demo.DemoError) as ctx:
            self.demo.main(["--config-file", self.config_file, *args])
        for text in mentioned:
            self.assertIn(text, str(ctx.exception))

    @unittest.skipUnless(os.path.isfile(SHARED_IMAGE), NO_SHARED_IMAGE)
    def test_folder_in_subprocess(self):
        folder = os.path.join(self.tmp, "images")
        os.makedirs(folder)
        shutil.copy(SHARED_IMAGE, folder)
        small = random_image(50, 70)
        cv2.imwrite(os.path.join(folder, "small.PNG"), small)
        with open(os.path.join(folder, "notes.txt"), "w") as f:
            f.write("not an image")
        expected_sizes = {
            os.path.basename(SHARED_IMAGE): cv2.imread(SHARED_IMAGE).shape,
            "small.PNG": small.shape,
        }
        out_dir = os.path.join(self.tmp, "vis", "nested")  # created by the demo
        result = run_demo("--config-file", self.config_file, "--input", folder, "--output", out_dir)
        self.assertEqual(
            result.returncode, 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
        self.assertEqual(sorted(os.listdir(out_dir)), sorted(expected_sizes))
        for name, shape in expected_sizes.items():
            drawn = cv2.imread(os.path.join(out_dir, name))
            self.assertIsNotNone(drawn, name)
            self.assertEqual(drawn.shape, shape)

    @unittest.skipUnless(os.path.isfile(SHARED_IMAGE), NO_SHARED_IMAGE)
    def test_single_image_to_file(self):
        out_file = os.path.join(self.tmp, "single", "drawn.jpg")
        self.run_main(
            "--input", SHARED_IMAGE, "--output", out_file, "--confidence-threshold", "0.3",
            "--opts", "MODEL.MASK_FORMER.TEST.PANOPTIC_ON", "False",
        )  # fmt: skip
        drawn = cv2.imread(out_file)
        self.assertIsNotNone(drawn)
        self.assertEqual(drawn.shape, cv2.imread(SHARED_IMAGE).shape)

    def check_video(self, source_path, output, expected_path, num_frames, height, width):
        progress = self.run_main(
            "--video-input", source_path, "--output", output,
            "--opts", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "128",
            "MODEL.MASK_FORMER.TEST.SEMANTIC_ON", "False",
            "MODEL.MASK_FORMER.TEST.INSTANCE_ON", "False",
            # No random-weight query is that confident: the frames are drawn without segments,
            # which keeps the test fast; frame count, rate and size are what it checks.
            "MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD", "0.9",
        )  # fmt: skip
        self.assertIn(f"{num_frames}/{num_frames}", progress)  # the tqdm progress bar
        self.assertIn("frame/s]", progress)
        source = cv2.VideoCapture(source_path)
        written = cv2.VideoCapture(expected_path)
        try:
            self.assertTrue(written.isOpened(), expected_path)
            for prop in (cv2.CAP_PROP_FPS, cv2.CAP_PROP_FRAME_WIDTH, cv2.CAP_PROP_FRAME_HEIGHT):
                self.assertEqual(written.get(prop), source.get(prop))
            shapes = [frame.shape for frame in video_frames(written)]
            self.assertEqual(shapes, [(height, width, 3)] * num_frames)
        finally:
            source.release()
            written.release()

    @unittest.skipUnless(os.path.isfile(SHARED_VIDEO), NO_SHARED_VIDEO)
    def test_video(self):
        out_file = os.path.join(self.tmp, "clip.mp4")
        self.check_video(SHARED_VIDEO, out_file, out_file, 5, 540, 960)

    def test_synthetic_video_to_folder(self):
        source = os.path.join(self.tmp, "synthetic.avi")
        writer = cv2.VideoWriter(source, cv2.VideoWriter_fourcc(*"MJPG"), 7.0, (72, 40))
        for i in range(4):
            writer.write(random_image(40, 72, seed=i))
        writer.release()
        out_dir = os.path.join(self.tmp, "videos")
        self.check_video(source, out_dir, os.path.join(out_dir, "synthetic.mp4"), 4, 40, 72)

    def test_missing_and_corrupt_video(self):
        missing = os.path.join(self.tmp, "no_such_clip.mp4")
        corrupt = os.path.join(self.tmp, "corrupt_clip.mp4")
        with open(corrupt, "wb") as f:
            f.write(np.random.RandomState(0).bytes(4096))
        out = os.path.join(self.tmp, "bad_video_out.mp4")
        for path in (missing, corrupt):
            with self.subTest(os.path.basename(path)):
                stderr = io.StringIO()
                # cli() is what `python demo/demo.py` runs: only SystemExit may escape it.
                with self.assertRaises(SystemExit) as ctx, contextlib.redirect_stderr(stderr):
                    self.demo.cli(
                        ["--config-file", self.config_file, "--video-input", path, "--output", out]
                    )
                message = ctx.exception.code
                self.assertIsInstance(message, str)  # printed on stderr, exit status 1
                self.assertIn(path, message)
                self.assertNotIn("Traceback", stderr.getvalue())
                self.assertFalse(os.path.exists(out))

    def test_argument_errors(self):
        images = []
        for i in range(2):
            images.append(os.path.join(self.tmp, f"img{i}.jpg"))
            cv2.imwrite(images[-1], random_image(20, 30, seed=i))
        one_file = os.path.join(self.tmp, "one.png")
        self.assert_demo_error(
            "--input", *images, "--output", one_file, mentioned=["must be a folder"]
        )
        nope = os.path.join(self.tmp, "nope.jpg")
        self.assert_demo_error("--input", nope, "--output", self.tmp, mentioned=[nope])
        self.assert_demo_error("--input", os.path.join(self.tmp, "*.gif"), "--output", self.tmp)
        self.assert_demo_error(
            "--input", images[0], "--output", self.tmp, "--opts", "MODEL.WEIGHTS"
        )
        self.assert_demo_error(
            "--input", images[0], "--output", os.path.join(self.tmp, "x.tiff"), mentioned=["x.tiff"]
        )
        self.assert_demo_error("--input", images[0], "--output", self.tmp, mentioned=["overwrite"])

    def test_expand_inputs(self):
        folder = os.path.join(self.tmp, "expand")
        os.makedirs(os.path.join(folder, "sub"))
        for name in ("b.JPG", "a.png", "c.webp", "d.txt", "sub/e.jpeg"):
            open(os.path.join(folder, name), "wb").close()
        got = self.demo.expand_inputs(
            [folder, os.path.join(folder, "sub", "*.jpeg"), os.path.join(folder, "a.png")]
        )
        want = ["a.png", "b.JPG", "c.webp", os.path.join("sub", "e.jpeg")]
        self.assertEqual(got, sorted(os.path.join(folder, n) for n in want))


if __name__ == "__main__":
    unittest.main()
