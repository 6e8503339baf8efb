"""Multi-process CPU (gloo) training: all_reduce_batchnorm's synchronised BatchNorm computes what
one BatchNorm over the whole batch computes; share_main_process_buffers gives every process the
main process's statistics before evaluation."""
import os
import tempfile
import unittest

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.layers import NaiveSyncBatchNorm
from torch import nn

from mask2former_d2.engine.trainer import all_reduce_batchnorm, share_main_process_buffers


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.SyncBatchNorm(4), nn.ReLU(),
                          nn.Sequential(nn.Conv2d(4, 4, 1), nn.SyncBatchNorm(4, momentum=0.3)))
    with torch.no_grad():  # not the initial affine parameters, so that they matter
        for m in model.modules():
            if isinstance(m, nn.SyncBatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.double()  # float64: gradients that are zero up to rounding compare exactly enough


def _batch() -> torch.Tensor:
    return torch.randn(4, 3, 6, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _worker(rank: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model = _model().train()
        all_reduce_batchnorm(model)
        x = _batch()[2 * rank: 2 * rank + 2]  # each process gets half of the batch
        out = model(x)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        for g in grads:  # what DDP does: the mean over processes
            dist.all_reduce(g)
            g /= 2
        if rank == 0:
            torch.save({"out": out.detach(), "grads": grads, "state": model.state_dict()}, out_file)
    finally:
        dist.destroy_process_group()


def _buffers_worker(rank: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        model[0].weight.data.fill_(float(rank))  # a parameter: not a buffer, left alone
        model[1].running_mean.fill_(10.0 + rank)  # plain BatchNorm: statistics differ per process
        model[1].num_batches_tracked.fill_(5 + rank)
        share_main_process_buffers(model)
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


class TestAllReduceBatchNorm(unittest.TestCase):
    def test_replaces_every_sync_batchnorm_with_its_state(self):
        model = _model()
        model[1].running_mean.fill_(0.25)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        model.eval()
        self.assertEqual(all_reduce_batchnorm(model), 2)
        self.assertEqual([type(m) for m in (model[1], model[3][1])], [NaiveSyncBatchNorm] * 2)
        self.assertFalse(any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()))
        self.assertFalse(model[1].training)
        self.assertEqual(model[3][1].momentum, 0.3)
        after = model.state_dict()
        self.assertEqual(sorted(after), sorted(before))
        for k, v in before.items():
            torch.testing.assert_close(after[k], v, rtol=0, atol=0, msg=k)

    def test_two_gloo_processes_equal_one_batchnorm_over_the_whole_batch(self):
        with tempfile.TemporaryDirectory() as tmp:
            out_file = os.path.join(tmp, "rank0.pt")
            mp.spawn(_worker, args=(os.path.join(tmp, "init"), out_file), nprocs=2, join=True)
            got = torch.load(out_file)
        # One process, the whole batch, plain BatchNorm: what synchronised BatchNorm computes.
        reference = _model().train()
        inputs = {}
        for parent in list(reference.modules()):
            for name, m in list(parent.named_children()):
                if isinstance(m, nn.SyncBatchNorm):
                    bn = nn.BatchNorm2d(m.num_features, momentum=m.momentum).double()
                    bn.load_state_dict(m.state_dict())
                    bn.register_forward_hook(lambda mod, args, _: inputs.__setitem__(mod, args[0].detach()))
                    setattr(parent, name, bn)
        out = reference(_batch())
        weights = torch.linspace(-1, 1, got["out"].numel(), dtype=out.dtype).view_as(got["out"])
        # Each process's loss is on its half; DDP averages the two processes' gradients.
        ((out[:2] * weights).sum() + (out[2:] * weights).sum()).backward()
        torch.testing.assert_close(got["out"], out[:2].detach(), rtol=1e-10, atol=1e-10)
        for ours, ref in zip(got["grads"], [p.grad for p in reference.parameters()]):
            torch.testing.assert_close(ours, ref / 2, rtol=1e-8, atol=1e-10)
        state = reference.state_dict()
        for prefix, bn in (("1.", reference[1]), ("3.1.", reference[3][1])):
            x = inputs[bn]
            torch.testing.assert_close(got["state"][prefix + "running_mean"], state[prefix + "running_mean"],
                                       rtol=1e-10, atol=1e-12)
            # Detectron2's synchronised BatchNorm tracks the biased variance (nn.BatchNorm2d the
            # unbiased one): from 1, momentum m, running_var = 1 - m + m * var.
            var = x.var(dim=(0, 2, 3), unbiased=False)
            torch.testing.assert_close(got["state"][prefix + "running_var"], 1 - bn.momentum + bn.momentum * var,
                                       rtol=1e-10, atol=1e-12)

    def test_every_process_takes_the_main_process_buffers(self):
        with tempfile.TemporaryDirectory() as tmp:
            out_file = os.path.join(tmp, "state")
            mp.spawn(_buffers_worker, args=(os.path.join(tmp, "init"), out_file), nprocs=2, join=True)
            states = [torch.load(f"{out_file}.{rank}") for rank in (0, 1)]
        for rank, state in enumerate(states):
            self.assertTrue(bool((state["1.running_mean"] == 10.0).all()), rank)
            self.assertEqual(int(state["1.num_batches_tracked"]), 5)
            self.assertTrue(bool((state["0.weight"] == rank).all()), rank)


if __name__ == "__main__":
    unittest.main()
