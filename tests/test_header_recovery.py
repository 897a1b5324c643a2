"""Operator mistakes around the volume header: damage is named as damage (never as a vault
or URL problem), a missing header is not mistaken for an empty directory, and
``encfs header backup`` / ``encfs header restore`` put a header back safely."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from pathlib import Path

import pytest

from encfs import format as fmt
from encfs.cli import ExitCode
from tests.conftest import TransitKey
from tests.harness import MakeVolume, Volume, encfs, is_mounted
from tests.openbao import OpenBao


def _header(vol: Volume) -> Path:
    return vol.cipher_dir / fmt.VOLUME_HEADER_NAME


def _mount(vol: Volume) -> tuple[int, str]:
    proc = encfs("mount", vol.cipher_dir, vol.mountpoint, *vol.audit_args(), env=vol.env)
    if proc.returncode == 0:
        return 0, proc.stderr
    assert not is_mounted(vol.mountpoint)
    return proc.returncode, proc.stderr


def _rotated(make_volume: MakeVolume, openbao: OpenBao, transit_key: TransitKey) -> Volume:
    """A volume with a file in it, rotated once: ``encfs.volume.prev`` holds KEK v1."""
    vol: Volume = make_volume()
    (vol.mountpoint / "f").write_text("keep me")
    vol.unmount()
    openbao.rotate_key(transit_key.name)
    encfs("rotate", vol.cipher_dir, env=vol.env, check=True)
    assert (vol.cipher_dir / fmt.VOLUME_HEADER_PREV).exists()
    return vol


def _url_offset(raw: bytes | bytearray, needle: bytes) -> int:
    url_len = int.from_bytes(raw[36:38], "big")
    at = raw[38 : 38 + url_len].index(needle)
    return 38 + at


def _restore_and_read(vol: Volume, *source: Path) -> None:
    proc = encfs("header", "restore", vol.cipher_dir, *source, env=vol.env)
    assert proc.returncode == 0, proc.stderr
    assert "restored the volume header" in proc.stdout
    vol.mount()
    assert (vol.mountpoint / "f").read_text() == "keep me"
    vol.unmount()


def test_flipped_url_byte_is_a_damaged_header(
    make_volume: MakeVolume,
    openbao: OpenBao,
    transit_key: TransitKey,
) -> None:
    vol = _rotated(make_volume, openbao, transit_key)
    raw = bytearray(_header(vol).read_bytes())
    raw[_url_offset(raw, b"/transit/") + 5] ^= 0x1C  # transit -> transht: still a URL
    _header(vol).write_bytes(bytes(raw))
    code, err = _mount(vol)
    assert code == ExitCode.BAD_VOLUME, err
    assert "is damaged" in err and "not the one this host pinned" in err
    assert "token lacks" not in err and "transit mount" not in err
    assert f"encfs header restore {vol.cipher_dir}" in err  # .prev parses: offered
    fsck = encfs("fsck", vol.cipher_dir, env=vol.env)
    assert fsck.returncode == ExitCode.BAD_VOLUME and "is damaged" in fsck.stderr
    _restore_and_read(vol)
    # the damaged header was kept for inspection, as the new .prev
    assert (vol.cipher_dir / fmt.VOLUME_HEADER_PREV).read_bytes() == bytes(raw)


def test_flipped_wrapped_key_byte_offers_the_previous_header(
    make_volume: MakeVolume,
    openbao: OpenBao,
    transit_key: TransitKey,
) -> None:
    vol = _rotated(make_volume, openbao, transit_key)
    raw = bytearray(_header(vol).read_bytes())
    at = raw.index(b"vault:v2:") + 20
    raw[at] = ord("B") if raw[at] != ord("B") else ord("C")  # still valid base64
    _header(vol).write_bytes(bytes(raw))
    code, err = _mount(vol)
    assert code == ExitCode.BAD_VOLUME, err
    assert "does not unwrap" in err and "may be damaged" in err
    assert "transit mount" not in err
    assert "encfs.volume.prev unwraps and its tag verifies" in err
    assert vol.audit_events()[-1]["error"] == "WrappedKeyRejected"
    _restore_and_read(vol)


def test_key_recreated_under_the_same_name(
    make_volume: MakeVolume,
    openbao: OpenBao,
    transit_key: TransitKey,
) -> None:
    vol: Volume = make_volume(mount=False)
    openbao.delete_key(transit_key.name)
    openbao.create_key(transit_key.name)
    code, err = _mount(vol)
    assert code == ExitCode.BAD_VOLUME, err
    assert "re-created under the same name" in err
    assert "transit mount" not in err


def test_tag_mismatch_offers_the_previous_header(
    make_volume: MakeVolume,
    openbao: OpenBao,
    transit_key: TransitKey,
) -> None:
    vol = _rotated(make_volume, openbao, transit_key)
    raw = bytearray(_header(vol).read_bytes())
    raw[-1] ^= 0x01
    _header(vol).write_bytes(bytes(raw))
    code, err = _mount(vol)
    assert code == ExitCode.HEADER_AUTH, err
    assert "encfs.volume.prev unwraps and its tag verifies" in err
    _restore_and_read(vol)


def test_truncated_header_is_damaged_and_prev_is_offered(
    make_volume: MakeVolume,
    openbao: OpenBao,
    transit_key: TransitKey,
) -> None:
    vol = _rotated(make_volume, openbao, transit_key)
    _header(vol).write_bytes(_header(vol).read_bytes()[:60])
    code, err = _mount(vol)
    assert code == ExitCode.BAD_VOLUME, err
    assert "is damaged: volume header truncated" in err
    assert f"encfs header restore {vol.cipher_dir}" in err
    _restore_and_read(vol)


def test_missing_header_is_not_an_empty_directory(
    make_volume: MakeVolume,
    tmp_path: Path,
    transit_key: TransitKey,
) -> None:
    vol: Volume = make_volume()
    (vol.mountpoint / "f").write_text("keep me")
    vol.unmount()
    backup = tmp_path / "hdr.backup"
    proc = encfs("header", "backup", vol.cipher_dir, backup, env=vol.env)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    assert backup.read_bytes() == _header(vol).read_bytes()
    again = encfs("header", "backup", vol.cipher_dir, backup, env=vol.env)
    assert again.returncode != 0 and "refusing to overwrite" in again.stderr
    _header(vol).unlink()
    cmds: list[list[str | Path]] = [
        ["mount", vol.cipher_dir, vol.mountpoint],
        ["info", vol.cipher_dir],
    ]
    for cmd in cmds:
        proc = encfs(*cmd, env=vol.env)
        assert proc.returncode == ExitCode.NO_VOLUME, proc.stderr
        assert "the volume header is missing" in proc.stderr
        assert "encfs header restore" in proc.stderr and "Do not run `encfs init`" in proc.stderr
    init = encfs("init", vol.cipher_dir, "--vault", transit_key.url, env=vol.env)
    assert init.returncode == ExitCode.VOLUME_EXISTS and "header is missing" in init.stderr
    no_prev = encfs("header", "restore", vol.cipher_dir, env=vol.env)
    assert no_prev.returncode == ExitCode.NO_VOLUME and "no encfs.volume.prev" in no_prev.stderr
    _restore_and_read(vol, backup)


def test_restore_refusals(make_volume: MakeVolume, tmp_path: Path) -> None:
    vol: Volume = make_volume()
    other: Volume = make_volume(mount=False, name="other")
    other_backup = tmp_path / "other.backup"
    encfs("header", "backup", other.cipher_dir, other_backup, env=vol.env, check=True)
    before = _header(vol).read_bytes()
    busy = encfs("header", "restore", vol.cipher_dir, other_backup, env=vol.env)
    assert busy.returncode == ExitCode.VOLUME_IN_USE, busy.stderr  # mounted: refused
    vol.unmount()
    proc = encfs("header", "restore", vol.cipher_dir, other_backup, env=vol.env)
    assert proc.returncode == ExitCode.VOLUME_MISMATCH, proc.stderr
    assert "pinned volume" in proc.stderr
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"not a header at all, but long enough to be read" * 2)
    proc = encfs("header", "restore", vol.cipher_dir, garbage, env=vol.env)
    assert proc.returncode == ExitCode.BAD_VOLUME and "bad magic" in proc.stderr
    assert _header(vol).read_bytes() == before
    assert not (vol.cipher_dir / fmt.VOLUME_HEADER_PREV).exists()
    same = encfs("header", "restore", vol.cipher_dir, other_backup.with_name("x"), env=vol.env)
    assert same.returncode == ExitCode.FAILURE  # a missing FILE is an error, not .prev
    vol.mount()


def test_info_and_init_json(tmp_path: Path, transit_key: TransitKey) -> None:
    proc = encfs("init", tmp_path / "c", "--vault", transit_key.url, "--json", env=transit_key.env)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["vault"] == transit_key.url and doc["kek_version"] == 1
    assert len(bytes.fromhex(doc["volume_id"])) == 16 and doc["block_size"] == 4096
    assert Path(doc["pin_file"]).exists()
    pin = json.loads(Path(doc["pin_file"]).read_text())
    assert pin["vault_url"] == transit_key.url and pin["block_size"] == "4096"


def test_rotate_json(make_volume: MakeVolume, openbao: OpenBao, transit_key: TransitKey) -> None:
    vol: Volume = make_volume(mount=False)
    doc = json.loads(encfs("rotate", vol.cipher_dir, "--json", env=vol.env, check=True).stdout)
    assert (doc["changed"], doc["kek_version"]) == (False, 1)
    openbao.rotate_key(transit_key.name)
    doc = json.loads(encfs("rotate", vol.cipher_dir, "--json", env=vol.env, check=True).stdout)
    assert (doc["changed"], doc["old_kek_version"], doc["kek_version"]) == (True, 1, 2)


def test_header_findings_need_no_vault(tmp_path: Path) -> None:
    """Structural checks against the header's own fields and the pin, offline."""
    from encfs import pins, volume

    header = fmt.VolumeHeader(
        format_version=1,
        feature_flags=1,
        cipher=1,
        block_size=4096,
        volume_id=bytes(range(16)),
        slots=(fmt.KeySlot("transit+http://127.0.0.1:8200/transit/k", 2, "vault:v2:" + "A" * 80),),
    )
    hf = volume.HeaderFile(header, header.body(), bytes(32), tmp_path / "encfs.volume")
    assert volume.header_findings(hf, None) == []
    pin = pins.Pin(
        str(tmp_path),
        bytes(range(16)).hex(),
        "00",
        "t",
        "init",
        vault_url="transit+http://127.0.0.1:8200/transit/j",
        block_size="8192",
    )
    found = volume.header_findings(hf, pin)
    assert len(found) == 2 and "pinned" in found[0] and "block size 4096" in found[1]
    bad = header.with_slot(0, kek_version=3, vault_url="transit+http://127.0.0.1:8200")
    found = volume.header_findings(volume.HeaderFile(bad, bad.body(), bytes(32), hf.path), None)
    assert any("not a vault URL" in f for f in found)
    assert any("KEK version field says 3" in f for f in found)
    bad = header.with_slot(0, wrapped_key="vault:v2:!!!")
    found = volume.header_findings(volume.HeaderFile(bad, bad.body(), bytes(32), hf.path), None)
    assert found and "not a transit ciphertext" in found[0]


