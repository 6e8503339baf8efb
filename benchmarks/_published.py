"""Shared pieces of the benchmarks that measure this project against the published implementation.

The published implementation (packages ``mask2former`` and ``mask2former_video``) is a reference
to measure against, not a dependency: it is imported from its own directory inside a worker
process only. Get it with::

    pip download --no-deps maskformer2==0.1 -d /tmp/ref_pub
    tar -xzf /tmp/ref_pub/maskformer2-0.1.tar.gz -C /tmp/ref_pub    # -> /tmp/ref_pub/maskformer2-0.1

and pass that directory with ``--published`` (or set ``$M2F_PUBLISHED``).

PEM's published code (package ``pem``) is handled the same way: ``git clone
https://github.com/NiccoloCavagnero/PEM`` then ``git checkout 2dfeb3d`` in it, and pass the clone
with ``--published-pem`` (or set ``$PEM_PUBLISHED``); see :func:`import_published_pem`.
"""

import json
import os
import resource
import subprocess
import sys
import time
import types
from typing import Callable, Dict, List, Optional

DEFAULT_PUBLISHED = os.environ.get("M2F_PUBLISHED", "/tmp/ref_pub/maskformer2-0.1")
DEFAULT_PUBLISHED_PEM = os.environ.get("PEM_PUBLISHED", "/tmp/pem_pub")
PEM_COMMIT = "2dfeb3d"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT_PREFIX = "BENCH_RESULT "


def check_published(path: str) -> None:
    """Exits with one line if ``path`` does not hold the published packages."""
    for pkg in ("mask2former", "mask2former_video"):
        if not os.path.isfile(os.path.join(path, pkg, "__init__.py")):
            sys.exit(
                f"published implementation not found: {os.path.join(path, pkg)} is missing; "
                "get it with `pip download --no-deps maskformer2==0.1` and unpack it (see --help)"
            )


def import_published(path: str) -> List[str]:
    """Imports the published packages from ``path`` in this (worker) process, after the stand-ins
    its imports need on this environment. Returns what was patched, one line each."""
    import torch

    check_published(path)
    patches = []
    try:
        import timm.models.layers  # noqa: F401
    except ImportError:
        # Only its Swin backbone uses timm (not installed here); the ResNet configs never call these.
        class DropPath(torch.nn.Module):
            def __init__(self, drop_prob: float = 0.0):
                super().__init__()
                self.drop_prob = drop_prob

            def forward(self, x):
                if self.drop_prob == 0.0 or not self.training:
                    return x
                keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.drop_prob)
                return x * keep / (1 - self.drop_prob)

        layers = types.ModuleType("timm.models.layers")
        layers.DropPath = DropPath
        layers.to_2tuple = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x, x)
        layers.trunc_normal_ = torch.nn.init.trunc_normal_
        for name in ("timm", "timm.models"):
            sys.modules[name] = types.ModuleType(name)
        sys.modules["timm.models.layers"] = layers
        patches.append("stand-in module timm.models.layers (DropPath, to_2tuple, trunc_normal_): timm not installed")
    try:
        from detectron2.evaluation import fast_eval_api  # noqa: F401
    except ImportError:
        # detectron2's compiled _C is not built here; the published instance evaluator imports
        # COCOeval_opt at module level (never called by these benchmarks).
        from pycocotools.cocoeval import COCOeval

        fast = types.ModuleType("detectron2.evaluation.fast_eval_api")
        fast.COCOeval_opt = COCOeval
        sys.modules["detectron2.evaluation.fast_eval_api"] = fast
        patches.append(
            "stand-in detectron2.evaluation.fast_eval_api.COCOeval_opt = pycocotools COCOeval: no detectron2._C"
        )
    import numpy as np

    for alias, typ in (("float", float), ("int", int), ("bool", bool)):
        if not hasattr(np, alias):
            setattr(np, alias, typ)
            patches.append(f"numpy alias np.{alias} = {typ.__name__} (removed from numpy)")
    sys.path.insert(0, path)
    import mask2former  # noqa: F401
    import mask2former_video  # noqa: F401

    if not os.path.abspath(mask2former.__file__).startswith(os.path.abspath(path)):
        sys.exit(f"imported mask2former from {mask2former.__file__}, not from {path}")
    return patches


def check_published_pem(path: str) -> None:
    """Exits with one line if ``path`` does not hold PEM's published code."""
    if not os.path.isfile(os.path.join(path, "pem", "__init__.py")):
        sys.exit(
            f"PEM's published code not found: {os.path.join(path, 'pem')} is missing; get it with "
            f"`git clone https://github.com/NiccoloCavagnero/PEM` and `git checkout {PEM_COMMIT}` in it"
        )


