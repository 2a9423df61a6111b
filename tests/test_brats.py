"""BraTS protocol: case discovery, the paper's split, central pseudo-volumes, dataset layout."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from AnomalySegLib.data import brats
from AnomalySegLib.errors import InputError, OutputError
from AnomalySegLib.io.volume_io import Volume, read_volume

SHAPE = (40, 36, 30)
# BraTS-like grid: i runs Left->Right reversed (x flipped), j flipped, k superior.
AFFINE = np.array([[-1.0, 0, 0, 20.0], [0, -1.0, 0, 130.0], [0, 0, 1.0, -60.0], [0, 0, 0, 1]])


def _case_arrays(seed: int, tumour_z: tuple[int, int] | None):
    rng = np.random.default_rng(seed)
    ii, jj, kk = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    # Brain spans k = 5..24 -> centre 14.5 -> central 10 slices are k = 10..19.
    brain = ((ii - 20) / 15.0) ** 2 + ((jj - 18) / 13.0) ** 2 + ((kk - 14.5) / 10.0) ** 2 <= 1.0
    flair = np.where(brain, 100.0 + rng.normal(0, 3, SHAPE), 0.0).astype(np.float32)
    seg = np.zeros(SHAPE, np.uint8)
    if tumour_z is not None:
        z0, z1 = tumour_z
        seg[18:24, 15:20, z0:z1] = 2  # oedema
        seg[20:22, 16:18, z0:z1] = 4  # enhancing
        flair[seg > 0] = 160.0
    return flair, seg


def _save(path, data, affine=AFFINE):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))


@pytest.fixture
def brats_root(tmp_path):
    root = tmp_path / "BraTS2019"
    tumours = {0: (12, 15), 1: (10, 20), 2: (13, 14), 3: (15, 18), 4: (11, 13), 5: (16, 19)}
    for n, tz in tumours.items():
        case = f"BraTS19_TST_{n:03d}_1"
        sub = root / ("HGG" if n % 2 else "LGG") / case
        flair, seg = _case_arrays(n, tz)
        _save(sub / f"{case}_flair.nii.gz", flair)
        _save(sub / f"{case}_seg.nii.gz", seg)
        _save(sub / f"{case}_t1.nii.gz", flair)  # other modalities are ignored
    # BraTS 2023 naming
    flair, seg = _case_arrays(9, (14, 16))
    _save(root / "BraTS-GLI-00009-000" / "BraTS-GLI-00009-000-t2f.nii.gz", flair)
    _save(root / "BraTS-GLI-00009-000" / "BraTS-GLI-00009-000-seg.nii.gz", seg)
    # a validation-set case without segmentation
    _save(root / "BraTS19_VAL_001" / "BraTS19_VAL_001_flair.nii.gz", flair)
    return root


def test_find_cases(brats_root):
    cases, unlabelled = brats.find_brats_cases(brats_root)
    ids = [c.case_id for c in cases]
    assert ids == sorted(ids) and len(ids) == 7
    assert "BraTS-GLI-00009-000" in ids and unlabelled == ["BraTS19_VAL_001"]
    assert all(c.flair.name.startswith(c.case_id) and c.seg.is_file() for c in cases)
    with pytest.raises(InputError):
        brats.find_brats_cases(brats_root / "missing")


def test_paper_split_and_proportions():
    ids = [f"case{i:03d}" for i in range(335)]
    s = brats.split_cases(ids, seed=0)
    assert (len(s["train"]), len(s["val"]), len(s["test"])) == (271, 32, 32)
    assert set(s["train"]) | set(s["val"]) | set(s["test"]) == set(ids)
    assert not set(s["train"]) & set(s["test"]) and not set(s["val"]) & set(s["test"])
    assert brats.split_cases(list(reversed(ids)), seed=0) == s  # order of discovery does not matter
    assert brats.split_cases(ids, seed=1)["test"] != s["test"]
    small = brats.split_cases([f"c{i}" for i in range(10)], seed=0)
    assert (len(small["train"]), len(small["val"]), len(small["test"])) == (8, 1, 1)
    tiny = brats.split_cases(["a", "b", "c"])
    assert sorted(len(v) for v in tiny.values()) == [1, 1, 1]
    with pytest.raises(InputError):
        brats.split_cases(["a", "b"])


def test_pseudo_volume_geometry_and_centre():
    flair, seg = _case_arrays(0, (12, 15))
    pseudo = brats.extract_pseudo_volume(Volume(flair, AFFINE), Volume(seg.astype(np.float32), AFFINE), 10)
    assert pseudo.axis == 2 and pseudo.slice_offset == 10
    assert pseudo.flair.data.shape == (40, 36, 10)
    np.testing.assert_array_equal(pseudo.flair.data, flair[:, :, 10:20])
    np.testing.assert_array_equal(pseudo.label.data, (seg[:, :, 10:20] > 0).astype(np.uint8))
    assert pseudo.lesion_slices == [2, 3, 4]
    # every voxel keeps its world position
    for ijk in ([0, 0, 0], [7, 3, 9], [39, 35, 5]):
        new = pseudo.flair.affine @ np.array(ijk + [1.0])
        old = AFFINE @ np.array([ijk[0], ijk[1], ijk[2] + 10, 1.0])
        np.testing.assert_allclose(new, old)


def test_pseudo_volume_with_superior_axis_first():
    # Same anatomy stored with k first: the slab must be cut along voxel axis 0.
    flair, seg = _case_arrays(1, (12, 15))
    perm = np.array([[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1.0]])  # new (k, i, j) -> old (i, j, k)
    affine = AFFINE @ perm
    f2 = np.ascontiguousarray(flair.transpose(2, 0, 1))
    s2 = np.ascontiguousarray(seg.transpose(2, 0, 1)).astype(np.float32)
    pseudo = brats.extract_pseudo_volume(Volume(f2, affine), Volume(s2, affine), 10)
    assert pseudo.axis == 0 and pseudo.slice_offset == 10
    np.testing.assert_array_equal(pseudo.flair.data, f2[10:20])
    np.testing.assert_allclose(pseudo.flair.affine @ [2, 5, 6, 1], affine @ [12, 5, 6, 1])


def test_prepare_dataset_layout(brats_root, tmp_path):
    out = tmp_path / "brats_data"
    manifest = brats.prepare_brats_dataset(brats_root, out, seed=0)
    assert json.loads((out / "manifest.json").read_text())["split"] == manifest["split"]
    split = manifest["split"]
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == (5, 1, 1)
    for cid in split["test"] + split["val"]:
        where = manifest["cases"][cid]["split"]
        img = read_volume(out / where / f"{cid}.nii.gz")
        lab = read_volume(out / where / f"{cid}_label.nii.gz")
        assert img.shape == (40, 36, 10) and set(np.unique(lab.data)) <= {0.0, 1.0}
        np.testing.assert_allclose(img.affine, brats.slab_affine(AFFINE, 2, 10))
    # training volumes: tumour slices blanked, lesion-free slices untouched
    assert "BraTS19_TST_001_1" in manifest["cases"]
    for cid in split["train"]:
        info = manifest["cases"][cid]
        path = out / "train" / f"{cid}.nii.gz"
        if len(info["lesion_slices"]) == 10:
            assert not path.exists() and cid in manifest["skipped"]["train_all_slices_with_lesion"]
            continue
        data = read_volume(path).data
        original = read_volume(info["flair"]).data[:, :, 10:20]
        for k in range(10):
            if k in info["lesion_slices"]:
                assert not data[:, :, k].any()
            else:
                np.testing.assert_array_equal(data[:, :, k], original[:, :, k])
    assert manifest["healthy_training_slices"] == sum(
        10 - len(manifest["cases"][c]["lesion_slices"]) for c in split["train"]
        if c not in manifest["skipped"]["train_all_slices_with_lesion"])
    assert (out / "val_healthy").is_dir() and not list(tmp_path.glob(".*partial"))
    # refuses to overwrite without the flag; rebuilds with it
    with pytest.raises(OutputError):
        brats.prepare_brats_dataset(brats_root, out)
    again = brats.prepare_brats_dataset(brats_root, out, overwrite=True)
    assert again["split"] == manifest["split"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputError):
        brats.prepare_brats_dataset(brats_root, foreign, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "mine"
