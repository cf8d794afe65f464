"""Runs untrusted Python programs (generated code) contained, limited and classified.

Why a sandbox: a model's completion is arbitrary code. It must not read secrets, touch the
run's workdir, reach the network, outlive its deadline or take the machine down, and its
failure must be told apart (assertion, timeout, memory, ...) for the record. Nothing runs
unless the caller passes an explicit permission (`--allow_code_execution`).

Isolation levels, strongest first; `detect()` probes once which one this kernel allows
(by running a trivial program through it) and every `Result` names the level that ran:
- `bwrap`: bubblewrap with its own user, pid, net, ipc, uts (and cgroup) namespaces; the
  filesystem is /usr, the interpreter and a fresh /proc and /dev, all read-only, plus a
  size-limited tmpfs at /tmp as the only writable place (no /etc, no /home, no workdir);
  --die-with-parent, --new-session, --clearenv.
- `unshare` (root only, when bwrap is refused): util-linux unshare into new mount, net,
  pid, ipc, uts and cgroup namespaces; the launcher remounts every mount read-only and puts
  a size-limited tmpfs on /tmp, /var/tmp and /dev/shm, then drops to uid 65534. Weaker than
  bwrap: the host's world-readable files stay readable.
- `plain`: no namespaces: rlimits, an empty environment, its own session and a temporary
  working dir (and uid 65534 when the evaluator is root). It blocks neither the network nor
  writes wherever the program's uid may write: trusted code only.

Limits on every level (`Limits`): CPU time (RLIMIT_CPU), address space (4 GB), file size
(RLIMIT_FSIZE; stdout and stderr are in-memory files under the same cap, so a program that
prints 1 GB gets EFBIG at the cap and costs the evaluator nothing), processes (RLIMIT_NPROC)
and open files; a wall-clock deadline after which the whole process group is killed. What
contains a fork bomb: RLIMIT_NPROC, which the kernel ignores for uid 0, so a root evaluator
runs programs as uid 65534; under bwrap it counts only the sandbox's own user namespace,
and the pid namespace ends every leftover process when the launcher (its pid 1) exits.
"""

from __future__ import annotations

import ast
import concurrent.futures
import contextlib
import dataclasses
import errno
import functools
import logging
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from crystal.errors import EvalError, UsageError

ISOLATIONS = ("bwrap", "unshare", "plain")
KINDS = ("passed", "assertion", "exception", "syntax", "timeout", "memory", "output_limit",
         "killed", "early_exit", "sandbox_error")
NOBODY = 65534  # the uid (and gid) programs run as when the evaluator is root
TAIL_BYTES = 4096  # how much of stdout and stderr a Result keeps (the end)
SCRATCH_DIRS = ("/tmp", "/var/tmp", "/dev/shm")  # tmpfs'd by the unshare level
_LAUNCHER = (Path(__file__).with_name("launcher.py")).read_text()
_OUTPUT_ERRNOS = (errno.EFBIG, errno.ENOSPC, errno.EDQUOT)
log = logging.getLogger(__name__)


