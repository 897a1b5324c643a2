"""``encfs rekey``: re-encrypt a volume under a new volume key, mounted or not, and show how
far it is (a bar on a terminal, JSON lines when asked, a summary at the end)."""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

from encfs import backing, errors, mounts, rekey, volume
from encfs.audit import AuditLog
from encfs.cli.output import ExitCode
from encfs.cli.settings import audit_settings, connect_vaults


def cmd_rekey(args: argparse.Namespace) -> ExitCode:
    cipher_dir = args.cipher_dir
    volume.require_cipher_dir(cipher_dir)
    holder = backing.volume_holder(backing.open_root(str(cipher_dir)))
    if holder is not None:
        mountpoint = mounts.mountpoint_of(cipher_dir)
        if mountpoint is None:
            raise errors.VolumeBusy(
                f"{cipher_dir} is in use by {holder}, which answers no rekey request",
                hint="wait until it is done, or unmount it and run `encfs rekey` again",
            )
        return rekey_mounted(args, mountpoint)
    hf = volume.read_checked_header(cipher_dir)
    progress = rekey.RekeyProgress()
    vaults = connect_vaults(args, hf)
    context = {"vault2": str(vaults[1].url)} if len(vaults) > 1 else {}
    audit = AuditLog(
        audit_settings(args),
        cipher_dir=str(cipher_dir),
        vault=str(vaults[0].url),
        volume_id=hf.header.volume_id.hex(),
        **context,
    )
    view = None
    try:
        for vault in vaults:
            vault.check_capabilities("init")  # datakey, as init: a new volume key
            vault.check_capabilities("mount")
        view = ProgressView.choose(args.progress, progress)
        final = rekey.run_offline(cipher_dir, vaults, progress, threading.Event())
    except errors.EncfsError as exc:
        audit.error("rekey", exc, **summary_fields(progress))
        raise
    finally:
        for vault in vaults:
            vault.close()
        if view is not None:
            view.stop()
    audit.event("rekey", kek_version=final.header.kek_version, **summary_fields(progress))
    report(args, progress, final.header.kek_version)
    return ExitCode.OK


def rekey_mounted(args: argparse.Namespace, mountpoint: Path) -> ExitCode:
    """Ask the daemon serving ``mountpoint`` to rekey (or to report the rekey it runs) and
    follow its progress until it ends; the daemon goes on if this command is killed."""
    sock = mounts.status_socket(mountpoint)
    try:
        answer = mounts.ask(sock, "rekey")
    except (OSError, ValueError) as exc:
        raise errors.MountError(
            f"the encfs daemon of {mountpoint} does not answer: {exc}"
        ) from None
    if "error" in answer:
        raise errors.VolumeBusy(f"the daemon of {mountpoint} refuses to rekey: {answer['error']}")
    progress = rekey.RekeyProgress()
    view = ProgressView.choose(args.progress, progress)
    print(
        f"encfs: rekey of {args.cipher_dir} {'started' if answer.get('started') else 'running'} "
        f"in the daemon of {mountpoint}; it goes on if this command stops",
        file=sys.stderr,
    )
    try:
        while True:
            try:
                doc = mounts.ask(sock).get("rekey") or {}
            except (OSError, ValueError):
                raise errors.MountError(
                    f"the daemon of {mountpoint} went away during the rekey; after the next "
                    f"mount, `encfs rekey {args.cipher_dir}` finishes it"
                ) from None
            progress.load(doc)
            if progress.state in ("done", "failed", "stopped"):
                break
            time.sleep(0.2)
    finally:
        if view is not None:
            view.stop()
    if progress.state != "done":
        why = progress.error or progress.state
        if progress.problems or "open under neither" in why:
            raise errors.RekeyIncomplete(
                f"the rekey of {args.cipher_dir} did not finish: {why}",
                hint=f"see `encfs fsck {args.cipher_dir}`; fix what it names, then run rekey again",
            )
        raise errors.EncfsError(f"the rekey of {args.cipher_dir} did not finish: {why}")
    hf = volume.read_header(args.cipher_dir)
    report(args, progress, hf.header.kek_version)
    return ExitCode.OK


def summary_fields(progress: rekey.RekeyProgress) -> dict[str, Any]:
    doc = progress.as_dict()
    return {
        k: doc[k]
        for k in ("names_renamed", "blocks_resealed", "symlinks_resealed", "xattrs_resealed")
    } | {"elapsed": doc["elapsed"]}


def report(args: argparse.Namespace, progress: rekey.RekeyProgress, kek_version: int) -> None:
    doc = progress.as_dict()
    if args.json:
        out = {"cipher_dir": str(args.cipher_dir), "kek_version": kek_version}
        out |= {k: v for k, v in doc.items() if k != "problem_list"}
        print(json.dumps(out, indent=2))
        return
    mib = doc["bytes"] / (1 << 20)
    rate = doc["bytes_per_second"] / 1e6
    print(
        f"rekeyed {args.cipher_dir}: {doc['names_renamed']} names, {doc['blocks_resealed']} "
        f"blocks ({mib:.1f} MiB of content read, {rate:.0f} MB/s), "
        f"{doc['symlinks_resealed']} symlinks and {doc['xattrs_resealed']} xattrs re-sealed "
        f"in {doc['elapsed']:.1f} s; the old volume key is gone (new key wrapped with KEK "
        f"version {kek_version})"
    )


class ProgressView:
    """Shows a running rekey's progress on stderr from a thread of its own: a bar rewritten
    in place on a terminal (5 per second), JSON lines otherwise (1 per second), and one
    last line when stopped."""

    def __init__(self, progress: rekey.RekeyProgress, tty: bool) -> None:
        self.progress = progress
        self.tty = tty
        self.interval = 0.2 if tty else 1.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="encfs-progress", daemon=True)
        self._thread.start()

    @classmethod
    def choose(cls, asked: bool | None, progress: rekey.RekeyProgress) -> ProgressView | None:
        """A bar on a terminal, JSON lines elsewhere; none with ``--no-progress``."""
        if asked is False:
            return None
        return cls(progress, sys.stderr.isatty())

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.show()

    def show(self) -> None:
        doc = self.progress.as_dict()
        if self.tty:
            total = max(doc["bytes_total"], 1)
            share = min(doc["bytes"] / total, 1.0)
            bar = "#" * int(share * 30)
            sys.stderr.write(
                f"\rrekey [{bar:<30}] {share:4.0%} {doc['files']}/{doc['files_total']} files, "
                f"{doc['dirs']}/{doc['dirs_total']} dirs, "
                f"{doc['bytes_per_second'] / 1e6:.0f} MB/s, {doc['state']}\x1b[K"
            )
        else:
            sys.stderr.write(
                json.dumps(
                    {"kind": "progress"} | {k: v for k, v in doc.items() if k != "problem_list"}
                )
                + "\n"
            )
        sys.stderr.flush()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        if self.tty:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
        else:
            self.show()
