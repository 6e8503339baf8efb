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

For inference (``for_inference=True``: ``--eval-only``, the demos, ``Predictor``, export) the
fine-tuning allowance is an error: a classifier re-initialised for another class count, or a
head missing from the checkpoint, gives meaningless outputs, so every mismatched key and shape
is named with what the config expects.

Saving is atomic (:meth:`MaskFormerCheckpointer.save`): fvcore writes a checkpoint in place, so
an interrupted save left a truncated file under its final name. Here the data goes to a temporary
file in the same folder, is flushed and fsync'ed, then renamed; ``last_checkpoint`` is written
the same way, after the checkpoint. Resuming (``resume_or_load(..., resume=True)``) still
survives a checkpoint that cannot be read (a file copied half-way, a file system that lost data):
the newest other checkpoint in the directory that loads is used, with a warning naming the bad
file; when none can be read, one ``ValueError`` says so.

A user's wrong file is one ``ValueError`` / ``FileNotFoundError`` line naming it: a missing or
unreadable file (:func:`unreadable_reason`), an ImageNet classification checkpoint that needs
converting first (:func:`classification_checkpoint`) and a checkpoint none of whose keys the
model has.
"""
import logging
import os
import re
from typing import IO, Any, Callable, Dict, Iterable, List, Optional
from urllib.parse import urlparse

import torch
from detectron2.checkpoint import DetectionCheckpointer

logger = logging.getLogger(__name__)

__all__ = [
    "MaskFormerCheckpointer", "atomic_write", "classification_checkpoint", "last_good_checkpoint", "unreadable_reason",
]

# Suffix of the temporary file a checkpoint is written to before it is renamed to its name. It
# does not end in ".pth", so fvcore's ``get_all_checkpoint_files`` never lists a partial file.
TMP_SUFFIX = ".partial"


def atomic_write(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Writes ``path`` so that it appears only complete: ``write(f)`` fills a temporary file in
    the same folder, which is flushed, fsync'ed and renamed to ``path`` (an atomic replace on
    POSIX and Windows). On any error or interruption the temporary file is removed and ``path``
    keeps its previous content."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.{os.getpid()}{TMP_SUFFIX}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:  # the rename itself survives a power loss once the folder's entry is on disk
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows, where folders cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def last_good_checkpoint(save_dir: str) -> Optional[str]:
    """The checkpoint ``save_dir/last_checkpoint`` names, if that file exists (checkpoints are
    written atomically, so an existing one is complete); else None."""
    try:
        with open(os.path.join(save_dir, "last_checkpoint")) as f:
            name = f.read().strip()
    except OSError:
        return None
    path = os.path.join(save_dir, name)
    return path if name and os.path.isfile(path) else None

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


def _first_line(error: Any) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _examples(keys: List[str], n: int = 5) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _model_name(model: Any) -> str:
    """The class name of ``model``, looking through a DDP wrapper."""
    return type(getattr(model, "module", model)).__name__


class MaskFormerCheckpointer(DetectionCheckpointer):
    """A :class:`DetectionCheckpointer` that raises ``ValueError`` when a checkpoint does not fit
    the model's architecture, and saves atomically (see the module docstring).

    Args:
        model, save_dir, checkpointables: as in Detectron2's ``DetectionCheckpointer``.
        for_inference: the weights are used as they are (evaluation, demos, export): any
            parameter the checkpoint lacks or holds in another shape, including the classifier
            of another class count, is an error rather than a re-initialisation.
    """

    def __init__(self, model, save_dir: str = "", *, for_inference: bool = False, **checkpointables) -> None:
        super().__init__(model, save_dir, **checkpointables)
        self.for_inference = for_inference

    def save(self, name: str, **kwargs: Any) -> None:
        """fvcore's ``save``, written atomically (:func:`atomic_write`); the checkpoint also
        records the model's class (``meta_architecture``) so that an image checkpoint is told
        from a video one at inference."""
        if not self.save_dir or not self.save_to_disk:
            return
        if not os.path.isdir(self.save_dir):  # a remote PathManager folder: fvcore's own way
            return super().save(name, **kwargs)
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data["meta_architecture"] = _model_name(self.model)
        data.update(kwargs)
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {path}")
        atomic_write(path, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        """Writes ``last_checkpoint`` atomically (called after the checkpoint is complete)."""
        if not os.path.isdir(self.save_dir):
            return super().tag_last_checkpoint(last_filename_basename)
        path = os.path.join(self.save_dir, "last_checkpoint")
        atomic_write(path, lambda f: f.write(last_filename_basename.encode()))

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
            ValueError: when the named checkpoint and every other one are unreadable.
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
        raise ValueError(
            f"cannot resume: the last checkpoint {named} is unreadable ({_first_line(error)}) and no "
            f"other checkpoint in {self.save_dir} can be read; start over with --start-over or use "
            "another OUTPUT_DIR"
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
        if self.for_inference:
            self._check_complete(source, checkpoint, incompatible)
        if skipped:
            logger.warning(
                "%s: class-dependent weights re-initialised for a different number of classes: %s",
                source,
                ", ".join(skipped),
            )
        return incompatible

    def _check_complete(self, source: str, checkpoint: Dict[str, Any], incompatible: Any) -> None:
        """For inference: raises ``ValueError`` when the checkpoint was saved from another
        meta-architecture (image vs video), holds a classifier of another class count, or lacks
        parameters of the model (a backbone-only file), naming keys, shapes and the config."""
        model_name = _model_name(self.model)
        saved_from = checkpoint.get("meta_architecture")
        if isinstance(saved_from, str) and saved_from != model_name:
            raise ValueError(
                f"{source} is a {saved_from} checkpoint, but the config builds a {model_name} "
                "(MODEL.META_ARCHITECTURE); use the config the checkpoint was trained with"
            )
        classes = [(k, tuple(a), tuple(b)) for k, a, b in incompatible.incorrect_shapes]
        if classes:
            shapes = "; ".join(f"{k}: {a} in the checkpoint, {b} in the model" for k, a, b in classes[:3])
            # class_embed has NUM_CLASSES + 1 outputs (the last one is "no object").
            ckpt_classes, model_classes = classes[0][1][0] - 1, classes[0][2][0] - 1
            raise ValueError(
                f"{source} was trained for {ckpt_classes} classes, but the config expects "
                f"MODEL.SEM_SEG_HEAD.NUM_CLASSES {model_classes} ({shapes}); set "
                f"MODEL.SEM_SEG_HEAD.NUM_CLASSES {ckpt_classes} and the dataset it was trained on, or "
                "fine-tune it with train_net.py first"
            )
        params = {n for n, _ in getattr(self.model, "module", self.model).named_parameters()}
        missing = sorted(k for k in incompatible.missing_keys if k in params)
        if missing:
            raise ValueError(
                f"{source} lacks {len(missing)} of the model's {len(params)} parameters "
                f"({_examples(missing)}); they would stay randomly initialised. Use weights of the "
                "whole model trained with this config (a backbone-only file is for training)"
            )
