"""Preprocessing: normalisation, square mm field of view, and the exact inverse in physical space."""

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from skimage.filters import threshold_otsu

from AnomalySegLib.errors import InputError
from AnomalySegLib.data.preprocessing import (
    PreprocessConfig,
    brain_mask_in_volume,
    pixel_to_ras,
    prepare_volume,
    to_volume_grid,
)
from AnomalySegLib.io.volume_io import Volume, read_volume
from conftest import synthetic_head

S = 64
CFG = PreprocessConfig(image_size=S)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """Oblique (20 deg about x, 10 about y), anisotropic (1.3 x 0.9 x 3 mm), axis-permuted head."""
    head = synthetic_head()
    path = tmp_path_factory.mktemp("prep") / "head.nii.gz"
    nib.save(nib.Nifti1Image(head.data, head.affine), str(path))
    vol = read_volume(path)
    before = vol.data.copy()
    prep = prepare_volume(vol, CFG)
    np.testing.assert_array_equal(vol.data, before)  # input untouched
    # Independent canonical view through nibabel, for hand computations.
    canon = nib.as_closest_canonical(nib.load(str(path)))
    return head, vol, prep, np.asarray(canon.get_fdata(dtype=np.float32)), canon.affine


def _hand_frame(cdata, caff, size=S, margin=0.08):
    """FOV centre/pixel size computed by hand from the definition (Otsu foreground bbox)."""
    fg = cdata > threshold_otsu(cdata)
    proj = fg.any(axis=2)
    ii, jj = np.flatnonzero(proj.any(1)), np.flatnonzero(proj.any(0))
    si, sj = np.linalg.norm(caff[:3, 0]), np.linalg.norm(caff[:3, 1])
    extent = max((ii[-1] - ii[0] + 1) * si, (jj[-1] - jj[0] + 1) * sj)
    pixel = extent * (1 + margin) / size
    return (ii[0] + ii[-1]) / 2, (jj[0] + jj[-1]) / 2, pixel, si, sj


def _hand_pixel_to_ras(cdata, caff, k, row, col):
    ci, cj, pixel, si, sj = _hand_frame(cdata, caff)
    half = (S - 1) / 2
    # Radiological frame: columns run towards patient Left (-i), rows towards Posterior (-j).
    i = ci - (col - half) * pixel / si
    j = cj - (row - half) * pixel / sj
    return (caff @ np.array([i, j, k, 1.0]))[:3]


def test_outputs_shapes_and_ranges(case):
    head, vol, prep, cdata, caff = case
    n = prep.num_slices
    assert prep.images.shape == (n, S, S) and prep.images.dtype == np.float32
    assert prep.masks.shape == (n, S, S) and prep.masks.dtype == bool
    assert prep.slice_indices.shape == (n,) and np.all(np.diff(prep.slice_indices) > 0)
    assert prep.images.min() >= 0.0 and prep.images.max() <= 1.0
    assert prep.shape == vol.shape
    np.testing.assert_array_equal(prep.affine, vol.affine)
    np.testing.assert_allclose(prep.canonical_affine, caff, atol=1e-6)  # same view as nibabel's
    # Every kept slice passes the brain-fraction rule; the kept slices are the head's core.
    assert np.all(prep.masks.mean(axis=(1, 2)) >= CFG.min_brain_fraction)
    head_slices = np.flatnonzero(prep.reorientation.to_canonical(head.head).any(axis=(0, 1)))
    assert set(prep.slice_indices) <= set(head_slices) and n >= 0.6 * len(head_slices)
    # Square pixels in mm although the in-plane voxels are 1.3 x 0.9 mm.
    ci, cj, pixel, si, sj = _hand_frame(cdata, caff)
    assert prep.pixel_size_mm == pytest.approx(pixel)
    np.testing.assert_allclose(np.abs(prep.fov_step_ij) * [si, sj], [pixel, pixel])


