"""The commands on a volume at rest: ``init``, ``info``, ``fsck``, ``rotate``, ``header
backup/restore`` and ``pin show/reset``, and what they print."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from encfs import backing, errors, pins, volume
from encfs import format as fmt
from encfs.audit import AuditLog
from encfs.cli.output import ExitCode
from encfs.cli.settings import audit_settings, pinned_url, vault_settings
from encfs.keys import VolumeKeys
from encfs.vault import connect, parse_vault_url


def cmd_init(args: argparse.Namespace) -> ExitCode:
    url = parse_vault_url(args.vault)
    try:
        fmt.validate_block_size(args.block_size)
    except ValueError as exc:
        print(f"encfs: error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    audit = AuditLog(audit_settings(args), cipher_dir=str(args.cipher_dir), vault=str(url))
    note = volume.prepare_cipher_dir(args.cipher_dir)
    if note:
        print(f"encfs: note: {note}", file=sys.stderr)

    def pin(header: fmt.VolumeHeader, keys: VolumeKeys) -> None:
        pins.write_pin(
            args.cipher_dir,
            header.volume_id,
            keys,
            by="init",
            vault_url=header.vault_url,
            block_size=header.block_size,
        )

    vault = connect(url, vault_settings(args))
    try:
        vault.check_capabilities("init")
        header = volume.create(args.cipher_dir, vault, block_size=args.block_size, on_keys=pin)
    except errors.VaultError as exc:
        audit.error("init", exc)
        raise
    finally:
        vault.close()
    audit.event("init", volume_id=header.volume_id.hex(), kek_version=header.kek_version)
    if args.json:
        doc = {
            "cipher_dir": str(args.cipher_dir),
            "volume_id": header.volume_id.hex(),
            "vault": str(url),
            "kek_version": header.kek_version,
            "block_size": header.block_size,
            "features": fmt.feature_names(header.feature_flags),
            "pin_file": str(pins.pin_path(args.cipher_dir)),
        }
        print(json.dumps(doc, indent=2))
        return ExitCode.OK
    print(f"created volume {header.volume_id.hex()} in {args.cipher_dir}")
    print(f"  vault key: {url} (KEK version {header.kek_version})")
    print(
        f"  pinned:    {pins.pin_path(args.cipher_dir)} (this host mounts only this volume there)"
    )
    print(f"  mount it:  encfs mount {args.cipher_dir} MOUNTPOINT --vault {url}")
    return ExitCode.OK


def cmd_info(args: argparse.Namespace) -> ExitCode:
    hf = volume.read_header(args.cipher_dir)
    h = hf.header
    try:
        key_name = parse_vault_url(h.vault_url).key_name
    except errors.VaultConfigError:
        key_name = ""
    info = {
        "cipher_dir": str(args.cipher_dir.resolve()),
        "format_version": h.format_version,
        "feature_flags": h.feature_flags,
        "features": fmt.feature_names(h.feature_flags),
        "volume_id": h.volume_id.hex(),
        "cipher": fmt.CIPHER_NAMES[h.cipher],
        "block_size": h.block_size,
        "vault": h.vault_url,
        "key_name": key_name,
        "kek_version": h.kek_version,
        "wrapped_key": h.wrapped_key,
        "header_file": str(hf.path),
    }
    for old in h.retiring:  # a rekey under way: `encfs rekey` finishes it
        info["retiring_kek_version"] = old.kek_version
        info["retiring_wrapped_key"] = old.wrapped_key
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            if isinstance(value, list):
                value = ", ".join(value) or "none"
            print(f"{key.replace('_', ' '):<{width}}  {value}")
        print("(header tag not verified: that needs the vault; `encfs fsck` verifies it)")
    return ExitCode.OK


def cmd_fsck(args: argparse.Namespace) -> ExitCode:
    from encfs import fsck

    hf = volume.read_checked_header(args.cipher_dir)
    vault = connect(pinned_url(args, hf), vault_settings(args))
    try:
        keys = volume.unlock(hf, vault)
        try:
            pins.check_pin(args.cipher_dir, hf.header.volume_id, keys, create=False)
        except BaseException:
            keys.close()
            raise
    finally:
        vault.close()
    root = backing.open_root(str(args.cipher_dir))
    lock: int | None = None
    try:
        if args.repair:
            lock = backing.lock_volume(root, f"encfs fsck --repair (pid {os.getpid()})")
        elif (holder := backing.volume_holder(root)) is not None:
            print(
                f"encfs: warning: {args.cipher_dir} is in use by {holder}; writes made while "
                "fsck runs may show as problems (unmount it for a clean check)",
                file=sys.stderr,
            )
        progress = _FsckProgress.choose(args.progress)
        try:
            report = fsck.check(
                args.cipher_dir,
                keys,
                hf.header.block_size,
                repair=args.repair,
                progress=progress.update if progress else None,
            )
        finally:
            if progress:
                progress.done()
    finally:
        keys.close()
        if lock is not None:
            os.close(lock)
    for problem in report.problems:
        print(json.dumps(problem.as_dict()) if args.json else problem)
    left = report.unrepaired
    repaired = len(report.problems) - len(left)
    if args.json:
        summary: dict[str, object] = {
            "kind": "summary",
            "files": report.files,
            "dirs": report.dirs,
            "blocks": report.blocks,
            "symlinks": report.symlinks,
            "xattrs": report.xattrs,
            "problems": len(report.problems),
            "repaired": repaired,
            "undo_files": report.undo_files,
        }
        print(json.dumps(summary))
    else:
        print(
            f"{report.files} files, {report.dirs} directories, {report.blocks} blocks "
            f"checked: {len(report.problems)} problem(s)"
            + (f", {repaired} repaired" if args.repair else "")
        )
        if report.undo_files:
            print(
                f"{report.undo_files} undo file(s) left by a crash"
                + (": used and removed" if args.repair else " (--repair uses and removes them)")
            )
    return ExitCode.CORRUPT if left else ExitCode.OK


class _FsckProgress:
    """fsck's progress on stderr, at most every ``interval`` seconds (the callback itself
    only compares the clock): a line rewritten in place on a terminal, JSON lines
    otherwise (only when asked: ``--progress``)."""

    def __init__(self, tty: bool) -> None:
        self.tty = tty
        self.interval = 0.2 if tty else 1.0
        self.start = time.monotonic()
        self.next = self.start + self.interval
        self.shown = False
        self.last: Any = None

    @classmethod
    def choose(cls, asked: bool | None) -> _FsckProgress | None:
        tty = sys.stderr.isatty()
        if asked is False or (asked is None and not tty):
            return None
        return cls(tty)

    def update(self, report: Any) -> None:
        self.last = report
        now = time.monotonic()
        if now < self.next:
            return
        self.next = now + self.interval
        self.show(report, now)

    def show(self, report: Any, now: float) -> None:
        elapsed = now - self.start
        if self.tty:
            sys.stderr.write(
                f"\rfsck: {report.files} files, {report.dirs} directories, {report.blocks} "
                f"blocks checked, {len(report.problems)} problem(s), {elapsed:.0f} s\x1b[K"
            )
        else:
            doc = {
                "kind": "progress",
                "files": report.files,
                "dirs": report.dirs,
                "blocks": report.blocks,
                "problems": len(report.problems),
                "elapsed": round(elapsed, 1),
            }
            sys.stderr.write(json.dumps(doc) + "\n")
        sys.stderr.flush()
        self.shown = True

    def done(self) -> None:
        """Clear the terminal line; in JSON mode, one last line with the final counts."""
        if self.tty and self.shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
        elif not self.tty and self.last is not None:
            self.show(self.last, time.monotonic())


def cmd_rotate(args: argparse.Namespace) -> ExitCode:
    hf = volume.read_checked_header(args.cipher_dir)
    url = pinned_url(args, hf)
    audit = AuditLog(
        audit_settings(args),
        cipher_dir=str(args.cipher_dir),
        vault=str(url),
        volume_id=hf.header.volume_id.hex(),
    )
    vault = connect(url, vault_settings(args))
    try:
        vault.check_capabilities("rotate")
        if pins.read_pin(args.cipher_dir) is not None:  # rotate only the volume pinned here
            keys = volume.unlock(hf, vault)
            try:
                pins.check_pin(args.cipher_dir, hf.header.volume_id, keys, create=False)
            finally:
                keys.close()
        result = volume.rotate(args.cipher_dir, vault)
    except errors.EncfsError as exc:
        audit.error("rotate", exc, kek_version=hf.header.kek_version)
        raise
    finally:
        vault.close()
    audit.event(
        "rotate",
        kek_version=result.new_version,
        old_kek_version=result.old_version,
        changed=result.changed,
    )
    if args.json:
        doc = {
            "cipher_dir": str(args.cipher_dir),
            "volume_id": hf.header.volume_id.hex(),
            "changed": result.changed,
            "old_kek_version": result.old_version,
            "kek_version": result.new_version,
        }
        print(json.dumps(doc, indent=2))
    elif result.changed:
        print(
            f"rotated {args.cipher_dir}: volume key now wrapped with KEK version "
            f"{result.new_version} (was {result.old_version}); no data re-encrypted"
        )
    else:
        print(
            f"{args.cipher_dir} already uses the newest KEK version ({result.new_version}); "
            "rotate the key in the vault first (bao write -f MOUNT/keys/KEY/rotate)"
        )
    return ExitCode.OK


def cmd_header(args: argparse.Namespace) -> ExitCode:
    if args.header_command == "backup":
        try:
            hf = volume.backup_header(args.cipher_dir, args.file)
        except FileExistsError:
            print(f"encfs: error: {args.file} exists; refusing to overwrite it", file=sys.stderr)
            return ExitCode.FAILURE
        print(
            f"backed up {hf.path} to {args.file} (volume {hf.header.volume_id.hex()}, KEK "
            f"version {hf.header.kek_version}); keep it away from the cipher dir's disk"
        )
        return ExitCode.OK
    result = volume.restore_header(args.cipher_dir, args.file)
    h = result.header.header
    source = args.file or args.cipher_dir / fmt.VOLUME_HEADER_PREV
    if not result.changed:
        print(f"{result.header.path} already is the header in {source}; nothing written")
        return ExitCode.OK
    print(
        f"restored the volume header of {args.cipher_dir} from {source} (volume "
        f"{h.volume_id.hex()}, KEK version {h.kek_version}); the header it replaced is kept "
        f"as {fmt.VOLUME_HEADER_PREV}. Its tag is verified by the next mount or "
        f"`encfs fsck {args.cipher_dir}`"
    )
    return ExitCode.OK


def cmd_pin(args: argparse.Namespace) -> ExitCode:
    if args.pin_command == "reset":
        if pins.reset_pin(args.cipher_dir):
            print(f"forgot the pin of {args.cipher_dir}; the next mount pins what it finds")
        else:
            print(f"{args.cipher_dir} was not pinned ({pins.pin_path(args.cipher_dir)})")
        return ExitCode.OK
    pin = pins.read_pin(args.cipher_dir)
    if pin is None:
        print(f"{args.cipher_dir} is not pinned on this host", file=sys.stderr)
        return ExitCode.NO_VOLUME
    doc = {**pin.__dict__, "pin_file": str(pins.pin_path(args.cipher_dir))}
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        for key, value in doc.items():
            print(f"{key.replace('_', ' '):<12} {value}")
    return ExitCode.OK
