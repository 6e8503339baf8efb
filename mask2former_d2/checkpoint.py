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
"""
import logging
import os
from typing import Any, Dict, List, Optional

from detectron2.checkpoint import DetectionCheckpointer

logger = logging.getLogger(__name__)

__all__ = ["MaskFormerCheckpointer"]

# Tensors whose shape depends only on the number of classes.
CLASS_DEPENDENT = ("predictor.class_embed.", "criterion.empty_weight")
HEAD_PREFIXES = ("sem_seg_head.", "criterion.")


def _examples(keys: List[str], n: int = 5) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


class MaskFormerCheckpointer(DetectionCheckpointer):
    """A :class:`DetectionCheckpointer` that raises ``ValueError`` when a checkpoint does not fit
    the model's architecture (see the module docstring)."""

    def _load_file(self, filename: str) -> Dict[str, Any]:
        self._loading = filename
        return super()._load_file(filename)

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
        incompatible = super()._load_model(checkpoint)
        # Kept for callers that inspect what matched (``load`` returns only the extra data).
        self.last_incompatible = incompatible
        source = getattr(self, "_loading", "checkpoint")
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