def _modulated_deform_conv_standin():
    """A module with the signature, parameters and output of Detectron2's ``ModulatedDeformConv``
    (DCNv2) that computes through ``torchvision.ops.deform_conv2d``: both read the offsets as
    interleaved (dy, dx) pairs per kernel tap and take the modulation mask as given."""
    import torch
    from torch.nn.modules.utils import _pair
    from torchvision.ops import deform_conv2d

    class ModulatedDeformConv(torch.nn.Module):
        def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                     groups=1, deformable_groups=1, bias=True, norm=None, activation=None):
            super().__init__()
            self.kernel_size = _pair(kernel_size)
            self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
            # torchvision infers the groups from the weight's shape and the deformable groups
            # from the offsets' channels, so neither is passed at call time.
            self.groups, self.deformable_groups = groups, deformable_groups
            self.norm, self.activation = norm, activation
            self.weight = torch.nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
            self.bias = torch.nn.Parameter(torch.zeros(out_channels)) if bias else None
            torch.nn.init.kaiming_uniform_(self.weight, nonlinearity="relu")

        def forward(self, x, offset, mask):
            x = deform_conv2d(x, offset, self.weight, self.bias, stride=self.stride, padding=self.padding,
                              dilation=self.dilation, mask=mask)
            if self.norm is not None:
                x = self.norm(x)
            return self.activation(x) if self.activation is not None else x

    return ModulatedDeformConv


def import_published_pem(path: str) -> List[str]:
    """Imports PEM's published package ``pem`` from ``path`` in this (worker) process, after the
    stand-ins its imports need on this environment. Returns what was patched, one line each."""
    check_published_pem(path)
    patches = []
    try:
        from detectron2 import _C  # noqa: F401
    except ImportError:
        # Without the compiled _C, detectron2.layers exports a placeholder that raises when built;
        # PEM's pixel decoder imports the name at module level, so the stand-in goes in first.
        import detectron2.layers
        import detectron2.layers.deform_conv

        standin = _modulated_deform_conv_standin()
        detectron2.layers.ModulatedDeformConv = standin
        detectron2.layers.deform_conv.ModulatedDeformConv = standin
        patches.append(
            "stand-in detectron2.layers.ModulatedDeformConv computing through torchvision.ops.deform_conv2d "
            "(same parameters, same offset layout): no detectron2._C"
        )
    sys.path.insert(0, path)
    import pem

    if not os.path.abspath(pem.__file__).startswith(os.path.abspath(path)):
        sys.exit(f"imported pem from {pem.__file__}, not from {path}")
    return patches


def published_cfg(config_file: str, opts: List[str], *add_config: Callable):
    """A published implementation's config (imported first): Detectron2's and DeepLab's
    defaults, each of ``add_config`` (the project's own ``add_*_config``), then ``config_file``
    and ``opts``; not frozen."""
    from detectron2.config import get_cfg
    from detectron2.projects.deeplab import add_deeplab_config

    cfg = get_cfg()
    add_deeplab_config(cfg)
    for add in add_config:
        add(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(opts)
    return cfg


def peak_rss_mib() -> float:
    """Peak resident memory of this process (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def emit(result: Dict) -> None:
    """Prints a worker's result for :func:`run_worker`."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def _rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def run_worker(cmd: List[str], timeout: float, mem_cap_mib: float, env: Optional[Dict] = None) -> Dict:
    """Runs ``cmd`` (a worker) with a wall-clock timeout and a resident-memory cap, both enforced
    by polling; returns its result dict, or ``{"status": "did not finish: <why>"}``."""
    env = dict(os.environ if env is None else env)
    env.setdefault("OMP_NUM_THREADS", "2")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    why = None
    peak = 0.0
    while proc.poll() is None:
        rss = _rss_mib(proc.pid)
        peak = max(peak, rss)
        if rss > mem_cap_mib:
            why = f"memory cap {mem_cap_mib:.0f} MiB exceeded (RSS {rss:.0f} MiB)"
        elif time.perf_counter() - t0 > timeout:
            why = f"timeout {timeout:.0f} s"
        if why:
            proc.kill()
            break
        time.sleep(0.2)
    out, err = proc.communicate()
    if why:
        return {"status": f"did not finish: {why}", "peak_rss_mib": peak}
    for line in reversed(out.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    last = (err.strip().splitlines() or ["no output"])[-1]
    return {"status": f"did not finish: exit {proc.returncode}: {last[:200]}", "peak_rss_mib": peak}


def fmt(x, nd: int = 2) -> str:
    """A table cell: numbers rounded, missing values as a dash."""
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def ratio(a, b) -> str:
    return f"{a / b:.2f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else "-"
