"""Boot the encfs test guest under a real systemd and run a bash script in it.

The guest is a Debian bookworm root built and cached by ``scripts/guest-root`` (default cache
``/var/cache/encfs-guest``, or ``$ENCFS_GUEST_CACHE``). It contains encfs's dependencies in
``/opt/encfs-venv`` but not encfs itself: the live checkout is ``/src`` in the guest (a
read-only bind mount under nspawn, a virtiofs share mounted read-only under qemu) and
``encfs`` (``/usr/local/bin/encfs``) imports it from there, so code edits need no rebuild.

Two ways to boot it:

* ``run_nspawn(root, script)``: ``systemd-nspawn -b`` with systemd as PID 1, the cached root
  under a throw-away overlay (``--volatile=overlay``: the root is never modified), its own
  network namespace (loopback only), ``/dev/fuse``. Boot to script: about a second.
* ``run_qemu(artifacts, script, workdir=...)``: ``qemu-system-x86_64 -accel tcg`` with
  Debian's cloud kernel, booting a per-run qcow2 overlay over the cached ext4 image, so the
  test can read the guest's disk after power-off (``GuestResult.read_disk_file``). Boot to
  script about 20 s, Python in the guest 7-13x slower than on the host.

How a run works: the harness writes ``script.sh`` and ``runner.sh`` into a results directory
that the guest sees as ``/results`` (read-write). The guest has a unit
``encfs-guest-test.service`` (from ``scripts/guest-root``; ``Type=exec``, ordered after
multi-user.target, ``SuccessAction=``/``FailureAction=exit-force``) which the harness pulls
into the boot with ``systemd.wants=`` on the init/kernel command line. The runner runs the
script, records its stdout, stderr, an xtrace and the exit status in ``/results``, dumps
``journalctl -b`` there and exits with the script's status; exit-force then ends the boot
(nspawn exits with that status; a VM powers off, file systems synced and unmounted).

Scripts run as root in ``/root`` with ``bash -e -o pipefail`` (xtrace to ``/results/trace``,
not stderr), stdin ``/dev/null`` and ``PATH`` starting with ``/opt/encfs-venv/bin``
(``encfs``, ``bao``, ``python``). Their start job is already finished, so boot has completed
from systemd's point of view: ``systemctl is-system-running --wait`` returns, and scripts may
start, stop and wait for units, ``kill -9`` processes, mount FUSE file systems. Anything
still running in the test unit is killed when the script exits. Other files a script writes
to ``/results`` are in ``GuestResult.results``.

Every process a run starts (nspawn and the container's whole PID namespace, qemu,
virtiofsd) is gone when ``run_*`` returns, also after a timeout or an exception.
"""

from __future__ import annotations

import functools
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GUEST_ROOT_SCRIPT = REPO / "scripts" / "guest-root"
VIRTIOFSD = Path("/usr/lib/qemu/virtiofsd")
TEST_UNIT = "encfs-guest-test.service"

Bind = tuple[str | Path, str]
"""A bind mount for nspawn: (host path, guest path)."""

_RUNNER = r"""# Written by tests/vm/guest.py: run by encfs-guest-test.service in the guest.
exec </dev/null
cd /root
read -r up _ </proc/uptime
# PID 1's start, in seconds of (host) uptime: a container's boot starts there.
pid1=$(awk -v t="$(getconf CLK_TCK)" '{printf "%.2f", $22 / t}' /proc/1/stat)
printf 'script_start_uptime=%s\npid1_start_uptime=%s\n' "$up" "$pid1" >/results/timing
exec 19>/results/trace
BASH_XTRACEFD=19 bash -e -o pipefail -x /results/script.sh >/results/stdout 2>/results/stderr
rc=$?
exec 19>&-
read -r up _ </proc/uptime
echo "script_end_uptime=$up" >>/results/timing
echo "$rc" >/results/status
journalctl -b --no-pager -o short-monotonic >/results/journal 2>&1
sync
exit "$rc"
"""


class GuestUnavailable(Exception):
    """The machine cannot boot the guest (not root, a tool missing, ENCFS_GUEST=0)."""


