"""Data loading: dataset registration (and mappers)."""

from . import datasets  # noqa: F401  (registration)
from .mappers import MAPPERS, build_dataset_mapper  # noqa: F401
