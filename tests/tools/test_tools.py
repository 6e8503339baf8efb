"""Tests of the tools convert_torchvision_to_d2.py, analyze_model.py and inspect_checkpoint.py
on synthetic weights (randomly initialised torchvision ResNets, tiny MaskFormer models)."""

import contextlib
import io
import os
import pickle
import tempfile
import unittest
from typing import Dict, List, Tuple

import numpy as np
import torch
import torchvision
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.backbone import build_resnet_backbone
from torch import nn
from torch.nn import functional as F

from mask2former_d2 import get_maskformer_cfg
from mask2former_d2.checkpoint import MaskFormerCheckpointer
from tests.common import TINY_CONFIG, load_script, tiny_cfg


def _load_tool(name: str):
    return load_script(f"tools/{name}.py")


convert = _load_tool("convert_torchvision_to_d2")
analyze_model = _load_tool("analyze_model")
inspect_checkpoint = _load_tool("inspect_checkpoint")


def torchvision_resnet(depth: int, seed: int = 0) -> nn.Module:
    """A randomly initialised torchvision ResNet (no download) with non-trivial BatchNorm
    statistics and affine parameters, in eval mode."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def torchvision_features(model: nn.Module, x: torch.Tensor) -> Dict[str, torch.Tensor]:
    """res2..res5 computed with torchvision's own modules."""
    y = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    out = {}
    for i in range(1, 5):
        y = getattr(model, f"layer{i}")(y)
        out[f"res{i + 1}"] = y
    return out


