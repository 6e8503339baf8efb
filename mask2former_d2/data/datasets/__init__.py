"""Dataset registrations; importing this package registers them with Detectron2's catalogs.

See ``datasets/README.md`` for each dataset's expected layout under ``$DETECTRON2_DATASETS``.
"""

from . import builtin  # noqa: F401  (registration)
from .utils import load_panoptic_json, load_sem_seg_checked
from .ytvis import load_ytvis_json, register_ytvis_instances

__all__ = ["load_panoptic_json", "load_sem_seg_checked", "load_ytvis_json", "register_ytvis_instances"]
