"""The ``encfs vault dev/serve/setup`` commands: run or provision a local OpenBao
(``encfs.bao``) and print what the operator needs (addresses, next steps; a token only in
dev mode)."""

from __future__ import annotations

import argparse
import os
import sys
import typing
from pathlib import Path

from encfs import errors
from encfs.cli.output import ExitCode, as_exit_code
from encfs.vault import VaultSettings

if typing.TYPE_CHECKING:
    from encfs.bao.process import BaoExit


def cmd_vault(args: argparse.Namespace) -> ExitCode:
    if args.vault_command == "dev":
        return _vault_dev(args)
    if args.vault_command == "serve":
        return _vault_serve(args)
    return _vault_setup(args)


def _vault_dev(args: argparse.Namespace) -> ExitCode:
    """``encfs vault dev``: an in-memory OpenBao in the foreground until SIGTERM/SIGINT;
    prints its address and root token (dev mode only). 0 when stopped on request."""
    from encfs.bao.dev import run_dev
    from encfs.bao.process import SignalForwarder

    root_token: str | None = None
    if args.root_token_file is not None:
        root_token = _dev_root_token(args.root_token_file)
    with SignalForwarder() as fwd:
        try:
            server = run_dev(args.listen, root_token, log=sys.stderr, on_spawn=fwd.attach)
        except errors.BaoServerError:
            if fwd.stop_signal is not None:
                return ExitCode.OK
            raise
        try:
            _print_dev_info(server.addr, server.root_token, server.mount)
            return _bao_exit_code(fwd.wait(server.proc))
        finally:
            server.stop()


def _print_dev_info(addr: str, root_token: str, mount: str) -> None:
    """The operator-facing lines of ``encfs vault dev``: address, admin (root) token, the
    ``export`` line, and the warning that dev mode is in memory and insecure."""
    lines = [
        f"OpenBao dev server listening on {addr} (transit enabled at {mount}/)",
        f"admin (root) token: {root_token}",
        "",
        f"  export VAULT_ADDR={addr} VAULT_TOKEN={root_token}",
        "",
        "Give a host a key and its own token:",
        f"  encfs vault setup --addr {addr} --key KEY --host HOST --token-out FILE",
        "",
        "WARNING: dev mode keeps everything in memory and is insecure: plain HTTP, a root",
        "token printed above, and every key is lost when it stops - so is every volume",
        "created with it. Use it for demos and tests only; `encfs vault serve` keeps data.",
        "Stop it with Ctrl-C (or SIGTERM).",
    ]
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()


def _bao_exit_code(ended: BaoExit) -> ExitCode:
    """A supervised OpenBao's end (``bao.process.BaoExit``) as our exit code: 0 if we
    stopped it and it exited cleanly, else non-zero (saying so if it stopped by itself)."""
    if ended.on_request:
        return ExitCode.OK if ended.status == 0 else ExitCode.FAILURE
    print(f"OpenBao stopped by itself (exit status {ended.status})", file=sys.stderr)
    return as_exit_code(ended.status if ended.status > 0 else 1)


def _dev_root_token(path: Path) -> str:
    """The dev server's root token from ``path``, made (0600) when the file is missing."""
    import secrets

    from encfs.vault import read_token

    if path.exists():
        secret = read_token(VaultSettings(token_file=path))
        try:
            view = secret.view()
            try:
                return bytes(view).decode()  # the dev server takes it on its command line
            finally:
                view.release()
        finally:
            secret.close()
    token = "dev-" + secrets.token_urlsafe(18)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


FIRST_START_TEXT = """\
Initialised a new OpenBao vault in {data} (1 unseal key share, threshold 1).
The unseal key and the initial root token are in {init} (mode 0600).

Trade-off: the unseal key sits on the same disk as the vault's data, so this server unseals
itself after every restart. That gives central revocation and an audit point, and keeps the
volume keys from anyone who has a volume's files or another host; it does NOT protect against
theft of this host's disk, which holds both the vault's data and the key that unseals it.

Next:
  1. give each host a key and its own token (with the root token from {init}):
       encfs vault setup --addr {addr} --ca-file {ca} --admin-token-file {init} \\
           --key KEY --host HOST --token-out FILE
  2. then move the root token out of {init}: keep it offline, or revoke it
     (bao token revoke -self) and make a new one when needed (bao operator generate-root).
     Host tokens are orphans: revoking the root token does not revoke them.
  3. in production prefer auto-unseal (cloud KMS, HSM, or transit on another vault), or
     remove the unseal key from {init} and unseal by hand after each start
     (bao operator unseal).
  4. for a cluster (3 nodes survive the loss of 1), copy {init}, {ca} and
     {ca_key} into each new node's data directory (modes 0600, directory 0700) and run
       encfs vault serve --data DIR --listen HOST:PORT --node-id NAME --join {addr}
     Hosts then list every node: encfs mount ... --vault ADDR1 --vault ADDR2 --vault ADDR3
"""


