"""encfs: an encrypted FUSE filesystem whose volume key is held by a key vault."""

__version__ = "0.1.0"