def test_intensity_normalisation_formula(case):
    head, vol, prep, cdata, caff = case
    low = np.percentile(vol.data, 1.0)
    median = np.percentile(vol.data[vol.data > threshold_otsu(vol.data)], 50.0)
    high = low + 2.0 * (median - low)  # the foreground median maps to 0.5
    assert prep.intensity_low == pytest.approx(low)
    assert prep.intensity_high == pytest.approx(high)
    # Forward resampling equals map_coordinates(order=1, constant 0) on the normalised slice.
    norm = np.clip((cdata - low) / (high - low), 0, 1)
    rr, cc = np.meshgrid(np.arange(S), np.arange(S), indexing="ij")
    for n in [0, prep.num_slices // 2, prep.num_slices - 1]:
        k = prep.slice_indices[n]
        i = prep.fov_origin_ij[0] + cc * prep.fov_step_ij[0]
        j = prep.fov_origin_ij[1] + rr * prep.fov_step_ij[1]
        expected = ndimage.map_coordinates(norm[:, :, k], [i, j], order=1, mode="constant", cval=0.0)
        np.testing.assert_allclose(prep.images[n], expected, atol=2e-6)


def test_constant_map_comes_back_as_one_on_the_brain(case):
    head, vol, prep, cdata, caff = case
    back = to_volume_grid(np.ones((prep.num_slices, S, S), np.float32), prep)
    assert back.shape == vol.shape and back.dtype == np.float32
    reo = prep.reorientation
    kept = np.zeros(prep.canonical_shape, bool)
    kept[:, :, prep.slice_indices] = True
    kept = reo.from_canonical(kept)
    head_kept = head.head & kept
    assert head_kept.sum() > 0.6 * head.head.sum()
    np.testing.assert_allclose(back[head_kept], 1.0, atol=1e-6)
    assert np.all(back[~kept] == 0)
    # Outside the FOV the map is 0: the FOV is only ~8% wider than the head, so the
    # grid corners of kept slices (far outside the head) are 0.
    can = reo.to_canonical(back)
    assert np.all(can[0, 0, prep.slice_indices] == 0) and np.all(can[-1, -1, prep.slice_indices] == 0)


def _world_centroid(weights, affine):
    idx = np.argwhere(weights > 0)
    w = weights[weights > 0].astype(np.float64)
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    return (world * w[:, None]).sum(0) / w.sum()


def _spot(row, col, sigma=1.5):
    rr, cc = np.meshgrid(np.arange(S), np.arange(S), indexing="ij")
    return np.exp(-((rr - row) ** 2 + (cc - col) ** 2) / (2 * sigma**2)).astype(np.float32)


@pytest.mark.parametrize("row,col", [(20.0, 41.0), (40.0, 25.0), (31.5, 31.5)])
def test_spot_maps_back_to_the_right_ras_position(case, row, col):
    head, vol, prep, cdata, caff = case
    n0 = prep.num_slices // 2
    maps = np.zeros((prep.num_slices, S, S), np.float32)
    maps[n0] = _spot(row, col)
    back = to_volume_grid(maps, prep)
    got = _world_centroid(back, vol.affine)
    expected = _hand_pixel_to_ras(cdata, caff, prep.slice_indices[n0], row, col)
    # Within a fraction of the largest in-plane voxel (1.3 mm).
    assert np.linalg.norm(got - expected) < 0.5, (got, expected)
    np.testing.assert_allclose(pixel_to_ras(prep, prep.slice_indices[n0], row, col), expected, atol=1e-6)


def test_image_orientation_is_radiological(case):
    """Row 0 is Anterior, column 0 is the patient's Right (documented convention)."""
    head, vol, prep, cdata, caff = case
    n0 = prep.num_slices // 2

    def where(row, col):
        maps = np.zeros((prep.num_slices, S, S), np.float32)
        maps[n0] = _spot(row, col)
        return _world_centroid(to_volume_grid(maps, prep), vol.affine)

    top, bottom = where(12, 32), where(52, 32)
    left, right = where(32, 12), where(32, 52)
    assert top[1] - bottom[1] > 20  # towards Anterior (+y)
    assert left[0] - right[0] > 20  # column 0 towards patient Right (+x)


def test_inverse_matches_map_coordinates(case):
    head, vol, prep, cdata, caff = case
    rng = np.random.default_rng(3)
    maps = rng.random((prep.num_slices, S, S)).astype(np.float32)
    can = prep.reorientation.to_canonical(to_volume_grid(maps, prep))
    ni, nj, _ = prep.canonical_shape
    ii, jj = np.meshgrid(np.arange(ni), np.arange(nj), indexing="ij")
    cols = (ii - prep.fov_origin_ij[0]) / prep.fov_step_ij[0]
    rows = (jj - prep.fov_origin_ij[1]) / prep.fov_step_ij[1]
    for n in [0, prep.num_slices - 1]:
        expected = ndimage.map_coordinates(maps[n], [rows, cols], order=1, mode="constant", cval=0.0)
        np.testing.assert_allclose(can[:, :, prep.slice_indices[n]], expected, atol=2e-6)
    # Nearest-neighbour keeps label values exactly.
    labels = (maps > 0.5).astype(np.float32)
    near = to_volume_grid(labels, prep, order=0)
    assert set(np.unique(near)) <= {0.0, 1.0}
    with pytest.raises(ValueError):
        to_volume_grid(maps, prep, order=3)
    with pytest.raises(ValueError):
        to_volume_grid(maps[:-1], prep)


def test_brain_mask_in_volume_matches_head(case):
    head, vol, prep, cdata, caff = case
    mask = brain_mask_in_volume(prep)
    assert mask.shape == vol.shape and mask.dtype == bool
    kept = np.zeros(prep.canonical_shape, bool)
    kept[:, :, prep.slice_indices] = True
    truth = head.head & prep.reorientation.from_canonical(kept)
    dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    assert dice > 0.95
    # The dark "ventricles" inside the head are in the mask (hole filling).
    vent = (vol.data > 10) & (vol.data < 30) & truth
    assert vent.sum() > 20 and mask[vent].mean() > 0.95


def test_higher_brain_fraction_keeps_fewer_slices(case):
    head, vol, prep, cdata, caff = case
    strict = prepare_volume(vol, PreprocessConfig(image_size=S, min_brain_fraction=0.4))
    assert 0 < strict.num_slices < prep.num_slices
    assert set(strict.slice_indices) <= set(prep.slice_indices)
    assert np.all(strict.masks.mean(axis=(1, 2)) >= 0.4)


def test_config_validation_and_dict_round_trip():
    cfg = PreprocessConfig(image_size=96, low_percentile=0.5, reference_percentile=60.0, fov_margin=0.1)
    assert PreprocessConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict() == {"image_size": 96, "low_percentile": 0.5, "reference_percentile": 60.0,
                             "reference_level": 0.5, "fov_margin": 0.1, "min_brain_fraction": 0.03,
                             "brain_extraction": "auto", "bias_correction": False}
    assert PreprocessConfig.from_dict({"image_size": 64}).low_percentile == 1.0
    with pytest.raises(ValueError, match="unknown"):
        PreprocessConfig.from_dict({"image_size": 64, "spacing": 1})
    for bad in [100, 16, 0, -32, 64.5]:
        with pytest.raises(ValueError):
            PreprocessConfig(image_size=bad)
    with pytest.raises(ValueError):
        PreprocessConfig(low_percentile=100)
    with pytest.raises(ValueError):
        PreprocessConfig(reference_level=0.0)


def test_constant_and_nan_volumes_rejected():
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    with pytest.raises(InputError, match="constant volume"):
        prepare_volume(Volume(np.zeros((20, 20, 8), np.float32), aff, path="zeros.nii.gz"), CFG)
    data = np.ones((20, 20, 8), np.float32)
    data[3, 3, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        prepare_volume(Volume(data, aff), CFG)


def test_no_brain_tissue_rejected():
    # One bright voxel per slice along a diagonal: the FOV spans the diagonal, but no
    # slice has tissue over 3% of it.
    data = np.zeros((40, 40, 40), np.float32)
    k = np.arange(40)
    data[k, k, k] = 100.0
    with pytest.raises(InputError, match="no brain tissue found in dots"):
        prepare_volume(Volume(data, np.eye(4), path="dots.nii.gz"), CFG)


# ------------------------------------------------------------------ brain_mask.tissue_mask


def _disk_image(size=64, radius=20, value=100.0, hole_radius=6, hole_value=5.0, centre=(30, 34)):
    rr, cc = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    d2 = (rr - centre[0]) ** 2 + (cc - centre[1]) ** 2
    img = np.zeros((size, size), np.float32)
    img[d2 <= radius**2] = value
    img[d2 <= hole_radius**2] = hole_value
    return img, d2 <= radius**2


def test_tissue_mask_covers_disk_including_dark_hole():
    from AnomalySegLib.data.brain_mask import tissue_mask

    img, disk = _disk_image()
    mask = tissue_mask(img)
    assert mask.dtype == bool
    np.testing.assert_array_equal(mask, disk)  # hole filled, background excluded
    # A 3 px dark cut from the hole to the rim (a "sulcus") is closed by the 5x5 disk
    # inside the disk, where thresholding alone leaves it open.
    rr, cc = np.meshgrid(np.arange(64), np.arange(64), indexing="ij")
    notched = img.copy()
    notched[(np.abs(cc - 34) <= 1) & (rr > 30)] = 0.0
    assert not (notched > 50)[31:47, 34].any()
    assert tissue_mask(notched)[31:47, 33:36].all()
    assert not tissue_mask(np.zeros((16, 16))).any()
    assert not tissue_mask(np.full((16, 16), 7.0)).any()
    with pytest.raises(ValueError):
        tissue_mask(np.zeros((4, 4, 4)))


def test_tissue_mask_keeps_a_dark_lesion_at_the_brains_edge_on_skull_stripped_images():
    """A dark lesion open to the background (a cortical infarct on T1) falls below Otsu and is
    not enclosed, so the paper's rule cuts it out; the brain's support (non-zero region, holes
    filled, eroded 2 px) brings it back, never beyond the brain, and only where the background
    is exactly 0."""
    from scipy import ndimage

    from AnomalySegLib.data.brain_mask import CLOSING_FOOTPRINT, brain_support, tissue_mask

    img, disk = _disk_image(hole_radius=0)
    rr, cc = np.meshgrid(np.arange(64), np.arange(64), indexing="ij")
    lesion = disk & ((rr - 30) ** 2 + (cc - 52) ** 2 <= 7 ** 2)  # straddles the rim at column 54
    img[lesion] = 20.0
    paper = ndimage.binary_fill_holes(ndimage.binary_closing(img > 60, CLOSING_FOOTPRINT))
    assert paper[lesion].mean() < 0.3  # the old rule misses most of it
    mask = tissue_mask(img)
    inside = ndimage.binary_erosion(disk, CLOSING_FOOTPRINT)  # 2 px from the brain's edge
    np.testing.assert_array_equal(mask, paper | inside)
    assert mask[lesion & inside].all() and not mask[~disk].any()
    # background that is not exactly 0 (noise, an unstripped field of view): the paper's rule,
    # also when a few background pixels were clipped to exactly 0
    noisy = img + 1.0
    specks = np.zeros_like(disk)
    specks[::7, ::5] = True
    noisy[specks & ~disk] = 0.0
    assert brain_support(noisy, tissue_mask(noisy)) is None
    np.testing.assert_array_equal(tissue_mask(noisy), paper)
    # a support much larger than the tissue (here: a faint disk around a small bright one)
    faint, _ = _disk_image(radius=28, value=3.0, hole_radius=8, hole_value=100.0)
    assert brain_support(faint, faint > 50) is None


def test_tissue_masks_threshold_each_image_on_its_own():
    from AnomalySegLib.data.brain_mask import tissue_mask, tissue_masks

    dim, disk_a = _disk_image(value=0.1, hole_value=0.005, radius=12)
    bright, disk_b = _disk_image(value=1000.0, radius=25)
    masks = tissue_masks(np.stack([dim, bright, np.zeros_like(dim)]))
    assert masks.shape == (3, 64, 64) and masks.dtype == bool
    np.testing.assert_array_equal(masks[0], disk_a)  # a shared threshold would lose the dim disk
    np.testing.assert_array_equal(masks[1], disk_b)
    assert not masks[2].any()
    np.testing.assert_array_equal(masks[0], tissue_mask(dim))


def test_normalisation_is_robust_to_a_bright_lesion(case):
    # a bright lesion covering ~1.5 % of the head must not darken the healthy tissue
    head, vol, prep, cdata, caff = case
    from AnomalySegLib.io.volume_io import Volume

    data = vol.data.copy()
    inside = np.argwhere(head.head)
    lesion = inside[np.linalg.norm(inside - inside.mean(axis=0), axis=1).argsort()[: len(inside) * 3 // 200]]
    data[tuple(lesion.T)] = data.max() * 3.0
    with_lesion = prepare_volume(Volume(data, vol.affine), PreprocessConfig(image_size=S))
    assert with_lesion.intensity_high == pytest.approx(prep.intensity_high, rel=0.05)


def test_tissue_mask_on_the_foreground_box_equals_the_whole_image_rule():
    """The closing and hole filling run on the foreground's bounding box (speed); the mask
    must be exactly the paper's rule applied to the whole image, including foreground that
    touches the image border and holes near the box's edge (plus, where the background is
    exactly 0, the brain's support: its rule written out again here)."""
    from scipy import ndimage
    from skimage.filters import threshold_otsu
    from skimage.morphology import closing

    from AnomalySegLib.data.brain_mask import CLOSING_FOOTPRINT, MAX_SUPPORT_RATIO, tissue_mask

    def whole_image(img):
        paper = ndimage.binary_fill_holes(closing(img > threshold_otsu(img), CLOSING_FOOTPRINT))
        positive = img > 0
        if np.concatenate([positive[0], positive[-1], positive[:, 0], positive[:, -1]]).any() or not paper.any():
            return paper
        support = ndimage.binary_erosion(ndimage.binary_fill_holes(img > 0), CLOSING_FOOTPRINT)
        return paper | support if support.sum() <= MAX_SUPPORT_RATIO * paper.sum() else paper

    rng = np.random.default_rng(7)
    for case in range(400):
        h, w = (int(v) for v in rng.integers(8, 64, 2))
        img = np.zeros((h, w), dtype=np.float32)
        for _ in range(int(rng.integers(1, 5))):  # boxes anywhere, some cut by the border
            r, c = int(rng.integers(0, h)), int(rng.integers(0, w))
            dr, dc = (int(v) for v in rng.integers(1, 12, 2))
            img[max(r - dr, 0):r + dr, max(c - dc, 0):c + dc] = 0.5 + rng.random()
        if case % 2:
            img[img > 0] -= 0.4 * (rng.random(int((img > 0).sum())) > 0.9)  # speckle: small holes
            img += 0.05 * rng.random((h, w)).astype(np.float32)
        np.testing.assert_array_equal(tissue_mask(img), whole_image(img), err_msg=f"case {case}")


def test_tissue_masks_in_threads_equal_the_sequential_masks():
    """A volume's slices are masked in several threads (speed); each image keeps its own
    mask, in its own place, whatever the thread count."""
    from AnomalySegLib.data.brain_mask import MIN_IMAGES_PER_THREAD, tissue_mask, tissue_masks

    rng = np.random.default_rng(3)
    images = np.zeros((3 * MIN_IMAGES_PER_THREAD + 5, 40, 40), dtype=np.float32)
    for n, img in enumerate(images):  # a disk of its own size and brightness per image
        r = 4 + n % 15
        yy, xx = np.mgrid[:40, :40]
        img[(yy - 20) ** 2 + (xx - 20) ** 2 <= r * r] = 0.2 + n / len(images)
        img += 0.02 * rng.random(img.shape).astype(np.float32)
    sequential = tissue_masks(images, threads=1)
    np.testing.assert_array_equal(sequential, np.stack([tissue_mask(i) for i in images]))
    for threads in (2, 3, 8):
        np.testing.assert_array_equal(tissue_masks(images, threads=threads), sequential)
    assert len({int(m.sum()) for m in sequential}) > 10  # the images really differ


def test_brain_support_cropped_to_the_brain_equals_the_whole_slice_rule():
    """brain_support fills and erodes only around the non-zero region's bounding box; on
    random skull-stripped-like slices (blobs with holes, one a pixel from the image's edge,
    several pieces) it must equal the whole-slice fill + erosion exactly."""
    from scipy import ndimage

    from AnomalySegLib.data.brain_mask import CLOSING_FOOTPRINT, brain_support

    rng = np.random.default_rng(3)
    checked = 0
    for trial in range(40):
        img = ndimage.gaussian_filter(rng.random((48, 40)), 2.0)
        positive = img > np.quantile(img, rng.uniform(0.3, 0.8))
        positive[rng.random(positive.shape) < 0.05] = False  # holes and ragged edges
        if trial % 3 == 0:  # a piece a pixel from the image's edge
            positive[1:4, 10:30] = True
        positive[0], positive[-1], positive[:, 0], positive[:, -1] = False, False, False, False
        image = np.where(positive, 1.0 + img, 0.0).astype(np.float32)
        whole = ndimage.binary_erosion(ndimage.binary_fill_holes(positive), CLOSING_FOOTPRINT)
        got = brain_support(image, np.ones(positive.shape, dtype=bool))  # tissue large: never refused
        assert got is not None
        np.testing.assert_array_equal(got, whole)
        checked += whole.any()
    assert checked > 20  # most slices had a non-empty support to compare
