"""driver_volume_type "file": a volume that is a file on this host (os-brick's
LocalConnector).

Only regular files under the node's volume directories (setting
node_volume_dirs; by default the Controller's volume directory) are
accepted, every path component checked without following a symlink: a
request can never put another host file, a device node or a symlink's
target into a guest."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from vmattach.common.errors import InvalidArgument, NotFound
from vmattach.common.rules import quote
from vmattach.node.connectors.base import ConnectionInfo, StagedVolume, VolumeConnector
from vmattach.node.hypervisor import FileSource


def _refused(path: str, why: str) -> InvalidArgument:
    return InvalidArgument(f"connection_info.data.device_path {quote(path, 200)} {why}",
                           reason="FILE_NOT_ALLOWED")


class FileConnector(VolumeConnector):
    driver_volume_type = "file"

    def __init__(self, volume_dirs: Sequence[str | os.PathLike] = ()):
        self.volume_dirs = [os.path.normpath(os.path.abspath(d)) for d in volume_dirs]

    def _path(self, volume_id: str, info: ConnectionInfo) -> str:
        path = info.device_path
        if not path:
            raise InvalidArgument("connection_info.data.device_path is required for file volumes")
        if not os.path.isabs(path) or os.path.normpath(path) != path:
            raise InvalidArgument(f"connection_info.data.device_path {quote(path, 200)} "
                                  "is not a normalised absolute path")
        base = next((d for d in self.volume_dirs
                     if path != d and os.path.commonpath([d, path]) == d), None)
        if base is None:
            raise _refused(path, "is not in a volume directory of this node")
        self._check_regular(volume_id, base, path)
        return path

    @staticmethod
    def _check_regular(volume_id: str, base: str, path: str) -> None:
        """Walk from base to path one component at a time with O_PATH |
        O_NOFOLLOW (nothing is opened for reading, no device is touched): a
        symlink anywhere, or a last component that is not a regular file, is
        refused."""
        parts = Path(os.path.relpath(path, base)).parts
        fd = os.open(base, os.O_PATH | os.O_DIRECTORY)
        try:
            for i, part in enumerate(parts):
                last = i == len(parts) - 1
                flags = os.O_PATH | os.O_NOFOLLOW | (0 if last else os.O_DIRECTORY)
                try:
                    child = os.open(part, flags, dir_fd=fd)
                except FileNotFoundError:
                    raise NotFound(f"Volume {volume_id}: {path} does not exist on this node",
                                   reason="VOLUME_PATH_NOT_FOUND") from None
                except OSError as exc:
                    if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                        raise _refused(path, "goes through a symlink or a non-directory") from None
                    raise
                os.close(fd)
                fd = child
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise _refused(path, "is not a regular file (a symlink, device or other)")
        finally:
            os.close(fd)

    def stage(self, volume_id: str, info: ConnectionInfo) -> StagedVolume:
        return StagedVolume(volume_id, self.driver_volume_type,
                            device_path=self._path(volume_id, info))

    def unstage(self, volume_id: str, info: ConnectionInfo) -> None:
        """Nothing to undo: the file stays where it is."""

    def disk_source(self, volume_id: str, info: ConnectionInfo,
                    staged: StagedVolume | None) -> FileSource:
        return FileSource(self._path(volume_id, info))
