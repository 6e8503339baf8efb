"""Windowed video inference (placeholder)."""


class WindowTracks:
    pass
