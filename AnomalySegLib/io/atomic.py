"""The one atomic writer: write into a hidden sibling, then rename it onto the target.

A reader never sees a half-written model, report, output or dataset: everything is
written to a temporary name in the target's own folder (so the rename stays on one file
system) and moved into place with ``os.replace`` only when writing succeeded; on any
error the temporary files are removed and the targets are left as they were.

A temporary file is named ``.tmp-<random>-<target name>``: it keeps the target's
extension, so writers that choose the format from the name (NIfTI, NRRD, PNG) work on it.
A temporary folder is named ``.tmp-<random>-<target name>.partial``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, List, Union

PathLike = Union[str, "os.PathLike[str]"]

__all__ = ["replacing", "atomic_write", "atomic_write_text"]


@contextlib.contextmanager
def replacing(*targets: PathLike, directory: bool = False) -> Iterator[List[Path]]:
    """Temporary siblings of ``targets``, renamed onto them when the block ends without error.

    Yields one temporary path per target (an empty file, or with ``directory`` an empty
    folder). All are written before any is renamed. With ``directory`` an existing target
    folder is replaced as a whole (the caller has checked that it may be).
    """
    finals = [Path(t) for t in targets]
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
        for temp, final in zip(temps, finals):
            if directory and final.exists():
                shutil.rmtree(final)
            os.replace(temp, final)
    finally:
        for temp in temps:
            if temp.is_dir():
                shutil.rmtree(temp, ignore_errors=True)
            elif temp.exists():
                temp.unlink()


def atomic_write(target: PathLike, write: Callable[[Path], None]) -> None:
    """``write(temp)`` into a temporary sibling of ``target``, then rename it onto ``target``."""
    with replacing(target) as (temp,):
        write(temp)


def atomic_write_text(target: PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``target`` atomically."""
    atomic_write(target, lambda temp: temp.write_text(text, encoding="utf-8"))