@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_before_or_after_the_command(where: str) -> None:
    from encfs.cli import build_parser, verbosity

    argv = ["-vv", "info", "/x"] if where == "before" else ["info", "/x", "-vv"]
    assert verbosity(build_parser().parse_args(argv)) == 2
    assert verbosity(build_parser().parse_args(["-v", "pin", "show", "/x", "-v"])) == 2
    assert verbosity(build_parser().parse_args(["header", "backup", "/x", "/y"])) == 0


def test_broken_pipe_exits_quietly(make_volume: MakeVolume) -> None:
    import subprocess
    import sys

    vol: Volume = make_volume(mount=False)
    for args in (["info", str(vol.cipher_dir)], ["--help"], ["status"]):
        proc = subprocess.Popen(
            [sys.executable, "-m", "encfs", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**vol.env, "ENCFS_AUDIT_LOG": "none"},
        )
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()  # the reader is gone before encfs writes (like `| head -0`)
        err = proc.stderr.read().decode()
        proc.wait(timeout=30)
        assert "Traceback" not in err and "Broken pipe" not in err, err
        assert err == "", err


def test_fsck_progress(make_volume: MakeVolume, capsys: pytest.CaptureFixture[str]) -> None:
    vol: Volume = make_volume()
    for i in range(5):
        (vol.mountpoint / f"f{i}").write_bytes(os.urandom(10000))
    vol.unmount()
    proc = encfs("fsck", vol.cipher_dir, "--progress", env=vol.env)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    assert lines and lines[-1]["kind"] == "progress" and lines[-1]["files"] == 5
    quiet = encfs("fsck", vol.cipher_dir, env=vol.env)  # not a tty, not asked: none
    assert "progress" not in quiet.stderr
    from encfs.cli.volume import _FsckProgress
    from encfs.fsck import Report

    shown = _FsckProgress(tty=True)
    shown.next = 0.0
    shown.update(Report(files=7, blocks=9))
    shown.done()
    err = capsys.readouterr().err
    assert "\rfsck: 7 files, 0 directories, 9 blocks checked" in err and err.endswith("\x1b[K")


