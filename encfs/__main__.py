"""``python -m encfs``: the same entry point as the ``encfs`` command."""

from encfs.cli import main

raise SystemExit(main())
