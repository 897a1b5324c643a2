"""Attacks on the cipher dir, performed for real against the root daemon.

The daemon runs as root; every path it touches in the cipher dir is a path an attacker who
can write the cipher dir (offline disk access, a restored backup, a shared backing store)
may have replaced: by a symbolic link out of the cipher dir, by a FIFO or a device node, by
a name that decrypts to something no kernel filesystem would hand out. Users depend on the
mount never becoming a lever on the rest of the host: whatever the cipher dir holds, an
operation through the mount acts on the cipher dir only, never blocks forever, and never
gives the kernel a name it must not see.

How the tests plant: as root, straight in the backing dir (the backing entry of a plaintext
file is found by inode: ``use_ino`` is on). The kernel caches a looked-up entry's attributes
for 10 s, so a user who stat'ed a file a moment before the swap still sees a regular file
they own and acts on it; the operation then reaches the daemon with the old path. The user
is ``nobody`` (uid/gid 65534, no groups) on a mount made with
``allow_other,default_permissions``, or root itself: the daemon must not follow even for root.

Every step that could hang runs with a deadline; a hang is a failure, and the planted FIFOs
are opened on the way out so that no daemon thread stays blocked.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from encfs import crypto, volume
from encfs import format as fmt
from encfs.vault import VaultSettings, connect
from tests import harness
from tests.harness import MakeVolume, Volume, encfs, force_unmount, is_mounted

NOBODY = 65534
MULTIUSER = ["allow_other", "default_permissions"]
DEADLINE = 10.0  # seconds an operation through the mount may take before it counts as hung
LONG = "L" * 200  # a plaintext name whose encoding is a long name (docs/FORMAT.md §7)


# --- running things as someone, with a deadline --------------------------------------------


_planted_fifos: list[Path] = []


def release_fifos() -> None:
    """Open every FIFO a test planted, for reading and writing, without blocking, and close
    it: a daemon thread blocked opening one of them returns (and then reads end of file)."""
    for fifo in _planted_fifos:
        for _ in range(3):
            try:
                fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
            except OSError:
                break
            os.close(fd)
            time.sleep(0.05)


def mkfifo(path: Path) -> None:
    os.mkfifo(path, 0o600)
    _planted_fifos.append(path)


@pytest.fixture(autouse=True)
def _unblock_daemon_threads() -> Iterator[None]:
    yield
    release_fifos()
    _planted_fifos.clear()


def as_user(fn: Callable[[], Any], uid: int = NOBODY, timeout: float = DEADLINE) -> Any:
    """``harness.as_user`` that frees the daemon's threads stuck on planted FIFOs when
    ``fn`` hangs (``Hung``)."""
    return harness.as_user(fn, uid, timeout, on_hang=release_fifos)


def attempt(fn: Callable[[], Any], uid: int = NOBODY) -> int | None:
    """``as_user(fn)``'s errno, or None if it succeeded (a hang raises ``Hung``)."""
    try:
        as_user(fn, uid)
    except OSError as exc:
        return exc.errno
    return None


@dataclass
class Ran:
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    hung: bool


def run(cmd: list[str | Path], uid: int = 0, timeout: float = DEADLINE) -> Ran:
    """Run a command (as ``nobody`` through setpriv unless ``uid`` is 0). A process stuck in
    a FUSE request cannot be killed until the daemon answers, so on timeout the planted
    FIFOs are released first, then the process is killed."""
    argv = [str(c) for c in cmd]
    if uid != 0:
        argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv]
    start = time.monotonic()
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd="/",
        env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"},
    )
    hung = False
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        hung = True
        release_fifos()
        proc.kill()
        out, err = proc.communicate(timeout=15)
    return Ran(proc.returncode, out, err, time.monotonic() - start, hung)


# --- the scene --------------------------------------------------------------------------------


@pytest.fixture
def reachable_tmp() -> Iterator[Path]:
    """A fresh directory under /tmp that nobody can reach (0711), removed afterwards.

    Not pytest's ``tmp_path``: its parents are 0700, and opening them up (o+x) races with
    any other pytest session on the host that restores their modes at its own teardown."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="encfs-attacks-"))
    os.chmod(path, 0o711)
    yield path
    for entry in path.iterdir():
        force_unmount(entry)
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class Scene:
    vol: Volume
    home: Path
    """``/home`` in the mount: nobody's directory (0755)."""
    outside: Path
    """Root's directory outside the cipher dir (0755), holding what an attacker wants."""

    @property
    def id_copy(self) -> Path:
        return self.outside / "id"

    @property
    def victim(self) -> Path:
        return self.outside / "victim"

    @property
    def secret(self) -> Path:
        return self.outside / "secret"

    @property
    def rootdir(self) -> Path:
        return self.outside / "etc"

    @property
    def preload(self) -> Path:
        return self.rootdir / "ld.so.preload"


