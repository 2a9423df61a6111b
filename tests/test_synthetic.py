"""Tests of the offline synthetic data generator (AnomalySegLib.data.synthetic)."""

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from AnomalySegLib.data import synthetic
from AnomalySegLib.errors import InputError
from AnomalySegLib.data.synthetic import (LESION_KINDS, LESION_RADIUS_MM, LesionSpec, cohort_case_seeds, load_template,
                                     synthesize_case)

# Deep white matter (centrum semiovale) in MNI space; > 0.97 WM probability in a 7-voxel cube
# (Colin27 is registered to MNI space: > 0.65 there).
WM_POINT = (-28.0, -10.0, 30.0)

needs_colin27 = pytest.mark.skipif(
    not synthetic._COLIN27_FILE.is_file(),
    reason=f"colin27 template absent ({synthetic._COLIN27_FILE}): apt-get install mricron-data")


@pytest.fixture(scope="module")
def tpl():
    return load_template("mni152", 2.0)


@pytest.fixture(scope="module")
def colin():
    if not synthetic._COLIN27_FILE.is_file():
        pytest.skip(f"colin27 template absent ({synthetic._COLIN27_FILE}): apt-get install mricron-data")
    return load_template("colin27", 2.0)


def _world_to_voxel(affine, point):
    inv = np.linalg.inv(affine)
    return inv[:3, :3] @ np.asarray(point, dtype=float) + inv[:3, 3]


def _ball_ml(radius_mm):
    return 4.0 / 3.0 * np.pi * radius_mm ** 3 / 1000.0


def test_template_geometry_and_ranges(tpl):
    # 197x233x189 at 1 mm sampled every 2 voxels from voxel 0: (n - 1) // 2 + 1.
    assert tpl.t1.shape == (99, 117, 95)
    np.testing.assert_allclose(tpl.affine[:3, :3], np.eye(3) * 2.0)
    assert nib.aff2axcodes(tpl.affine) == ("R", "A", "S")
    assert tpl.t1.dtype == np.float32 and 0.0 <= tpl.t1.min() and tpl.t1.max() <= 1.0
    total = tpl.gm + tpl.wm + tpl.csf
    assert np.all(total[tpl.brain] > 0.99) and np.all(total[tpl.brain] < 1.3)
    assert not tpl.t1[~tpl.brain].any() and not tpl.csf[~tpl.brain].any()
    # The MNI152 average brain (incl. cerebellum, brainstem, ventricles) is ~1.9 L,
    # larger than a typical adult brain because of the template's scaling.
    assert 1600 < tpl.brain.sum() * 8 / 1000 < 2100
    with pytest.raises(ValueError):
        tpl.t1[0, 0, 0] = 1.0  # cached template is shared: read-only


