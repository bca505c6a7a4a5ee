"""File safety for the CLI and the loaders (no torch here):

- `lock_output`: a run that writes a results file holds an exclusive lock on it, so a second
  run on the same file (two `--resume` runs) refuses instead of writing every record twice;
- `check_writable`: the output is found unwritable before any model loads;
- `build_once`: a cache folder (converted weights) is built by one process while the others
  wait, into a private temporary folder renamed into place, so N shard processes that start at
  once never read a half-written folder;
- `read_text`: a text file decoded strictly, an undecodable byte named by its line.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import uuid
from typing import Callable

import filelock

from ..spec.errors import UserError

#: errno values that mean "the disk (or quota) is full".
DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def os_error_sentence(e: OSError, path: str, doing: str = "write", flag: str = "--output") -> str:
    """One sentence for an OSError met while writing `path` (given as `flag`), with the fix."""
    if e.errno in DISK_FULL:
        return f"The disk is full: could not {doing} {path}; free some space"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"Could not {doing} {path}: the folder is read-only or not yours; pick another {flag}"
    if e.errno == errno.EISDIR:
        return f"{path} is a folder; give a file name for {flag}"
    if e.errno in (errno.ENOTDIR, errno.EEXIST):  # makedirs through a file says EEXIST
        return f"{path} lies under something that is not a folder; fix the {flag} path"
    return f"Could not {doing} {path} ({e.strerror or e}); check the path and the disk"


def check_writable(path: str, flag: str = "--output") -> None:
    """Refuse an output that cannot be written, before any model loads: empty, a folder, a
    special file (a FIFO would block the run, a device swallow it), or unwritable. An existing
    file is opened for appending (nothing written); a new one is created and removed again."""
    path = os.fspath(path)
    if not path.strip():
        raise UserError(f"{flag} is empty; give a file name, e.g. {flag} results.jsonl.")
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder; give a file name for {flag}.")
    if os.path.exists(path) and not stat.S_ISREG(os.stat(path).st_mode):
        raise UserError(f"{path} is not a regular file (a pipe, device or socket), so records"
                        f" could block or vanish there; give a file name for {flag}.")
    folder = os.path.dirname(os.path.abspath(path))
    existed = os.path.exists(path)
    try:
        os.makedirs(folder, exist_ok=True)
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as e:
        raise UserError(os_error_sentence(e, path, flag=flag) + ".") from None
    if not existed:
        try:
            os.remove(path)
        except OSError:
            pass


class OutputLock:
    """An exclusive, non-blocking lock on a results file, held until `release` (or the process
    ends, even by kill -9: the kernel drops flock locks with the process). The lock is on the
    file itself (opened for appending, so nothing is changed), never on a sidecar file.

    It is `filelock.UnixFileLock` (flock) with `preserve_lock_file=True`: the results file is
    the lock file, so it must never be unlinked on release nor turned into a soft-lock marker
    (a pid written into the JSONL) on a file system without flock; there we warn and run
    unlocked, as before. Without fcntl (Windows) nothing is locked: a Windows lock is mandatory
    and would stop this run's own writer from appending to the file."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        self._lock: filelock.UnixFileLock | None = None

    def acquire(self) -> "OutputLock":
        if not filelock.unix_has_fcntl:
            return self
        # the real path: filelock opens with O_NOFOLLOW, and a symlinked --output is fine
        lock = filelock.UnixFileLock(os.path.realpath(self.path), blocking=False,
                                     thread_local=False, preserve_lock_file=True)
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            lock.acquire()
        except filelock.Timeout:
            raise UserError(f"{self.path} is being written by another run; wait for it to"
                            " finish or give this run another --output.") from None
        except OSError as e:
            if e.errno in (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                import sys  # a file system without locks (some network mounts): run unlocked
                print(f"Warning: {self.path} could not be locked ({e.strerror or e}); make sure no"
                      " other run writes it meanwhile.", file=sys.stderr)
                return self
            raise UserError(os_error_sentence(e, self.path) + ".") from None
        self._lock = lock
        return self

    def release(self) -> None:
        if self._lock is not None:
            try:
                self._lock.release()
            finally:
                self._lock = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_output(path: str) -> OutputLock:
    """Check `path` is writable and lock it for this run (see OutputLock)."""
    check_writable(path)
    return OutputLock(path).acquire()


def file_lock(path: str) -> filelock.FileLock:
    """A blocking exclusive lock on the file `path` (created if needed, kept after release)."""
    return filelock.FileLock(path, thread_local=False)


def build_once(out: str, build: Callable[[str], None], done_file: str = "config.json") -> bool:
    """Build the folder `out` with `build(tmp_folder)` unless it is already complete (holds
    `done_file`). Safe when N processes call it at once: one builds under a lock file while the
    others wait, the build goes to a private temporary folder renamed into place in one step,
    and a build that fails leaves nothing behind. True when this call built it."""
    if os.path.isfile(os.path.join(out, done_file)):
        return False
    parent = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(parent, exist_ok=True)
        lock = file_lock(out + ".lock")
        lock.__enter__()
    except OSError as e:
        raise UserError(os_error_sentence(e, parent, "write the cache in").rstrip(".") +
                        " or set C2C_CACHE to a writable folder.") from None
    try:
        if os.path.isfile(os.path.join(out, done_file)):
            return False  # another process built it while we waited
        tmp = f"{out}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            build(tmp)
            if not os.path.isfile(os.path.join(tmp, done_file)):
                raise RuntimeError(f"building {out} wrote no {done_file}")
            if os.path.isdir(out):  # an incomplete folder from an older version
                shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
        except OSError as e:
            raise UserError(os_error_sentence(e, parent, "write the cache in") +
                            " or set C2C_CACHE to another folder.") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return True
    finally:
        lock.__exit__(None, None, None)


def read_text(path: str, encoding: str | None = None) -> str:
    """The file's text, decoded strictly (default UTF-8, a BOM dropped); an undecodable byte
    is a UserError naming its line and the --encoding fix."""
    enc = encoding or "utf-8-sig"
    try:
        with open(path, "rb") as f:
            data = f.read()
    except IsADirectoryError:
        raise UserError(f"{os.path.basename(path)} is a folder; pass a file.") from None
    except OSError as e:
        raise UserError(f"Could not read {os.path.basename(path)} ({e.strerror or e}); check the"
                        " path.") from None
    try:
        return data.decode(enc)
    except LookupError:
        raise UserError(f"--encoding {encoding} is not an encoding Python knows; use e.g."
                        " utf-8, latin-1 or cp1252.") from None
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(f"{os.path.basename(path)} line {line} is not valid {e.encoding} (byte"
                        f" 0x{data[e.start]:02x}); pass --encoding with the file's encoding (e.g."
                        " --encoding latin-1) or re-save it as UTF-8.") from None
