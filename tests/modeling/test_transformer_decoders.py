"""Tests of the transformer decoders (Mask2Former's masked-attention decoder, MaskFormer's
DETR decoder) and their shared attention layers.

Naive references here are written independently of the package: sequence-first tensors,
``F.multi_head_attention_forward`` with per-head repeated masks, and the sine position
encoding spelled out from its formula.
"""

import unittest
from typing import List, Tuple

import torch
from torch import Tensor
from torch.nn import functional as F

from mask2former_d2.layers.attention import MultiHeadAttention
from mask2former_d2.modeling.transformer_decoder import build_transformer_decoder
from mask2former_d2.modeling.transformer_decoder.mask2former import (
    MultiScaleMaskedTransformerDecoder,
    _blocked_pixels,
)
from mask2former_d2.modeling.transformer_decoder.maskformer import StandardTransformerDecoder
from tests.common import naive_sine_pos, new_cfg, reference_mha

_THREADS = torch.get_num_threads()


def setUpModule():
    # The models here are tiny: thread start-up and contention cost more than they save.
    torch.set_num_threads(1)


def tearDownModule():
    torch.set_num_threads(_THREADS)


# Sizes of a 200x249 image: 1/32, 1/16, 1/8 feature levels and 1/4 mask features.
LEVEL_SIZES = [(7, 8), (13, 16), (25, 32)]
MASK_SIZE = (50, 63)


def _cfg(**mask_former):
    return new_cfg(MASK_FORMER=mask_former)


def _mask2former(**kwargs) -> MultiScaleMaskedTransformerDecoder:
    args = dict(num_classes=5, hidden_dim=32, num_queries=6, num_heads=4, dim_feedforward=48)
    args.update(num_layers=3, pre_norm=False, mask_dim=24, enforce_input_project=False)
    args.update(kwargs)
    in_channels = args.pop("in_channels", 32)
    return MultiScaleMaskedTransformerDecoder(
        in_channels, args.pop("mask_classification", True), **args
    )


def _inputs(batch=2, channels=32, mask_dim=24, seed=0) -> Tuple[List[Tensor], Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(batch, channels, h, w, generator=g) for h, w in LEVEL_SIZES]
    return x, torch.randn(batch, mask_dim, *MASK_SIZE, generator=g)


def _naive_sine_pos(h: int, w: int, channels: int) -> Tensor:
    """Normalised sine position encoding, (H*W, 1, C) sequence-first."""
    return naive_sine_pos(h, w, channels).reshape(h * w, 1, channels)


_mha = reference_mha


def _ln(x, norm):
    return F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias)


def _ffn(x, linear1, linear2):
    """linear2(relu(linear1(x)))."""
    return F.linear(F.relu(F.linear(x, linear1.weight, linear1.bias)), linear2.weight, linear2.bias)


def _mlp(x, mlp):
    n = len(mlp.layers)
    for i, layer in enumerate(mlp.layers):
        x = F.linear(x, layer.weight, layer.bias)
        x = F.relu(x) if i < n - 1 else x
    return x


