"""Helpers shared by the weight converters in ``tools/`` (torchvision ResNet, Swin).

A converter reads a ``torch.save`` checkpoint, renames its entries and writes the pickle
Detectron2's checkpointer reads (``{"model": {name: ndarray}, ...}``).
"""

import argparse
import logging
import pickle
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import numpy as np
import torch

__all__ = ["converter_main", "load_checkpoint", "to_numpy", "unwrap_state_dict", "write_d2_weights"]

logger = logging.getLogger(__name__)

# Keys under which training scripts wrap their state dict, most specific first.
_WRAPPER_KEYS = ("model", "state_dict", "model_state")


def load_checkpoint(path: str, allow_pickle: bool = False) -> Dict[str, Any]:
    """Loads a checkpoint file and returns its state dict.

    Args:
        path: ``.pth``/``.pt``/``.bin`` file saved by ``torch.save``.
        allow_pickle: allow arbitrary pickled objects (only for trusted files); by default only
            tensors and plain containers are unpickled.

    Returns:
        The state dict, unwrapped by :func:`unwrap_state_dict`.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path} holds objects other than tensors; if the file is trusted, pass "
            f"--allow-pickle (allow_pickle=True). Original error: {e}"
        ) from e
    return unwrap_state_dict(obj)


def unwrap_state_dict(obj: Any) -> Dict[str, Any]:
    """Returns the state dict inside common checkpoint wrappers ("model", "state_dict",
    "model_state"), or ``obj`` itself when it is a plain state dict."""
    if not isinstance(obj, Mapping):
        raise TypeError(f"expected a state dict or a checkpoint dict, got {type(obj).__name__}")
    for key in _WRAPPER_KEYS:
        if isinstance(obj.get(key), Mapping):
            return dict(obj[key])
    return dict(obj)


def to_numpy(value: Any) -> np.ndarray:
    """A tensor (or array) as a numpy array; bfloat16, which numpy lacks, becomes float32."""
    if isinstance(value, np.ndarray):
        return value
    tensor = value.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.numpy()


def write_d2_weights(weights: Dict[str, np.ndarray], output_path: str, author: str) -> Dict[str, Any]:
    """Writes ``weights`` as a Detectron2 weight pickle and returns the dict written.

    ``matching_heuristics`` lets Detectron2 match the names to the model's with its
    suffix heuristics, as for its own converted model-zoo files.
    """
    result = {"model": weights, "__author__": author, "matching_heuristics": True}
    with open(output_path, "wb") as f:
        pickle.dump(result, f)
    logger.info("Wrote %d arrays to %s", len(weights), output_path)
    return result


def converter_main(
    description: str,
    input_help: str,
    convert_file: Callable[..., Any],
    argv: Optional[Sequence[str]] = None,
) -> None:
    """Command line of a converter: ``INPUT OUTPUT [--allow-pickle]``, then
    ``convert_file(input, output, allow_pickle=...)``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("input", help=input_help)
    parser.add_argument("output", help="Detectron2 weight file to write (.pkl)")
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="unpickle arbitrary objects in the input (only for trusted files)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    convert_file(args.input, args.output, allow_pickle=args.allow_pickle)
