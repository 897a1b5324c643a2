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
from encfs.cli.settings import audit_settings, connect_vaults, vault2_settings, vault_settings
from encfs.keys import VolumeKeys
from encfs.vault import connect, parse_vault_url


def cmd_init(args: argparse.Namespace) -> ExitCode:
    if args.double != bool(args.vault2_url):
        print(
            "encfs: error: "
            + (
                "--double needs --vault2 URL: the vault key (KEK 2) that wraps the second "
                "volume key (another vault, or another key in the same one)"
                if args.double
                else "--vault2 is for a double-encrypted volume: add --double (or leave "
                "--vault2 out for a single-layer volume)"
            ),
            file=sys.stderr,
        )
        return ExitCode.USAGE
    url = parse_vault_url(args.vault)
    url2 = parse_vault_url(args.vault2_url) if args.double else None
    if url2 is not None and str(url2) == str(url):
        print(
            "encfs: error: --vault2 names the same vault key as --vault; double encryption "
            "needs two independent keys (another key, or another vault)",
            file=sys.stderr,
        )
        return ExitCode.USAGE
    try:
        fmt.validate_block_size(args.block_size)
    except ValueError as exc:
        print(f"encfs: error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    context = {} if url2 is None else {"vault2": str(url2)}
    audit = AuditLog(
        audit_settings(args), cipher_dir=str(args.cipher_dir), vault=str(url), **context
    )
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
            vault_url2=header.slots[1].vault_url if header.double else "",
        )

    vaults = []
    try:
        vaults.append(connect(url, vault_settings(args)))
        if url2 is not None:
            vaults.append(connect(url2, vault2_settings(args)))
        for number, vault in enumerate(vaults, 1):
            try:
                vault.check_capabilities("init")
            except errors.VaultError as exc:
                if url2 is not None:
                    exc.for_kek(number)
                raise
        header = volume.create(
            args.cipher_dir,
            vaults[0],
            block_size=args.block_size,
            on_keys=pin,
            outer_vault=vaults[1] if url2 is not None else None,
        )
    except errors.VaultError as exc:
        audit.error("init", exc, kek=exc.kek)
        raise
    finally:
        for vault in vaults:
            vault.close()
    fields: dict[str, Any] = {}
    if header.double:
        fields = {"kek_version2": header.slots[1].kek_version}
    audit.event("init", volume_id=header.volume_id.hex(), kek_version=header.kek_version, **fields)
    if args.json:
        doc: dict[str, Any] = {
            "cipher_dir": str(args.cipher_dir),
            "volume_id": header.volume_id.hex(),
            "vault": str(url),
            "kek_version": header.kek_version,
            "block_size": header.block_size,
            "features": fmt.feature_names(header.feature_flags),
            "pin_file": str(pins.pin_path(args.cipher_dir)),
        }
        if header.double:
            doc["vault2"] = str(url2)
            doc["kek_version2"] = header.slots[1].kek_version
            doc["outer_cipher"] = fmt.OUTER_CIPHER_NAMES[header.outer_cipher]
        print(json.dumps(doc, indent=2))
        return ExitCode.OK
    print(
        f"created {'double-encrypted ' if header.double else ''}volume "
        f"{header.volume_id.hex()} in {args.cipher_dir}"
    )
    if header.double:
        print(f"  KEK 1:     {url} (KEK version {header.kek_version}; inner layer AES-256-GCM)")
        print(
            f"  KEK 2:     {url2} (KEK version {header.slots[1].kek_version}; outer layer "
            f"{fmt.OUTER_CIPHER_NAMES[header.outer_cipher]})"
        )
    else:
        print(f"  vault key: {url} (KEK version {header.kek_version})")
    print(
        f"  pinned:    {pins.pin_path(args.cipher_dir)} (this host mounts only this volume there)"
    )
    extra = f" --vault2 {url2}" if url2 is not None else ""
    print(f"  mount it:  encfs mount {args.cipher_dir} MOUNTPOINT --vault {url}{extra}")
    return ExitCode.OK


