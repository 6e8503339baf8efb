"""MSDeformAttnPixelDecoder: checkpoint names, shapes at odd sizes, config wiring, gradients."""

import math
import pickle
import unittest
from pathlib import Path

import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.projects.deeplab import add_deeplab_config

from mask2former_d2 import add_maskformer2_config
from mask2former_d2.modeling.pixel_decoder import build_pixel_decoder
from mask2former_d2.modeling.pixel_decoder.msdeformattn import (
    MSDeformAttnPixelDecoder,
    MSDeformAttnTransformerEncoder,
)
from tests.common import SHARED

FIXTURE_WEIGHTS = Path(SHARED) / "fixtures" / "parity" / "m2f_r18_coco_panoptic" / "weights.pkl"

CHANNELS = {"res2": 16, "res3": 24, "res4": 40, "res5": 48}
STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


def input_shape(channels=CHANNELS):
    return {k: ShapeSpec(channels=c, stride=STRIDES[k]) for k, c in channels.items()}


def make_cfg(**head):
    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_maskformer2_config(cfg)
    cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME = "MSDeformAttnPixelDecoder"
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 64
    cfg.MODEL.SEM_SEG_HEAD.MASK_DIM = 32
    cfg.MODEL.SEM_SEG_HEAD.NORM = "GN"
    cfg.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS = 2
    cfg.MODEL.MASK_FORMER.DROPOUT = 0.0
    for k, v in head.items():
        cfg.MODEL.SEM_SEG_HEAD[k] = v
    return cfg


def make_features(height, width, b=2, channels=CHANNELS):
    """Backbone-like maps: stride-s features of an H x W image are ceil(H / s) x ceil(W / s)."""
    return {
        k: torch.randn(b, c, math.ceil(height / STRIDES[k]), math.ceil(width / STRIDES[k]))
        for k, c in channels.items()
    }


def published_keys(num_layers, num_levels=3):
    """The pixel-decoder keys of a published checkpoint (without the head's prefix)."""
    keys = []
    for i in range(num_levels):
        keys += [f"input_proj.{i}.{j}.{p}" for j in (0, 1) for p in ("weight", "bias")]
    keys.append("transformer.level_embed")
    for j in range(num_layers):
        layer = f"transformer.encoder.layers.{j}"
        for sub in ("sampling_offsets", "attention_weights", "value_proj", "output_proj"):
            keys += [f"{layer}.self_attn.{sub}.weight", f"{layer}.self_attn.{sub}.bias"]
        for sub in ("norm1", "linear1", "linear2", "norm2"):
            keys += [f"{layer}.{sub}.weight", f"{layer}.{sub}.bias"]
    keys += ["mask_features.weight", "mask_features.bias"]
    keys += ["adapter_1.weight", "adapter_1.norm.weight", "adapter_1.norm.bias"]
    keys += ["layer_1.weight", "layer_1.norm.weight", "layer_1.norm.bias"]
    return keys


