"""Checkpoint loading that refuses a checkpoint of another architecture.

Detectron2's checkpointer loads whatever matches and only logs the rest, so weights of a
different model (another backbone depth, pixel decoder or query count) load "successfully" into
a half-initialised model. :class:`MaskFormerCheckpointer` raises instead, naming the keys.
Two cases stay allowed, as Detectron2 users expect:

* backbone-only (ImageNet) weights: the checkpoint has no head keys, so the head's keys are
  simply missing;
* fine-tuning to another number of classes: only the class-dependent tensors
  (``class_embed``, ``criterion.empty_weight``) differ in shape; they are re-initialised with a
  warning.

Resuming (``resume_or_load(..., resume=True)``) also survives a checkpoint that cannot be read:
fvcore writes checkpoints in place, not atomically, so a crash while saving (or a file system
that lost unflushed data) can leave the file ``last_checkpoint`` names truncated. The newest
other checkpoint in the directory that loads is used instead, with a warning naming the bad file.

A user's wrong file is one ``ValueError`` / ``FileNotFoundError`` line naming it: a missing or
unreadable file (:func:`unreadable_reason`), an ImageNet classification checkpoint that needs
converting first (:func:`classification_checkpoint`) and a checkpoint none of whose keys the
model has.
"""
import logging
import os
import re
from typing import Any, Dict, Iterable, List, Optional
from urllib.parse import urlparse

from detectron2.checkpoint import DetectionCheckpointer

logger = logging.getLogger(__name__)

__all__ = ["MaskFormerCheckpointer", "classification_checkpoint", "unreadable_reason"]

# Classification checkpoints by their characteristic names -> (what they are, how to convert).
_CLASSIFIERS = (
    (
        re.compile(r"^(module\.)?(conv1\.weight|layer[1-4]\.0\.conv1\.weight|fc\.weight)$"),
        3,
        "a torchvision ImageNet classification checkpoint (conv1/layer1-4/fc names)",
        "tools/convert_torchvision_to_d2.py",
    ),
    (
        re.compile(r"^(module\.)?(patch_embed\.proj\.weight|layers\.0\.blocks\.0\.attn\.qkv\.weight|head\.weight)$"),
        2,
        "a Swin Transformer classification checkpoint (patch_embed/layers names)",
        "tools/convert_swin_to_d2.py",
    ),
)


def classification_checkpoint(keys: Iterable[str], path: str = "checkpoint") -> Optional[str]:
    """The one-line explanation when ``keys`` (of a state dict) are a classification network's
    as published (torchvision ResNet, Swin), which Detectron2 cannot load as they are; else None."""
    keys = list(keys)
    for pattern, needed, what, tool in _CLASSIFIERS:
        if len({k for k in keys if pattern.match(k)}) >= needed:
            out = os.path.splitext(os.path.basename(path))[0] + "_d2.pkl"
            return (
                f"{path} is {what}, not Detectron2 weights: convert it first with "
                f"python {tool} {path} {out}, then use MODEL.WEIGHTS {out}"
            )
    return None