def _naive_mask2former(dec, x, mask_features, pre_norm):
    """Every prediction of the masked-attention decoder (from the learned queries, then after
    each layer), computed the way the published decoder does: sequence-first, layer i reads
    level i mod 3, its attention mask is the previous prediction resized to that level (blocked
    where sigmoid < 0.5, fully blocked rows opened) and repeated per head."""
    heads = dec.num_heads
    b = mask_features.shape[0]
    tgt = dec.query_feat.weight[:, None].repeat(1, b, 1)  # (Q, B, C)
    qpos = dec.query_embed.weight[:, None].repeat(1, b, 1)

    def predict(t):
        d = _ln(t, dec.decoder_norm).transpose(0, 1)  # (B, Q, C)
        logits = F.linear(d, dec.class_embed.weight, dec.class_embed.bias)
        masks = torch.einsum("bqc,bchw->bqhw", _mlp(d, dec.mask_embed), mask_features)
        return logits, masks

    memories = []
    for lvl, feat in enumerate(x):
        proj = dec.input_proj[lvl]
        feat = F.conv2d(feat, proj.weight, proj.bias) if hasattr(proj, "weight") else feat
        h, w = feat.shape[-2:]
        mem = feat.flatten(2).permute(2, 0, 1) + dec.level_embed.weight[lvl]  # (S, B, C)
        memories.append((mem, _naive_sine_pos(h, w, mem.shape[-1]), (h, w)))

    predictions = [predict(tgt)]
    for i in range(len(dec.transformer_ffn_layers)):
        mem, pos, size = memories[i % len(memories)]
        small = F.interpolate(predictions[-1][1], size=size, mode="bilinear", align_corners=False)
        blocked = small.sigmoid().flatten(2) < 0.5  # (B, Q, S)
        blocked[blocked.all(-1)] = False
        blocked = blocked.repeat_interleave(heads, dim=0)  # (B*M, Q, S), batch-major

        ca = dec.transformer_cross_attention_layers[i]
        sa = dec.transformer_self_attention_layers[i]
        ff = dec.transformer_ffn_layers[i]
        if pre_norm:
            t = _ln(tgt, ca.norm)
            tgt = tgt + _mha(ca.multihead_attn, t + qpos, mem + pos, mem, heads, blocked)
            t = _ln(tgt, sa.norm)
            tgt = tgt + _mha(sa.self_attn, t + qpos, t + qpos, t, heads)
            t = _ln(tgt, ff.norm)
            tgt = tgt + _ffn(t, ff.linear1, ff.linear2)
        else:
            tgt = _ln(
                tgt + _mha(ca.multihead_attn, tgt + qpos, mem + pos, mem, heads, blocked), ca.norm
            )
            tgt = _ln(tgt + _mha(sa.self_attn, tgt + qpos, tgt + qpos, tgt, heads), sa.norm)
            ffn = _ffn(tgt, ff.linear1, ff.linear2)
            tgt = _ln(tgt + ffn, ff.norm)
        predictions.append(predict(tgt))
    return predictions


class TestMultiHeadAttention(unittest.TestCase):
    def test_matches_torch_reference(self):
        torch.manual_seed(0)
        attn = MultiHeadAttention(16, 4).eval()
        b, lq, s = 3, 5, 11
        q, k, v = torch.randn(b, lq, 16), torch.randn(b, s, 16), torch.randn(b, s, 16)
        blocked = torch.rand(b, lq, s) < 0.5
        blocked[..., 0] = False  # keep every row attendable
        padding = torch.zeros(b, s, dtype=torch.bool)
        padding[1, -3:] = True
        ours = attn(q, k, v, attn_mask=blocked, key_padding_mask=padding)
        ref = _mha(
            attn,
            q.transpose(0, 1),
            k.transpose(0, 1),
            v.transpose(0, 1),
            4,
            attn_mask=blocked.repeat_interleave(4, dim=0),
            key_padding_mask=padding,
        ).transpose(0, 1)
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)

    def test_fused_self_attention_projection(self):
        torch.manual_seed(0)
        attn = MultiHeadAttention(16, 2).eval()
        x, v = torch.randn(2, 7, 16), torch.randn(2, 7, 16)
        ours = attn(x, x, v)
        ref = _mha(attn, x.transpose(0, 1), x.transpose(0, 1), v.transpose(0, 1), 2)
        torch.testing.assert_close(ours, ref.transpose(0, 1), atol=1e-5, rtol=1e-5)

    def test_bad_arguments(self):
        with self.assertRaises(ValueError):
            MultiHeadAttention(10, 3)
        attn = MultiHeadAttention(8, 2)
        x = torch.randn(1, 3, 8)
        with self.assertRaises(TypeError):
            attn(x, x, x, attn_mask=torch.zeros(1, 3, 3))


