"""Installed versions of the packages we build on (read from their metadata; nothing imported)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__all__ = ["installed_version", "sglang_version"]


def installed_version(dist: str) -> str:
    """The installed version of distribution ``dist``, or ``"unknown"`` when it is absent."""
    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


def sglang_version() -> str:
    """The installed SGLang's version (``"unknown"`` without SGLang)."""
    return installed_version("sglang")
