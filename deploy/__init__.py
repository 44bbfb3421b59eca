"""Files for running vmattach as a service, installed with the package:
vmattach.toml (every setting, commented) and systemd/ (the units)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def path(name: str) -> Path:
    """The installed copy of a file of this folder, e.g. path("vmattach.toml")."""
    return Path(str(resources.files(__name__).joinpath(name)))