@dataclass(frozen=True)
class GuestArtifacts:
    """What ``scripts/guest-root`` built: the root directory and, for qemu, the cloud
    kernel, its small initrd and the raw ext4 base image (never written: runs boot qcow2
    overlays). ``key`` is the hash of the build's inputs (usable as a CI cache key)."""

    root: Path
    key: str
    kernel: Path | None = None
    initrd: Path | None = None
    image: Path | None = None


@dataclass
class GuestResult:
    """The outcome of one boot.

    ``returncode`` is the script's exit status, or None if it never finished (timeout, boot
    failure). ``stdout``/``stderr``/``trace`` are the script's; ``journal`` is the guest's
    ``journalctl -b`` taken after the script ended (empty if it never did); ``console`` is
    what nspawn or the VM's serial console printed. ``results`` is the directory the guest
    saw as ``/results``; ``disk`` (qemu only) the guest's disk, a qcow2 overlay that lives
    as long as ``workdir``. ``timing`` has ``boot_s`` (guest uptime when the script
    started; under nspawn: since PID 1 started), ``script_s`` and ``wall_s`` (host time for
    the whole run)."""

    kind: str
    returncode: int | None
    stdout: str
    stderr: str
    trace: str
    journal: str
    console: str
    timed_out: bool
    workdir: Path
    results: Path
    disk: Path | None = None
    timing: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def describe(self, tail: int = 60) -> str:
        """A report for assertion messages: status, output, and the tails of trace,
        journal and console."""

        def last(text: str) -> str:
            return "\n".join(text.splitlines()[-tail:])

        status = "timed out" if self.timed_out else f"exit status {self.returncode}"
        parts = [
            f"{self.kind} guest: {status}; timing {self.timing}; results in {self.results}",
            f"--- stdout\n{self.stdout}",
            f"--- stderr\n{self.stderr}",
            f"--- trace (last {tail} lines)\n{last(self.trace)}",
        ]
        if self.journal:
            parts.append(f"--- journal (last {tail} lines)\n{last(self.journal)}")
        else:
            parts.append(f"--- console (last {tail} lines)\n{last(self.console)}")
        return "\n".join(parts)

    def check(self) -> GuestResult:
        """Return self if the script exited 0; raise AssertionError with ``describe()``."""
        if not self.ok:
            raise AssertionError(self.describe())
        return self

    # --- the qemu guest's disk, after power-off --------------------------------------------

    def raw_disk(self) -> Path:
        """The guest's disk as a raw ext4 image (converted from the qcow2 overlay once, ~1 s;
        sparse, next to it)."""
        if self.disk is None:
            raise ValueError("only qemu runs have a disk")
        raw = self.disk.with_suffix(".raw")
        if not raw.exists():
            subprocess.run(
                ["qemu-img", "convert", "-O", "raw", str(self.disk), str(raw)],
                check=True,
                capture_output=True,
                timeout=120,
            )
        return raw

    def debugfs(self, request: str) -> str:
        """Run one read-only ``debugfs -R REQUEST`` on the guest's disk; its stdout."""
        proc = subprocess.run(
            ["debugfs", "-R", request, str(self.raw_disk())],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"debugfs -R {request!r}: {proc.stderr.strip()}")
        return proc.stdout

    def read_disk_file(self, path: str) -> bytes:
        """The bytes of regular file ``path`` (absolute, in the guest) on the guest's disk.
        Raises FileNotFoundError if it is not there."""
        with tempfile.TemporaryDirectory(prefix="encfs-disk-") as tmp:
            out = Path(tmp) / "file"
            self.debugfs(f"dump -p {_debugfs_quote(path)} {out}")
            if not out.exists():
                raise FileNotFoundError(f"{path} is not on the guest's disk")
            return out.read_bytes()

    def copy_from_disk(self, path: str, dest: Path) -> Path:
        """Copy directory ``path`` from the guest's disk into ``dest`` (created); returns
        ``dest / basename(path)``. Handy to inspect a cipher dir with host tools."""
        dest.mkdir(parents=True, exist_ok=True)
        self.debugfs(f"rdump {_debugfs_quote(path)} {dest}")
        out = dest / Path(path).name
        if not out.exists():
            raise FileNotFoundError(f"{path} is not on the guest's disk")
        return out


def _debugfs_quote(path: str) -> str:
    if not path.startswith("/") or any(c in path for c in '"\n'):
        raise ValueError(f"unsupported guest path {path!r}")
    return f'"{path}"'


