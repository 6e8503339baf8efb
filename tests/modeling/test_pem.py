"""PEM's components against references written from their definitions: the prototype
cross-attention (naive per-query, per-head loops in float64), its attention mask, the channel
modulation, the STDC backbone's shapes and PEM-checkpoint loading, and a training step of a tiny
PEM."""
import copy
import os
import pickle
import tempfile
import unittest
from collections import OrderedDict

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from torch.nn import functional as F

from mask2former_d2.config import get_maskformer_cfg
from mask2former_d2.modeling.backbone.stdc import D2STDCnet
from mask2former_d2.modeling.pixel_decoder.pem import ChannelModulation
from mask2former_d2.modeling.transformer_decoder.pem import PEMTransformerDecoder, PrototypeCrossAttention
from tests.common import ROOT, SHARED, check_training_losses, make_inputs

FIXTURE = os.path.join(SHARED, "fixtures", "parity_pem", "pem_stdc1_cityscapes_panoptic")
TINY_PEM = os.path.join(ROOT, "configs", "quickstart", "pem_STDC1_tiny_coco_panoptic.yaml")


def naive_prototype_attention(layer, tgt, key_map, query_pos, blocked):
    """PEM_CA from its definition, one query and one head at a time, in float64 numpy."""
    d = {k: v.detach().double().numpy() for k, v in layer.state_dict().items() if v.is_floating_point()}
    x = key_map.detach().double().numpy()  # (B, C, H, W)
    b, c, h, w = x.shape
    m = layer.num_heads
    bn_mean, bn_var = d["feature_proj.bn.running_mean"], d["feature_proj.bn.running_var"]
    xn = (x - bn_mean[None, :, None, None]) / np.sqrt(bn_var[None, :, None, None] + 1e-5)
    xn = xn * d["feature_proj.bn.weight"][None, :, None, None] + d["feature_proj.bn.bias"][None, :, None, None]
    pad = np.pad(xn, ((0, 0), (0, 0), (1, 1), (1, 1)))
    kernel = d["feature_proj.to_query_3x3.weight"][:, 0]  # (C, 3, 3)
    local = np.zeros_like(xn)
    for i in range(3):
        for j in range(3):
            local += kernel[None, :, i, j, None, None] * pad[:, :, i : i + h, j : j + w]
    local += d["feature_proj.to_query_3x3.bias"][None, :, None, None]
    tokens = local.reshape(b, c, h * w).transpose(0, 2, 1) @ d["feature_proj.out.weight"].T + d["feature_proj.out.bias"]
    tokens /= np.linalg.norm(tokens, axis=-1, keepdims=True)

    q = (tgt + query_pos).detach().double().numpy()
    mu, var = q.mean(-1, keepdims=True), q.var(-1, keepdims=True)
    q = (q - mu) / np.sqrt(var + 1e-5) * d["query_proj.0.weight"] + d["query_proj.0.bias"]
    q = q @ d["query_proj.1.weight"].T + d["query_proj.1.bias"]
    q /= np.linalg.norm(q, axis=-1, keepdims=True)

    nq, dh = q.shape[1], c // m
    proto = np.zeros_like(q)
    for bi in range(b):
        for qi in range(nq):
            for hi in range(m):
                sl = slice(hi * dh, (hi + 1) * dh)
                sims = [
                    -np.inf if blocked is not None and blocked[bi, qi, n] else float(tokens[bi, n, sl] @ q[bi, qi, sl])
                    for n in range(h * w)
                ]
                proto[bi, qi, sl] = tokens[bi, int(np.argmax(sims)), sl]  # first maximum, 0 if all -inf
    inter = (proto * q) @ d["proj.weight"].T + d["proj.bias"]
    inter /= np.maximum(np.linalg.norm(inter, axis=1, keepdims=True), 1e-12)  # over the queries
    out = (inter * d["alpha"] + proto) @ d["final.weight"].T + d["final.bias"]
    return torch.from_numpy(out + tgt.detach().double().numpy())


class TestPrototypeCrossAttention(unittest.TestCase):
    def setUp(self):
        torch.manual_seed(0)
        self.layer = PrototypeCrossAttention(16, 4).eval()
        with torch.no_grad():
            for name, p in self.layer.named_parameters():
                p.add_(0.3 * torch.randn_like(p))
            self.layer.feature_proj.bn.running_mean.normal_()
            self.layer.feature_proj.bn.running_var.uniform_(0.5, 2.0)
        self.tgt = torch.randn(2, 5, 16)
        self.pos = torch.randn(1, 5, 16)
        self.keys = torch.randn(2, 16, 3, 4)

    def check(self, blocked):
        got = self.layer(self.tgt, self.keys, self.keys, self.pos, blocked)
        ref = naive_prototype_attention(self.layer, self.tgt, self.keys, self.pos, blocked)
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)

    def test_unmasked(self):
        self.check(None)

    def test_masked_including_a_fully_blocked_query(self):
        g = torch.Generator().manual_seed(1)
        blocked = torch.rand(2, 5, 12, generator=g) < 0.6
        blocked[0, 2] = True  # this query takes token 0 in every head
        blocked[1, 4, 0] = True
        self.check(blocked)

    def test_masked_tokens_are_never_prototypes(self):
        blocked = torch.ones(2, 5, 12, dtype=torch.bool)
        blocked[:, :, 7] = False  # one allowed token: every head of every query picks it
        tokens = F.normalize(self.layer.feature_proj(self.keys), dim=-1)
        queries = F.normalize(self.layer.query_proj(self.tgt + self.pos), dim=-1)
        proto = self.layer.prototypes(tokens, queries, blocked)
        torch.testing.assert_close(proto, tokens[:, 7:8].expand(-1, 5, -1))


