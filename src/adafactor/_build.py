"""Build a C source into a shared library once per machine, safe under concurrency and damage.

A training job starts one process per rank, all wanting the same kernel at once, on machines whose
cache directory outlives crashes, full disks and toolchain changes. So :func:`build_library`:

* builds at most once per cache key across processes: an exclusive ``fcntl.flock`` on
  ``<name>_<key>.lock`` is held around check-then-build; waiters find the finished library;
* never hands a damaged file to the loader (``dlopen`` of a truncated or altered library can die
  of SIGBUS/SIGSEGV): a library is returned only when its sha256 matches its sidecar;
* looks for a compiler only when it must build, so a cached kernel works without one;
* remembers a failed build on disk, so every later process fails fast instead of rebuilding;
* bounds the compiler's run time and leaves no temporary files behind.

Cache directory: ``$ADAFACTOR_CACHE_DIR``, else ``~/.cache/adafactor``. Per key it holds

* ``<name>_<key>.so``: the library, moved into place with ``os.replace`` (never written in place,
  so a process that has it mapped is unaffected by a rebuild);
* ``<name>_<key>.sha256``: its sha256 (``sha256sum -c`` format), written after it;
* ``<name>_<key>.json``: what built it (compiler, command, time); informational only;
* ``<name>_<key>.failed``: the command and error output of a failed build;
* ``<name>_<key>.lock``: the build lock, kept (deleting a lock file races with its users).

The key hashes the source bytes (only the file itself: ``#include``d files are not tracked),
the flags, the ``-D`` defines and the CPU signature (``-march=native`` code must not move to
another CPU sharing the directory), but *not* the compiler: a verified library then stays usable
where no compiler is on PATH (a container without a toolchain, a changed ``$CC``), and no compiler
is looked up unless a build is needed. The compiler used is recorded in the ``.json`` file;
delete the cache entry to rebuild with another one.

A failed build (compile error, timeout) is recorded in the ``.failed`` file and raised again by
later calls without running the compiler. Set ``ADAFACTOR_REBUILD=1`` to retry it (after fixing
the toolchain); a failure recorded by another process while this one waited for the lock is still
reported, so many ranks with the variable set retry once, not once each. A missing compiler is not
recorded: installing one is enough.

POSIX only (``fcntl``, process groups), like the C kernel it builds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

if sys.platform != "win32":
    import fcntl

__all__ = ["BuildError", "build_library", "cache_dir"]

_KEY_VERSION = 1  # bump when the key's contents or the cache layout change
_KEY_LEN = 16  # hex digits of the key in file names (64 bits)
_ERROR_TAIL = 2000  # characters of compiler output kept in errors and .failed files
_FIX = "install gcc (or clang), or set CC=/path/to/compiler, or use impl='reference'"
_NO_DEFINES: Mapping[str, int] = MappingProxyType({})
_NAME = re.compile(r"[A-Za-z0-9_]+")
_DEFINE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class BuildError(RuntimeError):
    """The library could not be built (no compiler, compile error, timeout, unwritable cache).

    The message names the cause and the fix; callers fall back to the reference path."""


def cache_dir() -> Path:
    """``$ADAFACTOR_CACHE_DIR``, else ``~/.cache/adafactor`` (as an absolute path)."""
    env = os.environ.get("ADAFACTOR_CACHE_DIR")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "adafactor"
    return path.absolute()


def build_library(
    source: Path,
    flags: Sequence[str],
    defines: Mapping[str, int] = _NO_DEFINES,
    *,
    name: str = "adafactor_cpu",
    timeout_s: float = 120.0,
) -> Path:
    """Return the path of a compiled, content-verified shared library for `source`, building it
    at most once per cache key across processes.

    ``flags`` go to the compiler in order before the source, except those starting with ``-l``
    (libraries, e.g. ``-lm``), which go after it where the linker expects them. ``defines`` are
    passed as ``-DNAME=value``, sorted by name. The compiler is ``$CC`` (may carry arguments,
    e.g. ``ccache gcc``), else the first of ``cc``, ``gcc``, ``clang`` on PATH; it is killed
    (with its children) after ``timeout_s`` seconds. Raises :class:`BuildError`.
    """
    if not _NAME.fullmatch(name):
        raise ValueError(f"name must be letters, digits and '_', got {name!r}")
    source = Path(source).absolute()
    try:
        code = source.read_bytes()
    except OSError as exc:
        raise BuildError(
            f"cannot read the kernel source {source}: {exc} (a broken install? reinstall it, "
            "or use impl='reference')"
        ) from exc
    flags = [str(flag) for flag in flags]
    define_flags = _define_flags(defines)
    key = _cache_key(code, flags, define_flags)
    cache = cache_dir()
    lib = cache / f"{name}_{key}.so"
    if _verified(lib):  # the common case: no lock, no compiler, one hash of the file
        return lib
    marker = lib.with_suffix(".failed")
    rebuild = os.environ.get("ADAFACTOR_REBUILD", "") not in ("", "0")
    seen = _stat(marker)
    if seen is not None and not rebuild:
        raise _remembered(marker)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with _locked(lib.with_suffix(".lock")):
            if _verified(lib):  # another process built it while this one waited
                return lib
            now = _stat(marker)
            if now is not None and (not rebuild or now != seen):
                raise _remembered(marker)  # failed again while this one waited: don't repeat it
            for stale in (lib, lib.with_suffix(".sha256")):  # damaged or half-written
                stale.unlink(missing_ok=True)
            _remove_stale_temps(cache, name, key)
            _compile(source, code, flags, define_flags, lib, timeout_s)
    except OSError as exc:
        raise BuildError(
            f"cannot write the build cache {cache}: {exc}; set ADAFACTOR_CACHE_DIR to a writable "
            "directory, or use impl='reference'"
        ) from exc
    return lib


def _define_flags(defines: Mapping[str, int]) -> list[str]:
    out = []
    for key in sorted(defines):
        value = defines[key]
        if not _DEFINE.fullmatch(key):
            raise ValueError(f"define names must be C identifiers, got {key!r}")
        if not isinstance(value, int):
            raise TypeError(f"define {key} must be an int, got {type(value).__name__}")
        out.append(f"-D{key}={int(value)}")
    return out


def _cpu_signature() -> str:
    # The instruction-set features -march=native compiles for: x86 "flags", Arm "Features".
    features = ""
    try:
        with open("/proc/cpuinfo") as f:
            features = next(
                (line.strip() for line in f if line.startswith(("flags", "Features"))), ""
            )
    except OSError:
        pass
    return " ".join((sys.platform, platform.machine(), platform.processor(), features))


def _cache_key(code: bytes, flags: list[str], define_flags: list[str]) -> str:
    # The compiler is deliberately not part of the key (see the module docstring).
    description = json.dumps(
        {
            "version": _KEY_VERSION,
            "source": hashlib.sha256(code).hexdigest(),
            "flags": flags,
            "defines": define_flags,
            "cpu": _cpu_signature(),
        },
        sort_keys=True,
    )
    return hashlib.sha256(description.encode()).hexdigest()[:_KEY_LEN]


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _verified(lib: Path) -> bool:
    """Whether ``lib`` exists, is not empty and hashes to its sidecar's digest."""
    try:
        expected = lib.with_suffix(".sha256").read_text().split()
        return lib.stat().st_size > 0 and bool(expected) and _sha256_file(lib) == expected[0]
    except (OSError, UnicodeDecodeError):
        return False