def require_code_execution(allowed: bool) -> None:
    """Raises unless the user explicitly allowed running generated code."""
    if not allowed:
        raise UsageError("this task runs model-generated code; pass --allow_code_execution to "
                         "allow it (it runs in a sandbox, see docs/eval.md)")


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one program may use. The CPU limit is per process (RLIMIT_CPU, whole seconds,
    rounded up); the wall deadline covers the whole run, sleeping included."""
    cpu_seconds: float = 4.0
    wall_seconds: float | None = None  # None: 2 x cpu_seconds + 5
    memory_bytes: int = 4 << 30  # RLIMIT_AS of every process
    file_bytes: int = 16 << 20  # RLIMIT_FSIZE: each file, and stdout, stderr
    tmp_bytes: int = 64 << 20  # size of the tmpfs working dir (bwrap, unshare)
    processes: int = 32  # RLIMIT_NPROC above what the uid already runs (threads count)
    open_files: int = 64  # RLIMIT_NOFILE

    @property
    def wall(self) -> float:
        return self.wall_seconds if self.wall_seconds is not None else 2 * self.cpu_seconds + 5


@dataclasses.dataclass(frozen=True)
class Result:
    """One program's run. kind is one of KINDS; exception is the last traceback line (or
    what ended the program); cpu_seconds is the program's own CPU time (startup excluded)
    when the launcher saw it end, else None."""
    passed: bool
    kind: str
    exception: str
    exit_code: int | None
    signal: int | None
    seconds: float
    cpu_seconds: float | None
    stdout: str
    stderr: str
    stdout_bytes: int
    stderr_bytes: int
    isolation: str
    run_id: str

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Interpreter:
    path: str
    version: str
    prefix: str


@dataclasses.dataclass(frozen=True)
class Isolation:
    """The level that runs programs here, the interpreter they run under, the uid they run
    as (None: the evaluator's own) and why each stronger level was refused."""
    name: str
    python: Interpreter
    uid: int | None
    refused: tuple[str, ...] = ()
    disable_userns: bool = True

    def describe(self) -> str:
        who = f", uid {self.uid}" if self.uid is not None else ""
        why = f"; refused: {'; '.join(self.refused)}" if self.refused else ""
        return f"{self.name} (python {self.python.version} {self.python.path}{who}){why}"


# ----------------------------------------------------------------------------- probing


def _sandbox_uid() -> int | None:
    return NOBODY if os.geteuid() == 0 else None


def _as_user(uid: int | None) -> dict:
    """Popen arguments that run the child as `uid` (nothing when it is our own)."""
    return {} if uid is None else {"user": uid, "group": uid, "extra_groups": []}


@functools.cache
def interpreter(uid: int | None = None) -> Interpreter:
    """The Python that programs run under: the evaluator's own base interpreter when `uid`
    can run it, else a system interpreter of the same minor version (a root evaluator's
    interpreter may live under /root, which uid 65534 cannot enter)."""
    major, minor = sys.version_info[:2]
    candidates = [os.path.realpath(getattr(sys, "_base_executable", sys.executable)),
                  f"/usr/local/bin/python{major}.{minor}", f"/usr/bin/python{major}.{minor}",
                  "/usr/bin/python3"]
    code = "import sys, hashlib; print(sys.version.split()[0]); print(sys.base_prefix)"
    for path in dict.fromkeys(candidates):
        if not os.path.exists(path):
            continue
        try:
            out = subprocess.run([path, "-I", "-S", "-c", code], capture_output=True,
                                 text=True, env={}, cwd="/", timeout=60, **_as_user(uid))
        except OSError:  # not executable by `uid`
            continue
        if out.returncode == 0:
            version, prefix = out.stdout.split("\n")[:2]
            return Interpreter(path, version, prefix)
    raise EvalError(f"no Python interpreter that uid {uid} can run (tried "
                    f"{', '.join(dict.fromkeys(candidates))}); the sandbox needs one")


def _refusal(level: str) -> str | None:
    """Why `level` cannot run at all here (a missing tool or privilege), before probing."""
    if level == "bwrap" and shutil.which("bwrap") is None:
        return "bwrap: not installed (Debian: apt-get install bubblewrap)"
    if level == "unshare" and os.geteuid() != 0:
        return "unshare: needs root"
    if level == "unshare" and shutil.which("unshare") is None:
        return "unshare: not installed (util-linux)"
    return None


def _probe(isolation: Isolation) -> str | None:
    """Runs a trivial program through `isolation`; None if it passed, else why not."""
    try:
        r = _run(isolation, "import socket\nsocket.gethostname()\n", Limits(cpu_seconds=5))
    except OSError as e:  # e.g. the tool is there but not executable
        return f"{isolation.name}: {e}"
    if r.passed:
        return None
    lines = r.stderr.strip().splitlines()  # bwrap's and unshare's own complaints land here
    last = lines[-1] if lines and r.kind != "sandbox_error" else (r.exception or r.kind)
    return f"{isolation.name}: {last}"


@functools.cache
def detect(force: str | None = None) -> Isolation:
    """The strongest isolation this machine allows (probed once per process), or `force`
    if it works here; a refused `force` is an EvalError naming the reason."""
    if force is not None and force not in ISOLATIONS:
        raise EvalError(f"sandbox isolation {force!r}: expected one of {', '.join(ISOLATIONS)}")
    uid = _sandbox_uid()
    python = interpreter(uid)
    refused: list[str] = []
    for level in ISOLATIONS if force is None else (force,):
        why = _refusal(level)
        if why is None:
            variants = (True, False) if level == "bwrap" else (True,)
            for disable_userns in variants:  # --disable-userns needs bwrap >= 0.8
                isolation = Isolation(level, python, uid, tuple(refused), disable_userns)
                why = _probe(isolation)
                if why is None:
                    return isolation
        refused.append(why)
    if force is not None:
        raise EvalError(f"sandbox isolation {force!r} refused here: {refused[-1]}")
    raise EvalError(f"no sandbox isolation works here: {'; '.join(refused)}")


# ----------------------------------------------------------------------------- running


def _bwrap_argv(isolation: Isolation, limits: Limits) -> list[str]:
    argv = ["bwrap", "--unshare-user", "--unshare-ipc", "--unshare-pid", "--unshare-net",
            "--unshare-uts", "--unshare-cgroup-try", "--hostname", "sandbox",
            "--die-with-parent", "--new-session", "--clearenv", "--as-pid-1"]
    if isolation.disable_userns:
        argv.append("--disable-userns")
    argv += ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
    py = isolation.python
    for path in dict.fromkeys([py.prefix, os.path.dirname(py.path)]):
        if not (path + "/").startswith("/usr/"):
            argv += ["--ro-bind", path, path]
    argv += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache",
             "--proc", "/proc", "--dev", "/dev", "--size", str(limits.tmp_bytes),
             "--tmpfs", "/tmp", "--remount-ro", "/dev", "--remount-ro", "/", "--chdir", "/tmp",
             "--"]
    return argv


