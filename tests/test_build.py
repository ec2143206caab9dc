"""The kernel build cache (adafactor._build): one build per key, damage, failures, timeouts.

Each test compiles a one-function C file with the real compiler, through a wrapper script that
logs every invocation, in a cache directory of its own. Libraries are loaded in a subprocess, so
a damaged file that slipped through fails the test instead of crashing pytest.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import adafactor._build as build
from adafactor._build import BuildError, build_library

REAL_CC = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
pytestmark = pytest.mark.skipif(REAL_CC is None, reason="no C compiler")

FLAGS = ["-O0", "-fPIC", "-shared"]
SOURCE = "int answer(void) { return VALUE; }\n"
BUILD_PY = Path(build.__file__)


class Env:
    """A source file, a logging compiler wrapper on $CC, and an empty cache directory."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = tmp_path
        self.cache = tmp_path / "cache"
        self.source = tmp_path / "answer.c"
        self.source.write_text(SOURCE)
        self.log = tmp_path / "cc.log"
        self.log.touch()
        self.cc = self.wrapper("cc-wrapper", "")
        monkeypatch.setenv("ADAFACTOR_CACHE_DIR", str(self.cache))
        monkeypatch.setenv("CC", str(self.cc))
        monkeypatch.delenv("ADAFACTOR_REBUILD", raising=False)

    def wrapper(self, name: str, before_exec: str) -> Path:
        """A compiler script: log "$@", run ``before_exec`` (shell), exec the real compiler."""
        path = self.root / name
        path.write_text(
            f'#!/bin/sh\necho "$@" >> "{self.log}"\n{before_exec}\nexec "{REAL_CC}" "$@"\n'
        )
        path.chmod(0o755)
        return path

    def runs(self) -> list[str]:
        return self.log.read_text().splitlines()

    def build(self, value: int = 42, **kwargs) -> Path:
        return build_library(self.source, FLAGS, {"VALUE": value}, **kwargs)

    def temps(self) -> list[str]:
        return sorted(p.name for p in self.cache.glob("*.tmp*"))


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Env:
    return Env(tmp_path, monkeypatch)


def call_answer(lib: Path) -> int:
    """answer() of ``lib``, loaded in a child process (a bad library kills only the child)."""
    code = "import ctypes, sys; print(ctypes.CDLL(sys.argv[1]).answer())"
    out = subprocess.run([sys.executable, "-c", code, str(lib)], capture_output=True, text=True)
    assert out.returncode == 0, (out.returncode, out.stderr)
    return int(out.stdout)


def test_builds_once_then_reuses(env: Env) -> None:
    lib = env.build()
    assert lib.parent == env.cache and lib.name.startswith("adafactor_cpu_")
    mtime = lib.stat().st_mtime_ns
    assert env.build() == lib and lib.stat().st_mtime_ns == mtime
    assert len(env.runs()) == 1
    digest = hashlib.sha256(lib.read_bytes()).hexdigest()
    assert lib.with_suffix(".sha256").read_text().split() == [digest, lib.name]
    info = json.loads(lib.with_suffix(".json").read_text())
    assert info["compiler"] == [str(env.cc)] and info["defines"] == ["-DVALUE=42"]
    assert call_answer(lib) == 42
    assert env.temps() == []


