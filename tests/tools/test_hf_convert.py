"""Hugging Face conversion, against ``transformers`` itself (no download): tiny randomly initialised
``transformers`` models converted here give the same class and mask logits as there, this
project's models converted there give the same outputs in ``transformers``, and d2 -> HF -> d2 is
bit-exact. Shapes: B batch, Q queries, K classes (+1 no-object), H/W input size."""
import contextlib
import importlib.util
import io
import os
import shutil
import tempfile
import unittest

import torch
from detectron2.modeling import build_model

from mask2former_d2.checkpoint import MaskFormerCheckpointer
from mask2former_d2.config import get_maskformer_cfg
from mask2former_d2.hf_conversion import UnsupportedArchitecture, arch_from_d2_cfg, hf_folder_to_d2
from tests.common import ROOT, load_script, save_checkpoint

HAVE_HF = importlib.util.find_spec("transformers") is not None and importlib.util.find_spec("safetensors") is not None
STAGES = ["stage1", "stage2", "stage3", "stage4"]
# At 128x160 the Swin stages (32x40 .. 4x5) are not multiples of the tiny window of 3: both sides
# pad their windows.
SIZE = (128, 160)
TOL = 1e-4  # of the reference's range


def _tiny_hf(kind: str, backbone: str, **overrides):
    """A tiny ``transformers`` model; ``overrides`` replace Mask2FormerConfig arguments."""
    import transformers as tf

    labels = {i: f"class number {i}" for i in range(5)}
    if backbone == "swin":
        swin = tf.SwinConfig if kind == "mask2former" else tf.MaskFormerSwinConfig
        bb = swin(embed_dim=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], window_size=3,
                  out_features=STAGES, image_size=96)
    else:  # the smallest depth Detectron2 builds (50), narrow
        bb = tf.ResNetConfig(embedding_size=8, hidden_sizes=[32, 64, 128, 256], depths=[3, 4, 6, 3],
                             layer_type="bottleneck", out_features=STAGES)
    if kind == "mask2former":
        kwargs = dict(
            backbone_config=bb, hidden_dim=32, feature_size=32, mask_feature_size=32, encoder_layers=2,
            decoder_layers=3, num_queries=8, num_labels=5, num_attention_heads=4, dim_feedforward=64,
            id2label=labels,
        )
        config = tf.Mask2FormerConfig(**{**kwargs, **overrides})
        model = tf.Mask2FormerForUniversalSegmentation(config)
    else:
        decoder = dict(model_type="detr", d_model=32, decoder_layers=2, decoder_attention_heads=4,
                       decoder_ffn_dim=64, encoder_layers=0, num_queries=8)
        config = tf.MaskFormerConfig(backbone_config=bb, fpn_feature_size=32, mask_feature_size=32, num_labels=5,
                                     id2label=labels, decoder_config=decoder)
        model = tf.MaskFormerForInstanceSegmentation(config)
    _perturb(model)
    return model.eval()


