"""The sandbox contains hostile programs: each one is reported as a failure of the kind that
stopped it, the run's workdir stays byte-for-byte unchanged, no process of it is left, and
the evaluator carries on. Run at every namespace level this machine allows (bwrap and the
unshare fallback as root in CI), plus the plain level's own guarantees."""
import errno
import hashlib
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from crystal.errors import EvalError, UsageError
from crystal.eval import sandbox as sb

STRONG = ("bwrap", "unshare")
FAST = sb.Limits(cpu_seconds=1, wall_seconds=2.5, processes=16)
MARKER = "crystal-sandbox-test-marker-5f1c"


def _sandbox(level: str) -> sb.Sandbox:
    try:
        return sb.Sandbox(allow_code_execution=True, isolation=level)
    except EvalError as e:
        pytest.skip(f"{level} isolation refused on this machine: {e}")


@pytest.fixture(scope="session", params=STRONG)
def strong(request) -> sb.Sandbox:
    return _sandbox(request.param)


@pytest.fixture(scope="session")
def plain() -> sb.Sandbox:
    return _sandbox("plain")


@pytest.fixture
def workdir(tmp_path) -> Path:
    """A run's workdir, world-writable so that only the isolation keeps programs out."""
    wd = tmp_path / "run"
    (wd / "checkpoints" / "100").mkdir(parents=True)
    (wd / "run.json").write_text('{"step": 100}\n')
    (wd / "checkpoints" / "100" / "state.bin").write_bytes(os.urandom(4096))
    for p in [wd, *wd.rglob("*")]:
        p.chmod(0o777 if p.is_dir() else 0o666)
    return wd


def snapshot(root: Path) -> dict:
    """Every entry under root (root included): mode, and content hash of files."""
    out = {}
    for p in [root, *sorted(root.rglob("*"))]:
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
        out[str(p.relative_to(root))] = (st.st_mode, st.st_size if p.is_file() else 0, digest)
    return out


# Each hostile program does its harm, then fails its "test" (as a generated completion
# would): the kind says what stopped it (exception: the sandbox refused the call;
# assertion: the call silently did nothing; a limit: timeout, memory, output_limit).
HOSTILE = {
    "write_outside": ("from pathlib import Path\n"
                      "Path(WORKDIR, 'evil.txt').write_text('escaped')\n"
                      "Path(WORKDIR, 'run.json').write_text('{}')\n", {"exception"}),
    "delete_outside": ("import os, shutil\n"
                       "os.remove(os.path.join(WORKDIR, 'run.json'))\n"
                       "shutil.rmtree(WORKDIR)\n", {"exception"}),
    "read_shadow": ("print(open('/etc/shadow').read())\n", {"exception"}),
    "socket_outside": ("import socket\n"
                       "socket.create_connection(('1.1.1.1', 443), timeout=3)\n", {"exception"}),
    "fork_bomb": ("import os\n"
                  "while True:\n"
                  "    try:\n"
                  "        os.fork()\n"
                  "    except OSError:\n"
                  "        pass\n", {"timeout"}),
    "infinite_loop": ("while True:\n    pass\n", {"timeout"}),
    "allocate_10gb": ("blocks = [bytes(1 << 30) for _ in range(10)]\n", {"memory"}),
    "kill_parent": ("import os, signal, time\n"
                    "for pid in (os.getppid(), 1, -1):\n"
                    "    try:\n"
                    "        os.kill(pid, signal.SIGKILL)\n"
                    "    except OSError:\n"
                    "        pass\n"
                    "time.sleep(0.3)\n"
                    "assert False, 'still here'\n", {"assertion"}),
    "outliving_child": ("import subprocess, sys\n"
                        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)',"
                        " MARKER], start_new_session=True)\n"
                        "assert False, 'spawned'\n", {"assertion"}),
    "fill_disk": ("i = 0\n"
                  "while True:\n"
                  "    with open(f'fill{i}', 'wb') as f:\n"
                  "        for _ in range(8):\n"
                  "            f.write(bytes(1 << 20))\n"
                  "    i += 1\n", {"output_limit"}),
    "scribble_status": ("import os\n"  # forged or broken status lines on every fd
                        "for fd in range(3, 64):\n"
                        "    try:\n"
                        "        os.write(fd, b\"{'main': 'x', 'exit': []}\\n{'pid': 1, \"\n"
                        "                     b\"'outcome': 'returned'}\\n\\x00[[[\\n\")\n"
                        "    except OSError:\n"
                        "        pass\n"
                        "assert False, 'scribbled'\n", {"assertion"}),
    "print_1gb": ("import sys\n"
                  "chunk = 'x' * (1 << 20)\n"
                  "for _ in range(1024):\n"
                  "    sys.stdout.write(chunk)\n", {"output_limit"}),
}


