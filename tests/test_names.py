"""Directory ids on disk (encfs/names.py ``write_dirid`` / ``read_dirid``), both forms,
read and written through the door (encfs/backing.py)."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from encfs import backing, names
from encfs import format as fmt
from encfs.errors import FormatError

ID = bytes(range(16))
ID_LINK = "AAECAwQFBgcICQoLDA0ODw"  # known answer (docs/FORMAT.md §6.1): b64url, unpadded


def _dir(path: Path) -> backing.Dir:
    return backing.open_root(str(path))


def test_link_form_known_answer(tmp_path: Path) -> None:
    assert names.write_dirid(_dir(tmp_path), link=True, dir_id=ID) == ID
    path = tmp_path / fmt.DIRID_NAME
    assert path.is_symlink()
    assert os.readlink(path) == ID_LINK
    assert len(ID_LINK) == fmt.DIRID_LINK_LEN
    assert names.read_dirid(_dir(tmp_path)) == ID


def test_file_form(tmp_path: Path) -> None:
    dir_id = names.write_dirid(_dir(tmp_path), link=False)
    path = tmp_path / fmt.DIRID_NAME
    assert not path.is_symlink()
    assert path.read_bytes() == dir_id
    assert stat.S_IMODE(path.stat().st_mode) == 0o440
    assert names.read_dirid(_dir(tmp_path)) == dir_id


@pytest.mark.parametrize("link", [True, False])
def test_fresh_ids_differ_and_never_replace(tmp_path: Path, link: bool) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    assert names.write_dirid(_dir(a), link=link) != names.write_dirid(_dir(b), link=link)
    before = names.read_dirid(_dir(a))
    with pytest.raises(FileExistsError):
        names.write_dirid(_dir(a), link=link)
    assert names.read_dirid(_dir(a)) == before


@pytest.mark.parametrize(
    "target",
    [
        ID_LINK[:-1],  # too short
        ID_LINK + "A",  # too long
        "!" * fmt.DIRID_LINK_LEN,  # not base64url
        "AAECAwQFBgcICQoLDA0ODx",  # right length, but not the canonical encoding of 16 bytes
        "AAECAwQFBgcICQoLDA0O+w",  # the standard alphabet, not base64url
        "",
    ],
)
def test_damaged_link_is_a_format_error(tmp_path: Path, target: str) -> None:
    os.symlink(target or ".", tmp_path / fmt.DIRID_NAME)
    with pytest.raises(FormatError, match="directory id damaged"):
        names.read_dirid(_dir(tmp_path))


def test_link_is_never_followed(tmp_path: Path) -> None:
    """A link pointing at a file that holds a valid id is still a damaged id: the target
    itself is the id, so a planted link cannot make us read some other file."""
    (tmp_path / "elsewhere").write_bytes(ID)
    os.symlink(str(tmp_path / "elsewhere"), tmp_path / fmt.DIRID_NAME)
    with pytest.raises(FormatError, match="directory id damaged"):
        names.read_dirid(_dir(tmp_path))


@pytest.mark.parametrize("content", [b"", ID[:15], ID + b"x"])
def test_damaged_file_is_a_format_error(tmp_path: Path, content: bytes) -> None:
    (tmp_path / fmt.DIRID_NAME).write_bytes(content)
    with pytest.raises(FormatError, match="directory id damaged"):
        names.read_dirid(_dir(tmp_path))


def test_missing_id_and_what_is_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="directory id missing"):
        names.read_dirid(_dir(tmp_path))
    root = _dir(tmp_path)
    with pytest.raises(FileNotFoundError):
        root.opendir("gone")
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        root.opendir("file")
    (tmp_path / "real").mkdir()
    os.symlink(str(tmp_path / "real"), tmp_path / "link")
    with pytest.raises(OSError) as info:
        root.opendir("link")  # a link to a directory is never entered
    assert info.value.errno in (errno.ELOOP, errno.ENOTDIR)


def test_special_file_as_id_is_damage_and_never_opened(tmp_path: Path) -> None:
    """A FIFO planted as ``.encfs.dirid`` once hung every listing (an open that blocks
    for a writer): now it is a damaged id, answered at once."""
    os.mkfifo(tmp_path / fmt.DIRID_NAME)
    with pytest.raises(FormatError, match="directory id damaged"):
        names.read_dirid(_dir(tmp_path))


def test_rmdir_that_fails_restores_the_id_in_its_form(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rmdir removes the id first; if the backing rmdir then fails, the id comes back
    unchanged and in the volume's form (a file id in a links volume, or the reverse,
    would still read, but only the right form keeps an older volume mountable)."""
    from encfs import fs
    from encfs.keys import VolumeKeys

    for link in (True, False):
        cipher = tmp_path / f"c-{link}"
        cipher.mkdir()
        names.write_dirid(_dir(cipher), link=link)
        keys = VolumeKeys(bytearray(os.urandom(32)), volume_id=os.urandom(16), block_size=4096)
        ops = fs.EncfsOperations(str(cipher), keys, 4096, fs.FsOptions(), dirid_links=link)
        ops.mkdir("/d", 0o755)
        backing_dir = cipher / ops.names.entry("/d").name
        assert os.path.islink(backing_dir / fmt.DIRID_NAME) is link
        before = names.read_dirid(_dir(backing_dir))

        def busy(path: str, *, dir_fd: int | None = None) -> None:
            raise OSError(errno.EBUSY, "busy")

        with monkeypatch.context() as m:
            m.setattr("encfs.backing.os.rmdir", busy)
            with pytest.raises(OSError) as info:
                ops.rmdir("/d")
        assert info.value.errno == errno.EBUSY
        assert os.path.islink(backing_dir / fmt.DIRID_NAME) is link
        assert names.read_dirid(_dir(backing_dir)) == before
        ops.rmdir("/d")
        assert not os.path.exists(backing_dir)
        keys.close()


@pytest.mark.parametrize("link", [True, False])
def test_what_mkdir_makes_durable_before_entries_exist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, link: bool
) -> None:
    """FORMAT.md §6.1 and §7: a long name's companion is fsynced before its entry exists,
    an id file before the directory gets entries; an id link needs no fsync at all."""
    from encfs import fs
    from encfs.keys import VolumeKeys

    names.write_dirid(_dir(tmp_path), link=link)
    keys = VolumeKeys(bytearray(os.urandom(32)), volume_id=os.urandom(16), block_size=4096)
    ops = fs.EncfsOperations(str(tmp_path), keys, 4096, fs.FsOptions(), dirid_links=link)
    plain = "/" + "d" * 200  # a long (hashed) backing name with a companion
    entry = ops.names.entry(plain)
    assert entry.is_long
    synced: list[tuple[str, bool]] = []
    real_fsync = os.fsync

    entry_path = str(tmp_path / entry.name)

    def fsync(fd: int) -> None:
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), os.path.lexists(entry_path)))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    ops.mkdir(plain, 0o755)
    dirid = os.path.join(entry_path, fmt.DIRID_NAME)
    assert synced[0] == (str(tmp_path / entry.companion), False)
    assert synced[1:] == ([] if link else [(dirid, True)])
    keys.close()
