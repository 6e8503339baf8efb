"""The embedding_bag formulation of deformable attention (mask2former_d2.accel.ms_deform_attn)
computes what the reference grid_sample module (mask2former_d2.layers.ms_deform_attn) computes,
and the reference computes the definition."""
import unittest
from unittest import mock

import torch

from mask2former_d2.accel import ms_deform_attn as fast
from mask2former_d2.accel.ms_deform_attn import EmbeddingBagMSDeformAttn
from mask2former_d2.layers import MSDeformAttn
from mask2former_d2.layers.ms_deform_attn import check_ms_deform_attn_inputs
from tests.layers import test_ms_deform_attn as reference_tests
from tests.layers.test_ms_deform_attn import make_inputs, naive_ms_deform_attn

SIZES = [(5, 7), (3, 4), (2, 2)]


def _inputs(batch=2, queries=6, channels=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in SIZES)
    return (
        torch.randn(batch, queries, channels, generator=g),
        torch.rand(batch, queries, len(SIZES), 2, generator=g),
        torch.randn(batch, s, channels, generator=g),
        torch.tensor(SIZES),
    )


def embedding_bag_op(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """The fast op with the reference op's arguments."""
    sizes = check_ms_deform_attn_inputs(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    return fast.sample_value_table(fast.value_table(value, sizes), sampling_locations, attention_weights)


class TestEmbeddingBagOp(reference_tests.TestMSDeformAttnOp):
    """Every check of the reference op, on the embedding_bag op."""

    op = staticmethod(embedding_bag_op)

    def test_float64_row_indices_path(self):
        # Huge tables compute rows in float64; force that path on a small case.
        value, shapes, starts, loc, attn = make_inputs([(5, 4), (2, 3)], dtype=torch.float32)
        expected = self.op(value, shapes, starts, loc, attn)
        with mock.patch.object(fast, "_FLOAT32_EXACT_INT", 1):
            out = self.op(value, shapes, starts, loc, attn)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


class TestEmbeddingBagMSDeformAttn(unittest.TestCase):
    def setUp(self):
        torch.manual_seed(0)
        self.attn = MSDeformAttn(16, len(SIZES), 4, 3)
        with torch.no_grad():  # offsets large enough to leave the levels sometimes
            self.attn.sampling_offsets.weight.normal_(0, 0.5)
            self.attn.attention_weights.weight.normal_(0, 0.5)
        self.fast = EmbeddingBagMSDeformAttn(16, len(SIZES), 4, 3)
        self.fast.load_state_dict(self.attn.state_dict())

    def test_same_values_as_the_reference_module(self):
        query, ref, flat, shapes = _inputs()
        for ref_points in (ref, torch.cat((ref, 0.1 + torch.rand_like(ref)), -1)):  # points, boxes
            with self.subTest(reference=ref_points.shape[-1]), torch.no_grad():
                expected = self.attn(query, ref_points, flat, shapes)
                got = self.fast(query, ref_points, flat, shapes)
                # The reference also takes the level sizes as plain pairs (as under torch.export).
                again = self.attn.attend(query, ref_points, self.attn.project_value(flat, SIZES))
                torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(again, expected, atol=1e-5, rtol=1e-5)

    def test_same_gradients_as_the_reference_module(self):
        query, ref, flat, shapes = _inputs(batch=1, queries=4)
        grads = []
        for module in (self.attn, self.fast):
            module.zero_grad()
            q, f = query.clone().requires_grad_(True), flat.clone().requires_grad_(True)
            module(q, ref, f, shapes).square().sum().backward()
            grads.append([q.grad, f.grad] + [p.grad for p in module.parameters()])
        for expected, got in zip(*grads):
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)

    def test_reference_against_the_definition(self):
        """The sampled sum, before the output projection, from one bilinear sample at a time."""
        query, ref, flat, shapes = _inputs(batch=1, queries=3)
        m, d = self.attn.num_heads, self.attn.head_dim
        with torch.no_grad():
            self.attn.output_proj = torch.nn.Identity()
            got = self.attn(query, ref, flat, shapes, None)
            offsets = self.attn.sampling_offsets(query).view(1, 3, m, len(SIZES), 3, 2)
            weights = self.attn.attention_weights(query).view(1, 3, m, -1).softmax(-1).view(1, 3, m, len(SIZES), 3)
            normaliser = torch.tensor([(w, h) for h, w in SIZES], dtype=torch.float32)
            locations = ref[:, :, None, :, None] + offsets / normaliser[None, None, None, :, None]
            value = self.attn.value_proj(flat).view(1, -1, m, d)
            expected = naive_ms_deform_attn(value, shapes, locations, weights)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    def test_exported_fast_module_is_the_reference(self):
        """While torch.export traces, the fast module computes its reference formulation (the
        embedding_bag gather needs concrete level sizes)."""
        query, ref, flat, _ = _inputs(batch=1, queries=4)

        class Wrapper(torch.nn.Module):
            def __init__(self, attn):
                super().__init__()
                self.attn = attn

            def forward(self, query, ref, flat):
                return self.attn(query, ref, flat, SIZES)

        program = torch.export.export(Wrapper(self.fast).eval(), (query, ref, flat))
        ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
        self.assertTrue(any("grid_sampler" in op for op in ops), ops)
        self.assertFalse(any("embedding_bag" in op for op in ops), ops)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(query, ref, flat), self.attn(query, ref, flat, SIZES))


if __name__ == "__main__":
    unittest.main()