# --- building the guest ---------------------------------------------------------------------


def unavailable_reason(*, vm: bool = False) -> str | None:
    """Why this machine cannot boot the guest (nspawn; with ``vm`` also qemu), or None."""
    if os.environ.get("ENCFS_GUEST", "1") == "0":
        return "ENCFS_GUEST=0"
    if os.geteuid() != 0:
        return "booting the guest needs root"
    tools = ["debootstrap", "systemd-nspawn", "mkfs.ext4"]
    if vm:
        tools += ["qemu-system-x86_64", "qemu-img", "debugfs"]
    missing = [t for t in tools if shutil.which(t) is None]
    if vm and not VIRTIOFSD.exists():
        missing.append(str(VIRTIOFSD))
    if missing:
        return f"missing {', '.join(missing)} (scripts/install installs them)"
    if not Path("/dev/fuse").exists():
        subprocess.run(["modprobe", "fuse"], capture_output=True, check=False)
        if not Path("/dev/fuse").exists():
            return "no /dev/fuse on the host"
    return None


@functools.cache
def build_guest(*, vm: bool = False) -> GuestArtifacts:
    """Run ``scripts/guest-root`` (``--root-only`` unless ``vm``) and return what it built.

    Instant when the cache is current; the first build takes ~2 min (debootstrap). Cached
    per process. Raises GuestUnavailable (see ``unavailable_reason``) or RuntimeError if
    the build fails."""
    reason = unavailable_reason(vm=vm)
    if reason is not None:
        raise GuestUnavailable(reason)
    cmd = [str(GUEST_ROOT_SCRIPT)] + ([] if vm else ["--root-only"])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    values = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)

    def path(name: str) -> Path | None:
        return Path(values[name]) if name in values else None

    root = path("root")
    if root is None or "key" not in values:
        raise RuntimeError(f"unexpected output from {GUEST_ROOT_SCRIPT}:\n{proc.stdout}")
    return GuestArtifacts(
        root=root,
        key=values["key"],
        kernel=path("kernel"),
        initrd=path("initrd"),
        image=path("image"),
    )


def _artifacts_or_skip(*, vm: bool) -> GuestArtifacts:
    try:
        return build_guest(vm=vm)
    except GuestUnavailable as e:
        pytest.skip(f"guest unavailable: {e}")


def guest_root() -> Path:
    """The cached guest root for ``run_nspawn`` (built on first use); skips the calling
    test if this machine cannot boot it."""
    return _artifacts_or_skip(vm=False).root


def guest_artifacts() -> GuestArtifacts:
    """The cached guest root, kernel, initrd and disk image for ``run_qemu`` (built on
    first use); skips the calling test if this machine cannot boot a VM."""
    return _artifacts_or_skip(vm=True)


# --- running a guest ------------------------------------------------------------------------


def _prepare(workdir: Path | None, script: str) -> tuple[Path, Path]:
    """The run's workdir (a fresh temp dir if None) and its results dir with the scripts."""
    if workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="encfs-guest-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results = workdir / "results"
    if results.exists():
        shutil.rmtree(results)
    results.mkdir()
    (results / "script.sh").write_text(script)
    (results / "runner.sh").write_text(_RUNNER)
    return workdir, results


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _collect(
    kind: str,
    workdir: Path,
    results: Path,
    console: Path,
    timed_out: bool,
    wall: float,
    disk: Path | None = None,
) -> GuestResult:
    status = _read(results / "status").strip()
    timing = {"wall_s": round(wall, 2)}
    marks: dict[str, float] = {}
    for line in _read(results / "timing").splitlines():
        k, _, v = line.partition("=")
        with suppress(ValueError):
            marks[k] = float(v)
    if "script_start_uptime" in marks:
        # qemu: from kernel start; nspawn: from PID 1's start (uptime is the host's).
        zero = marks.get("pid1_start_uptime", 0.0) if kind == "nspawn" else 0.0
        timing["boot_s"] = round(marks["script_start_uptime"] - zero, 2)
        if "script_end_uptime" in marks:
            timing["script_s"] = round(marks["script_end_uptime"] - marks["script_start_uptime"], 2)
    return GuestResult(
        kind=kind,
        returncode=int(status) if status.isdigit() else None,
        stdout=_read(results / "stdout"),
        stderr=_read(results / "stderr"),
        trace=_read(results / "trace"),
        journal=_read(results / "journal"),
        console=_read(console),
        timed_out=timed_out,
        workdir=workdir,
        results=results,
        disk=disk,
        timing=timing,
    )