def test_readme_synopsis_lists_every_option() -> None:
    """Every option of every command (but -h and -v) appears in README's synopsis, in the
    entry of its command (or in the "vault access" / "second vault" block the entry refers
    to)."""
    import argparse
    import re

    from encfs.cli.parser import _subparsers, build_parser

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = readme.split("## Command line", 1)[1].split("```", 2)[1]
    entries: dict[str, str] = {}
    current = ""
    for line in block.splitlines():
        m = re.match(r"encfs (\w+)", line)
        if m:
            current = m.group(1)
            entries[current] = entries.get(current, "") + line + "\n"
        elif line.startswith(" ") and current:
            entries[current] += line + "\n"
        elif line.startswith(("vault access:", "second vault:")):
            current = line.split(":", 1)[0]
            entries[current] = line + "\n"
    top = build_parser()
    for action in top._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for name, parser in action.choices.items():
            if name == "umount":
                continue
            assert name in entries, f"README synopsis lacks `encfs {name}`"
            text = entries[name]
            if "[vault access]" in text:
                text += entries["vault access"]
            if "[second vault]" in text:
                text += entries["second vault"]
            for sub in [parser, *_subparsers(parser)]:
                for opt in sub._actions:
                    if not opt.option_strings or opt.help == argparse.SUPPRESS:
                        continue
                    if opt.dest in ("help", "sub_verbose"):
                        continue
                    longest = max(opt.option_strings, key=len)
                    assert re.search(re.escape(longest) + r"(?![\w-])", text), (
                        f"README synopsis of `encfs {name}` lacks {longest}"
                    )