def _tasks_of(uid: int) -> int:
    """Tasks (processes and threads) of `uid` now, which RLIMIT_NPROC counts. By the owner
    of /proc/PID (a stat, not a read of every status file); processes that changed uid
    show as root there and are missed, which only makes the limit tighter."""
    count = 0
    for entry in os.scandir("/proc"):
        try:
            if entry.name.isdigit() and entry.stat().st_uid == uid:
                count += len(os.listdir(os.path.join(entry.path, "task")))
        except OSError:
            continue
    return count


def _rlimits(isolation: Isolation, limits: Limits) -> list:
    nproc = limits.processes
    if isolation.name != "bwrap":  # no user namespace: the count is the uid's, system-wide
        nproc += _tasks_of(isolation.uid if isolation.uid is not None else os.getuid())
    cpu = int(-(-limits.cpu_seconds // 1))
    return [("RLIMIT_CPU", cpu, cpu + 1), ("RLIMIT_AS", limits.memory_bytes, limits.memory_bytes),
            ("RLIMIT_FSIZE", limits.file_bytes, limits.file_bytes), ("RLIMIT_NPROC", nproc, nproc),
            ("RLIMIT_NOFILE", limits.open_files, limits.open_files), ("RLIMIT_CORE", 0, 0)]


def _command(isolation: Isolation, limits: Limits, status_fd: int, cwd: str,
             run_id: str) -> tuple[list[str], dict]:
    """argv and extra Popen arguments of one run at `isolation`."""
    cfg = [f"cwd={cwd}", f"status_fd={status_fd}", f"tmp_bytes={limits.tmp_bytes}",
           f"mounts={':'.join(SCRATCH_DIRS) if isolation.name == 'unshare' else ''}"]
    if isolation.uid is not None and isolation.name != "bwrap":  # bwrap starts as the uid
        cfg.append(f"uid={isolation.uid}")
    cfg += [f"{name}={soft}:{hard}" for name, soft, hard in _rlimits(isolation, limits)]
    python = [isolation.python.path, "-I", "-S", "-c", _LAUNCHER, *cfg,
              f"run=crystal-sandbox-{run_id}"]
    if isolation.name == "bwrap":  # bwrap itself runs as the sandbox uid (unprivileged)
        return _bwrap_argv(isolation, limits) + python, _as_user(isolation.uid)
    if isolation.name == "unshare":  # root does the mounts, the launcher drops the uid
        return ["unshare", "--mount", "--net", "--pid", "--ipc", "--uts", "--cgroup", "--fork",
                "--kill-child", "--mount-proc", "--"] + python, {}
    return python, {}


def _memfd(name: str, data: bytes = b"") -> int:
    fd = os.memfd_create(f"crystal-sandbox-{name}", os.MFD_CLOEXEC)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _tail(fd: int) -> tuple[str, int]:
    size = os.fstat(fd).st_size
    n = min(size, TAIL_BYTES)
    return os.pread(fd, n, size - n).decode("utf-8", "replace"), size


def _status_records(fd: int) -> list[dict]:
    size = os.fstat(fd).st_size
    records = []
    for line in os.pread(fd, min(size, 1 << 16), 0).decode("utf-8", "replace").splitlines():
        try:
            record = ast.literal_eval(line)  # a literal parser: a forged line cannot run code
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def own_marker() -> str:
    """The prefix of every run id of this evaluator process (`crystal-sandbox-PID-`): its
    own sandboxed processes, not those of another evaluator on the same machine."""
    return f"crystal-sandbox-{os.getpid()}-"


def processes_with(marker: str) -> list[int]:
    """Pids of live processes whose command line contains `marker` (a /proc scan)."""
    needle, pids = marker.encode(), []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                with open(os.path.join(entry.path, "cmdline"), "rb") as f:
                    if needle in f.read():
                        pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _end_all(marker: str, patience_s: float = 5.0):
    """Kills every process carrying `marker` and waits until none is left. A namespace
    ends with its pid 1, but after a deadline kill of the outer bwrap that happens a
    moment later; at the plain level nothing else ends a process that left the group."""
    deadline = time.monotonic() + patience_s
    while (pids := processes_with(marker)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)


def _kill_group(pgid: int):
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _wait(proc: subprocess.Popen, deadline: float) -> tuple[int, bool]:
    """Waits for `proc` until `deadline` (wakes the moment it exits, via a pidfd); at the
    deadline kills its process group. Returns (wait status code, timed out)."""
    pidfd = os.pidfd_open(proc.pid)
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        timed_out = not poller.poll(max(0.0, deadline - time.monotonic()) * 1000)
    finally:
        os.close(pidfd)
    if timed_out:
        _kill_group(proc.pid)
    proc.wait()
    _kill_group(proc.pid)  # stragglers in the group (plain level: nothing else ends them)
    return proc.returncode, timed_out


def _run(isolation: Isolation, program: str, limits: Limits) -> Result:
    run_id = f"{os.getpid()}-{secrets.token_hex(8)}"  # pid first, for own_marker()
    workdir = None
    if isolation.name == "plain":  # the other levels work in their own tmpfs
        workdir = tempfile.mkdtemp(prefix="crystal-sandbox-")
        if isolation.uid is not None:
            os.chown(workdir, isolation.uid, isolation.uid)
    fds = [_memfd("program", program.encode("utf-8", "surrogatepass"))] + [
        _memfd(name) for name in ("stdout", "stderr", "status")]
    try:
        argv, extra = _command(isolation, limits, fds[3], workdir or "/tmp", run_id)
        start = time.monotonic()
        proc = subprocess.Popen(argv, stdin=fds[0], stdout=fds[1], stderr=fds[2],
                                pass_fds=(fds[3],), env={}, cwd="/", start_new_session=True,
                                **extra)
        code, timed_out = _wait(proc, start + limits.wall)
        seconds = time.monotonic() - start
        _end_all(f"crystal-sandbox-{run_id}")
        (stdout, n_out), (stderr, n_err) = _tail(fds[1]), _tail(fds[2])
        records = _status_records(fds[3])
    finally:
        for fd in fds:
            os.close(fd)
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
    outcome = classify(records, code, timed_out, stderr, limits.cpu_seconds,
                       bwrap=isolation.name == "bwrap")
    return Result(passed=outcome.kind == "passed", kind=outcome.kind,
                  exception=outcome.exception, exit_code=outcome.exit_code,
                  signal=outcome.signal, seconds=round(seconds, 4), cpu_seconds=outcome.cpu,
                  stdout=stdout, stderr=stderr, stdout_bytes=n_out, stderr_bytes=n_err,
                  isolation=isolation.name, run_id=run_id)


# ----------------------------------------------------------------------------- classifying


@dataclasses.dataclass(frozen=True)
class Outcome:
    kind: str
    exception: str = ""
    exit_code: int | None = None
    signal: int | None = None
    cpu: float | None = None


_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Warning)"
                             r"|[A-Za-z_][\w.]*)(?::\s(.*))?$")


