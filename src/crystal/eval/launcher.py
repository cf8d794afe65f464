"""The first code that runs inside the sandbox: limits, then the untrusted program.

Why a separate file: `crystal.eval.sandbox` passes this file's text to `python -I -S -c`
(isolated mode, no site-packages), so it must use the standard library only and never
import crystal. It imports as little as it can (no json, re or traceback until needed):
interpreter start-up is most of a short program's cost. argv: [-c, KEY=VALUE, ...], the
last one `run=crystal-sandbox-RUN_ID`, only there so every process forked from here carries
it in /proc/PID/cmdline (the evaluator and the tests find stragglers by it). The program
arrives on stdin, which is then pointed at /dev/null.

Process layout: this process is the parent (pid 1 of its pid namespace under bwrap and
unshare, where the kernel drops signals that processes inside send to it); it forks the
child that drops privileges, sets the rlimits and runs the program in-process (no second
interpreter start). Both write one line each to the status fd: the child what the
program did ({"pid", "phase", "outcome", "type", "errno", "exception"}), the parent how
the child ended ({"main", "exit", "signal", "cpu"}), each a Python literal (repr) that the
evaluator reads with ast.literal_eval. When the parent exits, the pid namespace ends and the
kernel kills whatever the program left behind.
"""

import os
import resource
import sys
import time

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND = 32, 1024, 2048, 4096
MS_RELATIME = 1 << 21
_KEEP_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
               "noatime": MS_NOATIME, "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME}


def _read_program() -> bytes:
    chunks = []
    while True:
        block = os.read(0, 1 << 16)
        if not block:
            break
        chunks.append(block)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    return b"".join(chunks)


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def _private_mounts(tmp_dirs, tmp_bytes: int):
    """The unshare level (root, in a fresh mount namespace): every mount read-only, then a
    size-limited tmpfs over each world-writable scratch dir. ctypes is imported here, not
    at the top, because only this level mounts anything."""
    import ctypes  # only this level pays for it (see the docstring)
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split() for line in f]
    for fields in mounts:
        point = _unescape(fields[4]).encode()
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for opt in fields[5].split(","):
            flags |= _KEEP_FLAGS.get(opt, 0)
        libc.mount(None, point, None, flags, None)  # proc/sys submounts may refuse; checked below
    for d in tmp_dirs:
        if os.path.isdir(d):
            opts = f"size={tmp_bytes},mode=1777".encode()
            if libc.mount(b"tmpfs", d.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, opts) != 0:
                raise OSError(ctypes.get_errno(), f"mount tmpfs on {d}")
    with open("/proc/self/mountinfo") as f:
        writable = [_unescape(x.split()[4]) for x in f if x.split()[5].split(",")[0] == "rw"]
    scratch = set(tmp_dirs) | {"/proc", "/dev/pts"}  # proc and pts: kernel-checked, no files
    left = [p for p in writable if p not in scratch and not p.startswith("/proc/")]
    if left:
        raise OSError(f"mounts left writable: {', '.join(left)}")


def _config(argv) -> dict:
    """KEY=VALUE arguments: uid, cwd, status_fd, tmp_bytes, mounts (colon-separated dirs)
    and RLIMIT_X=SOFT:HARD."""
    cfg = {"uid": None, "mounts": [], "rlimits": []}
    for arg in argv:
        key, _, value = arg.partition("=")
        if key.startswith("RLIMIT_"):
            cfg["rlimits"].append((key, *map(int, value.split(":"))))
        elif key in ("uid", "status_fd", "tmp_bytes"):
            cfg[key] = int(value)
        elif key == "mounts":
            cfg[key] = value.split(":") if value else []
        else:
            cfg[key] = value
    return cfg


def _status(fd: int, record: dict):
    try:
        os.write(fd, (repr(record) + "\n").encode())
    except OSError:
        pass


def _limits(cfg: dict):
    if cfg["uid"] is not None:
        os.setgroups([])
        os.setgid(cfg["uid"])
        os.setuid(cfg["uid"])
    for name, soft, hard in cfg["rlimits"]:
        resource.setrlimit(getattr(resource, name), (soft, hard))
    os.chdir(cfg["cwd"])
    os.umask(0o077)
    os.environ.clear()  # unsetenv too: bwrap sets PWD, Python's locale coercion LC_CTYPE


def _report(e: BaseException, record: dict):
    """The exception's last traceback line into `record`, the traceback (without this
    file's frame) onto stderr after what the program printed. Each step may fail (memory
    gone, stderr at its size limit): the status line must still go out."""
    record["exception"] = record["type"]
    try:
        import traceback  # only a failing program pays for it
        lines = traceback.format_exception_only(type(e), e)
        record["exception"] = lines[-1].strip() if lines else record["type"]
    except BaseException:
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is sys.stderr:
                tb = e.__traceback__.tb_next if e.__traceback__ else None
                traceback.print_exception(type(e), e, tb)
            stream.flush()
        except BaseException:
            pass


def _child(cfg: dict, program: bytes):
    """Runs the program in this process; never returns."""
    fd = cfg["status_fd"]
    record = {"pid": os.getpid(), "phase": "setup"}
    try:
        _limits(cfg)
        record["phase"] = "compile"
        code = compile(program, "program.py", "exec")
        record["phase"] = "run"
        sys.argv = ["program.py"]
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
        record["phase"] = "flush"
        sys.stdout.flush()
        sys.stderr.flush()
        record["outcome"] = "returned"
    except BaseException as e:  # the program's own failure, SystemExit included
        record.update(outcome="raised", type=type(e).__name__, errno=getattr(e, "errno", None))
        _report(e, record)
    _status(fd, record)
    os._exit(0 if record.get("outcome") == "returned" else 1)


def _wait(pid: int) -> tuple[int, dict]:
    """Waits for the child, reaping any other process that the namespace hands to pid 1."""
    while True:
        try:
            got, status, usage = os.wait4(-1, 0)
        except ChildProcessError:
            return 1, {"main": pid, "exit": None, "signal": None, "cpu": None}
        if got == pid:
            break
    sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + sig
    cpu = round(usage.ru_utime + usage.ru_stime, 4)
    return code, {"main": pid, "exit": None if sig else code, "signal": sig, "cpu": cpu}


def main():
    cfg = _config(sys.argv[1:])
    program = _read_program()
    if cfg["mounts"]:
        try:
            _private_mounts(cfg["mounts"], cfg["tmp_bytes"])
        except BaseException as e:  # the sandbox's failure, not the program's
            _status(cfg["status_fd"], {"phase": "setup", "exception": f"{type(e).__name__}: {e}"})
            os._exit(1)
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        _child(cfg, program)
    code, record = _wait(pid)
    record["wall"] = round(time.monotonic() - start, 4)
    _status(cfg["status_fd"], record)
    os._exit(code)


if __name__ == "__main__":  # `python -c` runs it as __main__; never imported
    main()