class TestMSDeformAttnPixelDecoder(unittest.TestCase):
    def setUp(self):
        torch.manual_seed(0)

    def test_state_dict_names_match_published(self):
        cfg = make_cfg(CONVS_DIM=128, TRANSFORMER_ENC_LAYERS=2)
        decoder = build_pixel_decoder(cfg, input_shape())
        self.assertIsInstance(decoder, MSDeformAttnPixelDecoder)
        sd = decoder.state_dict()
        self.assertEqual(sorted(sd), sorted(published_keys(2)))
        layer = "transformer.encoder.layers.1"
        # 8 heads x 3 levels x 4 points; the feed-forward width is 1024 whatever the config.
        self.assertEqual(tuple(sd[f"{layer}.self_attn.sampling_offsets.weight"].shape), (192, 128))
        self.assertEqual(tuple(sd[f"{layer}.self_attn.attention_weights.weight"].shape), (96, 128))
        self.assertEqual(tuple(sd[f"{layer}.linear1.weight"].shape), (1024, 128))
        self.assertEqual(tuple(sd["transformer.level_embed"].shape), (3, 128))
        # input_proj.0 reads res5 (coarsest first).
        self.assertEqual(tuple(sd["input_proj.0.0.weight"].shape), (128, 48, 1, 1))
        self.assertEqual(tuple(sd["input_proj.2.0.weight"].shape), (128, 24, 1, 1))
        self.assertEqual(tuple(sd["adapter_1.weight"].shape), (128, 16, 1, 1))
        self.assertEqual(tuple(sd["layer_1.weight"].shape), (128, 128, 3, 3))

    @unittest.skipUnless(FIXTURE_WEIGHTS.is_file(), f"{FIXTURE_WEIGHTS} is absent")
    def test_loads_published_format_weights(self):
        with open(FIXTURE_WEIGHTS, "rb") as f:
            data = pickle.load(f)
        weights = data.get("model", data)
        prefix = "sem_seg_head.pixel_decoder."
        sd = {
            k[len(prefix) :]: torch.as_tensor(v) for k, v in weights.items() if k.startswith(prefix)
        }
        # The fixture is a ResNet-18 model with the default CONVS_DIM and MASK_DIM 128.
        channels = {"res2": 64, "res3": 128, "res4": 256, "res5": 512}
        cfg = make_cfg(CONVS_DIM=128, MASK_DIM=128, TRANSFORMER_ENC_LAYERS=2)
        decoder = build_pixel_decoder(cfg, input_shape(channels))
        decoder.load_state_dict(sd, strict=True)  # names and shapes
        decoder.eval()
        with torch.no_grad():
            mask_features, _, multi_scale = decoder.forward_features(
                make_features(64, 96, 1, channels)
            )
        self.assertTrue(torch.isfinite(mask_features).all())
        self.assertEqual(len(multi_scale), 3)

    def test_output_shapes_at_odd_size(self):
        decoder = build_pixel_decoder(make_cfg(), input_shape())
        features = make_features(200, 249)
        mask_features, encoder_out, multi_scale = decoder.forward_features(features)
        self.assertEqual(tuple(mask_features.shape), (2, 32, 50, 63))
        self.assertEqual(tuple(encoder_out.shape), (2, 64, 7, 8))
        self.assertEqual(
            [tuple(x.shape) for x in multi_scale], [(2, 64, 7, 8), (2, 64, 13, 16), (2, 64, 25, 32)]
        )
        self.assertIs(encoder_out, multi_scale[0])

    def test_fast_paths_equal_reference(self):
        """The fast decoder (embedding_bag sampling, positions in chunks of any size, 1x1 convs as
        matrix products) gives the reference decoder's outputs (grid_sample, all positions at
        once, convolutions)."""
        decoder = build_pixel_decoder(make_cfg(), input_shape()).eval()
        cfg = make_cfg()
        cfg.MODEL.MASK_FORMER.FAST_PATHS = False
        reference = build_pixel_decoder(cfg, input_shape()).eval()
        reference.load_state_dict(decoder.state_dict())
        features = make_features(200, 249)  # S = 7*8 + 13*16 + 25*32 = 1064 positions, B = 2
        with torch.no_grad():
            expected = reference.forward_features(features)
        for chunk in (1, 100, 1063, 2048):
            for layer in decoder.transformer.encoder.layers:
                layer.query_chunk = chunk
            with torch.no_grad():
                got = decoder.forward_features(features)
            torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
            for g, e in zip(got[2], expected[2]):
                torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)

    def test_channels_last_features_give_the_same_outputs(self):
        """Channels-last backbone maps (a ResNet at CPU inference) keep the FPN channels-last,
        with the same values as NCHW maps."""
        decoder = build_pixel_decoder(make_cfg(), input_shape()).eval()
        for b in (1, 2):
            features = make_features(200, 249, b=b)
            nhwc = {k: v.contiguous(memory_format=torch.channels_last) for k, v in features.items()}
            with torch.no_grad():
                expected = decoder.forward_features(features)
                got = decoder.forward_features(nhwc)
            self.assertTrue(expected[0].is_contiguous())
            if b == 1:
                self.assertTrue(got[0].is_contiguous(memory_format=torch.channels_last))
                self.assertFalse(got[0].is_contiguous())
            torch.testing.assert_close(got[0], expected[0], rtol=1e-4, atol=1e-4)
            for g, e in zip(got[2], expected[2]):
                torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)

    def test_every_param_gets_grad(self):
        decoder = build_pixel_decoder(make_cfg(), input_shape())
        decoder.train()
        # With the zero-initialised offset and attention-weight projections, nothing reaches
        # the queries (hence level_embed); move away from that point to see every gradient.
        for layer in decoder.transformer.encoder.layers:
            torch.nn.init.normal_(layer.self_attn.sampling_offsets.weight, std=0.1)
            torch.nn.init.normal_(layer.self_attn.attention_weights.weight, std=0.1)
        mask_features, _, multi_scale = decoder.forward_features(make_features(64, 95))
        loss = mask_features.square().mean() + sum(x.square().mean() for x in multi_scale)
        loss.backward()
        missing = [n for n, p in decoder.named_parameters() if p.requires_grad and p.grad is None]
        self.assertEqual(missing, [])
        zero = [n for n, p in decoder.named_parameters() if p.grad is not None and not p.grad.any()]
        self.assertEqual(zero, [])

    def test_float32_under_autocast(self):
        decoder = build_pixel_decoder(make_cfg(), input_shape()).eval()
        features = make_features(64, 64)
        with torch.no_grad():
            expected = decoder.forward_features(features)[0]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                half = {k: v.bfloat16() for k, v in features.items()}
                mask_features, encoder_out, multi_scale = decoder.forward_features(half)
        self.assertEqual(mask_features.dtype, torch.float32)
        self.assertTrue(all(x.dtype == torch.float32 for x in multi_scale))
        # Only the bfloat16 rounding of the inputs differs.
        torch.testing.assert_close(mask_features, expected, rtol=0, atol=0.1)

    def test_config_wiring(self):
        cfg = make_cfg(DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS=2, COMMON_STRIDE=8)
        cfg.MODEL.MASK_FORMER.NHEADS = 4
        cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS = 4
        cfg.MODEL.MASK_FORMER.DIM_FEEDFORWARD = 2048  # sizes the transformer decoder only
        cfg.MODEL.MASK_FORMER.DROPOUT = 0.25
        decoder = build_pixel_decoder(cfg, input_shape())
        layer = decoder.transformer.encoder.layers[0]
        self.assertEqual(layer.self_attn.num_heads, 4)
        self.assertEqual(layer.self_attn.num_points, 2)
        self.assertEqual(layer.linear1.out_features, 1024)
        self.assertEqual(layer.dropout1.p, 0.25)
        # COMMON_STRIDE 8: no FPN level, mask features at stride 8.
        self.assertEqual(decoder.num_fpn_levels, 0)
        self.assertFalse(any(k.startswith(("adapter_", "layer_")) for k in decoder.state_dict()))
        mask_features, _, _ = decoder.forward_features(make_features(64, 96))
        self.assertEqual(tuple(mask_features.shape[-2:]), (8, 12))

    def test_two_fpn_levels_and_explicit_kwargs(self):
        # Built without a config; the encoder reads only res4 and res5.
        encoder = dict(transformer_dropout=0.0, transformer_nheads=4, transformer_dim_feedforward=64)
        decoder = MSDeformAttnPixelDecoder(
            input_shape(),
            **encoder,
            transformer_enc_layers=1,
            conv_dim=32,
            mask_dim=16,
            norm="GN",
            transformer_in_features=["res5", "res4"],
            common_stride=4,
        )
        self.assertEqual(decoder.transformer_in_features, ["res4", "res5"])
        self.assertEqual(decoder.num_fpn_levels, 2)
        self.assertEqual(tuple(decoder.adapter_1.weight.shape), (32, 16, 1, 1))  # res2
        self.assertEqual(tuple(decoder.adapter_2.weight.shape), (32, 24, 1, 1))  # res3
        mask_features, _, multi_scale = decoder.forward_features(make_features(64, 96))
        self.assertEqual(tuple(mask_features.shape), (2, 16, 16, 24))
        self.assertEqual([tuple(x.shape[-2:]) for x in multi_scale], [(2, 3), (4, 6), (8, 12)])

    def test_reference_points_are_pixel_centres(self):
        shapes = torch.tensor([[2, 3], [1, 2]])
        ref = MSDeformAttnTransformerEncoder.get_reference_points(shapes, torch.device("cpu"))
        self.assertEqual(tuple(ref.shape), (1, 8, 2, 2))
        expected_first = torch.tensor(
            [[1 / 6, 1 / 4], [3 / 6, 1 / 4], [5 / 6, 1 / 4], [1 / 6, 3 / 4]]
        )
        torch.testing.assert_close(ref[0, :4, 0], expected_first)
        torch.testing.assert_close(ref[0, 6:, 1], torch.tensor([[0.25, 0.5], [0.75, 0.5]]))
        torch.testing.assert_close(ref[:, :, 0], ref[:, :, 1])  # every level entirely valid

    def test_bad_config(self):
        with self.assertRaisesRegex(ValueError, "transformer_in_features"):
            build_pixel_decoder(
                make_cfg(DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES=["res6"]), input_shape()
            )
        with self.assertRaisesRegex(ValueError, "common_stride"):
            build_pixel_decoder(make_cfg(COMMON_STRIDE=16), input_shape())
        with self.assertRaisesRegex(ValueError, "input_shape is empty"):
            build_pixel_decoder(make_cfg(IN_FEATURES=["p2"]), input_shape())


if __name__ == "__main__":
    unittest.main()