def hostile(name: str, workdir: Path) -> str:
    return (f"WORKDIR = {str(workdir)!r}\nMARKER = {MARKER!r}\n" + HOSTILE[name][0])


@pytest.mark.parametrize("name", sorted(set(HOSTILE) - {"fork_bomb"}))  # has its own test
def test_hostile_program_is_contained(strong, workdir, name):
    before = snapshot(workdir)
    r = strong.run(hostile(name, workdir), FAST)
    assert not r.passed and r.kind in HOSTILE[name][1], (r.kind, r.exception, r.stderr)
    assert r.isolation == strong.isolation.name
    assert snapshot(workdir) == before
    assert sb.processes_with(MARKER) == []
    assert sb.processes_with(f"crystal-sandbox-{r.run_id}") == []
    if name == "socket_outside":  # no route at all, not a slow or refused connect
        assert f"[Errno {errno.ENETUNREACH}]" in r.exception, r.exception
    if name == "print_1gb":
        assert r.stdout_bytes == FAST.file_bytes and len(r.stdout.encode()) <= sb.TAIL_BYTES
    if name == "infinite_loop":
        assert r.seconds < FAST.wall + 1.0


def test_read_shadow_shows_nothing_of_it(strong):
    r = strong.run("print(open('/etc/shadow').read())\n", FAST)
    assert r.kind == "exception"
    assert r.exception.startswith(("FileNotFoundError", "PermissionError")), r.exception
    try:
        secret = Path("/etc/shadow").read_text().split("\n")[0]
    except OSError:  # not root: the host file is unreadable to the test as well
        secret = ""
    assert not secret or secret not in r.stdout + r.stderr
    assert sb.processes_with(sb.own_marker()) == []


def test_local_listener_gets_no_connection(strong):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        r = strong.run("import socket\n"
                       f"s = socket.create_connection(('127.0.0.1', {port}), timeout=3)\n"
                       "s.sendall(b'escaped')\n", FAST)
        assert r.kind == "exception" and "Error" in r.exception, r.exception
        with pytest.raises(BlockingIOError):
            listener.accept()
    assert sb.processes_with(sb.own_marker()) == []


def test_fork_bomb_is_held_to_the_process_limit(strong, workdir):
    before = snapshot(workdir)
    peak = [0]
    done = threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], len(sb.processes_with(sb.own_marker())))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        r = strong.run(hostile("fork_bomb", workdir), FAST)
    finally:
        done.set()
        watcher.join()
    assert r.kind == "timeout" and r.seconds < FAST.wall + 1.0
    # the program's processes, plus the launcher and (bwrap, unshare) the outer process.
    # Outside bwrap's user namespace RLIMIT_NPROC counts the whole uid, so another
    # evaluator's sandboxes running at launch widen this bound (sandbox._rlimits).
    assert 2 <= peak[0] <= FAST.processes + 3, peak[0]
    assert sb.processes_with(sb.own_marker()) == []
    assert snapshot(workdir) == before


def test_filesystem_read_only_environment_empty(strong):
    r = strong.run("import os\n"
                   "for path in ('/', '/usr', '/dev'):\n"
                   "    assert os.statvfs(path).f_flag & os.ST_RDONLY, path\n"
                   "assert not os.statvfs('.').f_flag & os.ST_RDONLY\n"
                   "open('scratch.txt', 'w').write('ok')\n"
                   "assert dict(os.environ) == {}, dict(os.environ)\n"
                   "print(os.getuid())\n", FAST)
    assert r.passed, (r.kind, r.stderr)
    assert int(r.stdout) == (sb.NOBODY if os.geteuid() == 0 else os.getuid())