VICTIM = b"root's data\n" * 20  # over 18 bytes, so the daemon reads it as a non-empty file
SECRET = b"shadow:$6$\n"  # short: the kernel may cap a read at the link's size


@pytest.fixture
def scene(reachable_tmp: Path, transit_key: Any, tmp_path: Path) -> Iterator[Scene]:
    """A volume mounted with allow_other,default_permissions in a directory nobody can
    reach; its root is root's (0755) and holds ``home``, nobody's (0755)."""
    mp = reachable_tmp / "plain"
    mp.mkdir()
    vol = Volume(
        cipher_dir=reachable_tmp / "cipher",
        mountpoint=mp,
        vault_url=transit_key.url,
        env=transit_key.env,
        options=MULTIUSER,
        log_file=tmp_path / "daemon.log",
        audit_log=tmp_path / "audit.log",  # the daemon may write after teardown
    )
    vol.init()
    vol.mount()
    os.chmod(vol.mountpoint, 0o755)
    home = vol.mountpoint / "home"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    os.chmod(home, 0o755)
    outside = reachable_tmp / "outside"
    outside.mkdir(mode=0o755)
    s = Scene(vol, home, outside)
    shutil.copy(shutil.which("id") or "/usr/bin/id", s.id_copy)
    os.chmod(s.id_copy, 0o755)
    s.victim.write_bytes(VICTIM)
    os.chmod(s.victim, 0o644)
    s.rootdir.mkdir(mode=0o755)
    yield s
    release_fifos()
    force_unmount(mp)


def backing_of(vol: Volume, path: Path) -> Path:
    """The backing entry of a plaintext path: the one with its inode number (use_ino)."""
    ino = os.lstat(path).st_ino
    hits = [
        Path(dirpath, n)
        for dirpath, dirnames, filenames in os.walk(vol.cipher_dir)
        for n in (*dirnames, *filenames)
        if os.lstat(Path(dirpath, n)).st_ino == ino
    ]
    assert len(hits) == 1, (path, hits)
    return hits[0]


def swap_for_symlink(backing: Path, target: Path) -> None:
    """Replace a backing entry (file or directory) by a symbolic link to ``target``."""
    if backing.is_dir() and not backing.is_symlink():
        shutil.rmtree(backing)
    else:
        backing.unlink()
    os.symlink(target, backing)


def nobodys_file(s: Scene, name: str = "f", data: bytes = b"nobody's data") -> Path:
    """A file of nobody's in ``home``, stat'ed by nobody (so the kernel caches it)."""
    f = s.home / name

    def make() -> None:
        f.write_bytes(data)
        os.stat(f)

    as_user(make)
    return f


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Every entry under ``root``: kind and mode, owner, group, link count, content, xattrs."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in (".", *dirnames, *filenames):
            p = Path(dirpath, n)
            st = os.lstat(p)
            content: bytes | str | None = None
            if stat.S_ISREG(st.st_mode):
                content = p.read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(p)
            xattrs = tuple(
                sorted(
                    (n, os.getxattr(p, n, follow_symlinks=False))
                    for n in os.listxattr(p, follow_symlinks=False)
                )
            )
            out[str(p.relative_to(root))] = (
                st.st_mode,
                st.st_uid,
                st.st_gid,
                st.st_nlink,
                content,
                xattrs,
            )
    return out


# --- 1. symbolic links planted in the cipher dir ------------------------------------------------

WHO = [pytest.param(NOBODY, id="nobody"), pytest.param(0, id="root")]


@pytest.mark.parametrize("uid", WHO)
def test_chmod_through_swapped_entry_does_not_make_outside_file_setuid(
    scene: Scene, uid: int
) -> None:
    """Attack: nobody's file's backing entry is swapped for a link to a root-owned copy of
    ``id`` outside the cipher dir; ``chmod 4755`` through the mount made that copy setuid
    root (nobody then ran it with euid 0). Users depend on a chmod through the mount
    changing nothing but the cipher dir."""
    s = scene
    f = nobodys_file(s)
    swap_for_symlink(backing_of(s.vol, f), s.id_copy)
    attempt(lambda: os.chmod(f, 0o4755), uid)
    st = os.stat(s.id_copy)
    euid = run([s.id_copy, "-u"], uid=NOBODY).stdout.strip()
    assert stat.S_IMODE(st.st_mode) == 0o755, f"outside file made {oct(st.st_mode)}; euid {euid}"
    assert (st.st_uid, st.st_gid) == (0, 0)