def test_key_follows_source_flags_and_defines_and_the_command_line(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = build_library(env.source, [*FLAGS, "-lm"], {"VALUE": 1, "B": 2, "A": 3})
    # -D sorted by name, after the flags; -l after the source
    args = env.runs()[0].split()
    assert args[args.index("-DA=3") : args.index("-DA=3") + 3] == ["-DA=3", "-DB=2", "-DVALUE=1"]
    assert args[-2:] == [str(env.source), "-lm"]
    assert call_answer(first) == 1
    paths = {first, build_library(env.source, [*FLAGS, "-lm"], {"VALUE": 2, "B": 2, "A": 3})}
    paths.add(build_library(env.source, [*FLAGS, "-g", "-lm"], {"VALUE": 1, "B": 2, "A": 3}))
    env.source.write_text("/* changed */\n" + SOURCE)
    paths.add(build_library(env.source, [*FLAGS, "-lm"], {"VALUE": 1, "B": 2, "A": 3}))
    assert len(paths) == 4 and len(env.runs()) == 4
    # the compiler is not part of the key: another $CC reuses the cached library
    monkeypatch.setenv("CC", str(env.wrapper("other-cc", "")))
    assert build_library(env.source, [*FLAGS, "-lm"], {"A": 3, "B": 2, "VALUE": 1}) in paths
    assert len(env.runs()) == 4


def _damage(lib: Path, how: str, other: Path) -> None:
    data = lib.read_bytes()
    if how == "truncated":
        lib.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        lib.write_bytes(b"")
    elif how == "bitflip":
        i = len(data) // 2
        lib.write_bytes(data[:i] + bytes([data[i] ^ 0x10]) + data[i + 1 :])
    elif how == "replaced":  # a valid library, but not this one
        shutil.copyfile(other, lib)
    elif how == "no_sidecar":
        lib.with_suffix(".sha256").unlink()
    elif how == "bad_sidecar":
        lib.with_suffix(".sha256").write_text("0" * 64 + "  x.so\n")


@pytest.mark.parametrize(
    "how", ["truncated", "empty", "bitflip", "replaced", "no_sidecar", "bad_sidecar"]
)
def test_damaged_library_is_rebuilt_never_returned(env: Env, how: str) -> None:
    other = env.build(value=7)
    lib = env.build()
    _damage(lib, how, other)
    assert env.build() == lib
    assert len(env.runs()) == 3  # 7, 42, and 42 again
    digest = hashlib.sha256(lib.read_bytes()).hexdigest()
    assert lib.with_suffix(".sha256").read_text().split()[0] == digest
    assert call_answer(lib) == 42
    assert env.temps() == []


def test_cached_library_needs_no_compiler(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    lib = env.build()
    path = os.environ["PATH"]
    empty = env.root / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("CC")
    assert build.build_library(env.source, FLAGS, {"VALUE": 42}) == lib
    # a build that is needed fails with the fix in the message, and is not remembered
    with pytest.raises(BuildError, match=r"no C compiler found.*install gcc.*CC=.*reference"):
        env.build(value=5)
    assert list(env.cache.glob("*.failed")) == []
    monkeypatch.setenv("PATH", path)  # installing one just works
    monkeypatch.setenv("CC", str(env.cc))
    assert call_answer(env.build(value=5)) == 5


def test_failed_build_is_remembered_and_rebuild_retries(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = env.root / "broken"
    broken.touch()
    fails = f'[ -e "{broken}" ] && {{ echo "fake-cc: error: toolchain XYZZY" >&2; exit 1; }}'
    monkeypatch.setenv("CC", str(env.wrapper("flaky-cc", fails)))
    with pytest.raises(BuildError, match=r"(?s)exit status 1.*XYZZY.*install gcc"):
        env.build()
    assert len(env.runs()) == 1
    broken.unlink()  # the toolchain is fixed, but the failure is remembered
    start = time.monotonic()
    with pytest.raises(BuildError, match=r"(?s)XYZZY.*ADAFACTOR_REBUILD=1") as info:
        env.build()
    assert time.monotonic() - start < 0.5 and len(env.runs()) == 1
    assert str(env.cache) in str(info.value)
    monkeypatch.setenv("ADAFACTOR_REBUILD", "1")
    lib = env.build()
    assert len(env.runs()) == 2 and call_answer(lib) == 42
    assert list(env.cache.glob("*.failed")) == []
    monkeypatch.delenv("ADAFACTOR_REBUILD")
    assert env.build() == lib and len(env.runs()) == 2


def test_rebuild_does_not_repeat_a_failure_recorded_while_waiting(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ADAFACTOR_REBUILD=1 on every rank, one rank retries; the others report its result."""
    monkeypatch.setenv("CC", str(env.wrapper("bad-cc", 'echo "error: NOPE" >&2; exit 1')))
    with pytest.raises(BuildError):
        env.build()
    (marker,) = env.cache.glob("*.failed")
    monkeypatch.setenv("ADAFACTOR_REBUILD", "1")
    real_flock, waiting = fcntl.flock, threading.Event()

    def flock(fd: int, op: int) -> None:
        waiting.set()
        real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    errors: list[BaseException] = []

    def call() -> None:
        try:
            env.build()
        except BaseException as exc:
            errors.append(exc)

    with open(marker.with_suffix(".lock"), "w") as held:
        real_flock(held.fileno(), fcntl.LOCK_EX)  # "another rank" is building
        thread = threading.Thread(target=call)
        thread.start()
        assert waiting.wait(10)
        time.sleep(0.05)
        marker.unlink()  # ... and records its new failure
        marker.write_text("compiler failed (exit status 1)\nerror: RETRIED-ELSEWHERE\n")
    thread.join(10)
    assert len(errors) == 1 and "RETRIED-ELSEWHERE" in str(errors[0])
    assert len(env.runs()) == 1


def test_compiler_timeout(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    pidfile = env.root / "sleep.pid"
    hang = (
        'out=; for a; do [ "$prev" = -o ] && out="$a"; prev="$a"; done\n'
        'echo partial > "$out"\n'
        f'sleep 30 & echo $! > "{pidfile}"; wait'
    )
    monkeypatch.setenv("CC", str(env.wrapper("slow-cc", hang)))
    start = time.monotonic()
    with pytest.raises(BuildError, match=r"timed out after 1 s"):
        env.build(timeout_s=1.0)
    assert time.monotonic() - start < 8
    assert env.temps() == [] and not list(env.cache.glob("*.so"))
    # the compiler's children were killed too
    pid = int(pidfile.read_text())
    status = Path(f"/proc/{pid}/status")
    if status.exists():
        deadline = time.monotonic() + 3
        while status.exists() and "State:\tZ" not in status.read_text():
            assert time.monotonic() < deadline, "the compiler's child survived the timeout"
            time.sleep(0.02)
    # remembered like a compile error
    with pytest.raises(BuildError, match=r"timed out after 1 s"):
        env.build(timeout_s=1.0)
    assert len(env.runs()) == 1


def test_stale_temporary_files_are_removed(env: Env) -> None:
    lib = env.build()
    key = lib.stem.removeprefix("adafactor_cpu_")
    dead = subprocess.Popen(["true"])
    dead.wait()
    other_key = "0123456789abcdef"
    stale = [
        f"adafactor_cpu_{key}.{dead.pid}.tmp.so",
        f"adafactor_cpu_{key}.{os.getppid()}.tmp.sha256",  # this key: its builder holds the lock
        f"adafactor_cpu_{other_key}.{dead.pid}.tmp.so",
    ]
    kept = [f"adafactor_cpu_{other_key}.{os.getppid()}.tmp.so", f"mine_{key}.1.tmp.so"]
    for name in stale + kept:
        (env.cache / name).write_text("partial")
    lib.unlink()  # the next call must build (and clean up under the lock)
    assert env.build() == lib and len(env.runs()) == 2
    assert env.temps() == sorted(kept)


def test_unwritable_cache_dir(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = env.root / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("ADAFACTOR_CACHE_DIR", str(blocker / "cache"))
    with pytest.raises(BuildError, match=r"a-file/cache.*ADAFACTOR_CACHE_DIR"):
        env.build()


CHILD = textwrap.dedent(
    """
    import ctypes, importlib.util, json, sys
    spec = importlib.util.spec_from_file_location("_build", sys.argv[1])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    lib = mod.build_library(sys.argv[2], ["-O0", "-fPIC", "-shared"], {"VALUE": 42})
    print(json.dumps([str(lib), ctypes.CDLL(str(lib)).answer()]))
    """
)


def test_concurrent_processes_build_once(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    # a slow compiler, so that all four processes ask while the first build runs
    monkeypatch.setenv("CC", str(env.wrapper("slow-cc", "sleep 0.5")))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(BUILD_PY), str(env.source)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        results.append(tuple(json.loads(out)))
    assert len(set(results)) == 1 and results[0][1] == 42
    assert len(env.runs()) == 1
    assert env.temps() == []


def test_long_compiler_output_keeps_whole_last_lines() -> None:
    output = "".join(f"line {i}: error: something\n" for i in range(500))
    tail = build._tail(output)
    assert tail.startswith("...\nline ") and tail.endswith("line 499: error: something")
    assert len(tail) <= 2010
    assert build._tail("short\n") == "short"
