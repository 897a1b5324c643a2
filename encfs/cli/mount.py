"""The commands on a live mount: ``mount`` (the daemon in the foreground, or spawned in the
background until it reports the mount live), ``unmount`` and ``status``, and what they print."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from encfs.cli.output import ExitCode, setup_logging
from encfs.cli.parser import verbosity
from encfs.cli.settings import audit_settings, vault2_settings, vault_setting, vault_settings
from encfs.vault import env_vault_addr
from encfs.watcher import WatchSettings


def _mount_options(raw: Sequence[str]) -> dict[str, bool]:
    known = {"allow_other", "default_permissions", "nonempty", "ro", "rw", "writeback_cache"}
    opts: dict[str, bool] = {}
    for group in raw:
        for opt in filter(None, group.split(",")):
            if opt not in known:
                raise argparse.ArgumentTypeError(
                    f"unknown mount option {opt!r} (known: {', '.join(sorted(known))})"
                )
            opts[opt] = True
    return opts


def cmd_mount(args: argparse.Namespace, argv: Sequence[str]) -> ExitCode:
    from encfs.daemon import Daemon, MountConfig
    from encfs.fs import FsOptions

    try:
        opts = _mount_options(args.options)
    except argparse.ArgumentTypeError as exc:
        print(f"encfs: error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    refusal = _double_refusal(args)
    if refusal:
        print(f"encfs: error: {refusal}", file=sys.stderr)
        return ExitCode.USAGE
    if not args.foreground:
        return _spawn_background(argv, args)
    read_only = opts.get("ro", False) and not opts.get("rw", False)
    fs = FsOptions(read_only=read_only, writeback_cache=opts.get("writeback_cache", False))
    if args.suspended_errno is not None:  # else FsOptions' default
        fs = dataclasses.replace(fs, suspended_errno=args.suspended_errno)
    config = MountConfig(
        cipher_dir=args.cipher_dir.resolve(),
        mountpoint=args.mountpoint.resolve(),
        vault=vault_settings(args),
        vault_url=vault_setting(args.vault_url),
        vault_addr=env_vault_addr(),
        vault2=vault2_settings(args),
        vault2_url=args.vault2_url,
        repin=args.repin,
        nonempty=opts.get("nonempty", False),
        allow_other=opts.get("allow_other", False),
        default_permissions=opts.get("default_permissions", False),
        read_only=read_only,
        fs=fs,
        debug=verbosity(args) >= 3,
        audit=audit_settings(args),
        ephemeral=args.ephemeral,
        metrics_file=args.metrics_file,
        watch=WatchSettings(
            check_interval=args.check_interval,
            offline_grace=args.offline_grace,
            on_revoke=args.on_revoke,
        ),
    )
    ready_fd: int | None = args.ready_fd

    def on_ready() -> None:
        if ready_fd is None:
            return
        # Background child: from now on log only to the log file / syslog, then tell the
        # waiting parent that the mount is live (it exits, and our stderr pipe closes).
        setup_logging(
            verbosity(args), stream=False, log_file=args.log_file, syslog=args.log_file is None
        )
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        os.write(ready_fd, b"READY\n")
        os.close(ready_fd)

    Daemon(config).run(on_ready=on_ready)
    return ExitCode.OK


def _double_refusal(args: argparse.Namespace) -> str:
    """Why these mount arguments ask for double encryption where there can be none (a
    usage error), or "". A persistent volume's layers are in its header (``encfs init
    --double``); an ephemeral volume is single-layer."""
    if args.ephemeral and (args.double or args.vault2_url):
        return (
            "an ephemeral volume is single-layer: double encryption (--double, --vault2) "
            "guards data that must outlive the loss of one KEK or one algorithm, and an "
            "ephemeral volume has no KEK and lasts one mount. Use `encfs init --double` "
            "for a persistent double-encrypted volume"
        )
    if args.double:
        return (
            "mount takes no --double: a volume is double-encrypted from `encfs init "
            "--double` on (its header says so); mount it with --vault2 URL for its second vault"
        )
    return ""


def _spawn_background(argv: Sequence[str], args: argparse.Namespace) -> ExitCode:
    """Run the daemon as a detached child; return once it reports the mount live or fails."""
    read_end, write_end = os.pipe()
    cmd = [sys.executable, "-m", "encfs", *argv, "--foreground", "--ready-fd", str(write_end)]
    child = subprocess.Popen(
        cmd,
        pass_fds=(write_end,),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    os.close(write_end)
    assert child.stderr is not None
    stderr_fd = child.stderr.fileno()
    deadline = time.monotonic() + max(60.0, 3 * args.vault_timeout)
    ready = b""
    err_text = b""
    open_fds = {read_end, stderr_fd}
    while open_fds and time.monotonic() < deadline:
        readable, _, _ = select.select(list(open_fds), [], [], 0.5)
        for fd in readable:
            chunk = os.read(fd, 65536)
            if not chunk:
                open_fds.discard(fd)
            elif fd == read_end:
                ready += chunk
            else:
                err_text += chunk
        if b"READY" in ready:
            break
    os.close(read_end)
    child.stderr.close()
    # libfuse 3.14 warns about its own unset thread limit on every start; not ours to report.
    err_text = b"".join(
        line for line in err_text.splitlines(keepends=True) if b"invalid max threads" not in line
    )
    if b"READY" in ready:
        sys.stderr.write(err_text.decode(errors="replace"))
        print(f"mounted {args.cipher_dir} on {args.mountpoint} (daemon pid {child.pid})")
        return ExitCode.OK
    try:
        code = child.wait(timeout=5)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
        sys.stderr.write(err_text.decode(errors="replace"))
        print("encfs: error: the mount did not come up in time; daemon killed", file=sys.stderr)
        return ExitCode.MOUNT_FAILED
    sys.stderr.write(err_text.decode(errors="replace"))
    return ExitCode(code) if code in ExitCode._value2member_map_ else ExitCode.MOUNT_FAILED


def cmd_unmount(args: argparse.Namespace) -> ExitCode:
    from encfs.mounts import fusermount, is_mountpoint, runtime_file

    mountpoint = args.mountpoint.resolve()
    if not is_mountpoint(mountpoint):
        print(f"encfs: error: {mountpoint} is not mounted", file=sys.stderr)
        return ExitCode.NOT_MOUNTED
    pid: int | None = None
    try:
        pid = int(json.loads(runtime_file(mountpoint).read_text())["pid"])
    except (OSError, ValueError, KeyError):
        pid = None
    proc = fusermount("-u", *(["-z"] if args.lazy else []), str(mountpoint))
    if proc.returncode != 0:
        msg = proc.stderr.strip()
        if "busy" in msg.lower():
            print(
                f"encfs: error: {mountpoint} is busy (files open or a process's cwd); "
                "close them or use --lazy",
                file=sys.stderr,
            )
            return ExitCode.BUSY
        print(f"encfs: error: unmount failed: {msg}", file=sys.stderr)
        return ExitCode.FAILURE
    if pid is not None:
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            print(
                f"encfs: warning: daemon {pid} still running after {args.timeout}s", file=sys.stderr
            )
            return ExitCode.FAILURE
    print(f"unmounted {mountpoint}")
    return ExitCode.OK


def cmd_status(args: argparse.Namespace) -> ExitCode:
    from encfs.mounts import RUN_DIR, ask, status_socket

    if args.mountpoint is not None:
        sockets = [status_socket(args.mountpoint.resolve())]
    else:
        sockets = sorted(RUN_DIR.glob("*.sock")) if RUN_DIR.is_dir() else []
    reports: list[dict[str, object]] = []
    for path in sockets:
        try:
            reports.append(ask(path))
        except (OSError, ValueError) as exc:
            if args.mountpoint is not None:
                print(
                    f"encfs: error: no encfs daemon answers for {args.mountpoint} ({exc})",
                    file=sys.stderr,
                )
                return ExitCode.NOT_MOUNTED
    if args.json:
        print(json.dumps(reports[0] if args.mountpoint is not None else reports, indent=2))
        return ExitCode.OK
    if args.prometheus:
        from encfs import metrics

        sys.stdout.write(metrics.render(reports))
        return ExitCode.OK
    if not reports:
        print("no encfs volume is mounted")
        return ExitCode.OK
    for report in reports:
        _print_status(report)
    return ExitCode.OK


def _print_status(r: dict[str, Any]) -> None:
    state = str(r.get("state", "?"))
    reason = f" — {r['reason']}" if r.get("reason") else ""
    print(f"{r.get('mountpoint')}: {state} since {r.get('since')}{reason}")
    print(f"  cipher dir   {r.get('cipher_dir')}  (volume {r.get('volume_id')})")
    reach = {True: "reachable", False: "unreachable", None: "not checked yet"}
    keks = r.get("keks") or []
    if r.get("double") and len(keks) > 1:
        print(f"  layers       AES-256-GCM inside {r.get('outer_cipher')} (double-encrypted)")
        for kek in keks:
            state = kek.get("state") or "not checked yet"
            print(
                f"  KEK {kek.get('kek')}        {kek.get('vault')}  (KEK version "
                f"{kek.get('kek_version')}): {state}"
            )
            if kek.get("last_error"):
                print(f"    last error {kek['last_error']}")
            _print_identity(kek.get("token") or {}, "    identity   ")
        print(
            f"  vaults       {reach[r.get('vault_reachable')]}, last check "
            f"{r.get('last_check') or '-'} (every {r.get('check_interval')} s, offline grace "
            f"{r.get('offline_grace')} s)"
        )
    else:
        print(f"  vault key    {r.get('vault')}  (KEK version {r.get('kek_version')})")
        print(
            f"  vault        {reach[r.get('vault_reachable')]}, last check "
            f"{r.get('last_check') or '-'} (every {r.get('check_interval')} s, offline grace "
            f"{r.get('offline_grace')} s)"
        )
        if r.get("last_error"):
            print(f"  last error   {r['last_error']}")
        _print_identity(r.get("token") or {}, "  identity     ")
    addresses = r.get("vault_addresses") or []
    if len(addresses) > 1 or r.get("vault_node"):
        node = r.get("vault_node") or "-"
        print(f"  vault nodes  {', '.join(addresses)}; last answer from {node}")
    mem = r.get("memory") or {}
    if mem:
        locked = "locked" if mem.get("locked") else f"NOT locked ({mem.get('detail')})"
        print(
            f"  key memory   {locked}, {'excluded from' if mem.get('dontdump') else 'in'} "
            "core dumps"
        )
    c = r.get("counters") or {}
    if c:
        print(
            f"  counters     {c.get('reads')} reads ({c.get('bytes_read')} B), "
            f"{c.get('writes')} writes ({c.get('bytes_written')} B), "
            f"{c.get('integrity_errors')} integrity errors"
        )
    if r.get("io_path"):
        served = ""
        if "native_reads" in c:
            served = (
                f"; {c.get('native_reads')} reads and {c.get('native_writes')} writes of "
                f"those served natively, {c.get('native_fallbacks')} handed to Python"
            )
        print(f"  I/O path     {r['io_path']}{served}")
    rk = r.get("rekey") or {}
    if rk:
        if rk.get("state") == "interrupted":
            line = "interrupted: `encfs rekey` finishes it"
        else:
            line = (
                f"{rk.get('state')}, {rk.get('files')}/{rk.get('files_total')} files, "
                f"{int(rk.get('bytes') or 0) >> 20}/{int(rk.get('bytes_total') or 0) >> 20} MiB"
                f", {rk.get('problems')} problem(s)"
            )
        print(f"  rekey        {line}")
    lf = r.get("libfuse") or {}
    if lf:
        print(
            f"  libfuse      {lf.get('version')}"
            f"{', HANDLE_KILLPRIV_V2' if lf.get('killpriv_v2') else ''}"
        )
    rss = r.get("rss")
    print(f"  daemon       pid {r.get('pid')}, RSS {int(rss) // 1024 if rss else '?'} KiB")


def _print_identity(token: dict[str, Any], lead: str) -> None:
    if not token:
        return
    ttl = token.get("ttl")
    print(
        f"{lead}{token.get('accessor') or token.get('client_cert_subject') or '-'}"
        f", token TTL {'never expires' if ttl is None else f'{ttl} s'}"
        f"{', renewable' if token.get('renewable') else ''}"
    )
