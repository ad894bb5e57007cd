"""Atomic file writes: every file fastdiff writes appears whole or not at all, with the user's umask.

A write goes to a hidden temporary file beside its target, ``.<name>.<8 random characters>.tmp``, which is
fsynced and renamed over the target. A process killed mid-write (SIGKILL, power loss) leaves that
temporary file behind; ``remove_stale_temporaries`` deletes such leftovers on the next run.
"""

from __future__ import annotations

import os
import re
import tempfile

# tempfile.mkstemp's random part: 8 characters of [a-z0-9_]
_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp$")


def current_umask() -> int:
    """The process umask, read without changing it where the platform allows (Linux: /proc/self/status)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, hence the /proc path first)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Permissions of a new regular file under the current umask (0644 under umask 022)."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """Permissions of a new folder under the current umask (0755 under umask 022)."""
    return 0o777 & ~current_umask()


def make_temp_dir(directory: str, prefix: str) -> str:
    """``tempfile.mkdtemp`` (created 0700) given the permissions an ordinary ``mkdir`` would give."""
    path = tempfile.mkdtemp(prefix=prefix, dir=directory)
    os.chmod(path, dir_mode())
    return path


def fsync_dir(directory: str) -> None:
    """Make a rename inside ``directory`` durable (best effort: some platforms cannot open folders)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write) -> None:
    """``write(tmp_path)`` into a temporary file beside ``path``, fsync it, then rename it over ``path``.

    The file gets the permissions of an ordinary ``open(path, "w")`` (0666 minus the umask), not mkstemp's
    0600. On any failure the temporary file is removed and ``path`` keeps its old content (or stays absent).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    except OSError as exc:
        raise _naming(exc, path) from exc
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, file_mode())  # after the write: some writers (safetensors) replace the file with a 0600 one
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise _naming(exc, path) from exc
        raise
    fsync_dir(directory)


def _naming(exc: OSError, path: str) -> OSError:
    """The same error (same errno, so the same OSError subclass) with a message that names the target file,
    not the temporary one: ``cannot write out/000001.png: No space left on device``."""
    message = f"cannot write {path}: {exc.strerror or exc}"
    return OSError(exc.errno, message) if exc.errno is not None else OSError(message)


def atomic_write_text(path, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def remove_stale_temporaries(directory, targets=None) -> list[str]:
    """Delete the temporary files ``atomic_write`` left in ``directory`` when a process was killed mid-write.

    Only names of ``atomic_write``'s own pattern are touched, and of those only the ones whose target
    name matches the regular expression ``targets`` (default: any). Returns the removed paths. Call it
    before a run starts writing, never while another process writes into the same folder.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return []
    wanted = re.compile(targets) if targets is not None else None
    removed = []
    for name in os.listdir(directory):
        match = _TEMP_NAME.match(name)
        if match is None or (wanted is not None and not wanted.fullmatch(match.group("target"))):
            continue
        path = os.path.join(directory, name)
        if os.path.isfile(path) and not os.path.islink(path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            removed.append(path)
    return removed


class OutputDirError(ValueError):
    """An output folder that cannot be used: empty name, a file in its place, not creatable, not writable."""


def prepare_output_dir(path, what: str = "output folder") -> str:
    """Create ``path`` if needed and prove it writable (a probe file), before any expensive work starts.

    ``what`` names the folder in the one-line ``OutputDirError`` (the CLI passes ``"--out"``).
    """
    path = os.fspath(path)
    if not path.strip():
        raise OutputDirError(f"{what} is empty; give a folder name")
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputDirError(f"{what} {path} exists and is not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise OutputDirError(f"{what} {path}: cannot create the folder ({exc.strerror or exc})") from None
    try:
        fd, probe = tempfile.mkstemp(dir=path, prefix=".fastdiff-write-probe.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputDirError(f"{what} {path} is not writable ({exc.strerror or exc})") from None
    return path
