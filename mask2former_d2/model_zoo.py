"""The published MaskFormer / Mask2Former / Mask2Former-VIS checkpoints, usable by name.

The table (``model_zoo.json`` beside this file) lists every checkpoint of the published model-zoo
pages that this project's model can run: its name here, config, file name, URL (``base_url`` +
``path``), the md5 prefix that the published file name carries, and the published numbers.
The pages give no file sizes, so ``size_bytes`` is null; the md5 prefix is what is verified.

Names are ``<dataset>/<task>/<backbone>`` for Mask2Former (``coco/panoptic/R50``,
``ytvis_2019/video/swin_tiny``) and ``maskformer/<dataset>/<task>/<backbone>`` for MaskFormer;
``zoo://<name>`` works wherever Detectron2 takes a path (``MODEL.WEIGHTS zoo://coco/panoptic/R50``).
Importing this module (the package does) registers that ``zoo://`` handler with Detectron2's
``PathManager``: the file is downloaded once through Detectron2's URL handler into its cache
(``$FVCORE_CACHE``, default ``~/.torch/iopath_cache``), then checked against its md5 prefix.

``$MASK2FORMER_D2_ZOO_URL`` replaces the base URL (a mirror, or a local server in tests).
"""
import difflib
import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from functools import lru_cache
from typing import IO, Any, Dict, List, Optional, Sequence
from urllib.parse import urlparse

from detectron2.utils.file_io import PathManager
from iopath.common.file_io import PathHandler, get_cache_dir

__all__ = [
    "ZooCheckpoint", "list_checkpoints", "register", "get", "get_url", "get_local_path", "get_config_file",
    "download", "ZooPathHandler",
]

logger = logging.getLogger(__name__)

PREFIX = "zoo://"
URL_ENV = "MASK2FORMER_D2_ZOO_URL"
_TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model_zoo.json")
# Configs are not installed with the package; they live in the repository beside it.
_CONFIG_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class ZooCheckpoint:
    """One published checkpoint.

    Attributes:
        name: the name used here (``coco/panoptic/R50``).
        config: this repository's config for it, relative to the repository root (None if none).
        published_config: the config path on the published model-zoo page.
        backbone: the backbone as the page names it (``Swin-B (IN21k)``).
        model_id: the page's model id.
        file: the file name (``model_final_94dc52.pkl``).
        path: the file's path below the base URL.
        md5_prefix: the first hex digits of the file's md5 (from its name).
        size_bytes: the file size, where published (the pages give none: None).
        published: the page's numbers (``PQ 51.9, AP 41.7, mIoU 61.7``).
    """

    name: str
    config: Optional[str]
    published_config: str
    backbone: str
    model_id: str
    file: str
    path: str
    md5_prefix: str
    size_bytes: Optional[int]
    published: str


@lru_cache(maxsize=1)
def _table() -> Dict[str, Any]:
    with open(_TABLE) as f:
        table = json.load(f)
    table["by_name"] = {c["name"]: ZooCheckpoint(**c) for c in table["checkpoints"]}
    return table


def list_checkpoints() -> List[ZooCheckpoint]:
    """All checkpoints of the table, in the published pages' order."""
    return list(_table()["by_name"].values())


def register(ckpt: ZooCheckpoint) -> None:
    """Adds ``ckpt`` to the table for this process (e.g. a checkpoint of one's own on a mirror).

    Raises:
        KeyError: when its name is taken.
    """
    by_name = _table()["by_name"]
    if ckpt.name in by_name:
        raise KeyError(f"model zoo: the name {ckpt.name!r} is taken")
    by_name[ckpt.name] = ckpt