def _vault_serve(args: argparse.Namespace) -> ExitCode:
    """``encfs vault serve`` (and ``encfs-vault.service``): the persistent OpenBao of
    ``bao.serve.start_serve`` in the foreground; prints (and tells systemd) when it is
    ready, forwards SIGTERM/SIGINT (stop) and SIGHUP (reload) to it, and returns when it
    has stopped: 0 if stopped on request, non-zero if OpenBao died. Its log goes to stderr."""
    from encfs.bao.process import SignalForwarder
    from encfs.bao.serve import notify_ready, notify_stopping, start_serve
    from encfs.bao.setup import DEFAULT_MOUNT

    with SignalForwarder() as fwd:
        try:
            server = start_serve(
                args.data,
                args.listen,
                cluster_listen=args.cluster_listen,
                node_id=args.node_id,
                join=args.join,
                log=sys.stderr,
                on_spawn=fwd.attach,
            )
        except errors.BaoServerError:
            if fwd.stop_signal is not None:
                return ExitCode.OK
            raise
        try:
            paths = server.paths
            if server.initialized_now:
                print(
                    FIRST_START_TEXT.format(
                        data=paths.data_dir,
                        init=paths.init_file,
                        addr=server.addr,
                        ca=paths.ca_file,
                        ca_key=paths.ca_key_file,
                    ),
                    flush=True,
                )
            if server.joined_now:
                print(
                    f"encfs-vault: this node ({args.node_id}) joined the cluster at {args.join}",
                    flush=True,
                )
            if server.unsealed:
                role = "a standby of its cluster" if server.standby else "active"
                print(
                    f"encfs-vault: OpenBao ready at {server.addr}, {role} (CA: {paths.ca_file}; "
                    f"transit at {DEFAULT_MOUNT}/)",
                    flush=True,
                )
            else:
                print(
                    f"encfs-vault: OpenBao at {server.addr} is SEALED: no unseal key in "
                    f"{paths.init_file}; unseal it with:\n"
                    f"  BAO_ADDR={server.addr} BAO_CACERT={paths.ca_file} bao operator unseal",
                    flush=True,
                )
            notify_ready(server)
            return _bao_exit_code(fwd.wait(server.proc))
        finally:
            notify_stopping()
            server.stop()


def _vault_setup(args: argparse.Namespace) -> ExitCode:
    """``encfs vault setup``: ``bao.setup.setup`` with the admin token from
    ``--admin-token-file`` or ``VAULT_TOKEN`` / ``BAO_TOKEN``, then print what was done and
    how to use it (never the token)."""
    from encfs.bao.setup import HOST_TOKEN_PERIOD, read_admin_token, setup

    result = setup(
        args.addr,
        read_admin_token(args.admin_token_file),
        args.key,
        args.host,
        args.token_out,
        args.ca_file,
        args.mount,
    )
    if result.transit_enabled:
        print(f"enabled transit at {args.mount.strip('/')}/")
    kinfo = result.key_info
    if result.key_created:
        print(
            f"created key {result.vault_url} ({kinfo.get('type')}, not exportable, "
            "deletion not allowed)"
        )
    else:
        print(
            f"kept existing key {result.vault_url} (version {kinfo.get('latest_version')}, "
            "deletion not allowed)"
        )
    for note in result.notes:
        print(f"note: {note}")
    print(f"wrote policy {result.policy} and token role {result.role}")
    print(
        f"issued a new host token (periodic {HOST_TOKEN_PERIOD}, orphan; accessor "
        f"{result.accessor}) into {result.token_file} (mode 0600)"
    )
    if result.previous_accessor:
        print(
            f"the previous token in {result.token_file} (accessor {result.previous_accessor}) "
            "stays valid until it expires or you revoke it: "
            f"bao token revoke -accessor {result.previous_accessor}"
        )
    ca = f" --ca-file {args.ca_file}" if args.ca_file is not None else ""
    print("create a volume with it:")
    print(
        f"  encfs init CIPHER_DIR --vault {result.vault_url} --token-file {result.token_file}{ca}"
    )
    return ExitCode.OK
