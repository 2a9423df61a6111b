"""A gzip writer that compresses on several cores and still writes one standard gzip member.

Writing a float32 anomaly map is mostly deflate time, and deflate is single-threaded in
:mod:`gzip`. :class:`ParallelGzipWriter` cuts the stream into independent chunks, deflates
them in a thread pool (``zlib`` releases the GIL while it compresses) and writes them in
order -- the method of ``pigz``: every chunk but the last ends with a sync flush (an empty
stored block, byte aligned, not final), the last with the final block, so the
concatenated chunks are one valid deflate stream inside one gzip member (header,
CRC-32 and length of the whole input). Any gzip reader (zlib's ``gzread`` in ITK/Slicer,
Python's :mod:`gzip`, ``gunzip``) reads it; chunks do not share a dictionary, which costs
well under 1 % of size at the chunk sizes used here. Memory stays bounded: at most
``2 * threads`` chunks are in flight.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO, Deque, Optional

from ..cpus import worker_threads

__all__ = ["ParallelGzipWriter", "DEFAULT_CHUNK_BYTES"]

#: Uncompressed bytes per independently compressed chunk.
DEFAULT_CHUNK_BYTES = 4 << 20

#: Fixed gzip header: magic, deflate, no flags, mtime 0 (reproducible files), no extra
#: flags, OS "unknown" -- the same fields as ``gzip.GzipFile(mtime=0, filename="")`` except
#: the OS byte.
_HEADER = b"\x1f\x8b\x08\x00" + struct.pack("<I", 0) + b"\x00\xff"


def _deflate(data: bytes, level: int, final: bool) -> bytes:
    comp = zlib.compressobj(level, zlib.DEFLATED, -15)  # raw deflate: the header is ours
    return comp.compress(data) + comp.flush(zlib.Z_FINISH if final else zlib.Z_SYNC_FLUSH)


class ParallelGzipWriter(io.IOBase):
    """Write-only binary file object producing a gzip stream (see the module docstring).

    ``fileobj`` receives the compressed bytes; it is not closed by :meth:`close`.
    ``threads`` defaults to the usable CPUs (at most 8); 1 compresses in the calling thread
    (the same bytes as with more threads). ``chunk_bytes`` defaults to
    :data:`DEFAULT_CHUNK_BYTES`.
    """

    def __init__(self, fileobj: BinaryIO, *, level: int = 6, threads: Optional[int] = None,
                 chunk_bytes: Optional[int] = None) -> None:
        if not 0 <= level <= 9:
            raise ValueError(f"gzip level must be 0-9, got {level}")
        chunk_bytes = DEFAULT_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
        super().__init__()
        self._out = fileobj
        self._level = level
        self._chunk = int(chunk_bytes)
        self._threads = worker_threads() if threads is None else max(1, int(threads))
        self._pool = ThreadPoolExecutor(self._threads) if self._threads > 1 else None
        self._pending: Deque[Future] = deque()
        self._buffer = bytearray()
        self._crc = 0
        self._size = 0
        self._closed = False
        self._out.write(_HEADER)

    # -- file-object protocol (what nibabel and json writers call) ----------------------
    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    @property
    def closed(self) -> bool:
        return self._closed

    def tell(self) -> int:
        """Uncompressed bytes written so far (what a reader's offset would be)."""
        return self._size

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        """Forward only (zeros are written up to ``offset``), like a gzip file in write mode."""
        if whence == os.SEEK_CUR:
            offset += self._size
        elif whence != os.SEEK_SET:
            raise OSError("ParallelGzipWriter can only seek from the start or the current position")
        if offset < self._size:
            raise OSError("ParallelGzipWriter cannot seek backwards")
        if offset > self._size:
            self.write(bytes(offset - self._size))
        return self._size

    def flush(self) -> None:
        """No-op: chunks are written when full or at :meth:`close` (a flush would cut a chunk)."""

    def write(self, data) -> int:
        if self._closed:
            raise ValueError("write to a closed ParallelGzipWriter")
        view = memoryview(data).cast("B")
        self._crc = zlib.crc32(view, self._crc)
        self._size += view.nbytes
        self._buffer += view
        while len(self._buffer) >= self._chunk:
            piece = bytes(self._buffer[: self._chunk])
            del self._buffer[: self._chunk]
            self._submit(piece)
        return view.nbytes

    def close(self) -> None:
        """Compress what is left, end the stream (final block, CRC-32, length); idempotent."""
        if self._closed:
            return
        try:
            self._submit(bytes(self._buffer), final=True)
            self._buffer = bytearray()
            self._drain(0)
            self._out.write(struct.pack("<II", self._crc & 0xFFFFFFFF, self._size & 0xFFFFFFFF))
        finally:
            self._stop()

    def __enter__(self) -> "ParallelGzipWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # do not finish a stream whose content is incomplete; just stop the threads
            self._stop()

    # -- internals ------------------------------------------------------------------------
    def _stop(self) -> None:
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _submit(self, piece: bytes, final: bool = False) -> None:
        if self._pool is None:
            self._out.write(_deflate(piece, self._level, final))
            return
        self._pending.append(self._pool.submit(_deflate, piece, self._level, final))
        self._drain(2 * self._threads)

    def _drain(self, keep: int) -> None:
        """Write finished chunks in order until at most ``keep`` are in flight."""
        while len(self._pending) > keep:
            self._out.write(self._pending.popleft().result())
