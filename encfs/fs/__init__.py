"""The FUSE filesystem of a mount (being split: for now everything is in ``ops``)."""

from encfs.fs.ops import EncfsFUSE, EncfsOperations, FsOptions

__all__ = ["EncfsFUSE", "EncfsOperations", "FsOptions"]