@pytest.mark.parametrize("uid", WHO)
@pytest.mark.parametrize(
    "how",
    [
        pytest.param(["truncate", "--no-create", "-s", "0"], id="truncate-c"),
        pytest.param(
            ["python3", "-c", "import os, sys; os.truncate(sys.argv[1], 0)"], id="truncate-syscall"
        ),
        pytest.param(
            [
                "python3",
                "-c",
                "import os, sys; fd = os.open(sys.argv[1], "
                "os.O_WRONLY | os.O_TRUNC); os.write(fd, b'x\\n')",
            ],
            id="open-trunc",
        ),
        pytest.param(
            ["dd", "conv=nocreat,notrunc", "status=none", "if=/dev/zero", "count=1", "bs=4"],
            id="dd-overwrite",
        ),
        pytest.param(["truncate", "-s", "0"], id="truncate"),
        pytest.param(["sh", "-c", 'echo x > "$0"'], id="echo-redirect"),
        pytest.param(["sh", "-c", 'echo x >> "$0"'], id="echo-append"),
    ],
)
def test_writes_through_swapped_entry_leave_outside_file_alone(
    scene: Scene, uid: int, how: list[str]
) -> None:
    """Attack: the backing entry of nobody's file is swapped for a link to a root-owned file
    outside; ``truncate -s 0`` and ``echo x >`` through the mount emptied or overwrote it.
    Users depend on writes through the mount landing in the cipher dir only."""
    s = scene
    # Appending to or overwriting part of a non-empty outside file fails its decryption
    # (EIO) before anything is written; an empty root-owned file (an empty ld.so.preload,
    # a crontab) has nothing to decrypt, so the write would go through.
    content = b"" if how[-1] in ('echo x >> "$0"', "bs=4") else VICTIM
    s.victim.write_bytes(content)
    f = nobodys_file(s)
    swap_for_symlink(backing_of(s.vol, f), s.victim)
    cmd: list[str | Path] = [*how, f] if how[0] != "dd" else [*how, f"of={f}"]
    ran = run(cmd, uid=uid)
    assert not ran.hung, ran
    assert s.victim.read_bytes() == content
    assert stat.S_IMODE(os.stat(s.victim).st_mode) == 0o644


@pytest.mark.parametrize("uid", WHO)
@pytest.mark.parametrize(
    "op",
    [
        "chown",
        "touch",
        "utimens",
        "setxattr",
        "removexattr",
        "link",
        "rename",
        "rename-over",
        "unlink",
    ],
)
def test_metadata_through_swapped_entry_leaves_outside_file_alone(
    scene: Scene, uid: int, op: str
) -> None:
    """Attack: as above, then chown, touch (UTIME_NOW), set times, set or remove a user
    xattr, hard-link, rename, rename over, unlink through the mount. Users depend on
    metadata changes through the mount never reaching a file outside the cipher dir."""
    s = scene
    f = nobodys_file(s)
    other = nobodys_file(s, "other")
    os.setxattr(s.victim, "user.keep", b"root's attribute")
    os.utime(s.victim, ns=(1_000_000_000, 1_000_000_000))
    before = snapshot(s.outside)
    before_x = {n: os.getxattr(s.victim, n) for n in os.listxattr(s.victim)}
    swap_for_symlink(backing_of(s.vol, f), s.victim)
    ops: dict[str, Callable[[], Any]] = {
        "chown": lambda: os.chown(f, NOBODY if uid == 0 else -1, NOBODY),
        "touch": lambda: os.utime(f),
        "utimens": lambda: os.utime(f, ns=(2_000_000_000, 3_000_000_000)),
        "setxattr": lambda: os.setxattr(f, "user.planted", b"by nobody"),
        "removexattr": lambda: os.removexattr(f, "user.keep"),
        "link": lambda: os.link(f, s.home / "hardlink"),
        "rename": lambda: os.rename(f, s.home / "renamed"),
        "rename-over": lambda: os.rename(other, f),
        "unlink": lambda: os.unlink(f),
    }
    attempt(ops[op], uid)
    assert snapshot(s.outside) == before
    assert {n: os.getxattr(s.victim, n) for n in os.listxattr(s.victim)} == before_x
    st = os.stat(s.victim)
    assert st.st_mtime_ns == 1_000_000_000


@pytest.mark.parametrize("uid", WHO)
def test_read_through_swapped_entry_does_not_read_root_only_file(scene: Scene, uid: int) -> None:
    """Attack: a root-only file outside the cipher dir (a stand-in for /etc/shadow; here it
    even holds a valid encfs ciphertext, so a daemon that opened it would decrypt it) is
    linked in as the backing entry of nobody's file; reading the file through the mount
    read the secret. Users depend on the daemon never opening anything outside."""
    s = scene
    g = s.vol.mountpoint / "g"
    g.write_bytes(SECRET)
    shutil.copy(backing_of(s.vol, g), s.secret)  # its content is bound to its file id only
    os.chmod(s.secret, 0o600)
    g.unlink()
    f = nobodys_file(s)
    swap_for_symlink(backing_of(s.vol, f), s.secret)
    try:
        data = as_user(lambda: f.read_bytes(), uid)
    except OSError:
        data = b""
    assert SECRET not in data