def _wait(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait for ``proc``; on timeout kill its process group. True if it timed out."""
    try:
        proc.wait(timeout=timeout)
        return False
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        return True


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group led by ``proc`` (started with start_new_session) and reap."""
    if proc.poll() is None:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _kill_container(container_uuid: str) -> None:
    """SIGKILL the init of the nspawn container started with ``--uuid=container_uuid`` if it
    outlived nspawn (nspawn does not take it along when it is killed) and wait until its PID
    namespace is empty: killing a namespace's init kills every process in it."""
    needle = b"container_uuid=" + str(uuid.UUID(container_uuid)).encode() + b"\0"
    namespaces: set[str] = set()
    for entry in _procs():
        try:
            if needle not in (entry / "environ").read_bytes():
                continue
            status = (entry / "status").read_text()
            ns = os.readlink(entry / "ns" / "pid")
        except OSError:
            continue
        nspid = next((ln.split()[1:] for ln in status.splitlines() if ln.startswith("NSpid:")), [])
        if nspid[-1:] == ["1"] and len(nspid) > 1:
            namespaces.add(ns)
            with suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)
    deadline = time.monotonic() + 10
    while namespaces and time.monotonic() < deadline:
        alive = False
        for entry in _procs():
            with suppress(OSError):
                if os.readlink(entry / "ns" / "pid") in namespaces:
                    alive = True
                    break
        if not alive:
            return
        time.sleep(0.05)


def _procs() -> Iterator[Path]:
    return (p for p in Path("/proc").iterdir() if p.name.isdigit())


def run_nspawn(
    root: Path,
    script: str,
    *,
    binds: Sequence[Bind] = (),
    ro_binds: Sequence[Bind] = (),
    capabilities: Sequence[str] = ("CAP_IPC_LOCK",),
    workdir: Path | None = None,
    timeout: float = 120.0,
    src: Path = REPO,
) -> GuestResult:
    """Boot ``root`` with ``systemd-nspawn -b`` and run ``script`` (bash) in it as the test
    unit; return when the container has exited (or after ``timeout`` seconds, killed).

    The root is used through ``--volatile=overlay`` (changes go to a tmpfs and vanish), the
    checkout ``src`` is ``/src`` (read-only), the results dir ``/results``; ``binds`` and
    ``ro_binds`` add (host, guest) bind mounts. The container has its own network namespace
    with only loopback, so guest services may listen on any port. ``capabilities`` are
    granted on top of nspawn's default set; the default adds CAP_IPC_LOCK, which root has on
    a real host (without it nspawn's seccomp filter fails mlock() with EPERM). ``workdir``
    (default: a fresh temp dir that the caller owns) holds ``results/`` and ``console.log``.
    """
    workdir, results = _prepare(workdir, script)
    if not Path("/dev/fuse").exists():
        subprocess.run(["modprobe", "fuse"], capture_output=True, check=False)
    console = workdir / "console.log"
    container_uuid = uuid.uuid4().hex
    machine = f"encfs-{container_uuid[:12]}"
    cmd = [
        "timeout", "-k", "5", str(int(timeout) + 15),
        "systemd-nspawn", "-b", "-D", str(root),
        "--keep-unit", "--register=no", "--console=passive",
        "--volatile=overlay", "--private-network",
        f"--machine={machine}", f"--uuid={container_uuid}",
        "--bind=/dev/fuse",
        *(f"--capability={c}" for c in capabilities),
        f"--bind-ro={src}:/src",
        f"--bind={results}:/results",
        *(f"--bind={h}:{g}" for h, g in binds),
        *(f"--bind-ro={h}:{g}" for h, g in ro_binds),
        "--", f"systemd.wants={TEST_UNIT}",
    ]  # fmt: skip
    (workdir / "command").write_text(shlex.join(cmd) + "\n")
    start = time.monotonic()
    timed_out = False
    try:
        with console.open("wb") as out:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                timed_out = _wait(proc, timeout)
            finally:
                _kill_group(proc)
    finally:
        _kill_container(container_uuid)
        # nspawn cannot remove its propagation dir when /run is not a tmpfs.
        shutil.rmtree(f"/run/systemd/nspawn/propagate/{machine}", ignore_errors=True)
    return _collect("nspawn", workdir, results, console, timed_out, time.monotonic() - start)