def get(name: str) -> ZooCheckpoint:
    """The checkpoint called ``name`` (a leading ``zoo://`` is allowed).

    Raises:
        KeyError: for an unknown name, with the closest known names.
    """
    name = name[len(PREFIX):] if name.startswith(PREFIX) else name
    by_name = _table()["by_name"]
    if name not in by_name:
        close = difflib.get_close_matches(name, list(by_name), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else "see docs/model_zoo.md"
        raise KeyError(f"model zoo: no checkpoint named {name!r}; {hint}")
    return by_name[name]


def base_url(url: Optional[str] = None) -> str:
    """``url``, else ``$MASK2FORMER_D2_ZOO_URL``, else the published base URL; ends with ``/``."""
    url = url or os.environ.get(URL_ENV) or _table()["base_url"]
    return url if url.endswith("/") else url + "/"


def get_url(name: str, url: Optional[str] = None) -> str:
    """The download URL of checkpoint ``name`` (below ``base_url(url)``)."""
    return base_url(url) + get(name).path


def get_local_path(name: str, url: Optional[str] = None, cache_dir: Optional[str] = None) -> str:
    """Where the file of ``name`` is cached: the path Detectron2's URL handler gives its URL
    (``<cache>/<URL path>``), which is also where a user can put the file by hand."""
    parsed = urlparse(get_url(name, url))
    return os.path.join(get_cache_dir(cache_dir), parsed.path.lstrip("/"))


def get_config_file(name: str) -> str:
    """The absolute path of this repository's config for checkpoint ``name``.

    Raises:
        KeyError: when the repository has no config for it.
    """
    ckpt = get(name)
    if ckpt.config is None:
        raise KeyError(f"model zoo: {name} ({ckpt.published_config}) has no config in this repository")
    return os.path.join(_CONFIG_ROOT, ckpt.config)


def _md5(path: str) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(name: str, path: str) -> None:
    """Checks the file at ``path`` against the size (where known) and md5 prefix of ``name``.

    Raises:
        ValueError: naming the file and what differs.
    """
    ckpt = get(name)
    size = os.path.getsize(path)
    if ckpt.size_bytes is not None and size != ckpt.size_bytes:
        raise ValueError(f"{path}: {size} bytes, expected {ckpt.size_bytes} for zoo://{name}; delete it and retry")
    digest = _md5(path)
    if not digest.startswith(ckpt.md5_prefix):
        raise ValueError(
            f"{path}: md5 {digest} does not start with {ckpt.md5_prefix} as zoo://{name} requires "
            "(a truncated or different file); delete it and retry"
        )


def download(name: str, url: Optional[str] = None, cache_dir: Optional[str] = None) -> str:
    """Returns the verified local file of checkpoint ``name``, downloading it first if it is not in
    the cache (once: later calls find it there).

    Args:
        name: a name of the table, with or without ``zoo://``.
        url: the base URL (default: ``base_url()``).
        cache_dir: the cache root (default: Detectron2's, ``$FVCORE_CACHE`` or ``~/.torch/iopath_cache``).

    Raises:
        OSError: the file is not cached and cannot be downloaded; the message names the URL and
            the local path where the file can be put by hand.
        ValueError: the file fails verification (it is deleted when it was just downloaded).
    """
    name = get(name).name
    remote = get_url(name, url)
    local = get_local_path(name, url, cache_dir)
    if os.path.isfile(local):
        verify(name, local)
        return local
    logger.info("model zoo: downloading %s to %s", remote, local)
    try:
        # force: Detectron2's handler remembers URLs it fetched before, possibly into another cache.
        fetched = PathManager.get_local_path(remote, force=True, cache_dir=get_cache_dir(cache_dir))
    except OSError as e:  # urllib's URLError/HTTPError are OSErrors
        reason = getattr(e, "reason", None) or e
        raise OSError(
            f"zoo://{name}: cannot download {remote} ({reason}); download it by hand to {local}"
        ) from None
    try:
        verify(name, fetched)
    except ValueError:
        os.remove(fetched)
        raise
    return fetched


class ZooPathHandler(PathHandler):
    """``zoo://<name>`` paths for Detectron2's ``PathManager`` (hence ``MODEL.WEIGHTS`` and
    ``DetectionCheckpointer``): resolved to the verified cached file of :func:`download`."""

    def _get_supported_prefixes(self) -> List[str]:
        return [PREFIX]

    def _get_local_path(self, path: str, force: bool = False, **kwargs: Any) -> str:
        return download(path[len(PREFIX):])

    def _open(self, path: str, mode: str = "r", buffering: int = -1, **kwargs: Any) -> IO:
        if "w" in mode or "a" in mode:
            raise ValueError(f"{path}: zoo:// paths are read-only (mode {mode!r})")
        return open(self._get_local_path(path), mode)

    def _exists(self, path: str, **kwargs: Any) -> bool:
        try:
            get(path)
        except KeyError:
            return False
        return True

    def _isfile(self, path: str, **kwargs: Any) -> bool:
        return self._exists(path)


def _register() -> None:
    # Registering twice raises in iopath (e.g. when the module is reloaded).
    if PREFIX not in PathManager._path_handlers:
        PathManager.register_handler(ZooPathHandler())


_register()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m mask2former_d2.model_zoo list | info NAME | download NAME``."""
    import argparse

    parser = argparse.ArgumentParser(description="The published checkpoints, by name (zoo://<name>).")
    parser.add_argument("command", choices=["list", "info", "download"])
    parser.add_argument("name", nargs="?", help="a checkpoint name, e.g. coco/panoptic/R50")
    args = parser.parse_args(argv)
    if args.command == "list":
        for c in list_checkpoints():
            print(f"{c.name:45s} {c.published}")
        return 0
    if not args.name:
        parser.error(f"{args.command} needs a NAME")
    try:
        ckpt = get(args.name)
        if args.command == "info":
            rows = [("name", f"zoo://{ckpt.name}"), ("config", ckpt.config), ("url", get_url(ckpt.name)),
                    ("cached at", get_local_path(ckpt.name)), ("md5", ckpt.md5_prefix + "..."),
                    ("published", ckpt.published)]
            print("\n".join(f"{k + ':':10s} {v}" for k, v in rows))
        else:
            print(download(ckpt.name))
    except (KeyError, OSError, ValueError) as e:
        print(f"model_zoo: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
