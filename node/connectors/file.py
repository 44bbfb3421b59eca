"""driver_volume_type "file": a volume that is a file on this host (os-brick's
LocalConnector)."""

from __future__ import annotations

import os

from vmattach.common.errors import InvalidArgument, NotFound
from vmattach.node.connectors.base import ConnectionInfo, StagedVolume, VolumeConnector
from vmattach.node.hypervisor import FileSource


class FileConnector(VolumeConnector):
    driver_volume_type = "file"

    @staticmethod
    def _path(volume_id: str, info: ConnectionInfo) -> str:
        path = info.device_path
        if not path:
            raise InvalidArgument("connection_info.data.device_path is required for file volumes")
        if not os.path.isabs(path) or os.path.normpath(path) != path:
            raise InvalidArgument(f"connection_info.data.device_path {path[:200]!r} "
                                  "is not a normalised absolute path")
        if not os.path.exists(path):
            raise NotFound(f"Volume {volume_id}: {path} does not exist on this node",
                           reason="VOLUME_PATH_NOT_FOUND")
        return path

    def stage(self, volume_id: str, info: ConnectionInfo) -> StagedVolume:
        return StagedVolume(volume_id, self.driver_volume_type,
                            device_path=self._path(volume_id, info))

    def unstage(self, volume_id: str, info: ConnectionInfo) -> None:
        """Nothing to undo: the file stays where it is."""

    def disk_source(self, volume_id: str, info: ConnectionInfo,
                    staged: StagedVolume | None) -> FileSource:
        return FileSource(self._path(volume_id, info))
