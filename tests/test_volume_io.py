"""Volume reading/writing: geometry round trips across NIfTI, NRRD, MHA and DICOM; errors."""

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from AnomalySegLib.errors import InputError
from AnomalySegLib.io.geometry import ras_to_lps
from AnomalySegLib.io.volume_io import (
    Volume,
    find_volumes,
    read_volume,
    volume_stem,
    write_nifti,
    write_volume_itk,
)
from conftest import rotation_matrix


def _small_oblique(shape=(9, 7, 5), axes=None):
    a = np.eye(4)
    axes = np.eye(3) if axes is None else axes
    a[:3, :3] = rotation_matrix(20, 10, 0) @ axes * np.array([0.9, 1.3, 3.0])[None, :]
    a[:3, 3] = (-40.0, 25.0, 13.0)
    data = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    return data, a


def _physical_points_lps(img: sitk.Image, indices):
    return np.array([img.TransformIndexToPhysicalPoint(tuple(int(v) for v in ijk)) for ijk in indices])


CORNERS = [(0, 0, 0), (8, 0, 0), (0, 6, 0), (0, 0, 4), (8, 6, 4), (3, 2, 1)]


def test_read_nifti_affine_and_data(tmp_path):
    data, aff = _small_oblique()
    p = tmp_path / "case01.nii.gz"
    nib.save(nib.Nifti1Image(data.astype(np.int16), aff), str(p))
    vol = read_volume(p)
    assert vol.data.dtype == np.float32 and vol.shape == data.shape
    np.testing.assert_array_equal(vol.data, data)
    np.testing.assert_allclose(vol.affine, aff, atol=1e-5)
    np.testing.assert_allclose(vol.spacing, [0.9, 1.3, 3.0], atol=1e-5)
    assert vol.path == p and vol.name == "case01"


@pytest.mark.parametrize("ext", [".nrrd", ".mha", ".nhdr", ".mhd"])
def test_nifti_written_by_nibabel_read_via_sitk_formats(tmp_path, ext):
    """nibabel RAS NIfTI -> SimpleITK -> NRRD/MHA -> read_volume: same affine and data."""
    data, aff = _small_oblique(axes=np.diag([-1.0, 1.0, 1.0]))
    nii = tmp_path / "ref.nii"
    nib.save(nib.Nifti1Image(data, aff), str(nii))
    other = tmp_path / f"conv{ext}"
    sitk.WriteImage(sitk.ReadImage(str(nii)), str(other))
    a, b = read_volume(nii), read_volume(other)
    np.testing.assert_array_equal(a.data, b.data)
    np.testing.assert_allclose(b.affine, a.affine, atol=1e-4)
    # Physical points: the file's LPS geometry equals the RAS affine, flipped.
    img = sitk.ReadImage(str(other))
    lps = _physical_points_lps(img, CORNERS)
    ras = np.array([a.affine @ np.r_[c, 1.0] for c in CORNERS])[:, :3]
    np.testing.assert_allclose(lps, ras * [-1, -1, 1], atol=1e-4)


@pytest.mark.parametrize("name", ["out.nrrd", "out.mha", "out.nrrd.part", "out.tmp.mha", "out.mha.part"])
def test_write_volume_itk_geometry(tmp_path, name):
    data, aff = _small_oblique()
    ref = Volume(data, aff)
    path = tmp_path / name
    write_volume_itk(path, data * 2, ref, dtype=np.float32)
    assert [p.name for p in tmp_path.iterdir()] == [name]  # exactly the requested file
    img = sitk.ReadImage(str(path), imageIO="NrrdImageIO" if ".nrrd" in name else "MetaImageIO")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img).transpose(2, 1, 0), data * 2)
    lps = _physical_points_lps(img, CORNERS)
    expected = np.array([(ras_to_lps(aff) @ np.r_[c, 1.0])[:3] for c in CORNERS])
    np.testing.assert_allclose(lps, expected, atol=1e-9)
    if name.endswith((".nrrd", ".mha")):
        np.testing.assert_allclose(read_volume(path).affine, aff, atol=1e-12)