@pytest.mark.parametrize("uid", WHO)
def test_getxattr_through_swapped_entry_does_not_read_outside(scene: Scene, uid: int) -> None:
    """Attack: the backing entry is linked to an outside file that carries a valid sealed
    ``user.*`` attribute (values are bound to the attribute name only, so one can be copied);
    getxattr through the mount returned it. Users depend on attributes coming from the
    cipher dir only."""
    s = scene
    g = s.vol.mountpoint / "g"
    g.write_bytes(b"")
    os.setxattr(g, "user.color", b"outside value")
    bg = backing_of(s.vol, g)
    (bname,) = [n for n in os.listxattr(bg) if n.startswith("user.encfs.")]
    os.setxattr(s.victim, bname, os.getxattr(bg, bname))
    f = nobodys_file(s)
    swap_for_symlink(backing_of(s.vol, f), s.victim)
    try:
        value = as_user(lambda: os.getxattr(f, "user.color"), uid)
    except OSError:
        value = b""
    assert value != b"outside value"


@pytest.mark.parametrize("uid", WHO)
@pytest.mark.parametrize("long", [False, True], ids=["short-name", "long-name"])
def test_create_over_dangling_link_creates_nothing_outside(
    scene: Scene, uid: int, long: bool
) -> None:
    """Attack: a dangling link to ``/etc/ld.so.preload`` (here a stand-in in a root-owned
    directory) is planted as the backing entry of a name nobody is about to create; the
    daemon created the file there, owned by nobody. Users depend on creation through the
    mount making a new entry in the cipher dir (O_EXCL) and nothing else."""
    s = scene
    name = LONG if long else "preload"
    f = nobodys_file(s, name)
    backing = backing_of(s.vol, f)
    as_user(lambda: os.unlink(f))
    assert attempt(lambda: os.stat(f)) == errno.ENOENT  # the kernel now caches "no such entry"
    os.symlink(s.preload, backing)

    def create() -> None:
        fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, b"/tmp/evil.so\n")
        finally:
            os.close(fd)

    attempt(create, uid)
    assert not os.path.lexists(s.preload), f"created {s.preload}: {os.stat(s.preload)}"
    assert os.listdir(s.rootdir) == []


@pytest.mark.parametrize("uid", WHO)
@pytest.mark.parametrize("target", ["victim", "dangling"])
def test_long_name_companion_link_is_not_followed(scene: Scene, uid: int, target: str) -> None:
    """Attack: the long-name companion (``encfs.ln.<hash>.name``) of a name about to be
    created is planted as a link to a root-owned file outside (or a dangling link into a
    root-owned directory); writing the companion truncated and overwrote that file (or
    created one). Users depend on companions being written in the cipher dir only."""
    s = scene
    f = nobodys_file(s, LONG)
    companion = Path(str(backing_of(s.vol, f)) + fmt.LONGNAME_SUFFIX)
    assert companion.exists()
    as_user(lambda: os.unlink(f))
    assert not companion.exists()
    assert attempt(lambda: os.stat(f)) == errno.ENOENT
    os.symlink(s.victim if target == "victim" else s.preload, companion)
    attempt(lambda: f.write_bytes(b"again"), uid)
    assert s.victim.read_bytes() == VICTIM
    assert not os.path.lexists(s.preload)


@pytest.fixture
def swapped_dir(scene: Scene) -> tuple[Scene, Path, Path]:
    """nobody's directory ``home/sub`` (a file ``x``, a symlink ``l``, a long-named file, an
    empty directory ``e``),
    looked at by nobody; then its backing directory is copied to a root-owned directory
    outside (``outside/copy``, 0755, everything root's) and replaced by a link to the copy.
    Returns the scene, the plaintext directory and the copy."""
    s = scene
    sub = s.home / "sub"

    def make() -> None:
        sub.mkdir()
        (sub / "x").write_bytes(b"x's content")
        os.symlink("link target", sub / "l")
        (sub / LONG).write_bytes(b"long")
        os.mkdir(sub / "e")
        os.listdir(sub)
        for n in ("x", "l", LONG, "e"):
            os.lstat(sub / n)

    as_user(make)
    backing = backing_of(s.vol, sub)
    copy = s.outside / "copy"
    shutil.copytree(backing, copy, symlinks=True)
    for dirpath, dirnames, filenames in os.walk(copy):
        for n in (".", *dirnames, *filenames):
            os.lchown(Path(dirpath, n), 0, 0)
    os.chmod(copy, 0o755)
    swap_for_symlink(backing, copy)
    return s, sub, copy


