"""Tests of the FPN pixel decoders (BasePixelDecoder, TransformerEncoderPixelDecoder) and
of the DETR transformer encoder they use, against naive re-computations."""

import math
import unittest

import torch
from detectron2.layers import ShapeSpec
from torch.nn import functional as F

from mask2former_d2.layers.detr_transformer import TransformerEncoderOnly
from mask2former_d2.modeling.pixel_decoder.build import build_pixel_decoder
from mask2former_d2.modeling.pixel_decoder.fpn import (
    BasePixelDecoder,
    TransformerEncoderPixelDecoder,
)
from tests.common import naive_sine_pos, new_cfg, reference_mha

_THREADS = torch.get_num_threads()


def setUpModule():
    # The models here are tiny: thread start-up and contention cost more than they save.
    torch.set_num_threads(1)


def tearDownModule():
    torch.set_num_threads(_THREADS)


CHANNELS = {"res2": 8, "res3": 16, "res4": 24, "res5": 40}
IMAGE = (200, 249)  # odd size: strides do not divide it


def _input_shape():
    return {k: ShapeSpec(channels=c, stride=2 ** int(k[-1])) for k, c in CHANNELS.items()}


def _features(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, c in CHANNELS.items():
        s = 2 ** int(name[-1])
        out[name] = torch.randn(
            batch, c, math.ceil(IMAGE[0] / s), math.ceil(IMAGE[1] / s), generator=g
        )
    return out


def _base(norm="GN", conv_dim=32, mask_dim=16):
    return BasePixelDecoder(_input_shape(), conv_dim=conv_dim, mask_dim=mask_dim, norm=norm)


def _with_encoder(pre_norm=False, layers=1, dropout=0.0):
    return TransformerEncoderPixelDecoder(
        _input_shape(),
        transformer_dropout=dropout,
        transformer_nheads=4,
        transformer_dim_feedforward=48,
        transformer_enc_layers=layers,
        transformer_pre_norm=pre_norm,
        conv_dim=32,
        mask_dim=16,
        norm="GN",
    )


def _conv(conv, x, relu):
    """A detectron2 Conv2d (conv, optional norm, optional ReLU) applied with functional ops."""
    k = conv.weight.shape[-1]
    y = F.conv2d(x, conv.weight, conv.bias, padding=k // 2)
    if conv.norm is not None:
        y = F.group_norm(y, conv.norm.num_groups, conv.norm.weight, conv.norm.bias, conv.norm.eps)
    return F.relu(y) if relu else y


def _naive_fpn(dec, feats, top):
    """Top-down FPN from an already computed coarsest input ``top`` (res5 or encoder output)."""
    y = _conv(dec.layer_4, top, relu=True)
    outs = [y]
    for k, name in ((3, "res4"), (2, "res3"), (1, "res2")):
        lateral = _conv(getattr(dec, f"adapter_{k}"), feats[name], relu=False)
        y = lateral + F.interpolate(y, size=lateral.shape[-2:], mode="nearest")
        y = _conv(getattr(dec, f"layer_{k}"), y, relu=True)
        outs.append(y)
    return F.conv2d(y, dec.mask_features.weight, dec.mask_features.bias, padding=1), outs[:3]


def _assert_fpn_close(mask_features, multi_scale, ref_mask, ref_scales, atol):
    """The pixel decoder's mask features and multi-scale features equal the naive ones."""
    torch.testing.assert_close(mask_features, ref_mask, atol=atol, rtol=1e-4)
    for got, ref in zip(multi_scale, ref_scales):
        torch.testing.assert_close(got, ref, atol=atol, rtol=1e-4)


def _decoder_cfg(name, in_features):
    """Mask2Former defaults with the tiny pixel decoder ``name`` on ``in_features``."""
    return new_cfg(SEM_SEG_HEAD={
        "PIXEL_DECODER_NAME": name, "IN_FEATURES": in_features, "CONVS_DIM": 32, "MASK_DIM": 16, "NORM": "GN",
    })


def _naive_sine_pos(h, w, channels):
    """Normalised sine position encoding (1, C, H, W)."""
    return naive_sine_pos(h, w, channels).permute(2, 0, 1)[None]


def _naive_encoder(encoder, src, pos, heads, pre_norm):
    """DETR encoder on (B, C, H, W) with torch's reference attention, sequence-first."""
    b, c, h, w = src.shape
    x = src.flatten(2).permute(2, 0, 1)
    p = pos.flatten(2).permute(2, 0, 1)

    def ln(t, norm):
        return F.layer_norm(t, (c,), norm.weight, norm.bias)

    def attend(layer, t):
        return reference_mha(layer.self_attn, t + p, t + p, t, heads)

    def ffn(layer, t):
        return F.linear(
            F.relu(F.linear(t, layer.linear1.weight, layer.linear1.bias)),
            layer.linear2.weight,
            layer.linear2.bias,
        )

    for layer in encoder.layers:
        if pre_norm:
            x = x + attend(layer, ln(x, layer.norm1))
            x = x + ffn(layer, ln(x, layer.norm2))
        else:
            x = ln(x + attend(layer, x), layer.norm1)
            x = ln(x + ffn(layer, x), layer.norm2)
    if encoder.norm is not None:
        x = ln(x, encoder.norm)
    return x.permute(1, 2, 0).reshape(b, c, h, w)


class TestBasePixelDecoder(unittest.TestCase):
    def test_state_dict_names(self):
        names = set(_base().state_dict())
        expected = {"mask_features.weight", "mask_features.bias"}
        for k in (1, 2, 3):
            expected |= {
                f"adapter_{k}.weight",
                f"adapter_{k}.norm.weight",
                f"adapter_{k}.norm.bias",
            }
        for k in (1, 2, 3, 4):
            expected |= {f"layer_{k}.weight", f"layer_{k}.norm.weight", f"layer_{k}.norm.bias"}
        self.assertEqual(names, expected)

        no_norm = set(_base(norm="").state_dict())
        expected = {"mask_features.weight", "mask_features.bias"}
        expected |= {f"adapter_{k}.{p}" for k in (1, 2, 3) for p in ("weight", "bias")}
        expected |= {f"layer_{k}.{p}" for k in (1, 2, 3, 4) for p in ("weight", "bias")}
        self.assertEqual(no_norm, expected)

    def test_shapes_at_odd_size(self):
        dec = _base().eval()
        with torch.no_grad():
            mask_features, encoder_features, multi_scale = dec.forward_features(_features())
        self.assertEqual(mask_features.shape, (2, 16, 50, 63))
        self.assertIsNone(encoder_features)
        self.assertEqual(
            [tuple(t.shape) for t in multi_scale], [(2, 32, 7, 8), (2, 32, 13, 16), (2, 32, 25, 32)]
        )

    def test_matches_naive_fpn(self):
        torch.manual_seed(0)
        dec = _base().eval()
        for module in dec.modules():  # non-trivial norm affine parameters
            if isinstance(module, torch.nn.GroupNorm):
                torch.nn.init.normal_(module.weight, 1.0, 0.2)
                torch.nn.init.normal_(module.bias, 0.0, 0.2)
        feats = _features(seed=1)
        with torch.no_grad():
            mask_features, _, multi_scale = dec.forward_features(feats)
            ref_mask, ref_scales = _naive_fpn(dec, feats, feats["res5"])
        _assert_fpn_close(mask_features, multi_scale, ref_mask, ref_scales, atol=1e-5)

    def test_from_config_selects_in_features(self):
        cfg = _decoder_cfg("BasePixelDecoder", ["res3", "res4", "res5"])
        dec = build_pixel_decoder(cfg, _input_shape())
        self.assertIsInstance(dec, BasePixelDecoder)
        self.assertEqual(dec.in_features, ["res3", "res4", "res5"])
        self.assertFalse(hasattr(dec, "adapter_3"))
        mask_features, _, multi_scale = dec.forward_features(_features())
        self.assertEqual(mask_features.shape, (2, 16, 25, 32))
        self.assertEqual(len(multi_scale), 3)

    def test_empty_input_shape(self):
        with self.assertRaises(ValueError):
            BasePixelDecoder({}, conv_dim=8, mask_dim=8, norm="GN")

    def test_every_parameter_gets_gradient(self):
        dec = _base().train()
        mask_features, _, multi_scale = dec.forward_features(_features())
        (mask_features.square().mean() + sum(t.mean() for t in multi_scale)).backward()
        self.assertEqual([n for n, p in dec.named_parameters() if p.grad is None], [])


class TestTransformerEncoderPixelDecoder(unittest.TestCase):
    def test_state_dict_names(self):
        for pre_norm in (False, True):
            names = set(_with_encoder(pre_norm=pre_norm, layers=2).state_dict())
            expected = set(_base().state_dict()) | {"input_proj.weight", "input_proj.bias"}
            attn = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
            for i in range(2):
                prefix = f"transformer.encoder.layers.{i}."
                expected |= {prefix + f"self_attn.{a}" for a in attn}
                expected |= {
                    prefix + f"{m}.{p}"
                    for m in ("linear1", "linear2", "norm1", "norm2")
                    for p in ("weight", "bias")
                }
            if pre_norm:
                expected |= {"transformer.encoder.norm.weight", "transformer.encoder.norm.bias"}
            self.assertEqual(names, expected)
        dec = _with_encoder()
        self.assertEqual(dec.layer_4.weight.shape[1], 32)  # reads the encoder output
        self.assertEqual(dec.input_proj.weight.shape[:2], (32, CHANNELS["res5"]))

    def test_matches_naive_encoder_and_fpn(self):
        for pre_norm in (False, True):
            with self.subTest(pre_norm=pre_norm):
                torch.manual_seed(2)
                dec = _with_encoder(pre_norm=pre_norm, layers=2).eval()
                feats = _features(seed=3)
                with torch.no_grad():
                    mask_features, encoded, multi_scale = dec.forward_features(feats)
                    res5 = feats["res5"]
                    top = F.conv2d(res5, dec.input_proj.weight, dec.input_proj.bias)
                    pos = _naive_sine_pos(res5.shape[-2], res5.shape[-1], 32)
                    ref_encoded = _naive_encoder(dec.transformer.encoder, top, pos, 4, pre_norm)
                    ref_mask, ref_scales = _naive_fpn(dec, feats, ref_encoded)
                self.assertEqual(encoded.shape, (2, 32, 7, 8))
                torch.testing.assert_close(encoded, ref_encoded, atol=1e-4, rtol=1e-4)
                _assert_fpn_close(mask_features, multi_scale, ref_mask, ref_scales, atol=1e-4)

    def test_from_config(self):
        cfg = _decoder_cfg("TransformerEncoderPixelDecoder", ["res2", "res3", "res4", "res5"])
        cfg.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS = 3
        cfg.MODEL.MASK_FORMER.NHEADS = 4
        cfg.MODEL.MASK_FORMER.DIM_FEEDFORWARD = 64
        dec = build_pixel_decoder(cfg, _input_shape())
        self.assertIsInstance(dec, TransformerEncoderPixelDecoder)
        self.assertEqual(len(dec.transformer.encoder.layers), 3)
        self.assertEqual(dec.transformer.encoder.layers[0].linear1.out_features, 64)
        cfg.MODEL.MASK_FORMER.NHEADS = 5
        with self.assertRaises(ValueError):
            build_pixel_decoder(cfg, _input_shape())

    def test_every_parameter_gets_gradient(self):
        dec = _with_encoder(layers=2, dropout=0.1).train()
        mask_features, encoded, multi_scale = dec.forward_features(_features())
        loss = mask_features.square().mean() + encoded.mean() + sum(t.mean() for t in multi_scale)
        loss.backward()
        self.assertEqual([n for n, p in dec.named_parameters() if p.grad is None], [])


class TestTransformerEncoderOnly(unittest.TestCase):
    def test_padding_mask(self):
        torch.manual_seed(4)
        enc = TransformerEncoderOnly(
            hidden_dim=16, num_heads=2, num_encoder_layers=1, dim_feedforward=32, dropout=0.0
        ).eval()
        src = torch.randn(2, 16, 3, 5)
        pos = torch.randn(1, 16, 3, 5)
        pad = torch.zeros(2, 3, 5, dtype=torch.bool)
        pad[0, :, 3:] = True
        with torch.no_grad():
            out = enc(src, pad, pos)
            # Image 0 must not depend on its padded pixels; image 1 is unpadded.
            changed = src.clone()
            changed[0, :, :, 3:] += 5.0
            out2 = enc(changed, pad, pos)
        torch.testing.assert_close(out[0, :, :, :3], out2[0, :, :, :3])
        torch.testing.assert_close(out[1], out2[1])


if __name__ == "__main__":
    unittest.main()
