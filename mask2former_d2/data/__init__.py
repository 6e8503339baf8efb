"""Data loading: dataset registration (and mappers)."""

from . import datasets  # noqa: F401  (registration)