def cmd_info(args: argparse.Namespace) -> ExitCode:
    hf = volume.read_header(args.cipher_dir)
    h = hf.header
    try:
        key_name = parse_vault_url(h.vault_url).key_name
    except errors.VaultConfigError:
        key_name = ""
    info: dict[str, Any] = {
        "cipher_dir": str(args.cipher_dir.resolve()),
        "format_version": h.format_version,
        "feature_flags": h.feature_flags,
        "features": fmt.feature_names(h.feature_flags),
        "volume_id": h.volume_id.hex(),
        "cipher": fmt.CIPHER_NAMES[h.cipher],
    }
    if h.double:
        info["outer_cipher"] = fmt.OUTER_CIPHER_NAMES[h.outer_cipher]
    info |= {
        "block_size": h.block_size,
        "vault": h.vault_url,
        "key_name": key_name,
        "kek_version": h.kek_version,
        "wrapped_key": h.wrapped_key,
    }
    for number, slot in enumerate(h.slots[1:], 2):  # KEK 2 of a double volume
        try:
            name = parse_vault_url(slot.vault_url).key_name
        except errors.VaultConfigError:
            name = ""
        info |= {
            f"vault{number}": slot.vault_url,
            f"key_name{number}": name,
            f"kek_version{number}": slot.kek_version,
            f"wrapped_key{number}": slot.wrapped_key,
        }
    for number, old in enumerate(h.retiring, 1):  # a rekey under way: `encfs rekey` ends it
        suffix = "" if number == 1 else str(number)
        info[f"retiring_kek_version{suffix}"] = old.kek_version
        info[f"retiring_wrapped_key{suffix}"] = old.wrapped_key
    info["header_file"] = str(hf.path)
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
    vaults = connect_vaults(args, hf)
    try:
        keys = volume.unlock(hf, *vaults)
        try:
            pins.check_pin(args.cipher_dir, hf.header.volume_id, keys, create=False)
        except BaseException:
            keys.close()
            raise
    finally:
        for vault in vaults:
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
    header = hf.header
    if args.kek == "2" and not header.double:
        print(
            f"encfs: error: --kek 2: {args.cipher_dir} is single-layer and has one KEK (1)",
            file=sys.stderr,
        )
        return ExitCode.USAGE
    slots = {"1": [0], "2": [1], "both": list(range(len(header.slots)))}[args.kek]
    vaults = connect_vaults(args, hf)
    urls = [str(vault.url) for vault in vaults]
    context = {"vault2": urls[1]} if header.double else {}
    audit = AuditLog(
        audit_settings(args),
        cipher_dir=str(args.cipher_dir),
        vault=urls[0],
        volume_id=header.volume_id.hex(),
        **context,
    )
    try:
        for number, vault in enumerate(vaults, 1):
            try:
                vault.check_capabilities("rotate" if number - 1 in slots else "mount")
            except errors.VaultError as exc:
                if header.double:
                    exc.for_kek(number)
                raise
        if pins.read_pin(args.cipher_dir) is not None:  # rotate only the volume pinned here
            keys = volume.unlock(hf, *vaults)
            try:
                pins.check_pin(args.cipher_dir, header.volume_id, keys, create=False)
            finally:
                keys.close()
        result = volume.rotate(args.cipher_dir, *vaults, slots=slots)
    except errors.EncfsError as exc:
        kek = exc.kek if isinstance(exc, errors.VaultError) else None
        audit.error("rotate", exc, kek_version=header.kek_version, kek=kek)
        raise
    finally:
        for vault in vaults:
            vault.close()
    for done in result.slots:
        fields: dict[str, Any] = {}
        if header.double:
            fields = {"kek": done.slot + 1, "vault": urls[done.slot]}
        audit.event(
            "rotate",
            kek_version=done.new_version,
            old_kek_version=done.old_version,
            changed=done.changed,
            **fields,
        )
    if args.json:
        doc: dict[str, Any] = {
            "cipher_dir": str(args.cipher_dir),
            "volume_id": header.volume_id.hex(),
            "changed": result.changed,
            "old_kek_version": result.old_version,
            "kek_version": result.new_version,
        }
        if header.double:
            doc["keks"] = [
                {
                    "kek": done.slot + 1,
                    "vault": urls[done.slot],
                    "changed": done.changed,
                    "old_kek_version": done.old_version,
                    "kek_version": done.new_version,
                }
                for done in result.slots
            ]
        print(json.dumps(doc, indent=2))
        return ExitCode.OK
    for done in result.slots:
        which = f" (KEK {done.slot + 1}, {urls[done.slot]})" if header.double else ""
        if done.changed:
            print(
                f"rotated {args.cipher_dir}{which}: volume key now wrapped with KEK version "
                f"{done.new_version} (was {done.old_version}); no data re-encrypted"
            )
        else:
            print(
                f"{args.cipher_dir}{which} already uses the newest KEK version "
                f"({done.new_version}); rotate the key in the vault first "
                "(bao write -f MOUNT/keys/KEY/rotate)"
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