def test_resampled_affine_keeps_landmark(tpl):
    """The brain's centre of mass in world mm is the same at 1 mm (read independently), 2 and 3 mm."""
    folder = synthetic._nilearn_data_dir()
    native = nib.load(str(folder / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"))
    com_vox = np.array(ndimage.center_of_mass(np.asarray(native.dataobj) > 0))
    ref = native.affine[:3, :3] @ com_vox + native.affine[:3, 3]
    for t in (tpl, load_template("mni152", 3.0)):
        com = np.array(ndimage.center_of_mass(t.brain))
        world = t.affine[:3, :3] @ com + t.affine[:3, 3]
        assert np.linalg.norm(world - ref) < 2.0, (t.voxel_size_mm, world, ref)
    t3 = load_template("mni152", 3.0)
    np.testing.assert_allclose(np.diag(t3.affine)[:3], 3.0)
    np.testing.assert_allclose(t3.affine[:3, 3], native.affine[:3, 3])  # voxel 0 shared
    assert t3.t1.shape == (66, 78, 63)


def test_same_seed_identical_different_seed_differs(tpl):
    a = synthesize_case(tpl, 7, lesions=["bright"])
    b = synthesize_case(tpl, 7, lesions=["bright"])
    c = synthesize_case(tpl, 8, lesions=["bright"])
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    assert a.meta == b.meta
    assert not np.array_equal(a.image, c.image)
    assert not np.array_equal(a.label, c.label)
    # A Generator works as well and is not re-seeded.
    g = np.random.default_rng(7)
    d = synthesize_case(tpl, g)
    e = synthesize_case(tpl, g)
    assert d.meta["seed"] is None and not np.array_equal(d.image, e.image)


def test_healthy_case(tpl):
    case = synthesize_case(tpl, 3)
    assert case.image.dtype == np.float32 and case.label.dtype == np.uint8
    assert case.image.shape == case.label.shape == case.brain.shape == tpl.t1.shape
    assert not case.label.any() and case.meta["lesion_volume_ml"] == 0.0 and case.meta["lesions"] == []
    assert np.all(case.image[~case.brain] == 0.0)  # skull-stripped background
    assert np.all(case.image >= 0.0) and case.image[case.brain].mean() > 0
    json.dumps(case.meta)  # serialisable for the manifest


@pytest.mark.parametrize("kind", LESION_KINDS)
def test_label_inside_brain_and_volume_matches_kind(tpl, kind):
    lo, hi = (_ball_ml(r) for r in LESION_RADIUS_MM[kind])
    for seed in (11, 12):
        case = synthesize_case(tpl, seed, lesions=[kind])
        lab = case.label.astype(bool)
        assert set(np.unique(case.label)) == {0, 1}
        assert not np.any(lab & ~case.brain)
        (info,) = case.meta["lesions"]
        assert info["kind"] == kind
        r0, r1 = LESION_RADIUS_MM[kind]
        assert r0 <= info["radius_mm"] <= r1
        # 2 mm voxels are 0.008 mL each.
        assert info["volume_ml"] == pytest.approx(lab.sum() * 0.008)
        assert case.meta["lesion_volume_ml"] == pytest.approx(lab.sum() * 0.008)
        # Blobby outline and brain clipping keep it within +-50 % of the nominal ball.
        nominal = _ball_ml(info["radius_mm"])
        assert 0.5 * nominal < info["volume_ml"] < 1.5 * nominal
        assert 0.5 * lo < info["volume_ml"] < 1.5 * hi
    if kind == "small":
        assert info["volume_ml"] < 0.8


# (kind, radius, lower and upper bound of (mean in label - mean in a 4 mm shell) / WM intensity)
DIRECTIONS = [
    ("bright", 8.0, 0.25, 1.0),
    ("low_contrast", 8.0, 0.05, 0.25),
    ("dark", 8.0, -0.8, -0.2),
    ("tumour", 16.0, 0.1, 0.6),
]


@pytest.mark.parametrize("kind,radius,low,high", DIRECTIONS)
def test_lesion_intensity_direction(tpl, kind, radius, low, high):
    for seed, contrast in ((21, "flair"), (22, "t1"), (23, "t2")):
        case = synthesize_case(tpl, seed, lesions=[LesionSpec(kind, center_mm=WM_POINT, radius_mm=radius)],
                               contrast=contrast)
        lab = case.label.astype(bool)
        shell = ndimage.binary_dilation(lab, iterations=2) & ~lab & case.brain
        wm = case.meta["wm_intensity"]
        diff = (case.image[lab].mean() - case.image[shell].mean()) / wm
        assert low < diff < high, (kind, contrast, diff)
        centre = np.round(_world_to_voxel(case.affine, WM_POINT)).astype(int)
        assert lab[tuple(centre)]
        if kind == "tumour":  # necrotic core darker than the surrounding tissue
            i, j, k = centre
            core = case.image[i - 1:i + 2, j - 1:j + 2, k - 1:k + 2].mean()
            assert core < case.image[shell].mean() - 0.2 * wm


def test_noise_is_applied_inside_lesions(tpl):
    spec = LesionSpec("bright", center_mm=WM_POINT, radius_mm=9.0)
    clean = synthesize_case(tpl, 5, lesions=[spec], noise=0.0)
    noisy = synthesize_case(tpl, 5, lesions=[spec], noise=0.03)
    assert clean.meta["noise_kind"] == "none" and clean.meta["noise_sigma"] == 0.0
    lab = noisy.label.astype(bool)
    np.testing.assert_array_equal(clean.label, noisy.label)
    sigma = noisy.meta["noise_sigma"]
    assert sigma == pytest.approx(0.03 * noisy.meta["wm_intensity"])
    diff = (noisy.image - clean.image)[lab]
    assert diff.size > 300
    # Same noise level inside the lesion as elsewhere (Rician ~ Gaussian at this SNR).
    assert 0.8 * sigma < diff.std() < 1.2 * sigma
    tissue = noisy.brain & ~lab
    assert 0.8 * sigma < (noisy.image - clean.image)[tissue].std() < 1.2 * sigma
    assert noisy.image[lab].std() > 0


def test_n_slices_crops_and_keeps_world_coordinates(tpl):
    full = synthesize_case(tpl, 4)
    crop = synthesize_case(tpl, 4, n_slices=10)
    k0 = crop.meta["slice_offset"]
    assert crop.image.shape == (99, 117, 10) and crop.label.shape == (99, 117, 10)
    # Centred on the brain's inferior-superior extent.
    zs = np.flatnonzero(tpl.brain.any(axis=(0, 1)))
    assert abs((k0 + 4.5) - 0.5 * (zs[0] + zs[-1])) <= 1.0
    np.testing.assert_array_equal(crop.image, full.image[:, :, k0:k0 + 10])
    for idx in ((0, 0, 0), (40, 60, 9), (98, 116, 3)):
        w_crop = crop.affine @ np.array([*idx, 1.0])
        w_full = full.affine @ np.array([idx[0], idx[1], idx[2] + k0, 1.0])
        np.testing.assert_allclose(w_crop, w_full)
    # Lesions are drawn inside the kept slab.
    les = synthesize_case(tpl, 6, lesions=["bright", "small"], n_slices=10)
    assert les.label.any()
    for info in les.meta["lesions"]:
        assert info["volume_ml"] > 0
        k = _world_to_voxel(les.affine, info["center_mm"])[2]
        assert -0.5 <= k <= 9.5
    with pytest.raises(InputError):
        synthesize_case(tpl, 1, n_slices=500)


def test_make_cohort_writes_readable_files(tpl, tmp_path):
    kwargs = dict(n_healthy=2, n_lesion=2, lesion_kinds=("tumour", "small"), n_lesion_free_test=1,
                  seed=3, n_slices=12)
    manifest = synthetic.make_cohort(tmp_path / "a", **kwargs)
    assert manifest["healthy"] == ["healthy/healthy_000.nii.gz", "healthy/healthy_001.nii.gz"]
    assert manifest["test"] == ["test/lesion_000.nii.gz", "test/lesion_001.nii.gz", "test/normal_000.nii.gz"]
    assert manifest["labels"] == [p.replace(".nii.gz", "_label.nii.gz") for p in manifest["test"]]
    on_disk = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    for rel in manifest["healthy"] + manifest["test"]:
        img = nib.load(str(tmp_path / "a" / rel))
        assert img.get_data_dtype() == np.float32 and img.shape == (99, 117, 12)
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    case = manifest["cases"]["lesion_000"]
    assert case["lesion_kinds"] == ["tumour"]
    assert manifest["cases"]["lesion_001"]["lesion_kinds"] == ["small", "small"]
    for rel, name in zip(manifest["labels"], ("lesion_000", "lesion_001", "normal_000")):
        lab = nib.load(str(tmp_path / "a" / rel))
        data = np.asarray(lab.dataobj)
        assert lab.get_data_dtype() == np.uint8
        img = nib.load(str(tmp_path / "a" / manifest["cases"][name]["image"]))
        np.testing.assert_allclose(lab.affine, img.affine)
        assert data.sum() * 0.008 == pytest.approx(manifest["cases"][name]["lesion_volume_ml"])
        assert (data.sum() > 0) == name.startswith("lesion")
    assert manifest["placement"] == "deep" and manifest["templates"] == ["mni152"]
    assert {n: c["seed"] for n, c in manifest["cases"].items()} == cohort_case_seeds(
        3, n_healthy=2, n_lesion=2, n_lesion_free_test=1)
    # Any case can be regenerated alone from the seed stored in its meta.
    again = synthesize_case(tpl, case["seed"], lesions=["tumour"], contrast="flair", n_slices=12)
    np.testing.assert_allclose(again.image, np.asarray(nib.load(str(tmp_path / "a" / case["image"])).dataobj))
    # Same arguments -> byte-identical files.
    synthetic.make_cohort(tmp_path / "b", **kwargs)
    for rel in manifest["healthy"] + manifest["test"] + manifest["labels"]:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


def test_missing_nilearn_and_bad_arguments(tpl, monkeypatch):
    with pytest.raises(InputError):
        synthesize_case(tpl, 0, lesions=["glioma"])
    with pytest.raises(InputError):
        synthesize_case(tpl, 0, contrast="dwi")
    with pytest.raises(InputError, match="placement"):
        synthesize_case(tpl, 0, placement="cortex")
    with pytest.raises(InputError):
        load_template("icbm452")
    monkeypatch.setattr(synthetic.importlib.util, "find_spec", lambda name, *a: None)
    synthetic._load_native.cache_clear()
    with pytest.raises(InputError, match="pip install nilearn"):
        load_template("mni152", 7.0)  # not cached yet: must look for the files
    monkeypatch.undo()


def test_missing_colin27_names_the_debian_package(monkeypatch, tmp_path):
    monkeypatch.setattr(synthetic, "_COLIN27_FILE", tmp_path / "ch2bet.nii.gz")
    synthetic._load_native.cache_clear()
    with pytest.raises(InputError, match="apt-get install mricron-data"):
        load_template("colin27", 7.5)  # not cached: must look for the file
    synthetic._load_native.cache_clear()


@needs_colin27
def test_colin27_template_geometry_and_tissue_maps(colin):
    # ch2bet.nii.gz: 181x217x181 at 1 mm, RAS, first voxel at (-90, -125, -71) mm.
    assert colin.name == "colin27" and colin.t1.shape == (91, 109, 91)
    assert nib.aff2axcodes(colin.affine) == ("R", "A", "S")
    np.testing.assert_allclose(colin.affine[:3, :3], np.eye(3) * 2.0)
    np.testing.assert_allclose(colin.affine[:3, 3], [-90.0, -125.0, -71.0])
    assert load_template("colin27", 2.0) is colin and load_template("mni152", 2.0).name == "mni152"
    assert 0.0 <= colin.t1.min() and colin.t1.max() <= 1.0 and not colin.t1[~colin.brain].any()
    for p in (colin.gm, colin.wm, colin.csf):
        assert p.dtype == np.float32 and p.min() >= 0.0 and not p[~colin.brain].any()
    total = colin.gm + colin.wm + colin.csf
    assert total.max() <= 1.0 + 1e-6 and total[colin.brain].min() > 0.99  # matches the brain mask
    # Adult brain ~1.7 L, one connected piece; GM and WM each a sizeable share.
    assert 1500 < colin.brain.sum() * 8 / 1000 < 1900
    assert ndimage.label(colin.brain)[1] == 1
    gm_ml, wm_ml = colin.gm.sum() * 8 / 1000, colin.wm.sum() * 8 / 1000
    assert 600 < gm_ml < 1100 and 400 < wm_ml < 900
    # The derived classes follow the T1's intensity order (WM > GM > CSF) ...
    t1 = {k: float(colin.t1[getattr(colin, k) > 0.9].mean()) for k in ("wm", "gm", "csf")}
    assert t1["wm"] > t1["gm"] + 0.1 > t1["csf"] + 0.2, t1
    # ... and the anatomy: deep white matter and ventricles where MNI space has them.
    inv = np.linalg.inv(colin.affine)
    wm_vox = np.round(inv[:3, :3] @ np.array(WM_POINT) + inv[:3, 3]).astype(int)
    assert colin.wm[tuple(wm_vox)] > 0.9
    vent_vox = np.round(inv[:3, :3] @ np.array([-14.0, -21.0, 25.0]) + inv[:3, 3]).astype(int)  # left lateral ventricle
    assert colin.csf[tuple(vent_vox)] > 0.9


@needs_colin27
def test_colin27_lesion_case_label_in_brain_and_intensity_direction(colin):
    for seed, kind, contrast, sign in ((31, "bright", "flair", 1), (32, "dark", "t1", -1)):
        case = synthesize_case(colin, seed, lesions=[LesionSpec(kind, center_mm=WM_POINT, radius_mm=8.0)],
                               contrast=contrast)
        lab = case.label.astype(bool)
        assert case.meta["template"] == "colin27" and lab.sum() > 100
        assert not np.any(lab & ~case.brain)
        assert np.all(case.image[~case.brain] == 0.0)
        shell = ndimage.binary_dilation(lab, iterations=2) & ~lab & case.brain
        diff = (case.image[lab].mean() - case.image[shell].mean()) / case.meta["wm_intensity"]
        assert sign * diff > 0.2, (kind, contrast, diff)
    # FLAIR-like contrast of the healthy tissue: GM brighter than WM, CSF darkest.
    healthy = synthesize_case(colin, 33, contrast="flair", deform=False, bias=False, noise=0.0)
    mean = {k: float(healthy.image[getattr(colin, k) > 0.9].mean()) for k in ("gm", "wm", "csf")}
    assert mean["gm"] > mean["wm"] > mean["csf"], mean
    # A random ("mixed") lesion is also labelled inside the brain only.
    case = synthesize_case(colin, 34, lesions=["bright"], placement="mixed", n_slices=20)
    assert case.label.any() and not np.any(case.label.astype(bool) & ~case.brain)
    assert case.meta["placement"] == "mixed" and case.meta["lesions"][0]["placement"] == "mixed"


def test_mixed_placement_reaches_grey_matter_deep_stays_in_white_matter():
    t4 = load_template("mni152", 4.0)
    inv = np.linalg.inv(t4.affine)
    tissue = {"deep": [], "mixed": []}
    for placement in tissue:
        for seed in range(12):
            # Undeformed: the template's own maps are the subject's, so the centre can be checked.
            case = synthesize_case(t4, seed, lesions=["bright"], placement=placement, deform=False)
            (info,) = case.meta["lesions"]
            assert info["placement"] == placement and case.meta["placement"] == placement
            vox = tuple(np.round(inv[:3, :3] @ np.array(info["center_mm"]) + inv[:3, 3]).astype(int))
            assert t4.gm[vox] + t4.wm[vox] > 0.5  # parenchyma either way
            if placement == "deep":
                assert t4.wm[vox] > 0.4
            tissue[placement].append(info["center_tissue"])
            # Most of the blob stays inside the brain, cortex or not.
            assert info["volume_ml"] > 0.5 * 4.0 / 3.0 * np.pi * info["radius_mm"] ** 3 / 1000.0
    assert "gm" in tissue["mixed"] and "wm" in tissue["mixed"], tissue
    assert tissue["mixed"].count("gm") > tissue["deep"].count("gm"), tissue


def test_case_seeds_of_different_cohort_seeds_are_disjoint():
    sizes = dict(n_healthy=60, n_lesion=60, n_lesion_free_test=60)
    dev = cohort_case_seeds(0, **sizes)
    assert len(set(dev.values())) == len(dev) == 180  # no two cases share a seed
    for other in (1, 1000, 9000):
        assert not set(dev.values()) & set(cohort_case_seeds(other, **sizes).values())


def test_smooth_bias_model_is_a_bounded_non_polynomial_field_and_the_default_is_unchanged(tpl):
    """``bias_model="smooth"``: image / unbiased image is exp of a field whose log peaks at the
    drawn amplitude (10-25 %) inside the brain, that a quadratic fits poorly; the default
    (quadratic) draws exactly what it drew before the option existed."""
    kw = dict(contrast="flair", noise=0.0, deform=False)
    clean = synthesize_case(tpl, 11, bias=False, **kw)
    smooth = synthesize_case(tpl, 11, bias_model="smooth", **kw)
    quad = synthesize_case(tpl, 11, bias_model="quadratic", **kw)
    np.testing.assert_array_equal(quad.image, synthesize_case(tpl, 11, **kw).image)
    np.testing.assert_array_equal(smooth.image, synthesize_case(tpl, 11, bias_model="smooth", **kw).image)
    brain = clean.brain & (clean.image > 0.05 * clean.image.max())
    amp = smooth.meta["bias_amplitude"]
    assert 0.10 <= amp <= 0.25 and smooth.meta["bias_model"] == "smooth"
    log_field = np.log(smooth.image[brain] / clean.image[brain])
    log_field -= log_field.mean()
    # centred on the brain mean before the gain: the peak |log| equals the amplitude up to the re-centring
    assert abs(np.abs(log_field).max() - amp) < 0.5 * amp
    # a quadratic in the voxel coordinates explains the quadratic field almost fully, the smooth one not
    idx = np.argwhere(brain).astype(np.float64)
    idx = (idx - idx.mean(0)) / idx.std(0)
    x, y, z = idx.T
    design = np.stack([np.ones_like(x), x, y, z, x * x, y * y, z * z, x * y, x * z, y * z], axis=1)

    def unexplained(values):
        values = values - values.mean()
        residual = values - design @ np.linalg.lstsq(design, values, rcond=None)[0]
        return float(residual.var() / values.var())

    assert unexplained(np.log(quad.image[brain] / clean.image[brain])) < 0.01
    assert unexplained(log_field) > 0.2
    with pytest.raises(InputError, match="unknown bias model"):
        synthesize_case(tpl, 11, bias_model="n4", **kw)
