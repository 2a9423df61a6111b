"""The one atomic writer: write into a hidden sibling, then rename it onto the target.

A reader never sees a half-written model, report, output or dataset: everything is
written to a temporary name in the target's own folder (so the rename stays on one file
system) and moved into place only when writing succeeded; on any error (or an
interrupt: SIGINT, and SIGTERM through the command line) the temporary files are removed
and the targets are left as they were.

A temporary file is named ``.tmp-<random>-<target name>``: it keeps the target's
extension, so writers that choose the format from the name (NIfTI, NRRD, PNG) work on it.
A temporary folder is named ``.tmp-<random>-<target name>.partial``.

* Several targets are placed all together or not at all: an existing target is first
  moved aside to a hidden backup, restored if placing any of the others fails.
* Without ``overwrite`` the placement is no-clobber *atomically* (``os.link`` of the
  temporary file onto the final name fails with EEXIST if another process created the
  target meanwhile): two concurrent runs cannot silently replace each other's results.
* A target that is a symbolic link is written through: the link's target is replaced.
* New files get the mode of any normally created file (``0666 & ~umask``); a replaced
  file keeps its mode.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Union

from ..errors import OutputError

PathLike = Union[str, "os.PathLike[str]"]

__all__ = ["replacing", "atomic_write", "atomic_write_text", "default_file_mode", "check_writable_folder"]

#: errno values meaning "this file system cannot hard-link": fall back to check + rename.
_NO_LINK = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS, errno.EMLINK}


def default_file_mode() -> int:
    """``0666 & ~umask``: the mode ``open(path, "w")`` would give a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def check_writable_folder(folder: PathLike, what: str = "output folder") -> None:
    """OutputError unless a file can really be created in ``folder`` (an existing folder).

    Creates and removes a hidden temporary file: unlike ``os.access`` this also tells the
    truth for root, read-only mounts and a full disk's exhausted inodes.
    """
    folder = Path(folder) if str(folder) else Path(".")
    try:
        fd, name = tempfile.mkstemp(prefix=".tmp-", suffix="-probe", dir=folder)
    except OSError as exc:
        raise OutputError(f"{what} {folder} is not writable ({exc.strerror or exc})") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(name)


def _resolve(path: PathLike) -> Path:
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _exists_error(final: Path) -> OutputError:
    return OutputError(f"{final} already exists (use --overwrite to replace it)")


@contextlib.contextmanager
def replacing(*targets: PathLike, directory: bool = False, overwrite: bool = True) -> Iterator[List[Path]]:
    """Temporary siblings of ``targets``, moved onto them when the block ends without error.

    Yields one temporary path per target (an empty file, or with ``directory`` an empty
    folder). All are written before any is placed, and they are placed all together or
    not at all. With ``directory`` an existing target folder is replaced as a whole (the
    caller has checked that it may be). Without ``overwrite`` an existing target raises
    :class:`OutputError` and nothing is placed.
    """
    finals = [_resolve(t) for t in targets]
    temps: List[Path] = []
    try:
        for final in finals:
            parent = final.parent if str(final.parent) else Path(".")
            if directory:
                temps.append(Path(tempfile.mkdtemp(prefix=".tmp-", suffix=f"-{final.name}.partial", dir=parent)))
            else:
                fd, name = tempfile.mkstemp(prefix=".tmp-", suffix=f"-{final.name}", dir=parent)
                os.close(fd)
                temps.append(Path(name))
        yield temps
        if directory:
            for temp, final in zip(temps, finals):
                if final.exists():
                    if not overwrite:
                        raise _exists_error(final)
                    shutil.rmtree(final)
                os.replace(temp, final)
        else:
            _place_files(temps, finals, overwrite)
    finally:
        for temp in temps:
            if temp.is_dir() and not temp.is_symlink():
                shutil.rmtree(temp, ignore_errors=True)
            elif os.path.lexists(temp):
                with contextlib.suppress(OSError):
                    temp.unlink()


def _place_files(temps: List[Path], finals: List[Path], overwrite: bool) -> None:
    """Move complete temporary files onto their finals: all of them or none."""
    for final in finals:  # fail before touching anything when a target cannot be a file
        if final.is_dir():
            raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", str(final))
        if not overwrite and os.path.lexists(final):
            raise _exists_error(final)
    default_mode = default_file_mode()
    placed: List[Path] = []
    backups: List[tuple] = []  # (backup, final)
    try:
        for temp, final in zip(temps, finals):
            old: Optional[os.stat_result] = None
            with contextlib.suppress(FileNotFoundError):
                old = os.stat(final)
            os.chmod(temp, stat.S_IMODE(old.st_mode) if old is not None else default_mode)
            if old is not None and overwrite:
                backup = final.with_name(f".tmp-{os.urandom(4).hex()}-bak-{final.name}")
                os.replace(final, backup)
                backups.append((backup, final))
                os.replace(temp, final)
            elif overwrite:
                os.replace(temp, final)
            else:
                _link_no_clobber(temp, final)
            placed.append(final)
    except BaseException:
        for final in placed:
            with contextlib.suppress(OSError):
                final.unlink()
        for backup, final in backups:
            with contextlib.suppress(OSError):
                os.replace(backup, final)
        raise
    for backup, _ in backups:
        with contextlib.suppress(OSError):
            backup.unlink()


def _link_no_clobber(temp: Path, final: Path) -> None:
    """Place ``temp`` at ``final`` only if ``final`` does not exist, atomically."""
    try:
        os.link(temp, final)
    except FileExistsError:
        raise _exists_error(final) from None
    except OSError as exc:
        if exc.errno not in _NO_LINK:
            raise
        # no hard links on this file system: exclusive creation, then rename onto it
        try:
            os.close(os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            raise _exists_error(final) from None
        os.replace(temp, final)
        return
    temp.unlink()


def atomic_write(target: PathLike, write: Callable[[Path], None], *, overwrite: bool = True) -> None:
    """``write(temp)`` into a temporary sibling of ``target``, then move it onto ``target``."""
    with replacing(target, overwrite=overwrite) as (temp,):
        write(temp)


def atomic_write_text(target: PathLike, text: str, *, overwrite: bool = True) -> None:
    """Write ``text`` (UTF-8) to ``target`` atomically."""
    atomic_write(target, lambda temp: temp.write_text(text, encoding="utf-8"), overwrite=overwrite)
