"""Exported graphs reproduce the PyTorch model: ONNX in ONNX Runtime and torch.export (.pt2).

One dynamic export per architecture family (each export takes tens of seconds), checked at
three input sizes against the eager network, then through the post-processing; the shared parity
fixture is exported and its ONNX Runtime outputs pass the comparison of ``parity.py``.
"""
import importlib.util
import json
import os
import tempfile
import unittest

import cv2
import numpy as np
import torch
from detectron2.modeling import build_model

from mask2former_d2 import get_maskformer_cfg
from mask2former_d2.checkpoint import MaskFormerCheckpointer
from mask2former_d2.export import ExportableMaskFormer
from mask2former_d2.export.exporter import METADATA_KEY, export_metadata, export_onnx, export_program, trace
from tests.common import ROOT, SHARED, make_inputs, tiny_cfg

try:
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401
    import onnxscript  # noqa: F401

    HAVE_ONNX = True
except ImportError:
    HAVE_ONNX = False

FIXTURE = os.path.join(SHARED, "fixtures", "parity", "m2f_r18_coco_panoptic")
PARITY_TOOL = os.path.join(SHARED, "tools", "parity.py")
HAVE_FIXTURE = os.path.isfile(os.path.join(FIXTURE, "weights.pkl")) and os.path.isfile(PARITY_TOOL)
# Three sizes, none of them the traced one (64 x 96).
SIZES = [(96, 64), (128, 160), (32, 224)]
TOLERANCE = 1e-4  # max-abs deviation relative to the output's range

SWIN = [
    "MODEL.BACKBONE.NAME", "D2SwinTransformer",
    "MODEL.SWIN.EMBED_DIM", 16,
    "MODEL.SWIN.DEPTHS", [2, 2, 1, 1],  # shifted windows in the first two stages
    "MODEL.SWIN.NUM_HEADS", [1, 1, 2, 2],
    "MODEL.SWIN.WINDOW_SIZE", 7,
]
MASKFORMER_DECODER = [
    "MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME", "StandardTransformerDecoder",
    "MODEL.MASK_FORMER.ENC_LAYERS", 0,
    "MODEL.MASK_FORMER.DEC_LAYERS", 2,
]


def relative_deviation(got: torch.Tensor, expected: torch.Tensor) -> float:
    scale = max(float(expected.max() - expected.min()), 1e-12)
    return float((got - expected).abs().max()) / scale


def random_image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (1, 3, h, w), generator=g).float()