@contextmanager
def _virtiofsd(source: Path, socket: Path, log: Path) -> Iterator[None]:
    """A virtiofsd sharing ``source`` on ``socket`` for the lifetime of the block."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(VIRTIOFSD), f"--socket-path={socket}", "-o", f"source={source}",
             "-o", "sandbox=chroot", "-o", "cache=auto"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not socket.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"virtiofsd for {source} did not start:\n{_read(log)}")
            time.sleep(0.02)
        yield
    finally:
        if proc.poll() is None:
            proc.terminate()
            with suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        _kill_group(proc)


def run_qemu(
    artifacts: GuestArtifacts,
    script: str,
    *,
    workdir: Path | None = None,
    timeout: float = 300.0,
    memory_mb: int = 1024,
    cpus: int = 2,
    kernel_args: Sequence[str] = (),
    src: Path = REPO,
) -> GuestResult:
    """Boot the guest in ``qemu-system-x86_64 -accel tcg`` and run ``script`` (bash) in it
    as the test unit; return when the VM has powered off (or after ``timeout`` s, killed).

    The VM boots the cloud kernel and initrd from ``artifacts`` with its root on
    ``workdir/disk.qcow2``, a fresh copy-on-write overlay over the cached base image, and no
    network device; ``kernel_args`` are appended to its command line. ``src`` is shared
    read-only at ``/src`` and the results dir at ``/results`` (virtiofs). After the run,
    ``result.disk`` is that overlay (kept as long as ``workdir``; ``read_disk_file`` and
    ``copy_from_disk`` read it). ``workdir`` defaults to a fresh temp dir that the caller
    owns; it also gets ``console.log`` (the serial console).
    """
    if artifacts.kernel is None or artifacts.initrd is None or artifacts.image is None:
        raise ValueError("artifacts without kernel/initrd/image: use guest_artifacts()")
    workdir, results = _prepare(workdir, script)
    disk = workdir / "disk.qcow2"
    disk.unlink(missing_ok=True)
    disk.with_suffix(".raw").unlink(missing_ok=True)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(artifacts.image),
         str(disk)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    console = workdir / "console.log"
    append = " ".join(
        [
            "root=/dev/vda",
            "rw",
            "console=ttyS0",
            "panic=-1",
            f"systemd.wants={TEST_UNIT}",
            *kernel_args,
        ]
    )
    start = time.monotonic()
    timed_out = False
    with ExitStack() as stack:
        # Unix socket paths are short (108 bytes): not under a deep pytest tmp_path.
        sockdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="encfs-vfs-")))
        for tag, source in (("src", src), ("results", results)):
            stack.enter_context(
                _virtiofsd(source, sockdir / f"{tag}.sock", workdir / f"virtiofsd-{tag}.log")
            )
        cmd = [
            "timeout", "-k", "5", str(int(timeout) + 15),
            "qemu-system-x86_64", "-accel", "tcg", "-m", str(memory_mb), "-smp", str(cpus),
            "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
            "-no-reboot", "-nic", "none",
            "-kernel", str(artifacts.kernel), "-initrd", str(artifacts.initrd),
            "-append", append,
            "-drive", f"file={disk},format=qcow2,if=virtio",
            # vhost-user (virtiofs) needs guest RAM in a shared memory backend.
            "-object", f"memory-backend-memfd,id=mem,size={memory_mb}M,share=on",
            "-numa", "node,memdev=mem",
        ]  # fmt: skip
        for tag in ("src", "results"):
            cmd += [
                "-chardev",
                f"socket,id={tag},path={sockdir / f'{tag}.sock'}",
                "-device",
                f"vhost-user-fs-pci,chardev={tag},tag={tag}",
            ]
        (workdir / "command").write_text(shlex.join(cmd) + "\n")
        with console.open("wb") as out:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                timed_out = _wait(proc, timeout)
            finally:
                _kill_group(proc)
    return _collect(
        "qemu", workdir, results, console, timed_out, time.monotonic() - start, disk=disk
    )
