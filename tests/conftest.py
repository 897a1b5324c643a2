"""Shared fixtures: one real OpenBao dev server per session, fresh keys, real mounts."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness import MakeVolume, Volume, force_unmount
from tests.openbao import OpenBao


@pytest.fixture(scope="session", autouse=True)
def host_pins(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Volume pins (``encfs.pins``) go to a directory of this session, never the machine's
    /var/lib/encfs/pins; every ``encfs`` the tests run inherits ``ENCFS_PIN_DIR``."""
    path = tmp_path_factory.mktemp("pins")
    old = os.environ.get("ENCFS_PIN_DIR")
    os.environ["ENCFS_PIN_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("ENCFS_PIN_DIR", None)
    else:
        os.environ["ENCFS_PIN_DIR"] = old


@pytest.fixture(scope="session")
def openbao() -> Iterator[OpenBao]:
    """One OpenBao dev server (plain HTTP on loopback, transit at ``transit``) per session.

    Tests that seal, stop or otherwise break a server start their own ``OpenBao()``.
    """
    with OpenBao() as bao:
        yield bao


@dataclass(frozen=True)
class TransitKey:
    """A fresh transit key on the session server; ``token`` is the root token."""

    name: str
    url: str
    token: str
    bao: OpenBao

    @property
    def root_token(self) -> str:
        return self.token

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        env["VAULT_TOKEN"] = self.token
        env["VAULT_ADDR"] = self.bao.addr  # the vault pinned on the "host" (never the header)
        return env


@pytest.fixture
def transit_key(openbao: OpenBao) -> TransitKey:
    """A fresh, uniquely named transit key and the root token (for happy-path tests)."""
    name = "k-" + secrets.token_hex(6)
    openbao.create_key(name)
    return TransitKey(name=name, url=openbao.url_for(name), token=openbao.root_token, bao=openbao)


@pytest.fixture
def host_token(openbao: OpenBao, transit_key: TransitKey, tmp_path: Path) -> Path:
    """A 0600 token file holding a least-privilege host token for ``transit_key``: read the
    key's status, datakey, decrypt, rewrap, renew and look up itself; nothing else."""
    policy = openbao.write_host_policy(transit_key.name)
    path = tmp_path / "host.token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(openbao.make_token([policy]) + "\n")
    return path


@dataclass(frozen=True)
class SecondKey:
    """KEK 2 of a double-encrypted volume: another transit key on the session server, and a
    least-privilege host token of its own for it (0600 file), never the first key's."""

    name: str
    url: str
    token: str
    token_file: Path
    policy: str


def _write_secret(path: Path, text: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    return path


@pytest.fixture
def second_key(openbao: OpenBao, tmp_path: Path) -> SecondKey:
    name = "k2-" + secrets.token_hex(6)
    openbao.create_key(name)
    policy = openbao.write_host_policy(name)
    token = openbao.make_token([policy])
    return SecondKey(
        name=name,
        url=openbao.url_for(name),
        token=token,
        token_file=_write_secret(tmp_path / f"{name}.token", token),
        policy=policy,
    )


@pytest.fixture
def make_volume(
    transit_key: TransitKey, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[MakeVolume]:
    """Factory: ``make_volume(options=[...], block_size=N, mount=True, double=False) ->
    Volume``; ``double`` makes it double-encrypted, KEK 2 the ``second_key`` fixture's.

    Every integration test mounts through this fixture; teardown unmounts whatever is left.
    """
    made: list[Volume] = []

    def factory(
        options: list[str] | None = None,
        block_size: int = 4096,
        mount: bool = True,
        name: str = "",
        double: bool = False,
    ) -> Volume:
        tag = name or f"v{len(made)}"
        mp = tmp_path / f"{tag}-plain"
        mp.mkdir()
        second: SecondKey | None = request.getfixturevalue("second_key") if double else None
        vol = Volume(
            cipher_dir=tmp_path / f"{tag}-cipher",
            mountpoint=mp,
            vault_url=transit_key.url,
            env=transit_key.env,
            options=list(options or []),
            log_file=tmp_path / f"{tag}.log",
            block_size=block_size,
            audit_log=tmp_path / f"{tag}.audit",
            vault2_url=second.url if second else "",
            vault2_token_file=second.token_file if second else None,
        )
        made.append(vol)
        vol.init()
        if mount:
            vol.mount()
        return vol

    yield factory
    for vol in made:
        force_unmount(vol.mountpoint)


@pytest.fixture
def vol(make_volume: MakeVolume) -> Volume:
    """A mounted volume with default options."""
    v: Volume = make_volume()
    return v