def test_header_findings_of_a_double_volume(tmp_path: Path) -> None:
    """Each key slot is checked on its own; against the pin, slot 1's URL and the volume's
    kind (single-layer or double) never change after init."""
    from encfs import pins, volume

    url2 = "kmip://127.0.0.1:5696/outer"
    header = fmt.VolumeHeader(
        format_version=1,
        feature_flags=fmt.FEATURE_DIRID_LINKS | fmt.FEATURE_DOUBLE,
        cipher=1,
        block_size=4096,
        volume_id=bytes(range(16)),
        slots=(
            fmt.KeySlot("transit+http://127.0.0.1:8200/transit/k", 2, "vault:v2:" + "A" * 80),
            fmt.KeySlot(url2, 0, "kmip:v1:" + "B" * 80),
        ),
        outer_cipher=fmt.OUTER_CIPHER_CHACHA20_POLY1305,
    )

    def findings(h: fmt.VolumeHeader, pin: pins.Pin | None) -> list[str]:
        return volume.header_findings(volume.HeaderFile(h, h.body(), bytes(32), tmp_path), pin)

    def pin(**fields: str) -> pins.Pin:
        return pins.Pin(str(tmp_path), bytes(range(16)).hex(), "00", "t", "init", **fields)

    assert findings(header, None) == []
    assert findings(header, pin(vault_url2=url2, key_check2="11")) == []
    bad = header.with_slot(1, kek_version=3)
    assert findings(bad, None) == ["its KEK version field (KEK 2) says 3; a kmip key has none (0)"]
    bad = header.with_slot(1, wrapped_key="vault:v1:" + "C" * 80)
    assert "wrapped key (KEK 2)" in findings(bad, None)[0]
    moved = header.with_slot(1, vault_url="kmip://127.0.0.1:5696/other")
    assert "vault URL (KEK 2)" in findings(moved, pin(vault_url2=url2, key_check2="11"))[0]
    [only] = findings(header, pin())  # the pin of a single-layer volume
    assert "double-encrypted, but this host pinned" in only
    single = dataclasses.replace(
        header, feature_flags=fmt.FEATURE_DIRID_LINKS, slots=header.slots[:1], outer_cipher=0
    )
    [only] = findings(single, pin(vault_url2=url2, key_check2="11"))
    assert "single-layer, but this host pinned" in only