@pytest.mark.parametrize("uid", WHO)
@pytest.mark.parametrize(
    "op",
    [
        "create",
        "mkdir",
        "mknod",
        "symlink",
        "unlink",
        "rename",
        "rename-out",
        "rmdir",
        "chmod",
        "truncate",
        "setxattr",
        "link",
    ],
)
def test_swapped_directory_component_is_not_followed(
    swapped_dir: tuple[Scene, Path, Path], uid: int, op: str
) -> None:
    """Attack: a backing *directory* is swapped for a link to a root-owned directory
    outside; creating, removing, renaming or changing entries inside it through the mount
    acted on that directory (files appeared in it owned by nobody, root's files vanished).
    Users depend on no path component in the cipher dir ever being followed."""
    s, sub, copy = swapped_dir
    before = snapshot(copy)
    ops: dict[str, Callable[[], Any]] = {
        "create": lambda: (sub / "new").write_bytes(b"new"),
        "mkdir": lambda: os.mkdir(sub / "newdir"),
        "mknod": lambda: os.mkfifo(sub / "newfifo"),
        "symlink": lambda: os.symlink("t", sub / "newlink"),
        "unlink": lambda: os.unlink(sub / "x"),
        "rename": lambda: os.rename(sub / "x", sub / "y"),
        "rename-out": lambda: os.rename(sub / "x", s.home / "moved"),
        "rmdir": lambda: os.rmdir(sub / "e"),
        "chmod": lambda: os.chmod(sub / "x", 0o4777),
        "truncate": lambda: os.truncate(sub / "x", 0),
        "setxattr": lambda: os.setxattr(sub / "x", "user.planted", b"1"),
        "link": lambda: os.link(sub / "x", sub / "x2"),
    }
    attempt(ops[op], uid)
    assert snapshot(copy) == before


@pytest.mark.parametrize("uid", WHO)
@pytest.mark.parametrize("op", ["read", "readlink", "listdir"])
def test_swapped_directory_component_is_not_read(
    swapped_dir: tuple[Scene, Path, Path], uid: int, op: str
) -> None:
    """Attack: as above, then reading a file, a symlink or the listing through the mount
    read the outside directory's (root-only) entries. Users depend on every byte served
    coming from the cipher dir."""
    _s, sub, copy = swapped_dir
    for dirpath, dirnames, filenames in os.walk(copy):
        for n in (*dirnames, *filenames):
            if not os.path.islink(Path(dirpath, n)):
                os.chmod(Path(dirpath, n), 0o600)
    ops: dict[str, Callable[[], Any]] = {
        "read": lambda: (sub / "x").read_bytes(),
        "readlink": lambda: os.readlink(sub / "l"),
        "listdir": lambda: sorted(os.listdir(sub)),
    }
    try:
        got = as_user(ops[op], uid)
    except OSError:
        got = None
    assert got not in (b"x's content", "link target", sorted(["x", "l", LONG, "e"]))


def test_unprivileged_user_cannot_swap_backing_entries(
    reachable_tmp: Path, transit_key: Any, tmp_path: Path
) -> None:
    """The original attack, end to end as nobody: the operator made the cipher dir with a
    plain ``mkdir`` (0755) before ``encfs init``; nobody owns a directory in the mount, so
    its backing directory is nobody's too; nobody swaps a backing entry for a link to a
    root-owned copy of ``id`` and runs ``chmod 4755`` through the mount, then runs the copy
    with euid 0. Users depend on the cipher dir being root's alone (0700): the swap itself
    must be impossible for an unprivileged user, whichever step refuses."""
    cipher = reachable_tmp / "op-cipher"
    cipher.mkdir(mode=0o755)
    os.chmod(cipher, 0o755)
    mp = reachable_tmp / "op-plain"
    mp.mkdir()
    vol = Volume(
        cipher_dir=cipher,
        mountpoint=mp,
        vault_url=transit_key.url,
        env=transit_key.env,
        options=MULTIUSER,
        log_file=tmp_path / "op.log",
    )
    outside = reachable_tmp / "outside"
    outside.mkdir(mode=0o755)
    id_copy = outside / "id"
    shutil.copy(shutil.which("id") or "/usr/bin/id", id_copy)
    os.chmod(id_copy, 0o755)
    try:
        init = encfs("init", cipher, "--vault", vol.vault_url, *vol.audit_args(), env=vol.env)
        if init.returncode != 0:
            return  # init refused the 0755 directory: blocked at the first step
        mount = encfs(
            "mount",
            cipher,
            mp,
            "--vault",
            vol.vault_url,
            "-o",
            ",".join(MULTIUSER),
            *vol.audit_args(),
            env=vol.env,
        )
        if mount.returncode != 0:
            return  # mount refused: blocked
        os.chmod(mp, 0o755)
        (mp / "home").mkdir()
        os.chown(mp / "home", NOBODY, NOBODY)
        f = mp / "home" / "f"

        def attack() -> str:
            f.write_bytes(b"x")
            ino = os.stat(f).st_ino
            for dirpath, dirnames, filenames in os.walk(cipher):
                for n in (*dirnames, *filenames):
                    p = Path(dirpath, n)
                    if os.lstat(p).st_ino == ino:
                        p.unlink()
                        os.symlink(id_copy, p)
                        os.chmod(f, 0o4755)
                        return "swapped"
            return "backing entry not found"

        try:
            result = as_user(attack)
        except OSError as exc:
            result = f"refused: {exc}"
        euid = run([id_copy, "-u"], uid=NOBODY).stdout.strip()
        mode = stat.S_IMODE(os.stat(id_copy).st_mode)
        assert mode == 0o755, f"nobody: {result}; outside id is {oct(mode)}, runs with euid {euid}"
    finally:
        force_unmount(mp)


