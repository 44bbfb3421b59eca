"""The installed vmattach's version (`vmattach --version`, NodeGetInfo)."""

from __future__ import annotations

import functools
from importlib import metadata


@functools.cache
def version() -> str:
    """Read once: the installed metadata does not change under a running process
    (it was read on every NodeGetInfo, a call of each attach)."""
    try:
        return metadata.version("vmattach")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"