def test_hostile_batch_does_not_disturb_good_programs(strong, workdir):
    """Hostile and ordinary programs through the worker pool at once: the ordinary ones
    pass, each hostile one fails, the workdir is unchanged, nothing is left running."""
    before = snapshot(workdir)
    good = [f"assert sum(range({n})) == {n * (n - 1) // 2}\n" for n in range(4)]
    names = ["fork_bomb", "print_1gb", "allocate_10gb", "write_outside", "outliving_child"]
    results = strong.run_many([hostile(n, workdir) for n in names] + good, FAST, workers=2)
    assert [r.passed for r in results] == [False] * len(names) + [True] * len(good)
    assert [r.kind for r in results[:len(names)]] == [min(HOSTILE[n][1]) for n in names]
    assert snapshot(workdir) == before
    assert sb.processes_with(MARKER) == [] and sb.processes_with(sb.own_marker()) == []


# ----------------------------------------------------------------------------- plain level


@pytest.mark.parametrize("source, kind", [
    ("print('hi')\n", "passed"),
    ("assert 1 + 1 == 3\n", "assertion"),
    ("def f(:\n    pass\n", "syntax"),
    ("raise ValueError('no')\n", "exception"),
    ("import os\nos._exit(0)\n", "early_exit"),
    ("while True:\n    pass\n", "timeout"),
    ("x = bytearray(10 << 30)\n", "memory"),
    ("import time\ntime.sleep(60)\n", "timeout"),
])
def test_kinds(plain, source, kind):
    r = plain.run(source, sb.Limits(cpu_seconds=1, wall_seconds=2))
    assert (r.kind, r.passed) == (kind, kind == "passed"), (r.kind, r.exception, r.stderr)
    assert r.isolation == "plain"


def test_plain_kills_what_the_program_left_behind(plain):
    """No namespace ends the plain level's stragglers: the evaluator kills its process
    group and every process carrying the run's id, including one that left the group."""
    r = plain.run("import os, time\n"
                  "if os.fork() == 0:\n"
                  "    os.setsid()\n"
                  "    time.sleep(600)\n", FAST)
    assert r.passed
    assert sb.processes_with(f"crystal-sandbox-{r.run_id}") == []


# ----------------------------------------------------------------------------- permission


def test_nothing_runs_without_permission():
    with pytest.raises(UsageError, match="--allow_code_execution"):
        sb.Sandbox(allow_code_execution=False)
    with pytest.raises(UsageError, match="--allow_code_execution"):
        sb.require_code_execution(False)


def test_unknown_or_refused_isolation(monkeypatch):
    with pytest.raises(EvalError, match="expected one of bwrap, unshare, plain"):
        sb.detect("docker")
    monkeypatch.setenv("PATH", "/nonexistent")  # neither bwrap nor unshare can be found
    with pytest.raises(EvalError, match="bwrap: not installed"):
        sb.detect.__wrapped__("bwrap")
    chosen = sb.detect.__wrapped__(None)
    assert chosen.name == "plain"
    assert any(why.startswith("bwrap: not installed") for why in chosen.refused)
    assert "refused: bwrap: not installed" in chosen.describe()


# ----------------------------------------------------------------------------- classifying


def test_classify_from_wait_status_and_traceback():
    # bwrap reports a signal n as exit status 128 + n when the launcher itself was killed
    assert sb.classify([], 137, False, "", 4.0, bwrap=True).kind == "killed"
    assert sb.classify([], -9, False, "", 4.0).kind == "killed"
    assert sb.classify([], -24, False, "", 4.0).kind == "timeout"  # SIGXCPU
    main = {"main": 2, "exit": None, "signal": 9, "cpu": 5.0}
    assert sb.classify([main], 0, False, "", 4.0).kind == "timeout"  # SIGKILL at the hard limit
    tb = "Traceback (most recent call last):\n  File ...\nOSError: [Errno 28] No space left\n"
    assert sb.classify([], 1, False, tb, 4.0).kind == "output_limit"
    assert sb.classify([], 0, False, "", 4.0).kind == "early_exit"
    assert sb.classify([], 3, False, "garbage", 4.0).exception == "exit status 3"
    forged = [{"main": 7, "exit": 0, "signal": None, "cpu": 0.1}, {"pid": 7, "outcome":
                                                                   "returned"},
              {"pid": 9, "outcome": "returned"}, {"main": "x", "exit": []},
              {"main": 2, "exit": 1, "signal": None, "cpu": 0.1}]
    assert sb.classify(forged, 1, False, "", 4.0).kind == "exception"  # the last main line
    setup = [{"phase": "setup", "exception": "OSError: mount tmpfs on /tmp"}]
    assert sb.classify(setup, 1, False, "", 4.0).kind == "sandbox_error"
    assert sb.last_exception_line(tb) == ("OSError: [Errno 28] No space left", "OSError", 28)