@pytest.mark.parametrize("precreated", [False, True], ids=["new-dir", "mkdir-0755-first"])
def test_fresh_init_cipher_dir_is_root_only(
    reachable_tmp: Path, transit_key: Any, precreated: bool
) -> None:
    """Attack enabler: ``encfs init`` kept an existing 0755 cipher dir, so every user could
    list it and reach the backing directories they own. Users depend on a fresh volume's
    cipher dir being root's and 0700, whoever created the directory, so nobody cannot
    open it."""
    cipher = reachable_tmp / "fresh-cipher"
    if precreated:
        cipher.mkdir(mode=0o755)
        os.chmod(cipher, 0o755)
    env = transit_key.env
    init = encfs("init", cipher, "--vault", transit_key.url, "--audit-log", "none", env=env)
    if init.returncode != 0:  # refusing a 0755 directory outright also protects it
        assert precreated and ("0700" in init.stderr or "chmod" in init.stderr), init.stderr
        return
    st = os.stat(cipher)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o700)
    assert attempt(lambda: os.listdir(cipher)) == errno.EACCES
    assert attempt(lambda: os.stat(cipher / fmt.DIRID_NAME)) == errno.EACCES


@pytest.mark.parametrize("how", ["mode-0755", "owned-by-nobody"])
def test_mount_refuses_cipher_dir_not_root_0700(make_volume: MakeVolume, how: str) -> None:
    """Checks the door's §"init and mount make/require the cipher dir 0700 root": a cipher
    dir other users can enter (0755), or that is not root's, is refused at mount with a
    message saying what to fix (0700 / chmod). Users depend on the mount never serving a
    cipher dir someone else can rewrite under it."""
    vol: Volume = make_volume(mount=False)
    if how == "mode-0755":
        os.chmod(vol.cipher_dir, 0o755)
    else:
        os.chown(vol.cipher_dir, NOBODY, NOBODY)
    proc = encfs(
        "mount",
        vol.cipher_dir,
        vol.mountpoint,
        "--vault",
        vol.vault_url,
        *vol.audit_args(),
        env=vol.env,
    )
    mounted = is_mounted(vol.mountpoint)
    force_unmount(vol.mountpoint)
    assert proc.returncode != 0 and not mounted, "mounted a cipher dir others can write"
    assert "0700" in proc.stderr or "chmod" in proc.stderr or "chown" in proc.stderr, proc.stderr


# --- 2. special files planted in the cipher dir -------------------------------------------------


@pytest.fixture
def listing_dir(vol: Volume) -> tuple[Volume, Path, Path]:
    """Directory ``d`` with files ``ok`` and LONG; returns the volume, ``d`` and the backing
    path of LONG's companion."""
    d = vol.mountpoint / "d"
    d.mkdir()
    (d / "ok").write_bytes(b"ok")
    (d / LONG).write_bytes(b"long")
    companion = Path(str(backing_of(vol, d / LONG)) + fmt.LONGNAME_SUFFIX)
    assert companion.is_file()
    return vol, d, companion


def _responsive(vol: Volume) -> None:
    """The daemon still answers: a fresh file round-trips within the deadline."""
    f = vol.mountpoint / f"probe-{time.monotonic_ns()}"
    as_user(lambda: f.write_bytes(b"alive"), 0)
    assert as_user(lambda: f.read_bytes(), 0) == b"alive"