class TestPEMAttentionMask(unittest.TestCase):
    def test_negative_logits_block_and_only_a_fully_blocked_image_is_released(self):
        logits = torch.randn(3, 4, 2, 3)
        logits[1] = -1.0 - logits[1].abs()  # every pixel of every query blocked
        logits[2, 0] = -1.0  # one query fully blocked: stays blocked
        mask = PEMTransformerDecoder._attention_mask(None, logits)
        self.assertEqual(mask.shape, (3, 4, 6))
        self.assertTrue(torch.equal(mask[0], (logits[0] < 0).flatten(1)))
        self.assertFalse(mask[1].any())
        self.assertTrue(mask[2, 0].all())
        self.assertTrue(torch.equal(mask[2], (logits[2] < 0).flatten(1)))


class TestChannelModulation(unittest.TestCase):
    def test_double_sigmoid(self):
        torch.manual_seed(0)
        csm = ChannelModulation(8, norm="BN").eval()
        x = torch.randn(2, 8, 5, 6)
        mlp = csm.mlp[0].mlp
        h = F.conv2d(x.mean((2, 3), keepdim=True), mlp[0].weight)
        h = F.relu(F.batch_norm(h, mlp[1].running_mean, mlp[1].running_var, mlp[1].weight, mlp[1].bias))
        weight = torch.sigmoid(torch.sigmoid(F.conv2d(h, mlp[3].weight)))
        torch.testing.assert_close(csm(x), x + x * weight)


class TestSTDC(unittest.TestCase):
    def test_output_shapes_follow_output_shape(self):
        for layers, n_blocks in (([2, 2, 2], 8), ([4, 5, 3], 14)):
            net = D2STDCnet(layers=layers).eval()
            self.assertEqual(len(net.features), n_blocks)
            specs = net.output_shape()
            self.assertEqual({k: v.channels for k, v in specs.items()},
                             {"res2": 64, "res3": 256, "res4": 512, "res5": 1024})
            with torch.no_grad():
                out = net(torch.randn(1, 3, 96, 128))
            for name, spec in specs.items():
                self.assertEqual(tuple(out[name].shape), (1, spec.channels, 96 // spec.stride, 128 // spec.stride))

    def test_add_blocks_and_out_features(self):
        net = D2STDCnet(layers=[2, 2, 2], block_type="add", block_num=3, out_features=["res3", "res5"]).eval()
        with torch.no_grad():
            out = net(torch.randn(1, 3, 64, 64))
        self.assertEqual({k: tuple(v.shape) for k, v in out.items()}, {"res3": (1, 256, 8, 8), "res5": (1, 1024, 2, 2)})
        with self.assertRaisesRegex(ValueError, "OUT_FEATURES"):
            D2STDCnet(out_features=["res6"])


@unittest.skipUnless(os.path.isdir(FIXTURE), f"PEM parity fixture absent: {FIXTURE}")
class TestPEMCheckpoint(unittest.TestCase):
    """A PEM checkpoint loads with zero missing and unexpected keys whichever of the two names of
    each STDC parameter it uses, with and without version metadata."""

    @classmethod
    def setUpClass(cls):
        cls.cfg = get_maskformer_cfg(os.path.join(FIXTURE, "config.yaml"), ["MODEL.DEVICE", "cpu"])
        with open(os.path.join(FIXTURE, "weights.pkl"), "rb") as f:
            cls.ckpt = pickle.load(f)

    def load(self, state):
        model = build_model(self.cfg)
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "w.pkl")
            with open(path, "wb") as f:
                pickle.dump({**self.ckpt, "model": state}, f)
            ck = DetectionCheckpointer(model)
            inc = ck._load_model(ck._load_file(path))
        return model, inc

    def variants(self):
        full = self.ckpt["model"]
        stage = [k for k in full if k.startswith("backbone.x")]
        features = [k for k in full if k.startswith("backbone.features.")]
        self.assertEqual(len(stage), len(features))
        for name, drop in (("both", []), ("features only", stage), ("stage names only", features)):
            for metadata in (True, False):
                sd = OrderedDict((k, v) for k, v in full.items() if k not in drop)
                if metadata:
                    sd._metadata = copy.deepcopy(full._metadata)
                yield f"{name}, metadata={metadata}", sd

    def test_all_layouts_load_fully(self):
        for label, sd in self.variants():
            with self.subTest(label):
                model, inc = self.load(sd)
                self.assertEqual(list(inc.missing_keys), [])
                self.assertEqual(list(inc.unexpected_keys), [])
                self.assertEqual(list(inc.incorrect_shapes), [])
                got = model.backbone.state_dict()["features.7.conv_list.3.conv.weight"]
                want = self.ckpt["model"]["backbone.x32.0.7.conv_list.3.conv.weight"]
                np.testing.assert_array_equal(got.numpy(), want.astype(np.float32))


class TestTinyPEMTraining(unittest.TestCase):
    def test_losses_and_every_parameter_gets_a_gradient(self):
        cfg = get_maskformer_cfg(TINY_PEM, ["MODEL.SEM_SEG_HEAD.NUM_CLASSES", 5,
                                            "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", 256])
        torch.manual_seed(0)
        model = build_model(cfg)
        self.assertIsInstance(model.sem_seg_head.predictor, PEMTransformerDecoder)
        model.train()
        with EventStorage():
            losses = model(make_inputs([(64, 96), (64, 95)], num_classes=5, with_targets=True))
        check_training_losses(self, model, losses, num_aux=cfg.MODEL.MASK_FORMER.DEC_LAYERS - 1)


if __name__ == "__main__":
    unittest.main()