def test_write_nifti_round_trip_exact_grid(tmp_path):
    data, aff = _small_oblique()
    src = tmp_path / "src.nii.gz"
    nib.save(nib.Nifti1Image(data, aff), str(src))
    ref = read_volume(src)
    out = tmp_path / "heat.nii.gz"
    values = np.random.default_rng(0).random(ref.shape).astype(np.float32)
    write_nifti(out, values, ref, description="anomaly heatmap")
    img = nib.load(str(out))
    np.testing.assert_array_equal(img.affine, ref.affine)
    np.testing.assert_array_equal(np.asarray(img.dataobj), values)
    assert img.get_data_dtype() == np.float32
    np.testing.assert_allclose(img.get_qform(), ref.affine, atol=1e-5)
    assert int(img.header["sform_code"]) > 0 and int(img.header["qform_code"]) > 0
    assert img.header.get_xyzt_units()[0] == "mm"
    assert img.header["descrip"].tobytes().rstrip(b"\0") == b"anomaly heatmap"
    # A uint8 label on the grid of an NRRD reference (no NIfTI codes): codes are 1.
    nrrd = tmp_path / "ref.nrrd"
    write_volume_itk(nrrd, data, ref)
    ref2 = read_volume(nrrd)
    lab = tmp_path / "lab.nii.gz.part"  # temporary names keep working
    write_nifti(lab, data > 100, ref2, dtype=np.uint8)
    with open(lab, "rb") as fh:
        assert fh.read(2) == b"\x1f\x8b"  # gzip
    final = lab.with_name("lab.nii.gz")
    lab.rename(final)
    img2 = nib.load(str(final))
    assert img2.get_data_dtype() == np.uint8
    assert int(img2.header["sform_code"]) == 1 and int(img2.header["qform_code"]) == 1
    np.testing.assert_array_equal(np.asarray(img2.dataobj), (data > 100).astype(np.uint8))
    np.testing.assert_allclose(img2.affine, ref2.affine, atol=1e-5)
    with pytest.raises(ValueError):
        write_nifti(tmp_path / "bad.nii.gz", data[:-1], ref)


def _write_dicom_series(folder: Path, data: np.ndarray, direction_lps, spacing, origin_lps, extension=".dcm"):
    """Tiny DICOM series written slice by slice with SimpleITK (geometry in each slice)."""
    folder.mkdir()
    img = sitk.GetImageFromArray(data.transpose(2, 1, 0).astype(np.int16))
    img.SetSpacing(spacing)
    img.SetOrigin(origin_lps)
    img.SetDirection(tuple(np.asarray(direction_lps).ravel()))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = np.asarray(direction_lps)
    iop = "\\".join(f"{v:.10f}" for v in (*d[:, 0], *d[:, 1]))
    series_uid = "1.2.826.0.1.3680043.2.1125.1.424242"
    for k in range(data.shape[2]):
        sl = img[:, :, k]
        ipp = img.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": "MR",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.4",
            "0008|0018": f"{series_uid}.{k + 1}",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1.4242",
            "0020|000e": series_uid,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.10f}" for v in ipp),
            "0020|0037": iop,
            "0018|0050": f"{spacing[2]:.6f}",
            "0028|0030": f"{spacing[1]:.6f}\\{spacing[0]:.6f}",
        }
        for key, value in tags.items():
            sl.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"slice{k:03d}{extension}"))
        writer.SetImageIO("GDCMImageIO")
        writer.Execute(sl)


@pytest.mark.parametrize("extension", [".dcm", ""])
def test_dicom_folder_read_as_one_volume(tmp_path, extension):
    shape = (12, 10, 6)
    data = np.arange(np.prod(shape)).reshape(shape) % 97
    direction = rotation_matrix(20, 10, 0)  # right-handed, oblique
    spacing, origin = (0.9, 1.3, 3.0), (30.0, -12.0, 40.0)
    series = tmp_path / "patient7"
    _write_dicom_series(series, data, direction, spacing, origin, extension)
    (tmp_path / "other.nii.gz").write_bytes(b"")  # found by the scan, not read here
    assert find_volumes([tmp_path]) == [tmp_path / "other.nii.gz", series]
    assert find_volumes([series]) == [series]
    assert volume_stem(series) == "patient7"
    vol = read_volume(series)
    assert vol.shape == shape and vol.meta["format"] == "dicom"
    np.testing.assert_array_equal(vol.data, data)
    expected = np.eye(4)
    expected[:3, :3] = direction * np.array(spacing)[None, :]
    expected[:3, 3] = origin
    np.testing.assert_allclose(vol.affine, np.diag([-1.0, -1, 1, 1]) @ expected, atol=1e-4)
    if extension:  # a single slice file stands for its whole series
        one = read_volume(series / "slice003.dcm")
        np.testing.assert_array_equal(one.data, vol.data)
        assert volume_stem(series / "slice003.dcm") == "patient7"