def _stat(path: Path) -> tuple[int, int, int] | None:
    """Identity of a file version, to tell whether it was rewritten; None when missing."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _remembered(marker: Path) -> BuildError:
    try:
        record = marker.read_text(errors="replace").strip()
    except OSError:
        record = "(the record could not be read)"
    return BuildError(
        f"an earlier build failed and is not retried (recorded in {marker}):\n{record}\n"
        f"Fix: {_FIX}; then set ADAFACTOR_REBUILD=1 for one run (or delete that file) to retry"
    )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock shared by all processes (and threads) using the same lock file."""
    if sys.platform == "win32":  # pragma: no cover - no kernel builds there
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock, also when the process dies


def _temp_path(path: Path) -> Path:
    # <stem>.<pid>.tmp<suffix>: the pid tells a dead process's leftovers from a live build.
    return path.with_name(f"{path.stem}.{os.getpid()}.tmp{path.suffix}")


def _write_atomic(path: Path, text: str) -> None:
    tmp = _temp_path(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: exists, owned by someone else
        return True
    return True


def _remove_stale_temps(cache: Path, name: str, key: str) -> None:
    """Delete temporary files a killed build left (caller holds ``key``'s lock): all of this
    key's (no one else can be building it), and other keys' whose process is gone."""
    pattern = re.compile(rf"{name}_([0-9a-f]{{{_KEY_LEN}}})\.(\d+)\.tmp\.\w+")
    for path in cache.glob(f"{name}_*.tmp.*"):
        match = pattern.fullmatch(path.name)
        if match and (match[1] == key or not _pid_alive(int(match[2]))):
            with contextlib.suppress(OSError):
                path.unlink()


def _find_compiler() -> list[str] | None:
    """``$CC`` (split like a shell word list), else cc, gcc, clang: the first found on PATH."""
    candidates: list[list[str]] = []
    env = os.environ.get("CC", "").strip()
    if env:
        try:
            candidates.append(shlex.split(env))
        except ValueError:
            candidates.append([env])
    candidates += [["cc"], ["gcc"], ["clang"]]
    for words in candidates:
        path = shutil.which(words[0]) if words else None
        if path:
            return [path, *words[1:]]
    return None


def _kill_group(proc: subprocess.Popen[str]) -> None:
    """Kill the compiler and its children (cc1, as, ld), then reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (AttributeError, OSError):
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired, OSError, ValueError):
        proc.communicate(timeout=5)
    proc.wait()


def _run(command: list[str], timeout_s: float) -> tuple[int, str]:
    """Run the compiler in its own process group; return (exit status, its output)."""
    proc = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,  # so a timeout (or Ctrl-C here) kills its children too
    )
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except BaseException:
        _kill_group(proc)
        raise
    return proc.returncode, output


def _compile(
    source: Path,
    code: bytes,
    flags: list[str],
    define_flags: list[str],
    lib: Path,
    timeout_s: float,
) -> None:
    """Build ``lib`` (caller holds its lock); record a failure and raise BuildError."""
    cc = _find_compiler()
    if cc is None:  # not recorded: installing a compiler should just work
        cc_env = os.environ.get("CC")
        tried = f"$CC={cc_env!r}, cc, gcc, clang" if cc_env else "$CC, cc, gcc, clang"
        raise BuildError(f"no C compiler found to build {source.name} (tried {tried}); {_FIX}")
    tmp = _temp_path(lib)
    libs = [flag for flag in flags if flag.startswith("-l")]
    options = [flag for flag in flags if not flag.startswith("-l")]
    command = [*cc, *options, *define_flags, "-o", str(tmp), str(source), *libs]
    shown = shlex.join(command)
    marker = lib.with_suffix(".failed")
    start = time.monotonic()
    try:
        try:
            status, output = _run(command, timeout_s)
        except subprocess.TimeoutExpired:
            cause = f"the compiler timed out after {timeout_s:g} s (timeout_s) and was killed"
            _record(marker, f"{cause}\n$ {shown}\n")
            raise BuildError(f"building {source.name}: {cause}:\n$ {shown}\n{_FIX}") from None
        except OSError as exc:  # not recorded: the compiler could not be started
            raise BuildError(f"cannot run the compiler {cc[0]!r}: {exc}; {_FIX}") from exc
        output = _tail(output)
        if status != 0 or not tmp.is_file() or tmp.stat().st_size == 0:
            cause = f"exit status {status}" if status != 0 else "no output file"
            _record(marker, f"compiler failed ({cause})\n$ {shown}\n{output}\n")
            raise BuildError(
                f"compiling {source.name} failed ({cause}):\n$ {shown}\n{output}\n{_FIX}"
            )
        digest = _sha256_file(tmp)
        os.replace(tmp, lib)  # atomic: readers see no library or the whole one
        _write_atomic(lib.with_suffix(".sha256"), f"{digest}  {lib.name}\n")
        info = {
            "compiler": cc,
            "CC": os.environ.get("CC"),
            "command": [lib.name if arg == str(tmp) else arg for arg in command],
            "source": str(source),
            "source_sha256": hashlib.sha256(code).hexdigest(),
            "flags": flags,
            "defines": define_flags,
            "seconds": round(time.monotonic() - start, 3),
            "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "pid": os.getpid(),
        }
        _write_atomic(lib.with_suffix(".json"), json.dumps(info, indent=1) + "\n")
        marker.unlink(missing_ok=True)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def _tail(output: str) -> str:
    """The last ~2000 characters of the compiler's output, from a line start."""
    output = output.strip()
    if len(output) <= _ERROR_TAIL:
        return output
    tail = output[-_ERROR_TAIL:]
    return "...\n" + tail[tail.find("\n") + 1 :] if "\n" in tail else "..." + tail


def _record(marker: Path, text: str) -> None:
    with contextlib.suppress(OSError):  # the error raised next matters more than the record
        _write_atomic(marker, text)