def _perturb(model: torch.nn.Module) -> None:
    """Moves every parameter and BatchNorm statistic off its initial value (zero biases, unit
    norms), so that a weight placed wrongly or not at all changes the outputs."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                b.normal_(0.0, 0.1)


def _ours_logits(model, x: torch.Tensor):
    """Class (B, Q, K+1) and mask (B, Q, H/4, W/4) logits of the last decoder layer, for an
    already normalised input (as transformers takes it)."""
    with torch.no_grad():
        out = model.sem_seg_head(model.backbone(x))
    return out["pred_logits"], out["pred_masks"]


def _hf_logits(model, x: torch.Tensor):
    with torch.no_grad():
        out = model(pixel_values=x)
    return out.class_queries_logits, out.masks_queries_logits


TINY_OPTS = [
    "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "",
    "MODEL.SWIN.EMBED_DIM", 32, "MODEL.SWIN.DEPTHS", [1, 1, 2, 1], "MODEL.SWIN.NUM_HEADS", [1, 2, 4, 8],
    "MODEL.SWIN.WINDOW_SIZE", 3, "MODEL.SEM_SEG_HEAD.CONVS_DIM", 32, "MODEL.SEM_SEG_HEAD.MASK_DIM", 32,
    "MODEL.SEM_SEG_HEAD.NUM_CLASSES", 5, "MODEL.MASK_FORMER.HIDDEN_DIM", 32, "MODEL.MASK_FORMER.NHEADS", 4,
    "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", 8, "MODEL.MASK_FORMER.DIM_FEEDFORWARD", 64,
    "DATASETS.TEST", (),
]
OUR_CONFIGS = {
    "mask2former": ("configs/coco/panoptic-segmentation/swin/maskformer2_swin_tiny_bs16_50ep.yaml",
                    ["MODEL.MASK_FORMER.DEC_LAYERS", 3, "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", 2,
                     "MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS", 4]),
    "maskformer": ("configs/maskformer/ade20k-150/swin/maskformer_swin_tiny_bs16_160k.yaml",
                   ["MODEL.MASK_FORMER.DEC_LAYERS", 2]),
    # A narrow R50 with trainable BatchNorm (its counters exist here, not in transformers' files).
    "mask2former_resnet": ("configs/coco/instance-segmentation/maskformer2_R50_bs16_50ep.yaml",
                           ["MODEL.MASK_FORMER.DEC_LAYERS", 3, "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", 1,
                            "MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS", 4,
                            "MODEL.RESNETS.STEM_OUT_CHANNELS", 8, "MODEL.RESNETS.RES2_OUT_CHANNELS", 32,
                            "MODEL.RESNETS.WIDTH_PER_GROUP", 8, "MODEL.RESNETS.NORM", "BN"]),
}


def _our_tiny(kind: str):
    path, extra = OUR_CONFIGS[kind]
    cfg = get_maskformer_cfg(os.path.join(ROOT, path), TINY_OPTS + extra)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    _perturb(model)
    return cfg, model


class _ConverterCase:
    """Loads the converter ``script`` once, with a fixed input ``x``; a temporary folder a test."""

    script = ""

    @classmethod
    def setUpClass(cls):
        cls.tool = load_script(cls.script)
        torch.manual_seed(0)
        cls.x = torch.randn(1, 3, *SIZE)

    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp)


@unittest.skipUnless(HAVE_HF, "needs the hf extra (transformers, safetensors)")
class TestHFToD2(_ConverterCase, unittest.TestCase):
    script = "tools/convert_hf_to_d2.py"

    def check(self, kind: str, backbone: str, processor=None, **overrides):
        torch.manual_seed(1)
        hf = _tiny_hf(kind, backbone, **overrides)
        folder = os.path.join(self.tmp, f"{kind}_{backbone}_{len(os.listdir(self.tmp))}")
        hf.save_pretrained(folder)
        if processor is not None:
            processor.save_pretrained(folder)
        out = os.path.join(self.tmp, "d2", "model.pkl")
        lines = self.tool.convert(folder, out, task="semantic")
        self.assertFalse([line for line in lines if line.startswith("unplaced")])
        # Every tensor of the file is accounted for: mapped (1 or 3 per line) or skipped.
        from safetensors.torch import load_file

        stored = set(load_file(os.path.join(folder, "model.safetensors")))
        seen = set()
        for line in lines:
            if line.startswith("mapped"):
                seen.update(line.split()[1:-2][::2])
            elif line.startswith("skipped"):
                seen.add(line.split()[1])
        self.assertEqual(seen, stored)

        cfg = get_maskformer_cfg(os.path.join(self.tmp, "d2", "model.yaml"), ["MODEL.DEVICE", "cpu"])
        ours = build_model(cfg).eval()
        MaskFormerCheckpointer(ours).load(out)
        for name, theirs, mine in zip(("class", "mask"), _hf_logits(hf, self.x), _ours_logits(ours, self.x)):
            self.assertEqual(theirs.shape, mine.shape, name)
            err = (theirs - mine).abs().max().item() / (theirs.max() - theirs.min()).item()
            self.assertLess(err, TOL, f"{kind}/{backbone} {name} logits")
        return cfg

    def test_mask2former_swin(self):
        import transformers as tf

        processor = tf.Mask2FormerImageProcessor(
            image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3], size={"shortest_edge": 512, "longest_edge": 900}
        )
        cfg = self.check("mask2former", "swin", processor)
        self.assertEqual([round(v, 4) for v in cfg.MODEL.PIXEL_MEAN], [127.5, 102.0, 76.5])
        self.assertEqual([round(v, 4) for v in cfg.MODEL.PIXEL_STD], [51.0, 63.75, 76.5])
        self.assertEqual((cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST), (512, 900))
        self.assertEqual(cfg.MODEL.BACKBONE.NAME, "D2SwinTransformer")
        self.assertEqual(cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES, 8)
        self.assertEqual(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, 5)
        with open(os.path.join(self.tmp, "d2", "model.yaml")) as f:
            self.assertIn("#   4: class number 4", f.read())

    def test_mask2former_variants(self):
        # Pre-norm decoder layers; input projections in the decoder (forced, or because the pixel
        # decoder is narrower than the queries); a mask embedding of another width.
        for overrides in ({"pre_norm": True}, {"enforce_input_projection": True},
                          {"hidden_dim": 64, "feature_size": 32, "mask_feature_size": 48}):
            with self.subTest(**overrides):
                cfg = self.check("mask2former", "swin", **overrides)
                self.assertEqual(cfg.MODEL.MASK_FORMER.PRE_NORM, overrides.get("pre_norm", False))

    def test_training_settings_and_a_missing_loss_buffer(self):
        from safetensors.torch import load_file, save_file

        hf = _tiny_hf("mask2former", "swin", no_object_weight=0.05, class_weight=3.0, train_num_points=999)
        folder = os.path.join(self.tmp, "no_empty_weight")
        hf.save_pretrained(folder)
        weights = load_file(os.path.join(folder, "model.safetensors"))
        del weights["criterion.empty_weight"]
        save_file(weights, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        cfg, sd, _, report = hf_folder_to_d2(folder)
        mf = cfg.MODEL.MASK_FORMER
        self.assertEqual((mf.NO_OBJECT_WEIGHT, mf.CLASS_WEIGHT, mf.TRAIN_NUM_POINTS), (0.05, 3.0, 999))
        # Rebuilt here from NO_OBJECT_WEIGHT: the same as the buffer transformers had.
        self.assertTrue(torch.equal(sd["criterion.empty_weight"], hf.criterion.empty_weight))
        self.assertIn("criterion.empty_weight", [k for k, _ in report.skipped])

    def test_maskformer_swin(self):
        cfg = self.check("maskformer", "swin")
        self.assertEqual(cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME, "BasePixelDecoder")

    def test_mask2former_resnet(self):
        cfg = self.check("mask2former", "resnet")
        self.assertEqual((cfg.MODEL.RESNETS.DEPTH, cfg.MODEL.RESNETS.STRIDE_IN_1X1), (50, False))

    def test_maskformer_resnet(self):
        self.check("maskformer", "resnet")

    def test_refuses_what_it_cannot_express(self):
        import transformers as tf

        hf = _tiny_hf("mask2former", "swin")
        hf.config.backbone_config.use_absolute_embeddings = True
        folder = os.path.join(self.tmp, "ape")
        hf.save_pretrained(folder)
        with self.assertRaisesRegex(UnsupportedArchitecture, "use_absolute_embeddings"):
            hf_folder_to_d2(folder)
        convnext = tf.Mask2FormerConfig(backbone_config=tf.ConvNextConfig(out_features=STAGES))
        folder = os.path.join(self.tmp, "convnext")
        convnext.save_pretrained(folder)
        torch.save({}, os.path.join(folder, "pytorch_model.bin"))
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            code = self.tool.main([folder, os.path.join(self.tmp, "x.pkl")])
        self.assertEqual(code, 2)
        errors = stderr.getvalue().splitlines()
        self.assertEqual(len(errors), 1, errors)
        self.assertIn("backbone model_type='convnext'", errors[0])
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "x.pkl")))


@unittest.skipUnless(HAVE_HF, "needs the hf extra (transformers, safetensors)")
class TestD2ToHF(_ConverterCase, unittest.TestCase):
    script = "tools/convert_d2_to_hf.py"

    def to_hf(self, kind: str):
        cfg, model = _our_tiny(kind)
        weights = save_checkpoint(model, self.tmp, "pkl")
        folder = os.path.join(self.tmp, "hf")
        lines = self.tool.convert(cfg, weights, folder)
        self.assertFalse([line for line in lines if line.startswith("unplaced")])
        return cfg, model, folder

    def check_outputs(self, kind: str):
        import transformers as tf

        cfg, model, folder = self.to_hf(kind)
        cls = tf.MaskFormerForInstanceSegmentation if kind == "maskformer" else tf.Mask2FormerForUniversalSegmentation
        hf = cls.from_pretrained(folder).eval()
        for name, mine, theirs in zip(("class", "mask"), _ours_logits(model, self.x), _hf_logits(hf, self.x)):
            self.assertEqual(theirs.shape, mine.shape, name)
            err = (theirs - mine).abs().max().item() / (mine.max() - mine.min()).item()
            self.assertLess(err, TOL, f"{kind} {name} logits")
        self.assertEqual(hf.config.no_object_weight, cfg.MODEL.MASK_FORMER.NO_OBJECT_WEIGHT)
        self.assertEqual(hf.config.mask_weight, cfg.MODEL.MASK_FORMER.MASK_WEIGHT)
        processor = tf.AutoImageProcessor.from_pretrained(folder)
        self.assertEqual([round(m * 255, 3) for m in processor.image_mean], list(cfg.MODEL.PIXEL_MEAN))

    def test_mask2former_outputs_in_transformers(self):
        self.check_outputs("mask2former")

    def test_maskformer_outputs_in_transformers(self):
        self.check_outputs("maskformer")

    def test_mask2former_resnet_outputs_in_transformers(self):
        self.check_outputs("mask2former_resnet")

    def test_round_trip_is_bit_exact(self):
        for kind in ("mask2former", "maskformer", "mask2former_resnet"):
            with self.subTest(kind=kind):
                _, model, folder = self.to_hf(kind)
                _, back, _, _ = hf_folder_to_d2(folder)
                original = model.state_dict()
                # Back here the ResNet uses frozen BatchNorm (Detectron2's default), which has no
                # counters; every other tensor comes back.
                lost = {k for k in original if k.endswith("num_batches_tracked")}
                self.assertEqual(set(back), set(original) - lost)
                self.assertEqual(bool(lost), kind == "mask2former_resnet")
                original = {k: v for k, v in original.items() if k not in lost}
                changed = [k for k in original if not torch.equal(back[k], original[k])]
                self.assertEqual(changed, [])
                shutil.rmtree(folder)

    def test_refuses_what_transformers_cannot_express(self):
        cfg = get_maskformer_cfg(
            os.path.join(ROOT, "configs/maskformer/ade20k-150/maskformer_R101c_bs16_160k.yaml"), ["MODEL.DEVICE", "cpu"]
        )
        with self.assertRaisesRegex(UnsupportedArchitecture, "STEM_TYPE"):
            arch_from_d2_cfg(cfg)
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            code = self.tool.main(["--config-file", os.path.join(ROOT, "configs/maskformer/ade20k-150/"
                                   "maskformer_R101c_bs16_160k.yaml"), "--weights", "unused.pkl",
                                   "--output", os.path.join(self.tmp, "out")])
        self.assertEqual(code, 2)
        self.assertEqual(len(stderr.getvalue().splitlines()), 1, stderr.getvalue())
        self.assertIn("STEM_TYPE=deeplab", stderr.getvalue())
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "out")))
        cfg = get_maskformer_cfg(
            os.path.join(ROOT, "configs/youtubevis_2019/video_maskformer2_R50_bs16_8ep.yaml"), ["MODEL.DEVICE", "cpu"]
        )
        with self.assertRaisesRegex(UnsupportedArchitecture, "META_ARCHITECTURE"):
            arch_from_d2_cfg(cfg)


if __name__ == "__main__":
    unittest.main()
