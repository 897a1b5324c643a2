"""Tests that boot a real systemd: a Debian bookworm guest under systemd-nspawn or qemu (TCG).

``guest.py`` is the harness; ``scripts/guest-root`` builds and caches the guest.
"""