@pytest.mark.parametrize("kind", ["fifo", "link-to-outside-fifo", "link-to-root-only-copy"])
def test_special_long_name_companion_does_not_hang_listing(
    listing_dir: tuple[Volume, Path, Path], tmp_path: Path, kind: str
) -> None:
    """Attack: a long-name companion is replaced by a FIFO (or a link to a FIFO outside):
    the daemon opened it and blocked, ``ls`` hung in D state; replaced by a link to a
    root-only file outside holding the right encoding: the daemon read it. Users depend on
    listings returning, the rest of the directory listed, the damaged entry hidden."""
    vol, d, companion = listing_dir
    encoded = companion.read_bytes()
    companion.unlink()
    if kind == "fifo":
        mkfifo(companion)
    elif kind == "link-to-outside-fifo":
        mkfifo(tmp_path / "outside-fifo")
        os.symlink(tmp_path / "outside-fifo", companion)
    else:
        secret = tmp_path / "root-only-name"
        secret.write_bytes(encoded)
        os.chmod(secret, 0o600)
        os.symlink(secret, companion)
    ls = run(["ls", "-1", d])
    assert not ls.hung, f"ls hung for {ls.seconds:.1f} s"
    assert ls.returncode == 0, ls.stderr
    assert "ok" in ls.stdout.split()
    assert LONG not in ls.stdout.split()
    _responsive(vol)


def test_fifo_dirid_does_not_hang(vol: Volume) -> None:
    """Attack: a directory's ``.encfs.dirid`` is replaced by a FIFO: the daemon opened it and
    blocked, and ``ls`` of the directory hung in D state. Users depend on the listing
    failing fast (EIO) and the rest of the mount staying usable."""
    d = vol.mountpoint / "d"
    d.mkdir()
    (vol.mountpoint / "sibling").write_bytes(b"s")
    backing = backing_of(vol, d)
    vol.unmount()  # the daemon caches directory ids: start from a daemon that never saw it
    (backing / fmt.DIRID_NAME).unlink()
    mkfifo(backing / fmt.DIRID_NAME)
    vol.mount()
    ls = run(["ls", "-1", d])
    assert not ls.hung, f"ls hung for {ls.seconds:.1f} s"
    assert ls.returncode != 0
    root = run(["ls", "-1", vol.mountpoint])
    assert not root.hung and root.returncode == 0, root
    assert {"d", "sibling"} <= set(root.stdout.split())
    _responsive(vol)