class _BackboneOnly(nn.Module):
    """A model whose backbone attribute makes Detectron2's suffix matching add ``backbone.``."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone


def d2_resnet(depth: int, norm: str) -> nn.Module:
    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.RESNETS.NORM = norm
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    if depth in (18, 34):
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    return build_resnet_backbone(cfg, ShapeSpec(channels=3))


def _run(main, argv: List[str]) -> Tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


class TestConvertTorchvision(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.models, cls.pkls = {}, {}
        for depth in (18, 50):
            model = torchvision_resnet(depth)
            pth = os.path.join(cls.tmp.name, f"resnet{depth}.pth")
            torch.save(model.state_dict(), pth)
            pkl = os.path.join(cls.tmp.name, f"r{depth}.pkl")
            with contextlib.redirect_stderr(io.StringIO()):
                convert.main([pth, pkl])
            cls.models[depth], cls.pkls[depth] = model, pkl

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_names_follow_detectron2(self):
        expected = {
            "conv1.weight": "stem.conv1.weight",
            "bn1.running_var": "stem.conv1.norm.running_var",
            "layer1.0.conv2.weight": "res2.0.conv2.weight",
            "layer3.5.bn3.bias": "res4.5.conv3.norm.bias",
            "layer2.0.downsample.0.weight": "res3.0.shortcut.weight",
            "layer4.0.downsample.1.running_mean": "res5.0.shortcut.norm.running_mean",
            "fc.weight": None,
            "fc.bias": None,
            "layer1.0.bn1.num_batches_tracked": None,
            "bn1.num_batches_tracked": None,
        }
        for name, d2_name in expected.items():
            self.assertEqual(convert.rename_key(name), d2_name, name)

    def test_output_file(self):
        with open(self.pkls[50], "rb") as f:
            data = pickle.load(f)
        self.assertEqual(data["__author__"], "torchvision")
        self.assertIs(data["matching_heuristics"], True)
        source = self.models[50].state_dict()
        kept = [k for k in source if not k.startswith("fc.") and "num_batches_tracked" not in k]
        self.assertEqual(len(data["model"]), len(kept))
        for name in kept:
            value = data["model"][convert.rename_key(name)]
            self.assertIsInstance(value, np.ndarray)
            np.testing.assert_array_equal(value, source[name].numpy())

    def test_wrappers_and_prefix(self):
        sd = self.models[18].state_dict()
        plain = convert.convert_torchvision_state_dict(sd)
        wrapped = convert.convert_torchvision_state_dict(
            {"state_dict": {f"module.{k}": v for k, v in sd.items()}}
        )
        self.assertEqual(sorted(plain), sorted(wrapped))
        self.assertEqual(convert.infer_resnet_depth(sd), 18)
        self.assertEqual(convert.infer_resnet_depth(self.models[50].state_dict()), 50)

    def test_rejects_other_checkpoints(self):
        with self.assertRaisesRegex(ValueError, "not a torchvision ResNet"):
            convert.convert_torchvision_state_dict({"features.0.weight": torch.zeros(1)})
        with self.assertRaisesRegex(ValueError, "already uses Detectron2 names"):
            convert.convert_torchvision_state_dict({"stem.conv1.weight": torch.zeros(1)})

    def _check_loads_and_matches(self, depth: int) -> None:
        x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(depth))
        with torch.no_grad():
            expected = torchvision_features(self.models[depth], x)
        # BatchNorm in eval mode is checked on the small model only, to keep the test fast.
        for norm in ("FrozenBN", "BN") if depth == 18 else ("FrozenBN",):
            with self.subTest(norm=norm):
                model = _BackboneOnly(d2_resnet(depth, norm)).eval()
                checkpointer = MaskFormerCheckpointer(model)
                checkpointer.load(self.pkls[depth])
                result = checkpointer.last_incompatible
                # Frozen stages keep BatchNorm's step counter, which converted files drop.
                missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
                self.assertEqual(missing, [])
                self.assertEqual(result.unexpected_keys, [])
                self.assertEqual(result.incorrect_shapes, [])
                with torch.no_grad():
                    features = model.backbone(x)
                for name, value in expected.items():
                    # float32 rounding grows with the activations (res5 of R50 reaches ~1e2)
                    atol = 1e-5 * float(value.abs().max())
                    torch.testing.assert_close(features[name], value, rtol=1e-4, atol=atol)
                if norm == "FrozenBN":
                    # With requires_grad FrozenBN uses its scale/shift form instead of batch_norm.
                    res5 = model.backbone(x.clone().requires_grad_(True))["res5"].detach()
                    atol = 1e-5 * float(expected["res5"].abs().max())
                    torch.testing.assert_close(res5, expected["res5"], rtol=1e-4, atol=atol)

    def test_resnet18_loads_and_matches(self):
        self._check_loads_and_matches(18)

    def test_resnet50_loads_and_matches(self):
        self._check_loads_and_matches(50)


class TestAnalyzeModel(unittest.TestCase):
    SIZE = (128, 160)

    @classmethod
    def setUpClass(cls):
        torch.manual_seed(0)
        cls.model = build_model(tiny_cfg()).eval()
        cls.result = analyze_model.analyze(cls.model, analyze_model.TASKS, cls.SIZE)

    def test_parameters_per_module(self):
        counts = self.result["parameter"]
        head = self.model.sem_seg_head
        expected = {
            "backbone": self.model.backbone,
            "sem_seg_head.pixel_decoder": head.pixel_decoder,
            "sem_seg_head.predictor": head.predictor,
        }
        for row, module in expected.items():
            self.assertEqual(counts[row]["parameters"], sum(p.numel() for p in module.parameters()))
        total = sum(p.numel() for p in self.model.parameters())
        self.assertEqual(counts["total"]["parameters"], total)
        self.assertEqual(sum(counts[r]["parameters"] for r in self.result["rows"]), total)
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.assertEqual(counts["total"]["trainable"], trainable)

    def test_conv_flops_and_activations_match_hooks(self):
        # Independent count: every Conv2d call, out elements x (in channels / groups) x kernel.
        flops, activations = [0], [0]

        def hook(module, inputs, output):
            kh, kw = module.kernel_size
            flops[0] += output.numel() * module.in_channels // module.groups * kh * kw
            activations[0] += output.numel()

        handles = [
            m.register_forward_hook(hook) for m in self.model.modules() if isinstance(m, nn.Conv2d)
        ]
        try:
            images = analyze_model._example_input(self.model, *self.SIZE)
            with torch.no_grad():
                analyze_model.HeadlessMaskFormer(self.model)(images)
        finally:
            for h in handles:
                h.remove()
        self.assertEqual(tuple(images.shape), self.result["input_shape"])
        self.assertEqual(self.result["flop_by_operator"]["conv"], flops[0])
        self.assertEqual(self.result["activation_by_operator"]["conv"], activations[0])
        for task in ("flop", "activation"):
            rows = self.result[task]
            self.assertEqual(sum(rows[r] for r in self.result["rows"]), rows["total"])
            self.assertEqual(sum(self.result[f"{task}_by_operator"].values()), rows["total"])
        # The decoder's attention is counted, not left out as an unknown operator.
        self.assertIn("scaled_dot_product_attention", self.result["flop_by_operator"])
        self.assertNotIn("aten::scaled_dot_product_attention", self.result.get("uncounted_ops", {}))

    def test_attention_handles_match_naive_products(self):
        from fvcore.nn import ActivationCountAnalysis, FlopCountAnalysis

        q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 7, 8), torch.randn(2, 4, 7, 6)

        class Fused(nn.Module):
            def forward(self, q, k, v):
                return F.scaled_dot_product_attention(q, k, v)

        class Naive(nn.Module):
            def forward(self, q, k, v):
                return torch.matmul(torch.softmax(torch.matmul(q, k.transpose(-1, -2)), -1), v)

        fused_flop = FlopCountAnalysis(Fused(), (q, k, v)).set_op_handle(
            **analyze_model.FLOP_HANDLES
        )
        fused_act = ActivationCountAnalysis(Fused(), (q, k, v)).set_op_handle(
            **analyze_model.ACTIVATION_HANDLES
        )
        for analysis in (fused_flop, fused_act):
            analysis.unsupported_ops_warnings(False)
        self.assertEqual(fused_flop.total(), 2 * 4 * 5 * 7 * (8 + 6))
        self.assertEqual(fused_flop.total(), FlopCountAnalysis(Naive(), (q, k, v)).total())
        self.assertEqual(fused_act.total(), ActivationCountAnalysis(Naive(), (q, k, v)).total())

    def test_embedding_bag_handle_matches_weighted_sum(self):
        from fvcore.nn import FlopCountAnalysis

        table, rows, weights = torch.randn(30, 6), torch.randint(0, 30, (10, 4)), torch.rand(10, 4)

        class Bag(nn.Module):
            def forward(self, table, weights):
                return F.embedding_bag(rows, table, per_sample_weights=weights, mode="sum")

        class Naive(nn.Module):
            def forward(self, table, weights):
                return torch.einsum("nk,nkd->nd", weights, table[rows])

        torch.testing.assert_close(Bag()(table, weights), Naive()(table, weights))
        bag = FlopCountAnalysis(Bag(), (table, weights)).set_op_handle(**analyze_model.FLOP_HANDLES)
        naive = FlopCountAnalysis(Naive(), (table, weights))
        for analysis in (bag, naive):
            analysis.unsupported_ops_warnings(False)
        self.assertEqual(bag.total(), 10 * 4 * 6)
        self.assertEqual(bag.total(), naive.total())

    def test_report_prints_exact_counts(self):
        text = analyze_model.format_report(self.result)
        total = self.result["parameter"]["total"]["parameters"]
        self.assertIn(f"{total} (", text)
        self.assertIn(f"{self.result['flop']['total']} (", text)
        self.assertNotIn("criterion", text)  # no parameters, no FLOPs

    def test_cli_parameters_with_overrides(self):
        argv = ["--config-file", TINY_CONFIG, "--tasks", "parameter"]
        argv += ["MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "5"]
        code, out, _ = _run(analyze_model.main, argv)
        self.assertEqual(code, 0)
        model = build_model(
            get_maskformer_cfg(TINY_CONFIG, ["MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", 5])
        )
        total_line = [line for line in out.splitlines() if line.startswith("total")][0]
        self.assertEqual(int(total_line.split()[1]), sum(p.numel() for p in model.parameters()))
        self.assertNotIn("FLOPs", out)

    def test_cli_unknown_key_exits_with_message(self):
        argv = ["--config-file", TINY_CONFIG, "MODEL.MASK_FORMER.NUM_QUERIES", "3"]
        with self.assertRaises(SystemExit) as cm:
            analyze_model.main(argv)
        message = str(cm.exception.code)
        self.assertTrue(message.startswith("analyze_model: "), message)
        self.assertIn("MODEL.MASK_FORMER.NUM_QUERIES", message)
        self.assertIn("NUM_OBJECT_QUERIES", message)
        with self.assertRaises(SystemExit) as cm, contextlib.redirect_stderr(io.StringIO()):
            analyze_model.main(["--config-file", TINY_CONFIG, "--tasks", "flops"])
        self.assertEqual(cm.exception.code, 2)


class TestInspectCheckpoint(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        d = cls.tmp.name
        torch.manual_seed(0)
        cls.source = build_model(tiny_cfg())

        def save(model: nn.Module, name: str) -> str:
            DetectionCheckpointer(model, save_dir=d).save(name)
            return os.path.join(d, f"{name}.pth")

        cls.full = save(cls.source, "full")
        cls.other = save(build_model(tiny_cfg("MODEL.MASK_FORMER.DEC_LAYERS", 5)), "other")
        cls.five = save(build_model(tiny_cfg("MODEL.SEM_SEG_HEAD.NUM_CLASSES", 5)), "five")
        cls.resnet18 = torchvision_resnet(18)
        pth = os.path.join(d, "resnet18.pth")
        torch.save(cls.resnet18.state_dict(), pth)
        cls.backbone_pkl = os.path.join(d, "r18.pkl")
        with contextlib.redirect_stderr(io.StringIO()):
            convert.main([pth, cls.backbone_pkl])

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def inspect(self, path: str, *opts) -> Tuple[str, "inspect_checkpoint.LoadReport"]:
        return inspect_checkpoint.inspect_file(path, build_model(tiny_cfg(*opts)))

    def test_summary_counts(self):
        data = inspect_checkpoint.read_checkpoint(self.full)
        info = inspect_checkpoint.summarize(data["model"])
        sd = self.source.state_dict()
        self.assertEqual(info["tensors"], len(sd))
        self.assertEqual(info["values"], sum(v.numel() for v in sd.values()))
        self.assertEqual(info["parameters"], sum(p.numel() for p in self.source.parameters()))
        self.assertEqual(dict(info["dtypes"]), {"float32": len(sd)})
        self.assertIsNotNone(info["metadata"])
        self.assertEqual(sum(t for t, _ in info["prefixes"].values()), len(sd))
        self.assertEqual(
            set(info["prefixes"]),
            {"backbone", "sem_seg_head.pixel_decoder", "sem_seg_head.predictor", "criterion"},
        )

        info = inspect_checkpoint.summarize(
            inspect_checkpoint.read_checkpoint(self.backbone_pkl)["model"]
        )
        tv = {k: v for k, v in self.resnet18.state_dict().items() if not k.startswith("fc.")}
        self.assertEqual(info["tensors"], len([k for k in tv if "num_batches_tracked" not in k]))
        weights = [p for n, p in self.resnet18.named_parameters() if not n.startswith("fc.")]
        self.assertEqual(info["parameters"], sum(p.numel() for p in weights))
        self.assertIsNone(info["metadata"])  # numpy arrays: no module versions

    def test_full_checkpoint_loads_fully(self):
        text, report = self.inspect(self.full)
        self.assertEqual(report.verdict, "loads fully")
        self.assertEqual((report.missing, report.unexpected, report.shapes), ([], [], []))
        self.assertEqual(report.loaded, report.model_keys)
        self.assertTrue(text.rstrip().endswith("verdict: loads fully"))
        self.assertIn("module version metadata: present", text)

    def test_backbone_only_checkpoint(self):
        text, report = self.inspect(self.backbone_pkl, "MODEL.RESNETS.NORM", "FrozenBN")
        self.assertEqual(report.verdict, "loads as backbone initialisation")
        self.assertEqual([k for k in report.missing if k.startswith("backbone.")], [])
        self.assertEqual(report.unexpected, [])
        backbone_keys = [k for k in self.source.state_dict() if k.startswith("backbone.")]
        self.assertEqual(report.loaded, len(backbone_keys) + 40)  # + running statistics
        self.assertIn("backbone-only checkpoint: head keys missing is expected", text)
        self.assertIn("torchvision", text)

        # The same weights into the GroupNorm config: the BatchNorm statistics have no place.
        text, report = self.inspect(self.backbone_pkl)
        self.assertTrue(report.verdict.startswith("loads partially as backbone initialisation"))
        self.assertEqual(len(report.unexpected), 40)
        self.assertIn("running_mean/var", text)

    def test_other_architecture_does_not_fit(self):
        text, report = self.inspect(self.other)
        self.assertTrue(report.verdict.startswith("does not fit"), report.verdict)
        self.assertIn("transformer_self_attention_layers.2", report.verdict)
        self.assertTrue(report.unexpected)
        self.assertTrue(all(k.startswith("sem_seg_head.predictor.") for k in report.unexpected))
        self.assertIn("in the checkpoint, not in the model", text)

    def test_other_num_classes(self):
        text, report = self.inspect(self.five)
        self.assertTrue(report.verdict.startswith("loads for fine-tuning"), report.verdict)
        self.assertEqual(
            {k for k, _, _ in report.class_shapes},
            {
                "sem_seg_head.predictor.class_embed.weight",
                "sem_seg_head.predictor.class_embed.bias",
                "criterion.empty_weight",
            },
        )
        self.assertEqual(report.shapes, [])
        self.assertIn("different NUM_CLASSES", text)
        self.assertIn("checkpoint: 5 classes, model: 133", text)

    def test_cli_with_config_and_overrides(self):
        path = os.path.join(self.tmp.name, "quickstart5.pth")
        cfg = get_maskformer_cfg(TINY_CONFIG, ["MODEL.SEM_SEG_HEAD.NUM_CLASSES", 5])
        torch.save({"model": build_model(cfg).state_dict()}, path)
        argv = [path, "--config-file", TINY_CONFIG, "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "5"]
        code, out, _ = _run(inspect_checkpoint.main, argv)
        self.assertEqual(code, 0)
        self.assertEqual(out.strip().splitlines()[-1], "verdict: loads fully")
        code, out, _ = _run(inspect_checkpoint.main, [path, "--config-file", TINY_CONFIG])
        self.assertIn("verdict: loads for fine-tuning", out)

    def test_cli_errors_are_one_line(self):
        d = self.tmp.name
        garbage_pkl, garbage_pth, a_list = (
            os.path.join(d, n) for n in ("bad.pkl", "bad.pth", "list.pkl")
        )
        with open(garbage_pkl, "wb") as f:
            f.write(b"not a pickle")
        with open(garbage_pth, "wb") as f:
            f.write(b"\x00\x01 neither a zip nor a pickle")
        with open(a_list, "wb") as f:
            pickle.dump([1, 2], f)
        cases = {
            os.path.join(d, "missing.pkl"): "no such file",
            garbage_pkl: "not a readable checkpoint",
            garbage_pth: "not a readable checkpoint",
            a_list: "expected a dict",
        }
        for path, reason in cases.items():
            with self.subTest(path=path):
                code, out, err = _run(inspect_checkpoint.main, [path])
                self.assertEqual(code, 1)
                self.assertEqual(out, "")
                self.assertEqual(len(err.strip().splitlines()), 1, err)
                self.assertIn(reason, err)
                self.assertTrue(err.startswith("inspect_checkpoint: "))
        code, _, err = _run(
            inspect_checkpoint.main, [self.full, "--config-file", TINY_CONFIG, "MODEL.FOO", "1"]
        )
        self.assertEqual(code, 1)
        self.assertIn("MODEL.FOO", err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)


if __name__ == "__main__":
    unittest.main()