def _load_parity_tool():
    spec = importlib.util.spec_from_file_location("parity_tool", PARITY_TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_fixture_model(fixture: str):
    """(cfg, model) of a parity fixture: its config on the CPU with its released-format weights."""
    cfg = get_maskformer_cfg(os.path.join(fixture, "config.yaml"), ["MODEL.DEVICE", "cpu"])
    model = build_model(cfg)
    MaskFormerCheckpointer(model).load(os.path.join(fixture, "weights.pkl"))
    return cfg, model


def assert_onnx_parity(test: "_ExportCase", fixture: str) -> None:
    """The fixture's images through ONNX Runtime (``test.onnx_path``) pass parity.py's comparison."""
    from mask2former_d2.export.onnx_runtime import OnnxRuntimeMaskFormer

    parity = _load_parity_tool()
    expected = torch.load(os.path.join(fixture, "expected.pth"), weights_only=False)
    model = OnnxRuntimeMaskFormer(test.cfg, test.onnx_path, num_threads=2)
    got = parity._run(model, expected["images"], test.cfg.INPUT.FORMAT)
    ok, report = parity.compare(expected["outputs"], got)
    test.assertTrue(ok, report)


class _ExportCase:
    """Exports ``build()``'s model once (dynamic H/W) and checks it against the eager network."""

    optimize = False  # the graph optimisation is tested once (the fixture); it costs time
    dynamic_batch = False

    @classmethod
    def build(cls):
        raise NotImplementedError

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.cfg, cls.model = cls.build()
        cls.model.eval()
        cls.network = ExportableMaskFormer(cls.model)
        sample = random_image(64, 96)
        cls.program = trace(cls.model, sample, dynamic=True, dynamic_batch=cls.dynamic_batch)
        cls.onnx_path = os.path.join(cls.tmp.name, "model.onnx")
        metadata = export_metadata(cls.model, cls.cfg, tuple(sample.shape), True, cls.dynamic_batch)
        export_onnx(cls.program, cls.onnx_path, metadata, optimize=cls.optimize)
        from mask2former_d2.export.onnx_runtime import OnnxRuntimeNetwork

        cls.ort = OnnxRuntimeNetwork(cls.onnx_path, num_threads=2)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_onnx_runtime_network_outputs_at_three_sizes(self):
        q = self.cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES
        k = self.cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        for i, (h, w) in enumerate(SIZES):
            image = random_image(h, w, seed=i + 1)
            with self.subTest(size=(h, w)), torch.no_grad():
                expected = self.network(image)
                got = self.ort(image)
                self.assertEqual(tuple(got[0].shape), (1, q, k + 1))
                self.assertEqual(tuple(got[1].shape), (1, q, h // 4, w // 4))
                for name, g, e in zip(("pred_logits", "pred_masks"), got, expected):
                    self.assertLessEqual(relative_deviation(g, e), TOLERANCE, name)

    def test_postprocessed_outputs_match_the_pytorch_model(self):
        """Sizes that are not multiples of 32 (the runtime pads), outputs at another size."""
        from mask2former_d2.export.onnx_runtime import OnnxRuntimeMaskFormer

        k = self.cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        inputs = make_inputs([(70, 90)], num_classes=k, out_sizes=[(140, 181)], seed=3)
        with torch.no_grad():
            expected = self.model(inputs)[0]
        got = OnnxRuntimeMaskFormer(self.cfg, self.onnx_path)(inputs)[0]
        self.assertEqual(sorted(got), sorted(expected))
        torch.testing.assert_close(got["sem_seg"], expected["sem_seg"], atol=1e-4, rtol=1e-4)
        seg, info = got["panoptic_seg"]
        seg_e, info_e = expected["panoptic_seg"]
        self.assertEqual(info, info_e)
        self.assertTrue(torch.equal(seg, seg_e))
        inst, inst_e = got["instances"], expected["instances"]
        self.assertTrue(torch.equal(inst.pred_classes, inst_e.pred_classes))
        torch.testing.assert_close(inst.scores, inst_e.scores, atol=1e-4, rtol=1e-4)
        agreement = (inst.pred_masks == inst_e.pred_masks).float().mean()
        self.assertGreater(float(agreement), 0.9999)

    def test_onnx_file(self):
        model = onnx.load(self.onnx_path)
        onnx.checker.check_model(model)
        opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        self.assertGreaterEqual(opset, 17)
        self.assertEqual([i.name for i in model.graph.input], ["image"])
        self.assertEqual([o.name for o in model.graph.output], ["pred_logits", "pred_masks"])
        meta = json.loads({p.key: p.value for p in model.metadata_props}[METADATA_KEY])
        self.assertEqual(meta["num_classes"], self.cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
        self.assertEqual(meta["num_queries"], self.cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES)
        # The height and width are symbolic in the file.
        dims = model.graph.input[0].type.tensor_type.shape.dim
        self.assertTrue(dims[2].dim_param and dims[3].dim_param)


@unittest.skipUnless(HAVE_ONNX, "the export extra (onnx, onnxruntime, onnxscript) is not installed")
class TestSwinTransformerEncoderMaskFormer(unittest.TestCase):
    """Swin backbone, TransformerEncoderPixelDecoder, MaskFormer's decoder on its output: one
    dynamic export, as ONNX and as a reloaded .pt2, equals eager at sizes with one window per
    axis in the last stages, without padding (224 x 224) and with it; a static export at one
    size; a dynamic batch is refused, naming the backbone."""

    def test_dynamic_and_static_exports(self):
        from mask2former_d2.export.onnx_runtime import OnnxRuntimeNetwork

        cfg = tiny_cfg(
            *SWIN,
            *MASKFORMER_DECODER,
            "MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME", "TransformerEncoderPixelDecoder",
            "MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE", "transformer_encoder",
        )
        torch.manual_seed(0)
        model = build_model(cfg).eval()
        network = ExportableMaskFormer(model)
        sample = random_image(64, 96)
        with self.assertRaisesRegex(ValueError, r"model\.backbone \(D2SwinTransformer\) .* dynamic batch size"):
            trace(model, sample, dynamic=False, dynamic_batch=True)
        with tempfile.TemporaryDirectory() as tmp:
            program = trace(model, sample, dynamic=True)
            path = os.path.join(tmp, "swin_dynamic.onnx")
            export_onnx(program, path, export_metadata(model, cfg, tuple(sample.shape), dynamic=True), optimize=False)
            pt2 = export_program(program, os.path.join(tmp, "swin_dynamic.pt2"))
            runners = {"onnxruntime": OnnxRuntimeNetwork(path), "torch.export": torch.export.load(pt2).module()}
            for i, (h, w) in enumerate(SIZES + [(224, 224)]):
                image = random_image(h, w, seed=i + 1)
                with torch.no_grad():
                    expected = network(image)
                    for name, run in runners.items():
                        with self.subTest(runner=name, size=(h, w)):
                            for got, exp in zip(run(image), expected):
                                self.assertLessEqual(relative_deviation(got, exp), TOLERANCE)

            path = os.path.join(tmp, "swin_64x96.onnx")
            meta = export_metadata(model, cfg, tuple(sample.shape), dynamic=False)
            export_onnx(trace(model, sample, dynamic=False), path, meta, optimize=False)
            with torch.no_grad():
                expected = network(sample)
            for got, exp in zip(OnnxRuntimeNetwork(path)(sample), expected):
                self.assertLessEqual(relative_deviation(got, exp), TOLERANCE)


@unittest.skipUnless(HAVE_ONNX, "the export extra (onnx, onnxruntime, onnxscript) is not installed")
class TestResNetFPNMask2FormerAndMaskFormer(unittest.TestCase):
    """ResNet with BasePixelDecoder under both decoders (Mask2Former's multi-scale one and
    MaskFormer's on res5): the first exported dynamic and checked at two other sizes, the second
    static, where a file for one size refuses other sizes and batch sizes."""

    def test_dynamic_and_static_exports(self):
        from mask2former_d2.export.onnx_runtime import OnnxRuntimeNetwork

        base = ["MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME", "BasePixelDecoder"]
        variants = {
            "mask2former": (base, True),
            "maskformer": (base + MASKFORMER_DECODER + ["MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE", "res5"], False),
        }
        with tempfile.TemporaryDirectory() as tmp:
            for name, (opts, dynamic) in variants.items():
                with self.subTest(decoder=name, dynamic=dynamic):
                    cfg = tiny_cfg(*opts)
                    torch.manual_seed(0)
                    model = build_model(cfg).eval()
                    image = random_image(64, 96)
                    path = os.path.join(tmp, f"{name}.onnx")
                    meta = export_metadata(model, cfg, tuple(image.shape), dynamic=dynamic)
                    export_onnx(trace(model, image, dynamic=dynamic), path, meta, optimize=False)
                    ort = OnnxRuntimeNetwork(path)
                    checked = [image] + ([random_image(h, w, seed=h) for h, w in SIZES[1:]] if dynamic else [])
                    for x in checked:
                        with torch.no_grad():
                            expected = ExportableMaskFormer(model)(x)
                        for g, e in zip(ort(x), expected):
                            self.assertLessEqual(relative_deviation(g, e), TOLERANCE)
                    if not dynamic:
                        with self.assertRaisesRegex(ValueError, r"exported for 64x96 inputs only .*got 96x64"):
                            ort(random_image(96, 64))
                        with self.assertRaisesRegex(ValueError, r"exported for batch size 1; got 2 .*--dynamic-batch"):
                            ort(torch.cat([image, image]))


@unittest.skipUnless(HAVE_ONNX, "the export extra (onnx, onnxruntime, onnxscript) is not installed")
@unittest.skipUnless(HAVE_FIXTURE, f"no parity fixture at {FIXTURE}")
class TestParityFixture(_ExportCase, unittest.TestCase):
    """ResNet-18, MSDeformAttnPixelDecoder, Mask2Former decoder: the shared parity fixture, with
    its released-format weights; exported with dynamic height, width and batch size."""

    optimize = True
    dynamic_batch = True

    @classmethod
    def build(cls):
        return build_fixture_model(FIXTURE)

    def test_parity_through_onnx_runtime(self):
        """The fixture's images through ONNX Runtime pass parity.py's comparison (PARITY OK)."""
        assert_onnx_parity(self, FIXTURE)

    def test_torch_export_program_reloads_and_equals_eager(self):
        path = os.path.join(self.tmp.name, "model.pt2")
        export_program(self.program, path, {"num_classes": 133})
        extra = {f"{METADATA_KEY}.json": ""}
        reloaded = torch.export.load(path, extra_files=extra).module()
        self.assertEqual(json.loads(extra[f"{METADATA_KEY}.json"]), {"num_classes": 133})
        for h, w in SIZES[:2]:
            image = random_image(h, w, seed=h)
            with self.subTest(size=(h, w)), torch.no_grad():
                for g, e in zip(reloaded(image), self.network(image)):
                    self.assertLessEqual(relative_deviation(g, e), TOLERANCE)

    def test_any_batch_size(self):
        """One file for batches of 1 to 3 images: each image's outputs equal those of the eager
        network on that image alone, in ONNX Runtime and in the .pt2 program."""
        self.assertIsNone(self.ort.metadata["batch_size"])
        images = torch.cat([random_image(96, 128, seed=s) for s in range(3)])
        with torch.no_grad():
            alone = [self.network(images[i : i + 1]) for i in range(3)]
            program = self.program.module()
            for b in (1, 2, 3):
                for runner, run in (("onnxruntime", self.ort), ("torch.export", program)):
                    got = run(images[:b])
                    with self.subTest(batch=b, runner=runner):
                        self.assertEqual(tuple(got[1].shape[:2]), (b, self.cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES))
                        for i in range(b):
                            for g, e in zip(got, alone[i]):
                                self.assertLessEqual(relative_deviation(g[i : i + 1], e), TOLERANCE)

    def test_predictor_backend(self):
        from mask2former_d2.predictor import Predictor

        cfg = self.cfg.clone()
        cfg.defrost()
        cfg.MODEL.WEIGHTS = os.path.join(FIXTURE, "weights.pkl")
        cfg.INPUT.MIN_SIZE_TEST = 96
        rgb = torch.load(os.path.join(FIXTURE, "expected.pth"), weights_only=False)["images"][0]
        image = cv2.resize(np.ascontiguousarray(np.asarray(rgb)[:, :, ::-1]), (150, 100))
        expected = Predictor(cfg)(image)
        got = Predictor(cfg, backend="onnxruntime", model_file=self.onnx_path)(image)
        self.assertTrue(torch.equal(got["panoptic_seg"][0], expected["panoptic_seg"][0]))
        self.assertEqual(got["panoptic_seg"][1], expected["panoptic_seg"][1])
        torch.testing.assert_close(got["sem_seg"], expected["sem_seg"], atol=1e-4, rtol=1e-4)

    def test_demo_from_onnx(self):
        spec = importlib.util.spec_from_file_location("demo_script", os.path.join(ROOT, "demo", "demo.py"))
        demo = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(demo)
        image = np.asarray(torch.load(os.path.join(FIXTURE, "expected.pth"), weights_only=False)["images"][1])
        with tempfile.TemporaryDirectory() as tmp:
            src, out = os.path.join(tmp, "in.png"), os.path.join(tmp, "out.png")
            cv2.imwrite(src, cv2.resize(np.ascontiguousarray(image[:, :, ::-1]), (128, 72)))
            config = os.path.join(FIXTURE, "config.yaml")
            argv = ["--config-file", config, "--onnx", self.onnx_path, "--input", src, "--output", out,
                    "--opts", "INPUT.MIN_SIZE_TEST", "64"]
            self.assertEqual(demo.main(argv), 0)
            drawing = cv2.imread(out)
            self.assertEqual(drawing.shape, (72, 128, 3))
            with self.assertRaisesRegex(demo.DemoError, "--onnx .*missing.onnx: no such file"):
                demo.main(argv[:2] + ["--onnx", os.path.join(tmp, "missing.onnx")] + argv[4:])

    def test_bad_inputs(self):
        from mask2former_d2.export.onnx_runtime import OnnxRuntimeMaskFormer

        with self.assertRaisesRegex(ValueError, r"input 100x64: height and width must be multiples of 32"):
            self.ort(random_image(100, 64))
        other = self.cfg.clone()
        other.defrost()
        other.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 150
        with self.assertRaisesRegex(
            ValueError, r"exported from another config: .*NUM_CLASSES=150 \(file: 133\)"
        ):
            OnnxRuntimeMaskFormer(other, self.onnx_path)
        with self.assertRaisesRegex(FileNotFoundError, "no such ONNX file"):
            OnnxRuntimeMaskFormer(self.cfg, self.onnx_path + ".missing")


if __name__ == "__main__":
    unittest.main()