class TestMultiScaleMaskedTransformerDecoder(unittest.TestCase):
    def setUp(self):
        torch.manual_seed(0)  # tests that need other draws reseed

    def test_state_dict_matches_published_checkpoint(self):
        cfg = _cfg(DEC_LAYERS=4, HIDDEN_DIM=128, DIM_FEEDFORWARD=512, NUM_OBJECT_QUERIES=30)
        cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 133
        cfg.MODEL.SEM_SEG_HEAD.MASK_DIM = 128
        cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME = "MultiScaleMaskedTransformerDecoder"
        dec = build_transformer_decoder(cfg, 128, mask_classification=True)
        self.assertIsInstance(dec, MultiScaleMaskedTransformerDecoder)

        c, f, q, k = 128, 512, 30, 133
        expected = {}
        attn = {
            "in_proj_weight": (3 * c, c),
            "in_proj_bias": (3 * c,),
            "out_proj.weight": (c, c),
            "out_proj.bias": (c,),
        }
        for i in range(3):
            for layer, module in (
                ("self_attention", "self_attn"),
                ("cross_attention", "multihead_attn"),
            ):
                for name, shape in attn.items():
                    expected[f"transformer_{layer}_layers.{i}.{module}.{name}"] = shape
                expected[f"transformer_{layer}_layers.{i}.norm.weight"] = (c,)
                expected[f"transformer_{layer}_layers.{i}.norm.bias"] = (c,)
            ffn = f"transformer_ffn_layers.{i}"
            expected.update(
                {
                    f"{ffn}.linear1.weight": (f, c),
                    f"{ffn}.linear1.bias": (f,),
                    f"{ffn}.linear2.weight": (c, f),
                    f"{ffn}.linear2.bias": (c,),
                    f"{ffn}.norm.weight": (c,),
                    f"{ffn}.norm.bias": (c,),
                }
            )
        expected.update(
            {
                "decoder_norm.weight": (c,),
                "decoder_norm.bias": (c,),
                "query_feat.weight": (q, c),
                "query_embed.weight": (q, c),
                "level_embed.weight": (3, c),
                "class_embed.weight": (k + 1, c),
                "class_embed.bias": (k + 1,),
            }
        )
        for j in range(3):
            expected[f"mask_embed.layers.{j}.weight"] = (c, c)
            expected[f"mask_embed.layers.{j}.bias"] = (c,)
        got = {name: tuple(t.shape) for name, t in dec.state_dict().items()}
        self.assertEqual(got, expected)
        self.assertEqual(len(dec.input_proj), 3)
        self.assertTrue(all(len(list(p.parameters())) == 0 for p in dec.input_proj))

    def test_input_projection(self):
        for in_channels, enforce, has_proj in (
            (16, False, True),
            (32, True, True),
            (32, False, False),
        ):
            dec = _mask2former(in_channels=in_channels, enforce_input_project=enforce)
            names = {n for n in dec.state_dict() if n.startswith("input_proj.")}
            want = {f"input_proj.{i}.{p}" for i in range(3) for p in ("weight", "bias")}
            self.assertEqual(names, want if has_proj else set())

    def test_aux_outputs_match_naive_reference(self):
        # 4 layers: level 0 is read twice, so the attention masks of a revisited level count.
        dec = _mask2former(num_layers=4).train()
        x, mf = _inputs()
        with torch.no_grad():
            out = dec(x, mf)
            ref = _naive_mask2former(dec, x, mf, pre_norm=False)
        preds = out["aux_outputs"] + [out]
        self.assertEqual(len(out["aux_outputs"]), 4)  # learned queries + layers 1..3
        self.assertEqual(len(ref), 5)
        for i, (got, (logits, masks)) in enumerate(zip(preds, ref)):
            with self.subTest(prediction=i):
                self.assertEqual(set(got), {"pred_logits", "pred_masks"} | ({"aux_outputs"} if i == 4 else set()))
                torch.testing.assert_close(got["pred_logits"], logits, atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(got["pred_masks"], masks, atol=1e-4, rtol=1e-4)

        dec.eval()
        with torch.no_grad():
            evaluated = dec(x, mf)
        self.assertEqual(evaluated["aux_outputs"], [])
        dec.aux_outputs_in_eval = True
        with torch.no_grad():
            self.assertEqual(len(dec(x, mf)["aux_outputs"]), 4)

    def test_from_config_layers(self):
        cfg = _cfg(DEC_LAYERS=3, HIDDEN_DIM=32, NHEADS=4, NUM_OBJECT_QUERIES=5, DIM_FEEDFORWARD=16)
        cfg.MODEL.SEM_SEG_HEAD.MASK_DIM = 8
        dec = MultiScaleMaskedTransformerDecoder(cfg, 32, True)
        self.assertEqual(dec.num_layers, 2)
        self.assertEqual(len(dec.transformer_ffn_layers), 2)
        cfg.MODEL.MASK_FORMER.DEC_LAYERS = 0
        with self.assertRaises(ValueError):
            MultiScaleMaskedTransformerDecoder(cfg, 32, True)

    def test_without_mask_classification(self):
        dec = _mask2former(mask_classification=False, num_layers=2).train()
        self.assertFalse(hasattr(dec, "class_embed"))
        x, mf = _inputs()
        with torch.no_grad():
            out = dec(x, mf)
            # The class head only adds logits: the masks are those of the same weights with it.
            full = _mask2former(num_layers=2).train()
            missing, unexpected = full.load_state_dict(dec.state_dict(), strict=False)
            self.assertEqual((sorted(missing), unexpected), (["class_embed.bias", "class_embed.weight"], []))
            ref = _naive_mask2former(full, x, mf, pre_norm=False)
        self.assertNotIn("pred_logits", out)
        self.assertEqual([set(a) for a in out["aux_outputs"]], [{"pred_masks"}] * 2)
        for got, (_, masks) in zip(out["aux_outputs"] + [out], ref):
            torch.testing.assert_close(got["pred_masks"], masks, atol=1e-4, rtol=1e-4)

    def test_layers_match_naive_reference(self):
        for pre_norm in (False, True):
            with self.subTest(pre_norm=pre_norm):
                torch.manual_seed(1)
                dec = _mask2former(num_layers=3, in_channels=16, pre_norm=pre_norm).train()
                x, mf = _inputs(channels=16, seed=2)
                with torch.no_grad():
                    out = dec(x, mf)
                    ref = _naive_mask2former(dec, x, mf, pre_norm)
                for got, (logits, masks) in zip(out["aux_outputs"] + [out], ref):
                    torch.testing.assert_close(got["pred_logits"], logits, atol=1e-4, rtol=1e-4)
                    torch.testing.assert_close(got["pred_masks"], masks, atol=1e-4, rtol=1e-4)
                # The attention mask was informative: some pixels were blocked.
                small = F.interpolate(ref[0][1], size=LEVEL_SIZES[0], mode="bilinear")
                self.assertTrue(0.05 < (small < 0).float().mean() < 0.95)

    def test_eval_matches_training_predictions(self):
        torch.manual_seed(3)
        dec = _mask2former(num_layers=5)
        x, mf = _inputs(seed=4)
        with torch.no_grad():
            trained = dec.train()(x, mf)
            evaluated = dec.eval()(x, mf)
        torch.testing.assert_close(
            evaluated["pred_masks"], trained["pred_masks"], atol=1e-4, rtol=1e-4
        )
        torch.testing.assert_close(
            evaluated["pred_logits"], trained["pred_logits"], atol=1e-4, rtol=1e-4
        )

    def test_channels_last_mask_features(self):
        """Channels-last mask features (a ResNet at CPU inference) give the same predictions."""
        torch.manual_seed(3)
        dec = _mask2former(num_layers=5).eval()
        x, mf = _inputs(seed=4)
        with torch.no_grad():
            expected = dec(x, mf)
            got = dec(x, mf.contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(got["pred_masks"], expected["pred_masks"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got["pred_logits"], expected["pred_logits"], atol=1e-4, rtol=1e-4)

    def test_query_predicting_nothing_attends_everywhere(self):
        # With mask_embed's last layer fixed to a constant vector, every query predicts the
        # same sign everywhere (mask features are positive). All-negative masks block whole
        # rows, which must fall back to attending everywhere, i.e. exactly like all-positive
        # masks, which block nothing.
        torch.manual_seed(5)
        dec = _mask2former(num_layers=3).eval()
        x, _ = _inputs(seed=6)
        mf = torch.rand(2, 24, *MASK_SIZE) + 0.1
        last = dec.mask_embed.layers[-1]
        results = []
        with torch.no_grad():
            last.weight.zero_()
            for sign in (-1.0, 1.0):
                last.bias.fill_(sign)
                out = dec(x, mf)
                self.assertTrue(torch.isfinite(out["pred_logits"]).all())
                self.assertTrue(torch.isfinite(out["pred_masks"]).all())
                results.append(out["pred_logits"])
        torch.testing.assert_close(results[0], results[1])

    def test_attention_mask_rule(self):
        logits = torch.tensor([[[[-1.0, 2.0], [0.5, -3.0]], [[-1.0, -2.0], [-0.5, -3.0]]]])
        mask = _blocked_pixels(logits)  # (1, 2, 4)
        expected = torch.tensor([[[True, False, False, True], [False, False, False, False]]])
        self.assertTrue(torch.equal(mask, expected))

    def test_every_parameter_gets_gradient(self):
        dec = _mask2former(num_layers=3, in_channels=16).train()
        x, mf = _inputs(channels=16)
        mf.requires_grad_(True)
        out = dec(x, mf)
        preds = [out] + out["aux_outputs"]
        loss = sum(p["pred_logits"].sum() + p["pred_masks"].square().mean() for p in preds)
        loss.backward()
        missing = [n for n, p in dec.named_parameters() if p.grad is None]
        self.assertEqual(missing, [])
        self.assertIsNotNone(mf.grad)

    def test_bfloat16_autocast_close_to_float32(self):
        dec = _mask2former(num_layers=3).eval()
        x, mf = _inputs()
        with torch.no_grad():
            reference = dec(x, mf)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = dec(x, mf)
        for key in ("pred_logits", "pred_masks"):
            # Relative to each output's spread: bf16 keeps ~3 significant digits (0.7 % mean and
            # under 5 % max error seen; a pixel whose attention mask flips moves its query more).
            err = (out[key].float() - reference[key]).abs()
            scale = float(reference[key].std())
            self.assertLess(float(err.mean()), 0.02 * scale, key)
            self.assertLess(float(err.max()), 0.15 * scale, key)
            self.assertGreater(float(err.max()), 0.0, key)  # autocast reached the decoder

    def test_loads_old_static_query_name(self):
        dec = _mask2former()
        state = dict(dec.state_dict())  # a plain dict has no version metadata, like a .pkl
        state["static_query.weight"] = state.pop("query_feat.weight") + 1.0
        other = _mask2former()
        other.load_state_dict(state)
        torch.testing.assert_close(other.query_feat.weight, dec.query_feat.weight + 1.0)

    def test_wrong_number_of_levels(self):
        dec = _mask2former()
        x, mf = _inputs()
        with self.assertRaises(ValueError):
            dec(x[:2], mf)


def _maskformer(**kwargs) -> StandardTransformerDecoder:
    args = dict(num_classes=5, hidden_dim=32, num_queries=6, num_heads=4, dim_feedforward=48)
    args.update(dropout=0.0, enc_layers=1, dec_layers=2, pre_norm=False, deep_supervision=True)
    args.update(mask_dim=24, enforce_input_project=False)
    args.update(kwargs)
    in_channels = args.pop("in_channels", 32)
    return StandardTransformerDecoder(in_channels, args.pop("mask_classification", True), **args)


def _naive_detr(dec, x, mask_features, padding=None, pre_norm=False):
    """All decoder-layer predictions of MaskFormer's DETR decoder, seq-first. ``padding``
    (B, Hi, Wi), True = padding at the bottom/right, is resized (nearest) to the feature map; it
    masks the keys of the encoder's self-attention and of the decoder's cross-attention, and the
    position encoding of each image covers its valid part only."""
    tr = dec.transformer
    heads = tr.num_heads
    proj = dec.input_proj
    x = F.conv2d(x, proj.weight, proj.bias) if hasattr(proj, "weight") else x
    b, c, h, w = x.shape
    src = x.flatten(2).permute(2, 0, 1)  # (S, B, C)
    keys_padded = None
    pos = _naive_sine_pos(h, w, c).expand(-1, b, -1)
    if padding is not None:
        small = F.interpolate(padding[None].float(), size=(h, w))[0].bool()  # (B, H, W)
        keys_padded = small.flatten(1)  # (B, S)
        pos = torch.zeros(h, w, b, c)
        for i in range(b):
            vh, vw = int((~small[i]).any(1).sum()), int((~small[i]).any(0).sum())
            self_check = torch.zeros(h, w, dtype=torch.bool)
            self_check[vh:] = self_check[:, vw:] = True
            assert torch.equal(self_check, small[i]), "padding must be at the bottom/right"
            # Padded positions are masked keys: their encoding never reaches an output.
            pos[:vh, :vw, i] = naive_sine_pos(vh, vw, c)
        pos = pos.reshape(h * w, b, c)

    def attend(attn, q, k, v, pad=None):
        return _mha(attn, q, k, v, heads, key_padding_mask=pad)

    for layer in tr.encoder.layers:
        if pre_norm:
            t = _ln(src, layer.norm1)
            src = src + attend(layer.self_attn, t + pos, t + pos, t, keys_padded)
            src = src + _ffn(_ln(src, layer.norm2), layer.linear1, layer.linear2)
        else:
            src = _ln(src + attend(layer.self_attn, src + pos, src + pos, src, keys_padded), layer.norm1)
            src = _ln(src + _ffn(src, layer.linear1, layer.linear2), layer.norm2)
    if pre_norm:
        src = _ln(src, tr.encoder.norm)
    qpos = dec.query_embed.weight[:, None].repeat(1, b, 1)
    tgt = torch.zeros_like(qpos)
    outputs = []
    for layer in tr.decoder.layers:
        if pre_norm:
            t = _ln(tgt, layer.norm1)
            tgt = tgt + attend(layer.self_attn, t + qpos, t + qpos, t)
            t = _ln(tgt, layer.norm2)
            tgt = tgt + attend(layer.multihead_attn, t + qpos, src + pos, src, keys_padded)
            tgt = tgt + _ffn(_ln(tgt, layer.norm3), layer.linear1, layer.linear2)
        else:
            tgt = _ln(tgt + attend(layer.self_attn, tgt + qpos, tgt + qpos, tgt), layer.norm1)
            tgt = _ln(tgt + attend(layer.multihead_attn, tgt + qpos, src + pos, src, keys_padded), layer.norm2)
            tgt = _ln(tgt + _ffn(tgt, layer.linear1, layer.linear2), layer.norm3)
        d = _ln(tgt, tr.decoder.norm).transpose(0, 1)
        logits = F.linear(d, dec.class_embed.weight, dec.class_embed.bias)
        masks = torch.einsum("bqc,bchw->bqhw", _mlp(d, dec.mask_embed), mask_features)
        outputs.append((logits, masks))
    return outputs


class TestStandardTransformerDecoder(unittest.TestCase):
    def test_state_dict_names(self):
        for pre_norm in (False, True):
            dec = _maskformer(in_channels=16, pre_norm=pre_norm)
            expected = {
                "query_embed.weight",
                "input_proj.weight",
                "input_proj.bias",
                "class_embed.weight",
                "class_embed.bias",
                "transformer.decoder.norm.weight",
                "transformer.decoder.norm.bias",
            }
            expected |= {f"mask_embed.layers.{j}.{p}" for j in range(3) for p in ("weight", "bias")}
            attn = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
            common = {f"{lin}.{p}" for lin in ("linear1", "linear2") for p in ("weight", "bias")}
            enc = common | {f"self_attn.{a}" for a in attn}
            enc |= {f"norm{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}
            decl = common | {f"{m}.{a}" for m in ("self_attn", "multihead_attn") for a in attn}
            decl |= {f"norm{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias")}
            expected |= {f"transformer.encoder.layers.0.{n}" for n in enc}
            expected |= {f"transformer.decoder.layers.{i}.{n}" for i in range(2) for n in decl}
            if pre_norm:
                expected |= {"transformer.encoder.norm.weight", "transformer.encoder.norm.bias"}
            self.assertEqual(set(dec.state_dict()), expected)

    def test_from_config(self):
        cfg = _cfg(HIDDEN_DIM=32, NHEADS=4, NUM_OBJECT_QUERIES=5, DIM_FEEDFORWARD=16)
        cfg.MODEL.MASK_FORMER.update(ENC_LAYERS=0, DEC_LAYERS=3)
        cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME = "StandardTransformerDecoder"
        cfg.MODEL.SEM_SEG_HEAD.MASK_DIM = 8
        dec = build_transformer_decoder(cfg, 64, mask_classification=True)
        self.assertIsInstance(dec, StandardTransformerDecoder)
        self.assertEqual(len(dec.transformer.encoder.layers), 0)
        self.assertEqual(len(dec.transformer.decoder.layers), 3)
        self.assertTrue(dec.deep_supervision)

    def test_matches_naive_reference(self):
        torch.manual_seed(7)
        dec = _maskformer(dec_layers=3).train()
        g = torch.Generator().manual_seed(8)
        x = torch.randn(2, 32, *LEVEL_SIZES[0], generator=g)
        mf = torch.randn(2, 24, *MASK_SIZE, generator=g)
        out = dec(x, mf)
        ref = _naive_detr(dec, x, mf)
        preds = out["aux_outputs"] + [out]
        self.assertEqual(len(preds), 3)
        for got, (logits, masks) in zip(preds, ref):
            torch.testing.assert_close(got["pred_logits"], logits, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(got["pred_masks"], masks, atol=1e-4, rtol=1e-4)
        with torch.no_grad():
            evaluated = dec.eval()(x, mf)
        self.assertEqual(evaluated["aux_outputs"], [])
        torch.testing.assert_close(evaluated["pred_masks"], ref[-1][1], atol=1e-4, rtol=1e-4)

    def test_shapes_options_and_padding_mask(self):
        torch.manual_seed(9)
        x = torch.randn(2, 16, *LEVEL_SIZES[0])
        mf = torch.randn(2, 24, *MASK_SIZE)
        dec = _maskformer(in_channels=16, deep_supervision=False, pre_norm=True).eval()
        padding = torch.zeros(2, 200, 249, dtype=torch.bool)
        padding[1, :, 200:] = True
        with torch.no_grad():
            out = dec(x, mf, padding)
            logits, masks = _naive_detr(dec, x, mf, padding, pre_norm=True)[-1]
            unpadded = dec(x, mf)
        self.assertEqual(set(out), {"pred_logits", "pred_masks"})
        torch.testing.assert_close(out["pred_logits"], logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out["pred_masks"], masks, atol=1e-4, rtol=1e-4)
        # Only the padded image changes.
        torch.testing.assert_close(unpadded["pred_masks"][0], out["pred_masks"][0], atol=1e-5, rtol=1e-5)
        self.assertFalse(torch.allclose(unpadded["pred_masks"][1], out["pred_masks"][1]))

        dec = _maskformer(in_channels=16, mask_classification=False).train()
        out = dec(x, mf)
        self.assertEqual(set(out), {"pred_masks", "aux_outputs"})
        self.assertEqual([set(a) for a in out["aux_outputs"]], [{"pred_masks"}])

    def test_every_parameter_gets_gradient(self):
        dec = _maskformer(in_channels=16, dropout=0.1).train()
        out = dec(torch.randn(2, 16, *LEVEL_SIZES[0]), torch.randn(2, 24, *MASK_SIZE))
        preds = [out] + out["aux_outputs"]
        sum(p["pred_logits"].sum() + p["pred_masks"].square().mean() for p in preds).backward()
        missing = [n for n, p in dec.named_parameters() if p.grad is None]
        self.assertEqual(missing, [])


if __name__ == "__main__":
    unittest.main()
