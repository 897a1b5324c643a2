"""Tampering with the cipher dir: reads give EIO or a clear refusal, never wrong plaintext;
the daemon names file and block in one log line; fsck reports every problem."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
from pathlib import Path

import pytest

from encfs import format as fmt
from encfs.cli import ExitCode
from tests.harness import MakeVolume, Volume, encfs, force_unmount, is_mounted, wait_until

BS = 4096
CBS = BS + fmt.BLOCK_OVERHEAD


def _backing_of(vol: Volume, size: int) -> Path:
    """The backing file of the one plaintext file with ``size`` bytes."""
    want = vol.geometry.cipher_size(size)
    hits = [
        p
        for p in vol.cipher_dir.rglob("*")
        if p.is_file() and not p.name.startswith((".encfs", "encfs")) and p.stat().st_size == want
    ]
    assert len(hits) == 1, hits
    return hits[0]


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def _read_fails_eio(path: Path, secret: bytes) -> None:
    with pytest.raises(OSError) as info:
        data = path.read_bytes()
        assert secret not in data  # never wrong plaintext, even if the read "worked"
    assert info.value.errno == errno.EIO


def _fsck(vol: Volume, *extra: str) -> tuple[int, str]:
    proc = _fsck_run(vol, *extra)
    return proc.returncode, proc.stdout + proc.stderr


def _fsck_run(vol: Volume, *extra: str) -> subprocess.CompletedProcess[str]:
    """``encfs fsck`` of ``vol`` (the first vault pinned by VAULT_ADDR, the second of a
    double volume by its --vault2 options)."""
    return encfs("fsck", vol.cipher_dir, *extra, *vol.vault2_args(), env=vol.env)


LAYERS = ["single", "double"]
"""The tests that run on both kinds of volume (``populated_either``, ``layers``): those
about content blocks, their tampering and their repair, where the layers differ."""


@pytest.fixture
def populated(make_volume: MakeVolume) -> Volume:
    return _populate(make_volume())


@pytest.fixture(params=LAYERS)
def populated_either(make_volume: MakeVolume, request: pytest.FixtureRequest) -> Volume:
    """``populated``, single-layer and double-encrypted."""
    return _populate(make_volume(double=request.param == "double"))


def _populate(vol: Volume) -> Volume:
    m = vol.mountpoint
    # fmt: off
    (m / "a.bin").write_bytes(b"A" * (3 * BS))           # 3 blocks
    (m / "b.bin").write_bytes(b"B" * (3 * BS + 1))       # 4 blocks (last 1 byte)
    # fmt: on
    (m / "dir").mkdir()
    (m / "dir" / "note.txt").write_bytes(b"hello tamper")
    os.symlink("a.bin", m / "link")
    os.setxattr(m / "a.bin", "user.color", b"blue")
    (m / ("L" * 240)).write_bytes(b"long name content")
    vol.unmount()
    code, out = _fsck(vol)
    assert code == ExitCode.OK, out
    assert "0 problem(s)" in out
    return vol


def test_flip_bit_in_block(populated_either: Volume) -> None:
    vol = populated_either
    cbs = vol.geometry.cipher_block_size
    _flip(_backing_of(vol, 3 * BS), fmt.FILE_HEADER_LEN + cbs + 100)  # block 1
    vol.mount()
    f = vol.mountpoint / "a.bin"
    with open(f, "rb") as h:
        assert h.read(BS) == b"A" * BS  # block 0 is intact
        with pytest.raises(OSError) as info:
            h.read(BS)
        assert info.value.errno == errno.EIO
    vol.unmount()
    log = vol.log_file.read_text() if vol.log_file else ""
    assert "block 1" in log and "integrity" in log
    code, out = _fsck(vol)
    assert code == ExitCode.CORRUPT
    assert "block 1 of /a.bin" in out


def test_swap_two_blocks(populated_either: Volume) -> None:
    vol = populated_either
    cbs = vol.geometry.cipher_block_size
    backing = _backing_of(vol, 3 * BS)
    raw = bytearray(backing.read_bytes())
    o0, o1 = fmt.FILE_HEADER_LEN, fmt.FILE_HEADER_LEN + cbs
    raw[o0 : o0 + cbs], raw[o1 : o1 + cbs] = raw[o1 : o1 + cbs], raw[o0 : o0 + cbs]
    backing.write_bytes(bytes(raw))
    vol.mount()
    _read_fails_eio(vol.mountpoint / "a.bin", b"A" * BS)
    vol.unmount()
    code, out = _fsck(vol)
    assert code == ExitCode.CORRUPT
    assert "block 0 of /a.bin" in out and "block 1 of /a.bin" in out


def test_block_copied_from_other_file(populated_either: Volume) -> None:
    vol = populated_either
    cbs = vol.geometry.cipher_block_size
    a, b = _backing_of(vol, 3 * BS), _backing_of(vol, 3 * BS + 1)
    raw_a = bytearray(a.read_bytes())
    raw_b = b.read_bytes()
    o = fmt.FILE_HEADER_LEN
    raw_a[o : o + cbs] = raw_b[o : o + cbs]
    a.write_bytes(bytes(raw_a))
    vol.mount()
    with pytest.raises(OSError) as info:
        data = (vol.mountpoint / "a.bin").read_bytes()
        assert b"B" * 100 not in data
    assert info.value.errno == errno.EIO
    vol.unmount()
    assert _fsck(vol)[0] == ExitCode.CORRUPT


def test_swap_file_headers(populated: Volume) -> None:
    vol = populated
    a, b = _backing_of(vol, 3 * BS), _backing_of(vol, 3 * BS + 1)
    ra, rb = bytearray(a.read_bytes()), bytearray(b.read_bytes())
    h = fmt.FILE_HEADER_LEN
    ra[:h], rb[:h] = rb[:h], ra[:h]
    a.write_bytes(bytes(ra))
    b.write_bytes(bytes(rb))
    vol.mount()
    _read_fails_eio(vol.mountpoint / "a.bin", b"A" * BS)
    _read_fails_eio(vol.mountpoint / "b.bin", b"B" * BS)
    vol.unmount()
    code, out = _fsck(vol)
    assert code == ExitCode.CORRUPT
    assert "/a.bin" in out and "/b.bin" in out


def test_truncated_block(populated: Volume) -> None:
    vol = populated
    b = _backing_of(vol, 3 * BS + 1)
    os.truncate(b, b.stat().st_size - 5)  # the 1-byte last block loses its tag's end
    vol.mount()
    with open(vol.mountpoint / "b.bin", "rb") as h:
        h.seek(2 * BS)
        assert h.read(BS) == b"B" * BS
    vol.unmount()
    code, out = _fsck(vol)
    assert code == ExitCode.CORRUPT
    assert "block 3 of /b.bin" in out


def test_corrupt_name(populated: Volume) -> None:
    vol = populated
    target = _backing_of(vol, 3 * BS)
    name = target.name
    bad = name[:5] + ("A" if name[5] != "A" else "B") + name[6:]
    target.rename(target.with_name(bad))
    vol.mount()
    assert "a.bin" not in os.listdir(vol.mountpoint)  # hidden, not shown under a wrong name
    assert not (vol.mountpoint / "a.bin").exists()
    vol.unmount()
    code, out = _fsck(vol)
    assert code == ExitCode.CORRUPT
    assert "name" in out and bad in out


def test_corrupt_long_name_companion(populated: Volume) -> None:
    vol = populated
    comp = next(vol.cipher_dir.glob("encfs.ln.*.name"))
    comp.write_text(comp.read_text()[:-3] + "AAA")
    vol.mount()
    assert "L" * 240 not in os.listdir(vol.mountpoint)
    vol.unmount()
    assert _fsck(vol)[0] == ExitCode.CORRUPT


def test_corrupt_symlink_target(populated: Volume) -> None:
    vol = populated
    link = next(p for p in vol.cipher_dir.iterdir() if p.is_symlink() and p.name != fmt.DIRID_NAME)
    target = os.readlink(link)
    link.unlink()
    os.symlink(target[:-2] + ("AA" if target[-2:] != "AA" else "BB"), link)
    vol.mount()
    with pytest.raises(OSError) as info:
        os.readlink(vol.mountpoint / "link")
    assert info.value.errno == errno.EIO
    vol.unmount()
    code, out = _fsck(vol)
    assert code == ExitCode.CORRUPT and "symlink" in out


def test_corrupt_xattr_value(populated: Volume) -> None:
    vol = populated
    a = _backing_of(vol, 3 * BS)
    (xname,) = [n for n in os.listxattr(a) if n.startswith("user.encfs.")]
    value = bytearray(os.getxattr(a, xname))
    value[-1] ^= 1
    os.setxattr(a, xname, bytes(value))
    vol.mount()
    with pytest.raises(OSError) as info:
        os.getxattr(vol.mountpoint / "a.bin", "user.color")
    assert info.value.errno == errno.EIO
    vol.unmount()
    code, out = _fsck(vol)
    assert code == ExitCode.CORRUPT and "xattr" in out


def test_zeroed_block_reads_as_hole(populated_either: Volume) -> None:
    """Documented limit (docs/FORMAT.md, README): a whole block zeroed on disk is a hole."""
    vol = populated_either
    cbs = vol.geometry.cipher_block_size
    a = _backing_of(vol, 3 * BS)
    raw = bytearray(a.read_bytes())
    o = fmt.FILE_HEADER_LEN + cbs
    raw[o : o + cbs] = bytes(cbs)
    a.write_bytes(bytes(raw))
    vol.mount()
    assert (vol.mountpoint / "a.bin").read_bytes() == b"A" * BS + bytes(BS) + b"A" * BS


@pytest.mark.parametrize("field_offset", [8, 10, 15, 20, 40, -40, -1])
def test_volume_header_bit_flip_refused(populated: Volume, field_offset: int) -> None:
    vol = populated
    header = vol.cipher_dir / fmt.VOLUME_HEADER_NAME
    raw = bytearray(header.read_bytes())
    raw[field_offset] ^= 0x01
    header.write_bytes(bytes(raw))
    proc = encfs("mount", vol.cipher_dir, vol.mountpoint, env=vol.env)
    # Depending on the field: the structure check, the vault (a changed wrapped key, or a
    # changed mount or key name, which the pinned VAULT_ADDR takes from the header) or the
    # header tag refuses. The header's host and port are never used (docs/SECURITY.md).
    assert proc.returncode in {
        ExitCode.HEADER_AUTH,
        ExitCode.BAD_VOLUME,
        ExitCode.VAULT_PROTOCOL,
        ExitCode.VAULT_KEY_NOT_FOUND,
        ExitCode.VAULT_CONFIG,
        ExitCode.VAULT_UNREACHABLE,
        ExitCode.VAULT_DENIED,
    }, proc.stderr
    assert not is_mounted(vol.mountpoint)
    assert "error" in proc.stderr


def test_volume_header_unknown_flag(populated: Volume) -> None:
    vol = populated
    header = vol.cipher_dir / fmt.VOLUME_HEADER_NAME
    raw = bytearray(header.read_bytes())
    raw[10:14] = (1 << 7).to_bytes(4, "big")
    header.write_bytes(bytes(raw))
    proc = encfs("mount", vol.cipher_dir, vol.mountpoint, env=vol.env)
    assert proc.returncode == ExitCode.BAD_VOLUME
    assert "unknown feature flags 0x00000080" in proc.stderr


def test_volume_header_truncated_and_missing(populated: Volume) -> None:
    vol = populated
    header = vol.cipher_dir / fmt.VOLUME_HEADER_NAME
    header.write_bytes(header.read_bytes()[:30])
    proc = encfs("mount", vol.cipher_dir, vol.mountpoint, env=vol.env)
    assert proc.returncode == ExitCode.BAD_VOLUME
    assert "truncated" in proc.stderr
    header.unlink()
    proc = encfs("mount", vol.cipher_dir, vol.mountpoint, env=vol.env)
    assert proc.returncode == ExitCode.NO_VOLUME


def test_header_tag_mismatch_is_header_auth(populated: Volume) -> None:
    vol = populated
    header = vol.cipher_dir / fmt.VOLUME_HEADER_NAME
    raw = bytearray(header.read_bytes())
    raw[-1] ^= 0x80  # the tag itself
    header.write_bytes(bytes(raw))
    proc = encfs("mount", vol.cipher_dir, vol.mountpoint, env=vol.env)
    assert proc.returncode == ExitCode.HEADER_AUTH
    assert "tag mismatch" in proc.stderr


def test_what_integrity_does_not_cover(populated: Volume) -> None:
    """docs/SECURITY.md lists what format v1 does not detect; each item is shown here, so
    that a change in behaviour must change the list: truncation at a block boundary,
    extension by zero blocks, rollback of a file, a whole-file swap, symlink targets copied
    between entries, and a directory grafted by copying its id (fsck names the twins)."""
    vol = populated
    m = vol.mountpoint
    geo = fmt.Geometry(BS)
    vol.mount()
    (m / "old-new").write_bytes(b"first version")
    (m / "dir2").mkdir()
    os.symlink("b.bin", m / "link2")
    vol.unmount()
    by_size = {
        p.stat().st_size: p
        for p in vol.cipher_dir.rglob("*")
        if p.is_file() and not p.is_symlink() and "." not in p.name
    }
    rollback = by_size[geo.cipher_size(len(b"first version"))]
    saved = rollback.read_bytes()
    vol.mount()
    (m / "old-new").write_bytes(b"later version")
    vol.unmount()

    a = _backing_of(vol, 3 * BS)
    b = _backing_of(vol, 3 * BS + 1)
    os.truncate(a, geo.block_cipher_off(2))  # cut at a block boundary
    os.truncate(b, geo.block_cipher_off(3))  # b: drop its 1-byte last block, then ...
    with open(b, "ab") as f:
        f.write(bytes(CBS))  # ... extend by one zero block: reads as a zero block
    rollback.write_bytes(saved)  # an older ciphertext of the same file
    links = sorted(p for p in vol.cipher_dir.iterdir() if p.is_symlink() and "." not in p.name)
    assert len(links) == 2
    target_of = {p: os.readlink(p) for p in links}
    for p in links:
        p.unlink()
    links[0].symlink_to(target_of[links[1]])  # the two targets exchanged
    links[1].symlink_to(target_of[links[0]])
    dirs = [p for p in vol.cipher_dir.iterdir() if p.is_dir()]
    src = next(d for d in dirs if any(c.name != fmt.DIRID_NAME for c in d.iterdir()))
    dst = next(d for d in dirs if d != src)
    (dst / fmt.DIRID_NAME).unlink()
    os.symlink(os.readlink(src / fmt.DIRID_NAME), dst / fmt.DIRID_NAME)
    for child in src.iterdir():
        if child.name != fmt.DIRID_NAME:
            (dst / child.name).write_bytes(child.read_bytes())

    vol.mount()
    assert (m / "a.bin").read_bytes() == b"A" * (2 * BS)
    assert (m / "b.bin").read_bytes() == b"B" * (3 * BS) + bytes(BS)
    assert (m / "old-new").read_bytes() == b"first version"
    assert (os.readlink(m / "link"), os.readlink(m / "link2")) == ("b.bin", "a.bin")
    assert os.listdir(m / "dir") == os.listdir(m / "dir2") == ["note.txt"]
    assert (m / "dir2" / "note.txt").read_bytes() == b"hello tamper"
    vol.unmount()
    code, out = _fsck(vol)
    assert code == ExitCode.CORRUPT
    assert "same id as" in out
    assert out.count("CORRUPT") == 1, out  # the rest is invisible to fsck too


def test_fsck_repair_cuts_a_torn_tail_and_zeroes_a_torn_block(populated_either: Volume) -> None:
    """A write torn by a crash leaves a block that fails forever; ``fsck --repair`` makes
    the file readable again and names exactly the plaintext range it gave up."""
    vol = populated_either
    geo = vol.geometry
    a = _backing_of(vol, 3 * BS)  # torn in the middle: block 1 half new, half old
    _flip(a, geo.block_cipher_off(1) + 100)
    b = _backing_of(vol, 3 * BS + 1)  # torn at the end: the last full block cut short
    os.truncate(b, geo.block_cipher_off(2) + 1000)
    code, out = _fsck(vol)
    assert code == ExitCode.CORRUPT
    assert "CORRUPT block 1 of /a.bin" in out and "block block" not in out

    proc = _fsck_run(vol, "--repair", "--json")
    assert proc.returncode == ExitCode.OK, proc.stdout + proc.stderr
    items = [json.loads(line) for line in proc.stdout.splitlines()]
    summary = items.pop()
    assert summary["kind"] == "summary" and summary["problems"] == summary["repaired"] == 2
    lost = {item["plain_path"]: item["lost"] for item in items}
    assert lost == {"/a.bin": [BS, 2 * BS], "/b.bin": [2 * BS, 2 * BS + 1000 - geo.overhead]}
    assert all("lost" in item["repaired"] for item in items)
    assert _fsck(vol)[0] == ExitCode.OK
    vol.mount()
    assert (vol.mountpoint / "a.bin").read_bytes() == b"A" * BS + bytes(BS) + b"A" * BS
    assert (vol.mountpoint / "b.bin").read_bytes() == b"B" * (2 * BS)


def test_fsck_json_summary_and_a_mounted_volume(populated: Volume) -> None:
    """A clean volume gives a JSON summary on stdout; fsck of a mounted volume warns, and
    ``--repair`` is refused while it is mounted (exit 24, naming the mount)."""
    vol = populated
    proc = encfs("fsck", vol.cipher_dir, "--json", env=vol.env)
    assert proc.returncode == ExitCode.OK
    summary = json.loads(proc.stdout)
    assert summary["kind"] == "summary" and summary["problems"] == 0 and summary["files"] >= 4
    vol.mount()
    proc = encfs("fsck", vol.cipher_dir, env=vol.env)
    assert proc.returncode == ExitCode.OK
    assert "in use by the encfs mount at" in proc.stderr and str(vol.mountpoint) in proc.stderr
    proc = encfs("fsck", vol.cipher_dir, "--repair", env=vol.env)
    assert proc.returncode == ExitCode.VOLUME_IN_USE
    assert str(vol.mountpoint) in proc.stderr


def _undo_files(vol: Volume) -> dict[str, bytes]:
    undo_dir = vol.cipher_dir / fmt.UNDO_DIR_NAME
    if not undo_dir.exists():
        return {}
    found = {}
    for p in undo_dir.iterdir():
        with contextlib.suppress(FileNotFoundError):  # a last close may remove it meanwhile
            found[p.name] = p.read_bytes()
    return found


@pytest.mark.parametrize("layers", LAYERS)
def test_a_block_torn_mid_rewrite_is_restored_from_its_undo_record(
    make_volume: MakeVolume, layers: str
) -> None:
    """A partial-block rewrite (an append into the last block, an overwrite of part of a
    block) keeps the block's old content, sealed, in ``encfs.undo/`` while it is in
    flight. After a crash that tore the block, ``fsck --repair`` puts back the fsynced
    content (only the unsynced write is lost, no synced byte); after an fsync the record
    is dropped, after the last close the undo file is gone, and a crash's leftover is kept
    by the next mount until fsck has used it. On a double volume the records hold blocks
    sealed in both layers (FORMAT §10b: blocks of the volume's own kind)."""
    vol = make_volume(double=layers == "double")
    m = vol.mountpoint
    geo = vol.geometry
    log_data = os.urandom(3000)
    mid_data = os.urandom(3 * BS)
    (m / "log").write_bytes(log_data)
    (m / "mid").write_bytes(mid_data)
    (m / "other").write_bytes(b"o" * 100)
    (m / "calm").write_bytes(b"c" * 100)
    assert _undo_files(vol) == {}  # whole new files rewrite nothing in place
    log_fd = os.open(m / "log", os.O_RDWR)
    mid_fd = os.open(m / "mid", os.O_RDWR)
    calm_fd = os.open(m / "calm", os.O_RDWR)
    os.fsync(log_fd)
    os.fsync(mid_fd)
    os.pwrite(log_fd, b"appended, never synced", 3000)
    os.pwrite(mid_fd, b"X" * 10, BS + 5)
    os.pwrite(calm_fd, b"C", 50)  # in flight at the crash too, but not torn by it
    held = _undo_files(vol)
    assert len(held) == 3
    assert all(len(fmt.parse_undo(raw, geo.cipher_block_size)) == 1 for raw in held.values())
    sealed_sizes = {
        len(sealed)
        for raw in held.values()
        for sealed in fmt.parse_undo(raw, geo.cipher_block_size).values()
    }
    assert sealed_sizes <= {geo.cipher_block_size, 3000 + geo.overhead, 100 + geo.overhead}
    with open(m / "other", "r+b") as f:  # synced: its record goes at once ...
        f.seek(50)
        f.write(b"z")
        f.flush()
        os.fsync(f.fileno())
        assert len(_undo_files(vol)) == 4
        assert [fmt.parse_undo(r, geo.cipher_block_size) for r in _undo_files(vol).values()].count(
            {}
        ) == 1
    # ... and its file at the last close (FUSE's release comes just after close returns)
    assert wait_until(lambda: len(_undo_files(vol)) == 3)

    # The crash: the daemon dies in the middle of both rewrites, each block torn.
    os.kill(vol.daemon_pid(), 9)
    os.close(log_fd)
    os.close(mid_fd)
    os.close(calm_fd)
    force_unmount(m)
    log_backing = _backing_of(vol, 3000 + len(b"appended, never synced"))
    mid_backing = _backing_of(vol, 3 * BS)
    _flip(log_backing, geo.block_cipher_off(0) + 2000)
    _flip(mid_backing, geo.block_cipher_off(1) + 3000)

    vol.mount()  # a leftover undo file is the only good copy: the mount keeps it
    with pytest.raises(OSError) as err:
        (m / "log").read_bytes()
    assert err.value.errno == errno.EIO
    with open(m / "log", "r+b") as f, pytest.raises(OSError) as err:
        f.truncate(4 * BS)  # a rewrite of the torn block fails ...
    assert err.value.errno == errno.EIO
    with open(m / "mid", "r+b") as f:  # ... one of a good block works, without a record
        f.seek(10)
        f.write(b"Y" * 5)
    mid_data = mid_data[:10] + b"Y" * 5 + mid_data[15:]
    with open(m / "calm", "r+b") as f:  # nothing of it torn: its leftover is taken over
        f.seek(10)
        f.write(b"D")
    vol.unmount()
    left = _undo_files(vol)
    assert len(left) == 2 and left.items() <= held.items()  # the torn ones' records kept

    code, out = _fsck(vol)
    assert code == ExitCode.CORRUPT
    assert out.count("torn by a crash; --repair restores it") == 2, out
    assert "2 undo file(s) left by a crash" in out
    proc = _fsck_run(vol, "--repair", "--json")
    assert proc.returncode == ExitCode.OK, proc.stdout + proc.stderr
    items = [json.loads(line) for line in proc.stdout.splitlines()]
    summary = items.pop()
    assert summary["repaired"] == summary["problems"] == 2 and summary["undo_files"] == 2
    assert all(item["lost"] is None and "undo record" in item["repaired"] for item in items)
    assert _undo_files(vol) == {}
    assert _fsck(vol)[0] == ExitCode.OK
    vol.mount()
    assert (m / "log").read_bytes() == log_data
    assert (m / "mid").read_bytes() == mid_data
    assert (m / "calm").read_bytes() == b"c" * 10 + b"D" + b"c" * 39 + b"C" + b"c" * 49


@pytest.mark.parametrize("layers", LAYERS)
def test_an_undo_record_is_used_only_where_it_authenticates(
    make_volume: MakeVolume, layers: str
) -> None:
    """A record is genuine ciphertext of the file, but of another block: it must not be
    written back there (SECURITY.md: a planted record can bring back only an earlier
    version of its own block). The next mount says which undo files a crash left."""
    vol = make_volume(double=layers == "double")
    data = os.urandom(3 * BS)
    (vol.mountpoint / "f").write_bytes(data)
    vol.unmount()
    geo = vol.geometry
    backing = _backing_of(vol, 3 * BS)
    raw = backing.read_bytes()
    file_id = fmt.parse_file_header(raw[: fmt.FILE_HEADER_LEN])
    block_1 = raw[geo.block_cipher_off(1) : geo.block_cipher_off(2)]
    undo_dir = vol.cipher_dir / fmt.UNDO_DIR_NAME
    undo_dir.mkdir(mode=0o700)
    (undo_dir / fmt.undo_file_name(file_id)).write_bytes(fmt.pack_undo([(0, block_1)]))
    _flip(backing, geo.block_cipher_off(0) + 100)

    mounted = encfs(
        "mount", vol.cipher_dir, vol.mountpoint, "--vault", vol.vault_url, *vol.vault2_args(),
        env=vol.env,
    )  # fmt: skip
    assert mounted.returncode == ExitCode.OK, mounted.stderr
    assert "1 undo record(s) left by a crash" in mounted.stderr  # said at mount time
    vol.unmount()
    code, out = _fsck(vol)
    assert code == ExitCode.CORRUPT and "--repair restores it" not in out, out
    proc = _fsck_run(vol, "--repair", "--json")
    assert proc.returncode == ExitCode.OK, proc.stdout + proc.stderr
    item = json.loads(proc.stdout.splitlines()[0])
    assert item["lost"] == [0, BS] and "zeroed" in item["repaired"]
    vol.mount()
    assert (vol.mountpoint / "f").read_bytes() == bytes(BS) + data[BS:]


@pytest.mark.parametrize(
    ("where", "code", "complaint"),
    [
        ("byte 15", ExitCode.BAD_VOLUME, "unknown outer content cipher"),
        ("slot 1 version", ExitCode.BAD_VOLUME, "KEK version field (KEK 2)"),
        ("slot 1 url", ExitCode.BAD_VOLUME, "pinned for volume"),
        ("tag", ExitCode.HEADER_AUTH, "tag"),
    ],
)
def test_double_volume_header_tampered(
    make_volume: MakeVolume, where: str, code: int, complaint: str
) -> None:
    """The second key slot and the outer cipher byte are as guarded as the rest."""
    vol = make_volume(double=True, mount=False)
    header = vol.cipher_dir / fmt.VOLUME_HEADER_NAME
    raw = bytearray(header.read_bytes())
    parsed, body, _tag = fmt.parse_volume_header(bytes(raw))
    slot1 = len(body) - len(parsed.slots[1].pack())
    url_len = len(parsed.slots[1].vault_url)
    offset = {
        "byte 15": 15,
        "slot 1 version": slot1 + 2 + url_len + 3,
        "slot 1 url": slot1 + 2 + url_len - 1,
        "tag": len(raw) - 1,
    }[where]
    raw[offset] ^= 0x01
    header.write_bytes(bytes(raw))
    proc = encfs(
        "mount", vol.cipher_dir, vol.mountpoint, "--vault", vol.vault_url, *vol.vault2_args(),
        env=vol.env,
    )  # fmt: skip
    assert proc.returncode == code, proc.stderr
    assert complaint in proc.stderr
    assert not is_mounted(vol.mountpoint)