def unreadable_reason(path: str, error: BaseException) -> str:
    """Why ``path`` could not be read as a checkpoint (``error`` is what reading raised), in
    words: an empty or text file, a truncated or damaged file, objects ``torch.load`` refuses."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        size, head = -1, b""
    first = (str(error).strip().splitlines() or [type(error).__name__])[0].split(". ")[0]
    if size == 0:
        return "the file is empty"
    if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return f"it is a text file, not a weight file (it starts with {head[:24].decode()!r})"
    if "Weights only load failed" in first:
        return (
            "it holds objects other than tensors and plain containers, which torch.load "
            "(and so Detectron2's checkpointer) refuses by default"
        )
    if head.startswith(b"PK"):
        return f"the torch.save archive is truncated or damaged ({first})"
    if isinstance(error, EOFError) or "truncated" in first:
        return f"the file is truncated ({first})"
    return f"truncated or not a checkpoint ({type(error).__name__}: {first})"

# Tensors whose shape depends only on the number of classes.
CLASS_DEPENDENT = ("predictor.class_embed.", "criterion.empty_weight")
HEAD_PREFIXES = ("sem_seg_head.", "criterion.")


def _examples(keys: List[str], n: int = 5) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


class MaskFormerCheckpointer(DetectionCheckpointer):
    """A :class:`DetectionCheckpointer` that raises ``ValueError`` when a checkpoint does not fit
    the model's architecture (see the module docstring)."""

    def load(self, path: str, *args, **kwargs) -> Dict[str, Any]:
        """Detectron2's ``load``; a local ``path`` that is not a file raises
        ``FileNotFoundError`` naming it (fvcore asserts)."""
        local = urlparse(path)._replace(query="").geturl() if path and "://" not in path else ""
        if local and not os.path.isfile(local):
            what = "is a directory" if os.path.isdir(local) else "no such file"
            raise FileNotFoundError(f"checkpoint {local}: {what}; expected a .pkl or .pth weight file")
        return super().load(path, *args, **kwargs)

    def _load_file(self, filename: str) -> Dict[str, Any]:
        self._loading = filename
        try:
            return super()._load_file(filename)
        except (AssertionError, FileNotFoundError):
            raise
        except Exception as e:  # torch.load / pickle raise many types for a bad file
            reason = unreadable_reason(filename, e)
            raise ValueError(f"cannot read checkpoint {filename}: {reason}") from e

    def _torch_load(self, filename: str) -> Dict[str, Any]:
        # A file already read by ``get_checkpoint_file`` to check it is not read a second time.
        verified, self._verified = getattr(self, "_verified", None), None
        if verified is not None and verified[0] == filename:
            return verified[1]
        return super()._torch_load(filename)

    def _try_read(self, filename: str) -> Optional[Exception]:
        """Reads ``filename`` (kept for the ``load`` that follows); returns the error, if any."""
        try:
            self._verified = (filename, super()._torch_load(filename))
        except Exception as e:  # torch.load raises RuntimeError, EOFError or pickle errors
            return e
        return None

    def get_checkpoint_file(self) -> str:
        """The checkpoint to resume from: the one ``last_checkpoint`` names or, when that file
        cannot be read (or ``last_checkpoint`` is empty), the newest other ``.pth`` file of
        ``save_dir`` that can.

        Raises:
            RuntimeError: when the named checkpoint and every other one are unreadable.
        """
        named = super().get_checkpoint_file()
        if not named or not (os.path.isfile(named) or os.path.isdir(named)):
            return named  # nothing, or a file only the main worker sees: Detectron2 handles it
        error = self._try_read(named) if os.path.isfile(named) else "last_checkpoint is empty"
        if error is None:
            return named
        others = [f for f in self.get_all_checkpoint_files() if f != named]
        for candidate in sorted(others, key=os.path.getmtime, reverse=True):
            if self._try_read(candidate) is None:
                logger.warning(
                    "Cannot read the last checkpoint %s (%s); resuming from %s instead.",
                    named,
                    error,
                    candidate,
                )
                return candidate
        raise RuntimeError(
            f"Cannot resume: the last checkpoint {named} is unreadable ({error}) and no other "
            f"checkpoint in {self.save_dir} can be read."
        )

    def _load_model(self, checkpoint: Dict[str, Any]) -> Any:
        ckpt_keys = list(checkpoint["model"].keys())
        source = getattr(self, "_loading", "checkpoint")
        classifier = classification_checkpoint(ckpt_keys, source)
        if classifier:
            raise ValueError(classifier)
        incompatible = super()._load_model(checkpoint)
        # Kept for callers that inspect what matched (``load`` returns only the extra data).
        self.last_incompatible = incompatible
        model_keys = self.model.state_dict().keys()
        if ckpt_keys and not set(model_keys) - set(incompatible.missing_keys):
            raise ValueError(
                f"{source}: none of its {len(ckpt_keys)} keys is a key of this model (it has e.g. "
                f"{_examples(ckpt_keys, 3)}; the model has e.g. {_examples(list(model_keys), 3)})"
            )
        problems = []
        bad_shapes = [
            (k, tuple(a), tuple(b))
            for k, a, b in incompatible.incorrect_shapes
            if not any(p in k for p in CLASS_DEPENDENT)
        ]
        if bad_shapes:
            problems.append(
                "shape mismatch (checkpoint vs model): "
                + "; ".join(f"{k}: {a} vs {b}" for k, a, b in bad_shapes[:5])
                + (f" (+{len(bad_shapes) - 5} more)" if len(bad_shapes) > 5 else "")
            )
        # Keys skipped for their shape are reported as missing too; they are judged above.
        skipped = [k for k, *_ in incompatible.incorrect_shapes]
        has_head = any(k.startswith("sem_seg_head.") for k in ckpt_keys)
        if has_head:
            missing = [
                k
                for k in incompatible.missing_keys
                if k.startswith(HEAD_PREFIXES) and k not in skipped
            ]
            unexpected = [k for k in incompatible.unexpected_keys if k.startswith(HEAD_PREFIXES)]
            if missing:
                problems.append(f"{len(missing)} head keys missing from it: {_examples(missing)}")
            if unexpected:
                problems.append(
                    f"{len(unexpected)} head keys the model does not have: {_examples(unexpected)}"
                )
        if problems:
            raise ValueError(
                f"{source} does not fit this model's architecture — "
                + " | ".join(problems)
                + ". Check that the config (backbone depth, pixel/transformer decoder, hidden "
                "dims, number of queries and layers) is the one the checkpoint was trained with."
            )
        if skipped:
            logger.warning(
                "%s: class-dependent weights re-initialised for a different number of classes: %s",
                source,
                ", ".join(skipped),
            )
        return incompatible