def exception_kind(type_name: str, err: int | None = None) -> str:
    """The failure kind of an exception the program raised (by class name and errno)."""
    name = type_name.rsplit(".", 1)[-1]
    if name == "AssertionError":
        return "assertion"
    if name == "MemoryError":
        return "memory"
    if name == "SystemExit":
        return "early_exit"
    if err in _OUTPUT_ERRNOS:
        return "output_limit"
    return "exception"


def last_exception_line(stderr: str) -> tuple[str, str, int | None] | None:
    """(line, class name, errno) of the last line of a Python traceback in `stderr`."""
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    if not lines or not any(ln.startswith("Traceback (most recent call last)") for ln in lines):
        return None
    m = _EXCEPTION_LINE.match(lines[-1])
    if m is None:
        return None
    err = re.match(r"\[Errno (\d+)\]", m[2] or "")
    return lines[-1], m[1], int(err[1]) if err else None


def _signal_outcome(sig: int, code, cpu, cpu_limit: float) -> Outcome:
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu is not None
                                 and cpu >= int(-(-cpu_limit // 1))):
        return Outcome("timeout", f"CPU limit of {cpu_limit:g} s", code, sig, cpu)
    name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
    return Outcome("killed", f"killed by {name}", code, sig, cpu)


def _is_main(record: dict) -> bool:
    """A well-formed parent line (anything else, e.g. one a program forged, is skipped)."""
    return isinstance(record.get("main"), int) and all(
        record.get(k) is None or isinstance(record.get(k), (int, float))
        for k in ("exit", "signal", "cpu"))


def classify(records: Sequence[dict], code: int, timed_out: bool, stderr: str,
             cpu_limit: float, bwrap: bool = False) -> Outcome:
    """What ended the program, from the launcher's status lines (the child's own account
    of the program, the parent's of how the child ended), else from the wait status and
    the traceback's last line. `code` is Popen's returncode (negative: a signal; bwrap
    reports a signal n as 128 + n)."""
    mains = [r for r in records if _is_main(r)]
    main = mains[-1] if mains else None  # the parent writes after the program's end
    progs = [r for r in records if main and r.get("pid") == main["main"]]
    prog = progs[-1] if progs else None
    setup = [r for r in records if r.get("phase") == "setup"]
    if setup:  # a program can forge this line too, but only to fail itself
        return Outcome("sandbox_error", str(setup[-1].get("exception", "")), code)
    if timed_out:
        return Outcome("timeout", "wall-clock deadline", None, signal.SIGKILL,
                       main.get("cpu") if main else None)
    if main is not None:
        code, sig, cpu = main["exit"], main["signal"], main["cpu"]
    else:  # the launcher itself did not finish: its wait status is all there is
        cpu = None
        sig = -code if code < 0 else (code - 128 if bwrap and 128 < code < 160 else None)
        code = None if sig else code
    if sig:
        return _signal_outcome(sig, code, cpu, cpu_limit)
    if prog is not None and prog.get("outcome") == "returned" and code == 0:
        return Outcome("passed", "", 0, None, cpu)
    if prog is not None and prog.get("outcome") == "raised":
        kind = ("syntax" if prog.get("phase") == "compile"
                else exception_kind(str(prog.get("type", "")), prog.get("errno")))
        return Outcome(kind, str(prog.get("exception", "")), code, None, cpu)
    if code == 0:
        return Outcome("early_exit", "exited with status 0 before the program's end", 0,
                       None, cpu)
    parsed = last_exception_line(stderr)
    if parsed is not None:
        return Outcome(exception_kind(parsed[1], parsed[2]), parsed[0], code, None, cpu)
    return Outcome("exception", f"exit status {code}", code, None, cpu)


# ----------------------------------------------------------------------------- the API


def default_workers() -> int:
    """Programs run at once: one per CPU this process may use."""
    return len(os.sched_getaffinity(0))


class Sandbox:
    """Runs programs at the strongest isolation available (or `isolation`), only when
    `allow_code_execution` is True. `run` one program, `run_many` in parallel."""

    def __init__(self, allow_code_execution: bool, isolation: str | None = None):
        require_code_execution(allow_code_execution)
        self.isolation = detect(isolation)
        if self.isolation.refused:  # the user should know their code ran less isolated
            log.warning("sandbox: running generated code under %s", self.isolation.describe())

    def run(self, program: str, limits: Limits = Limits()) -> Result:
        return _run(self.isolation, program, limits)

    def run_many(self, programs: Sequence[str], limits: Limits | Sequence[Limits] = Limits(),
                 workers: int | None = None) -> list[Result]:
        """Results in the order of `programs`, at most `workers` running at once (never
        more than one per CPU: more would stretch each program's wall time past its
        deadline); threads only wait, each program is its own process tree."""
        per = [limits] * len(programs) if isinstance(limits, Limits) else list(limits)
        if len(per) != len(programs):
            raise ValueError(f"{len(programs)} programs but {len(per)} limits")
        workers = min(workers or default_workers(), default_workers())
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            return list(pool.map(self.run, programs, per))
