"""Create a frozen format-v1 volume under tests/data/. RAN ONCE PER VOLUME; KEPT FOR THE RECORD.

A frozen volume is a compatibility fixture: every later encfs must still mount it and read
exactly the tree in its EXPECTED.json (tests/test_frozen_volume.py). Never regenerate one
to make a failing test pass: a failure means the on-disk format changed. There is one per
format variant (docs/FORMAT.md §12): ``frozen-v1`` (feature flags 0, made 2026-11),
``frozen-v1-dirid-links`` (``DIRID_LINKS``, made 2026-12-01, by the encfs that added it) and
``frozen-v1-double`` (``DIRID_LINKS | DOUBLE``, made 2026-12-06 with ``--double``: two
TEST-ONLY KEKs, TEST-KEK.b64 for key slot 0 and TEST-KEK2.b64 for key slot 1).

How the vault problem is solved: a volume's key is wrapped by a KEK in a vault, and the
dev vault that made this volume is gone. So the KEK is a fixed TEST-ONLY key kept next to
the volume (TEST-KEK.b64) and imported into a fresh OpenBao with the transit BYOK API
(``import_kek`` below, also used by the test): the same KEK in any fresh server decrypts
the header's ``vault:v1:`` ciphertext. The volume itself is made by the real CLI
(``encfs init`` / ``encfs mount``) and real file operations through the FUSE mount.

Layout written here (for each volume):

    tests/data/frozen-v1[-VARIANT]/
      cipher/              the cipher dir, exactly as encfs wrote it
      cipher-xattrs.json   the backing xattrs (git cannot store xattrs)
      EXPECTED.json        the plaintext tree: path -> kind, size, sha256, target, xattrs
      TEST-KEK.b64         the TEST-ONLY KEK (base64 of 32 bytes); TEST-KEK.README says so

    .venv/bin/python -m tests.make_frozen_volume [NAME] [--double]   # NAME under
                             # tests/data/; refuses if NAME/cipher exists. --double: a
                             # double-encrypted volume, KEK 2 from TEST-KEK2.b64
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding

from tests.openbao import OpenBao

DATA = Path(__file__).resolve().parent / "data"
FROZEN = DATA / "frozen-v1"
KEK_NAME = "encfs-frozen-v1"
KEK2_NAME = "encfs-frozen-v1-outer"
"""KEK 2 (key slot 1) of a double-encrypted frozen volume."""
BLOCK_SIZE = 4096


def read_test_kek(frozen: Path = FROZEN, file: str = "TEST-KEK.b64") -> bytes:
    """A frozen volume's TEST-ONLY KEK: ``TEST-KEK.b64`` (key slot 0), ``TEST-KEK2.b64``
    (key slot 1 of a double-encrypted one)."""
    kek = base64.b64decode((frozen / file).read_text().strip(), validate=True)
    if len(kek) != 32:
        raise ValueError(f"{file} must hold 32 bytes")
    return kek


def import_kek(bao: OpenBao, name: str, kek: bytes) -> None:
    """Import ``kek`` as transit key ``name`` (type aes256-gcm96) with the BYOK API.

    ``GET MOUNT/wrapping_key`` gives the server's RSA-4096 public key. The payload is
    RSA-OAEP-SHA256(ephemeral AES-256 key) || AES-KWP(ephemeral key, KEK) (RFC 5649),
    base64, posted to ``MOUNT/keys/NAME/import``.
    """
    answer = bao.admin.adapter.get(f"/v1/{bao.mount}/wrapping_key")
    public = serialization.load_pem_public_key(answer["data"]["public_key"].encode())
    if not isinstance(public, rsa.RSAPublicKey):
        raise TypeError("transit wrapping key is not RSA")
    ephemeral = os.urandom(32)
    wrapped_ephemeral = public.encrypt(
        ephemeral,
        padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None),
    )
    wrapped_kek = aes_key_wrap_with_padding(ephemeral, kek)
    bao.admin.adapter.post(
        f"/v1/{bao.mount}/keys/{name}/import",
        json={
            "ciphertext": base64.b64encode(wrapped_ephemeral + wrapped_kek).decode(),
            "type": "aes256-gcm96",
            "hash_function": "SHA256",
        },
    )


def encfs(*args: str | Path, env: dict[str, str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "encfs", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    if proc.returncode != 0:
        raise SystemExit(f"encfs {args[0]} failed ({proc.returncode}):\n{proc.stderr}")


def pattern(seed: str, size: int) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


LONG_FILE = "long-" + "n" * 246 + ".txt"  # 255 bytes: the longest name there is
LONG_DIR = "d" * 200  # a long (hashed) name on a directory


def populate(mnt: Path) -> None:
    """The plaintext tree, written through the FUSE mount."""
    (mnt / "empty").write_bytes(b"")
    (mnt / "one.txt").write_bytes(b"x")
    (mnt / "five-thousand.bin").write_bytes(pattern("5000", 5000))
    (mnt / "multi-block.bin").write_bytes(pattern("multi", 3 * BLOCK_SIZE + 100))
    (mnt / "exact-block.bin").write_bytes(pattern("exact", BLOCK_SIZE))
    with open(mnt / "sparse.bin", "wb") as f:  # blocks 0 and 1 stay holes
        f.truncate(10_000)
        f.seek(9_990)
        f.write(b"sparse end")
    (mnt / "ünïcødé 名前.txt").write_text("non-ASCII name\n", encoding="utf-8")
    (mnt / LONG_FILE).write_text("a 255-byte name\n")
    (mnt / "sub").mkdir()
    (mnt / "sub" / "nested.txt").write_text("nested file\n")
    (mnt / "sub" / "empty-dir").mkdir()
    (mnt / LONG_DIR).mkdir()
    (mnt / LONG_DIR / "inner.txt").write_text("inside a long-named directory\n")
    os.symlink("sub/nested.txt", mnt / "link")
    os.symlink("/nonexistent/absolute/target", mnt / "abs-link")
    os.setxattr(mnt / "five-thousand.bin", "user.comment", b"frozen v1")
    os.setxattr(mnt / "five-thousand.bin", "user.binary", bytes(range(256)))
    os.setxattr(mnt / "sub", "user.dir", b"a directory xattr")


def snapshot(mnt: Path) -> dict[str, dict[str, Any]]:
    """Plaintext tree: mount-relative path ('/' for the root) -> what it holds."""
    tree: dict[str, dict[str, Any]] = {}

    def xattrs(path: Path) -> dict[str, str]:
        return {
            name: base64.b64encode(os.getxattr(path, name, follow_symlinks=False)).decode()
            for name in sorted(os.listxattr(path, follow_symlinks=False))
        }

    def walk(path: Path, rel: str) -> None:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            tree[rel] = {"kind": "symlink", "target": os.readlink(path), "size": st.st_size}
        elif stat.S_ISDIR(st.st_mode):
            tree[rel] = {"kind": "dir", "xattrs": xattrs(path)}
            for child in sorted(os.listdir(path)):
                walk(path / child, (rel.rstrip("/") + "/" + child))
        elif stat.S_ISREG(st.st_mode):
            data = path.read_bytes()
            tree[rel] = {
                "kind": "file",
                "size": st.st_size,
                "sha256": hashlib.sha256(data).hexdigest(),
                "xattrs": xattrs(path),
            }
        else:
            tree[rel] = {"kind": f"other {stat.S_IFMT(st.st_mode):o}"}

    walk(mnt, "/")
    return tree


def backing_xattrs(cipher: Path) -> dict[str, dict[str, str]]:
    """Every ``user.*`` xattr of the cipher dir: relative backing path -> name -> base64."""
    found: dict[str, dict[str, str]] = {}
    for dirpath, dirnames, filenames in os.walk(cipher):
        for name in [".", *dirnames, *filenames]:
            path = Path(dirpath) / name
            if path.is_symlink():
                continue
            attrs = {
                x: base64.b64encode(os.getxattr(path, x)).decode()
                for x in sorted(os.listxattr(path))
                if x.startswith("user.")
            }
            if attrs:
                found[os.path.normpath(path.relative_to(cipher)).replace(os.sep, "/")] = attrs
    return found


def main(argv: list[str]) -> int:
    double = "--double" in argv
    argv = [a for a in argv if a != "--double"]
    frozen = DATA / argv[0] if argv else FROZEN
    cipher = frozen / "cipher"
    if cipher.exists():
        print(f"{cipher} exists: the frozen volume is never regenerated", file=sys.stderr)
        return 1
    frozen.mkdir(parents=True, exist_ok=True)
    for name in ("TEST-KEK.b64", "TEST-KEK2.b64") if double else ("TEST-KEK.b64",):
        if not (frozen / name).exists():
            (frozen / name).write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    kek = read_test_kek(frozen)
    with OpenBao() as bao, tempfile.TemporaryDirectory(prefix="encfs-frozen-") as tmp:
        import_kek(bao, KEK_NAME, kek)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        env["VAULT_TOKEN"] = bao.root_token
        url = bao.url_for(KEK_NAME)
        second: list[str | Path] = []
        if double:
            import_kek(bao, KEK2_NAME, read_test_kek(frozen, "TEST-KEK2.b64"))
            token2 = Path(tmp) / "vault2.token"
            token2.write_text(bao.root_token + "\n")
            token2.chmod(0o600)
            second = ["--vault2", bao.url_for(KEK2_NAME), "--vault2-token-file", token2]
        encfs(
            "init", cipher, "--vault", url, *(["--double"] if double else []), *second,
            "--block-size", str(BLOCK_SIZE), env=env,
        )  # fmt: skip
        mnt = Path(tmp) / "mnt"
        mnt.mkdir()
        encfs("mount", cipher, mnt, "--vault", url, *second, env=env)
        try:
            populate(mnt)
            tree = snapshot(mnt)
        finally:
            encfs("unmount", mnt, env=env)
    header = (cipher / "encfs.volume").read_bytes()
    expected = {
        "description": "The plaintext tree of the frozen format-v1 volume in cipher/. "
        "Paths are mount-relative; sizes in bytes; xattr values and file digests of the "
        "plaintext (values base64). Never edit: see tests/make_frozen_volume.py.",
        "kek_name_at_creation": KEK_NAME,
        **({"kek2_name_at_creation": KEK2_NAME} if double else {}),
        "block_size": BLOCK_SIZE,
        "header_sha256": hashlib.sha256(header).hexdigest(),
        "tree": tree,
    }
    (frozen / "EXPECTED.json").write_text(json.dumps(expected, indent=1) + "\n")
    (frozen / "cipher-xattrs.json").write_text(
        json.dumps(backing_xattrs(cipher), indent=1, sort_keys=True) + "\n"
    )
    print(f"frozen volume written to {frozen}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
