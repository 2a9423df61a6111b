"""The multi-core gzip writer: one standard gzip member, readable by every reader we rely on."""

import gzip
import io
import zlib

import numpy as np
import pytest

from AnomalySegLib.io.parallel_gzip import ParallelGzipWriter


def _payload(n: int = 300_000, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    data = np.zeros(n, dtype=np.float32)
    data[n // 4: 3 * n // 4] = rng.gamma(2.0, 0.5, n // 2)  # a map: zeros around float noise
    return data.tobytes()


def _write(payload: bytes, *, threads: int, chunk: int, piece: int = 10_000, level: int = 6) -> bytes:
    buf = io.BytesIO()
    with ParallelGzipWriter(buf, level=level, threads=threads, chunk_bytes=chunk) as gz:
        for i in range(0, len(payload), piece):
            assert gz.write(payload[i:i + piece]) == len(payload[i:i + piece])
        assert gz.tell() == len(payload)
    return buf.getvalue()


@pytest.mark.parametrize("threads,chunk", [(1, 65536), (3, 65536), (2, 7), (4, 10**7)])
def test_stream_is_one_gzip_member_with_the_input(threads, chunk):
    payload = _payload()
    out = _write(payload, threads=threads, chunk=chunk)
    assert gzip.decompress(out) == payload
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)  # exactly one member: nothing after its trailer
    assert d.decompress(out) == payload and d.eof and d.unused_data == b""
    assert out[:2] == b"\x1f\x8b" and out[4:8] == b"\x00\x00\x00\x00"  # gzip magic, mtime 0
    crc, size = np.frombuffer(out[-8:], dtype="<u4")
    assert crc == zlib.crc32(payload) and size == len(payload)


def test_output_does_not_depend_on_the_thread_count_and_compresses_like_gzip():
    payload = _payload(seed=1)
    one, many = _write(payload, threads=1, chunk=65536), _write(payload, threads=4, chunk=65536)
    assert one == many
    assert len(one) <= 1.02 * len(gzip.compress(payload, 6))  # independent chunks cost < 2 %


def test_empty_stream_seek_and_errors():
    buf = io.BytesIO()
    with ParallelGzipWriter(buf, threads=2) as gz:
        pass
    assert gzip.decompress(buf.getvalue()) == b""
    buf = io.BytesIO()
    gz = ParallelGzipWriter(buf, threads=2, chunk_bytes=16)
    gz.write(b"abc")
    assert gz.seek(10) == 10 and gz.seek(0, io.SEEK_CUR) == 10  # forward: zeros, like gzip's writer
    with pytest.raises(OSError):
        gz.seek(5)
    gz.write(b"xyz")
    gz.close()
    gz.close()  # idempotent
    assert gzip.decompress(buf.getvalue()) == b"abc" + bytes(7) + b"xyz"
    with pytest.raises(ValueError):
        gz.write(b"late")
    with pytest.raises(ValueError):
        ParallelGzipWriter(io.BytesIO(), level=10)


def test_a_failed_write_does_not_finish_the_stream():
    buf = io.BytesIO()
    with pytest.raises(RuntimeError):
        with ParallelGzipWriter(buf, threads=2, chunk_bytes=8) as gz:
            gz.write(b"0123456789" * 5)
            raise RuntimeError("disk full")
    with pytest.raises((EOFError, OSError, zlib.error)):
        gzip.decompress(buf.getvalue())  # truncated: no final block, no trailer


def test_nifti_written_in_parallel_reads_back_with_nibabel_and_itk(tmp_path, monkeypatch):
    import nibabel as nib
    import SimpleITK as sitk

    from AnomalySegLib.io.volume_io import Volume, write_nifti

    rng = np.random.default_rng(2)
    data = rng.normal(size=(40, 33, 70)).astype(np.float32)  # ~370 kB: several 64 kB chunks
    affine = np.diag([1.5, 1.0, 2.0, 1.0])
    affine[:3, 3] = [-30.0, 12.0, 5.0]
    import AnomalySegLib.io.parallel_gzip as pg

    monkeypatch.setattr(pg, "DEFAULT_CHUNK_BYTES", 65536)
    write_nifti(tmp_path / "m.nii.gz", data, Volume(data, affine))
    raw = (tmp_path / "m.nii.gz").read_bytes()
    assert raw.count(b"\x00\x00\xff\xff") >= 5  # the sync-flush markers between chunks: several chunks
    img = nib.load(tmp_path / "m.nii.gz")
    np.testing.assert_array_equal(np.asarray(img.dataobj), data)
    np.testing.assert_allclose(img.affine, affine)
    itk = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "m.nii.gz"))).transpose(2, 1, 0)
    np.testing.assert_array_equal(itk, data)  # zlib's gzread, as in Slicer