def test_find_volumes_scans_and_skips_outputs(tmp_path):
    for name in ["b.nrrd", "a.nii.gz", "c.mha", "a_mask.nii.gz", "a_heatmap.nii.gz", "a_label.nii.gz",
                 "a.seg.nrrd", "notes.txt", ".hidden.nii.gz", "d.nii"]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "deep.nii.gz").write_bytes(b"")
    found = find_volumes([tmp_path])
    assert [p.name for p in found] == ["a.nii.gz", "b.nrrd", "c.mha", "d.nii"]
    # Files are taken as given (even label names); duplicates are dropped.
    explicit = find_volumes([tmp_path / "a_mask.nii.gz", tmp_path / "a.nii.gz", tmp_path])
    assert [p.name for p in explicit] == ["a_mask.nii.gz", "a.nii.gz", "b.nrrd", "c.mha", "d.nii"]
    with pytest.raises(InputError, match="no such file"):
        find_volumes([tmp_path / "missing.nii.gz"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no volumes found"):
        find_volumes([empty])


def test_volume_stem():
    assert volume_stem("x/case01.nii.gz") == "case01"
    assert volume_stem("x/case01.NII") == "case01"
    assert volume_stem("case01.nrrd") == "case01"
    assert volume_stem("case01.mha") == "case01"
    assert volume_stem("case.01.mhd") == "case.01"
    assert volume_stem("case01.seg.nrrd") == "case01"


# ----------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_volume(tmp_path / "nope.nii.gz")


def test_text_file_renamed_nifti(tmp_path):
    for name in ["fake.nii.gz", "fake.nii", "fake.nrrd", "fake.mha"]:
        p = tmp_path / name
        p.write_text("this is not an image\n" * 20)
        with pytest.raises(InputError, match=name.replace(".", r"\.")) as exc:
            read_volume(p)
        assert "cannot read" in str(exc.value) and "\n" not in str(exc.value)


def test_truncated_gzip_nifti(tmp_path):
    data, aff = _small_oblique()
    p = tmp_path / "trunc.nii.gz"
    nib.save(nib.Nifti1Image(data, aff), str(p))
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match="trunc.nii.gz"):
        read_volume(p)


def test_2d_images_rejected(tmp_path):
    p = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 9), np.float32), np.eye(4)), str(p))
    with pytest.raises(InputError, match="2D image, not a 3D volume"):
        read_volume(p)
    q = tmp_path / "flat.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((8, 9), np.float32)), str(q))
    with pytest.raises(InputError, match="2D image, not a 3D volume"):
        read_volume(q)


def test_4d_images(tmp_path):
    p = tmp_path / "four.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((5, 6, 7, 3), np.float32), np.eye(4)), str(p))
    with pytest.raises(InputError, match="3 volumes"):
        read_volume(p)
    q = tmp_path / "four.nrrd"
    frames = [sitk.GetImageFromArray(np.full((7, 6, 5), t, np.float32)) for t in range(3)]
    four = sitk.JoinSeries(frames)
    assert four.GetDimension() == 4 and four.GetNumberOfComponentsPerPixel() == 1
    sitk.WriteImage(four, str(q))
    with pytest.raises(InputError, match="3 volumes"):
        read_volume(q)
    # A single volume stored as 4D is fine.
    q1 = tmp_path / "four1.nrrd"
    sitk.WriteImage(sitk.JoinSeries(frames[2:]), str(q1))
    vol1 = read_volume(q1)
    assert vol1.shape == (5, 6, 7)
    np.testing.assert_array_equal(vol1.data, np.full((5, 6, 7), 2.0))
    one = tmp_path / "one.nii.gz"
    data = np.random.default_rng(0).random((5, 6, 7, 1)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2, 2, 1])), str(one))
    vol = read_volume(one)
    assert vol.shape == (5, 6, 7)
    np.testing.assert_array_equal(vol.data, data[..., 0])


def test_rgb_rejected(tmp_path):
    q = tmp_path / "rgb.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((4, 5, 6, 3), np.uint8), isVector=True), str(q))
    with pytest.raises(InputError, match="3 components"):
        read_volume(q)


def test_nan_and_inf_rejected(tmp_path):
    data, aff = _small_oblique()
    data[2, 3, 1] = np.nan
    p = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(data, aff), str(p))
    with pytest.raises(InputError, match="nan.nii.gz: contains NaN values"):
        read_volume(p)
    data[2, 3, 1] = np.inf
    q = tmp_path / "inf.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(data), str(q))
    with pytest.raises(InputError, match="contains infinite values"):
        read_volume(q)


def test_empty_dicom_folder(tmp_path):
    folder = tmp_path / "dicom"
    folder.mkdir()
    (folder / "junk.dcm").write_bytes(b"x" * 200)
    with pytest.raises(InputError, match="no DICOM series"):
        read_volume(folder)


def test_synthetic_head_volume_object(make_oblique_volume, tmp_path):
    head = make_oblique_volume(tmp_path)
    vol = read_volume(head.path)
    np.testing.assert_allclose(vol.affine, head.affine, atol=1e-5)
    np.testing.assert_array_equal(vol.data, head.data)
    # gzip really used for .nii.gz outputs of nibabel (sanity of the fixture)
    assert gzip.decompress(head.path.read_bytes())[344:348] == b"n+1\x00"