@pytest.mark.parametrize("kind", ["fifo", "chardev"])
def test_special_file_as_regular_backing_fails_fast(vol: Volume, kind: str) -> None:
    """Attack: a regular file's backing entry is replaced by a FIFO (the daemon's open blocked
    forever) or a device node (the daemon opened a device). Users depend on opening such an
    entry through the mount failing at once (EIO), never hanging, never touching a device."""
    f = vol.mountpoint / "f"
    f.write_bytes(b"regular")
    os.stat(f)  # the kernel caches a regular file
    backing = backing_of(vol, f)
    backing.unlink()
    if kind == "fifo":
        mkfifo(backing)
    else:
        os.mknod(backing, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # /dev/null's numbers
    cat = run(["cat", f])
    assert not cat.hung, f"cat hung for {cat.seconds:.1f} s"
    assert cat.returncode != 0, "opened a special file as a regular file's backing entry"
    _responsive(vol)


# --- 3. names that decrypt to what no filesystem may hand out -----------------------------------


@pytest.fixture
def names_key(vol: Volume, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The volume's keys, unwrapped with the root token (to craft backing names)."""
    for var in ("BAO_TOKEN", "CREDENTIALS_DIRECTORY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("VAULT_TOKEN", vol.env["VAULT_TOKEN"])
    hf = volume.read_header(vol.cipher_dir)
    vault = connect(vol.vault_url, VaultSettings(timeout=10))
    try:
        keys = volume.unlock(hf, vault)
    finally:
        vault.close()
    yield keys
    keys.close()


def read_dirid(backing_dir: Path) -> bytes:
    """A backing directory's id, read straight from the format (docs/FORMAT.md §6.1)."""
    path = backing_dir / fmt.DIRID_NAME
    if path.is_symlink():
        return crypto.b64decode(os.readlink(path))
    return path.read_bytes()


BAD_NAMES = {
    "dot": b".",
    "dotdot": b"..",
    "empty": b"",
    "slash": b"a/b",
    "nul": b"zz\0b",
    "256-bytes": b"n" * 256,
    "slash-only": b"/",
}


@pytest.mark.parametrize("bad", list(BAD_NAMES), ids=list(BAD_NAMES))
def test_bad_decrypted_name_is_hidden(vol: Volume, names_key: Any, bad: str) -> None:
    """Attack: someone with the names key (or a buggy writer) plants a backing entry whose
    name decrypts to ``.``, ``..``, the empty name, a name with ``/`` or NUL, or a name over
    255 bytes; the daemon handed it to the kernel, which failed the whole listing with EIO,
    or showed duplicates of ``.``/``..`` or a truncated name. Users depend on such an entry
    being treated as corrupt: hidden, logged, the rest of the listing intact."""
    raw = BAD_NAMES[bad]
    m = vol.mountpoint
    for n in ("good1", "good2"):
        (m / n).write_bytes(n.encode())
    dir_id = read_dirid(vol.cipher_dir)
    encoded = names_key.names.encrypt(raw, dir_id)
    backing = encoded
    if len(encoded) > fmt.MAX_BACKING_NAME:
        backing = fmt.LONGNAME_PREFIX + crypto.b64encode(crypto.sha256(encoded.encode()))
        (vol.cipher_dir / (backing + fmt.LONGNAME_SUFFIX)).write_text(encoded)
    (vol.cipher_dir / backing).write_bytes(b"")
    ls = run(["ls", "-1a", m])
    assert not ls.hung
    assert ls.returncode == 0, ls.stderr
    listed = ls.stdout.splitlines()
    assert sorted(listed) == [".", "..", "good1", "good2"], listed
    for n in ("good1", "good2"):
        assert (m / n).read_bytes() == n.encode()
    _responsive(vol)
    vol.unmount()
    log = vol.log_file.read_text() if vol.log_file else ""
    assert backing in log, "the corrupt entry is not named in the log"


# --- 4. long plaintext paths -------------------------------------------------------------------


def test_plaintext_paths_up_to_4095_bytes(vol: Volume) -> None:
    """Plaintext paths up to PATH_MAX (4,095 bytes) work, though their encrypted form is far
    longer (150-byte names encrypt to 235 characters; 200-byte names would be long names of
    52): mkdir failed at ~2.6 KB of plaintext once the backing path passed 4,096 bytes.
    Users depend on any path the kernel accepts working on the mount. The test walks down
    with chdir, as the whole path exceeds PATH_MAX for the test process too."""
    part = "p" * 150
    levels = 26  # 26 * 151 = 3926 bytes of directories, then a 150-byte file name: 4077
    leaf = "f" * 149 + "1"
    home = os.getcwd()
    made = 0
    try:
        os.chdir(vol.mountpoint)
        for _ in range(levels):
            os.mkdir(part)
            os.chdir(part)
            made += 1
        plain_len = levels * (len(part) + 1) + 1 + len(leaf)
        assert 4000 < plain_len <= 4095
        data = os.urandom(10000)
        fd = os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        assert os.stat(leaf).st_size == len(data)
        with open(leaf, "rb") as h:
            assert h.read() == data
        os.rename(leaf, "g" * 150)
        assert os.listdir(".") == ["g" * 150]
        with open("g" * 150, "rb") as h:
            assert h.read() == data
        os.mkdir("d" * 100)
        os.rmdir("d" * 100)
        os.unlink("g" * 150)
        while made:
            os.chdir("..")
            os.rmdir(part)
            made -= 1
    finally:
        os.chdir(home)
    assert os.listdir(vol.mountpoint) == []


@pytest.mark.parametrize("kind", ["link-to-outside-dir", "fifo-undo-file"])
def test_planted_undo_entries_are_not_followed(vol: Volume, tmp_path: Path, kind: str) -> None:
    """Attack: ``encfs.undo`` (where the daemon keeps the old content of blocks it rewrites
    in place) is planted as a link to a directory outside, or a file's undo file as a FIFO.
    Users depend on the daemon writing nothing outside the cipher dir, never blocking, and
    the partial-block writes still working (without records)."""
    f = vol.mountpoint / "f"
    f.write_bytes(b"x" * 3000)
    backing = backing_of(vol, f)
    outside = tmp_path / "outside"
    outside.mkdir()
    vol.unmount()
    undo_dir = vol.cipher_dir / fmt.UNDO_DIR_NAME
    if kind == "link-to-outside-dir":
        os.symlink(outside, undo_dir)
    else:
        undo_dir.mkdir(mode=0o700)
        file_id = fmt.parse_file_header(backing.read_bytes()[: fmt.FILE_HEADER_LEN])
        mkfifo(undo_dir / fmt.undo_file_name(file_id))
    vol.mount()
    append = run(["sh", "-c", f"printf appended >> {f}"])
    assert not append.hung, f"the append hung for {append.seconds:.1f} s"
    assert append.returncode == 0, append.stderr
    assert f.read_bytes() == b"x" * 3000 + b"appended"
    assert list(outside.iterdir()) == []
    _responsive(vol)
