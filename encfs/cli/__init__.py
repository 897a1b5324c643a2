"""The ``encfs`` command line: argv, exit codes, printing to the user and logging set-up live
in this package and nowhere else. ``main`` parses argv and hands the command to its module:
``volume`` (a volume at rest), ``mount`` (a live mount), ``vault`` (a local OpenBao),
``service`` (systemd); ``parser`` holds the argparse tree, ``output`` the exit codes and
logging."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence

from encfs import errors
from encfs.cli.mount import cmd_mount, cmd_status, cmd_unmount
from encfs.cli.output import ExitCode, exit_code_for, setup_logging
from encfs.cli.parser import build_parser, verbosity
from encfs.cli.rekey import cmd_rekey
from encfs.cli.service import ConfigError, cmd_systemd, expand_config
from encfs.cli.vault import cmd_vault
from encfs.cli.volume import cmd_fsck, cmd_header, cmd_info, cmd_init, cmd_pin, cmd_rotate

__all__ = ["ExitCode", "build_parser", "main", "verbosity"]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        argv = expand_config(argv)
    except ConfigError as exc:
        print(f"encfs: error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    try:
        return _run(parser, argv)
    except BrokenPipeError:
        # The reader went away (`encfs status | head -1`): stop quietly, like other tools.
        # Point stdout at /dev/null so that the interpreter's final flush cannot fail again.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        return ExitCode.FAILURE


def _run(parser: argparse.ArgumentParser, argv: list[str]) -> int:
    """Parse ``argv`` and run the command; flushes stdout before returning (a reader that
    went away raises ``BrokenPipeError`` here, for ``main``)."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        sys.stdout.flush()
        return int(exc.code) if isinstance(exc.code, int) else ExitCode.USAGE
    setup_logging(verbosity(args))
    code = _dispatch(parser, args, argv)
    sys.stdout.flush()
    return code


def _dispatch(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> int:
    try:
        if args.command == "init":
            return cmd_init(args)
        if args.command == "mount":
            return cmd_mount(args, argv)
        if args.command in ("unmount", "umount"):
            return cmd_unmount(args)
        if args.command == "info":
            return cmd_info(args)
        if args.command == "fsck":
            return cmd_fsck(args)
        if args.command == "rotate":
            return cmd_rotate(args)
        if args.command == "rekey":
            return cmd_rekey(args)
        if args.command == "status":
            return cmd_status(args)
        if args.command == "vault":
            return cmd_vault(args)
        if args.command == "systemd":
            return cmd_systemd(args)
        if args.command == "pin":
            return cmd_pin(args)
        if args.command == "header":
            return cmd_header(args)
    except errors.EncfsError as exc:
        print(f"encfs: error: {exc}", file=sys.stderr)
        hint = getattr(exc, "hint", "")
        if hint:
            print(f"encfs: hint: {hint}", file=sys.stderr)
        return exit_code_for(exc)
    except KeyboardInterrupt:
        return ExitCode.FAILURE
    except BrokenPipeError:
        raise
    except OSError as exc:
        print(f"encfs: error: {exc}", file=sys.stderr)
        return ExitCode.FAILURE
    parser.error(f"unknown command {args.command}")
    return ExitCode.USAGE  # pragma: no cover
