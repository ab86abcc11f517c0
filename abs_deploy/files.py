"""Writing outputs so that no failure (a bad path, a full or read-only disk, a kill) costs work
or leaves debris: outputs are checked before any work, every file is written under a temporary
name beside its target and renamed over it when complete, and the temporary files and folders
a killed run left are removed by the next run that writes to the same folder.

Temporary names are `.<target name>.abs-tmp-<host>-<pid>-<random>`: the host and pid say whose
they are, so a run removes only leftovers of processes of this host that no longer exist.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterable
from pathlib import Path

from abs_deploy.errors import UserError

_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:40]
_TEMP = re.compile(r"\..+\.abs-tmp-(?P<host>[A-Za-z0-9]*)-(?P<pid>\d+)-[0-9a-f]{8}")


def check_output(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Refuse, before any work starts, an output whose folder is missing or not writable, a
    folder given as an output file, or an output that is one of `inputs` (writing it would
    replace the input). Returns the output as a Path."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"output {path} is a folder; give a file name")
    folder = path.parent
    if not folder.is_dir():
        raise UserError(f"cannot write {path}: folder {folder} does not exist")
    for given in inputs:
        if same_file(path, Path(given)):
            raise UserError(f"output {path} is the input {given}: it would be replaced; "
                            "give another output name")
    # Permission bits do not tell (root ignores them, a read-only mount overrides them):
    # creating a file does.
    probe = temp_path(path)
    try:
        with open(probe, "xb"):
            pass
    except OSError as e:
        raise UserError(f"cannot write {path}: {reason(e)}") from None
    discard(probe)
    return path


def same_file(a: Path, b: Path) -> bool:
    """Whether `a` and `b` name one file: the same path after links, or one inode."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # either does not exist (yet)
        return False


def write_bytes(path: str | os.PathLike, data: bytes | memoryview) -> Path:
    """`data` to `path` in full or not at all: the previous file stays until the new one is
    complete. A disk error is one `UserError` line."""
    path = Path(path)
    remove_stale(path.parent)
    tmp = temp_path(path)
    try:
        with open(tmp, "xb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        discard(tmp)
        raise UserError(f"cannot write {path}: {reason(e)}") from None
    except BaseException:
        discard(tmp)
        raise
    return path


def temp_dir(target: Path) -> Path:
    """A new temporary folder beside `target`, for files to be moved into place together."""
    remove_stale(target.parent)
    tmp = temp_path(target)
    try:
        tmp.mkdir()
    except OSError as e:
        raise UserError(f"cannot write to {target.parent}: {reason(e)}") from None
    return tmp


def temp_path(target: Path) -> Path:
    """A fresh temporary name in `target`'s folder (same file system, so renaming is atomic)."""
    return target.with_name(f".{target.name}.abs-tmp-{_HOST}-{os.getpid()}-"
                            f"{secrets.token_hex(4)}")


def remove_stale(folder: Path) -> None:
    """Remove the temporary files and folders that killed runs of this host left in `folder`
    (named by `temp_path`, their process gone). Nothing else is touched; a leftover that cannot
    be removed is left, since cleaning up is no reason to fail."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        m = _TEMP.fullmatch(entry.name)
        if not m or m["host"] != _HOST or _alive(int(m["pid"])):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)


def discard(path: Path) -> None:
    """Remove a temporary file or folder of ours, if it exists; never raises (it runs while
    another error is on its way to the user, and a read-only folder refuses even this)."""
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def reason(e: OSError) -> str:
    """What an OSError says to a user: 'No space left on device', 'Read-only file system'."""
    return e.strerror or str(e) or type(e).__name__


def _alive(pid: int) -> bool:
    if pid <= 0 or pid == os.getpid():  # kill(0) would signal our own process group
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # EPERM: it exists, and belongs to someone else
        return True
    return True
