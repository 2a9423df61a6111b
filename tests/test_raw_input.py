"""Raw-scan building blocks: skull check, deepbet brain extraction, N4 bias correction.

The deepbet tests (``-m deepbet`` or ``-k deepbet``) need the optional ``deepbet`` package
(``pip install "anomalyseg[raw]"``) and Debian's mricron-data (Colin27 ``ch2.nii.gz`` and
``ch2bet.nii.gz``); they are skipped with the reason when either is absent.
"""

from __future__ import annotations

import importlib.util
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from AnomalySegLib.errors import Cancelled, InputError, ModelFileError
from AnomalySegLib.data.raw_input import (MissingDependencyError, SkullCheck, correct_bias_field, deepbet_model_files,
                                     dice, dice_physical, extract_brain, resample_mask, skull_check)
from AnomalySegLib.data.synthetic import add_synthetic_skull, package_data_file
from AnomalySegLib.io.volume_io import Volume, read_volume

from conftest import synthetic_head

CH2 = Path("/usr/share/mricron/templates/ch2.nii.gz")
CH2BET = Path("/usr/share/mricron/templates/ch2bet.nii.gz")
needs_colin = pytest.mark.skipif(not (CH2.is_file() and CH2BET.is_file()),
                                 reason="needs Colin27 ch2.nii.gz/ch2bet.nii.gz: apt-get install mricron-data")
HAS_DEEPBET = importlib.util.find_spec("deepbet") is not None
needs_deepbet = pytest.mark.skipif(not HAS_DEEPBET, reason='needs deepbet: pip install "anomalyseg[raw]"')


def reoriented(volume: Volume, perm=(2, 0, 1), flips=(1,)) -> Volume:
    """The same image on a permuted/flipped voxel grid (same physical space)."""
    data = np.flip(volume.data.transpose(perm), axis=flips).copy()
    m = np.zeros((4, 4))
    m[3, 3] = 1.0
    for t, src in enumerate(perm):
        if t in flips:
            m[src, t] = -1.0
            m[src, 3] = data.shape[t] - 1
        else:
            m[src, t] = 1.0
    return Volume(data=data, affine=volume.affine @ m)




@pytest.fixture(scope="module")
def mni_2mm():
    from AnomalySegLib.data.synthetic import load_template

    try:
        return load_template("mni152", 2.0)
    except InputError as exc:
        pytest.skip(str(exc))


# ============================================================================ skull check


@needs_colin
def test_skull_check_colin27_with_skull():
    result = skull_check(read_volume(CH2))
    assert isinstance(result, SkullCheck)
    assert result.has_skull, result.reason
    assert result.gap_level < 0.5 and result.ring_to_gap > 2.5
    assert "skull present" in result.reason
    assert result.to_dict()["profile"]


def _rician(data: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n1, n2 = rng.normal(0.0, sigma, data.shape), rng.normal(0.0, sigma, data.shape)
    return np.sqrt((data + n1) ** 2 + n2 ** 2).astype(np.float32)


@needs_colin
def test_skull_check_noisy_background_and_zero_padding():
    """A noisy background padded with exact zeros (resampled or cropped scans) is still a head."""
    ch2 = read_volume(CH2)
    padded = np.pad(_rician(ch2.data, 3.0), 25)
    affine = ch2.affine.copy()
    affine[:3, 3] -= affine[:3, :3] @ np.full(3, 25.0)
    result = skull_check(Volume(padded, affine))
    assert result.has_skull, result.reason
    bet = read_volume(CH2BET)
    result = skull_check(Volume(_rician(bet.data, 3.0, seed=1), bet.affine))
    assert not result.has_skull, result.reason


@needs_colin
def test_skull_check_colin27_stripped():
    result = skull_check(read_volume(CH2BET))
    assert not result.has_skull, result.reason
    assert result.gap_level > 0.8


def test_skull_check_nilearn_mni152_brain_is_stripped():
    path = package_data_file("nilearn", "datasets", "data", "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    if path is None:
        pytest.skip("needs nilearn's bundled MNI152 template: pip install nilearn")
    result = skull_check(read_volume(path))
    assert not result.has_skull, result.reason


def test_skull_check_nimare_mni152_head_has_skull():
    path = package_data_file("nimare", "resources", "templates", "tpl-MNI152NLin6Asym_res-02_T1w.nii.gz")
    if path is None:
        pytest.skip("optional: the MNI152 head with skull ships in nimare's wheel (pip install --no-deps nimare)")
    result = skull_check(read_volume(path))
    assert result.has_skull, result.reason


@pytest.mark.parametrize("contrast", ["t1", "t2", "flair"])
@pytest.mark.parametrize("n_slices", [None, 32])
def test_skull_check_generated_volumes_are_stripped(mni_2mm, contrast, n_slices):
    from AnomalySegLib.data.synthetic import synthesize_case

    case = synthesize_case(mni_2mm, 11, contrast=contrast, n_slices=n_slices)
    result = skull_check(Volume(case.image, case.affine))
    assert not result.has_skull, result.reason


@pytest.mark.parametrize("contrast", ["t1", "t2", "flair"])
def test_skull_check_generated_volume_add_synthetic_skull(mni_2mm, contrast):
    from AnomalySegLib.data.synthetic import synthesize_case

    case = synthesize_case(mni_2mm, 12, contrast=contrast)
    result = skull_check(Volume(add_synthetic_skull(case.image, case.affine), case.affine))
    assert result.has_skull, result.reason


def test_skull_check_oblique_synthetic_head_is_stripped():
    head = synthetic_head()  # the suite's small oblique, anisotropic head (zero background)
    result = skull_check(Volume(head.data, head.affine))
    assert not result.has_skull, result.reason


def test_skull_check_empty_volume():
    result = skull_check(Volume(np.zeros((20, 20, 20), np.float32), np.eye(4)))
    assert not result.has_skull
    assert "no head" in result.reason


# ============================================================================ bias field


def _smooth_log_field(shape, spacing):
    axes = [np.linspace(-1.0, 1.0, n) for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    return (0.25 * x + 0.2 * y ** 2 - 0.15 * z + 0.1 * x * z).astype(np.float32)


@pytest.fixture(scope="module")
def biased_case(mni_2mm):
    from AnomalySegLib.data.synthetic import synthesize_case

    case = synthesize_case(mni_2mm, 21, contrast="t1", bias=False, noise=0.02)
    spacing = np.linalg.norm(case.affine[:3, :3], axis=0)
    log_field = _smooth_log_field(case.image.shape, spacing)
    return case, spacing, log_field, (case.image * np.exp(log_field)).astype(np.float32)


def _field_recovery(image, brain, biased, corrected, true_log):
    """(correlation of the estimated and true log fields, WM CV unbiased/biased/corrected)."""
    inside = brain & (image > 0.2 * image[brain].max())
    est_log = np.log(biased[inside]) - np.log(corrected[inside])
    r = float(np.corrcoef(est_log, true_log[inside])[0, 1])
    wm = inside & (image > np.percentile(image[brain], 80))

    def cv(a):
        return float(a[wm].std() / a[wm].mean())

    return r, (cv(image), cv(biased), cv(corrected))


def test_bias_field_known_field_is_removed(biased_case):
    case, spacing, true_log, biased = biased_case
    corrected = correct_bias_field(biased, case.brain, spacing)
    assert corrected.shape == biased.shape and corrected.dtype == np.float32
    r, (cv_true, cv_biased, cv_corrected) = _field_recovery(case.image, case.brain, biased, corrected, true_log)
    # The WM intensity spread is back to the unbiased level. The estimated field also
    # absorbs the template's own intensity non-uniformity, so it correlates ~0.85 (not 1)
    # with the applied one on this synthetic 2 mm case.
    assert cv_corrected < 1.15 * cv_true and cv_corrected < 0.5 * cv_biased, (cv_true, cv_biased, cv_corrected)
    assert r > 0.8, r


@needs_colin
def test_bias_field_colin27_1mm_field_is_recovered():
    ref = read_volume(CH2BET)
    brain = ndimage.binary_fill_holes(ref.data > 0)
    true_log = _smooth_log_field(ref.shape, ref.spacing)
    biased = (ref.data * np.exp(true_log)).astype(np.float32)
    corrected = correct_bias_field(biased, brain, ref.spacing, threads=2)
    r, (cv_true, cv_biased, cv_corrected) = _field_recovery(ref.data, brain, biased, corrected, true_log)
    assert r > 0.9, r
    assert cv_corrected < 1.15 * cv_true and cv_corrected < 0.5 * cv_biased, (cv_true, cv_biased, cv_corrected)


def test_bias_field_progress_and_default_mask(biased_case):
    _, spacing, _, biased = biased_case
    events = []
    out = correct_bias_field(biased, None, spacing, iterations=(5, 5), progress=events.append)
    assert out.shape == biased.shape
    fractions = [e.fraction for e in events]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0
    assert fractions == sorted(fractions)
    assert {e.stage for e in events} == {"bias"}


def test_bias_field_cancel(biased_case):
    case, spacing, _, biased = biased_case
    with pytest.raises(Cancelled):
        correct_bias_field(biased, case.brain, spacing, cancel=lambda: True)
    calls = []

    def cancel_later():
        calls.append(1)
        return len(calls) > 3  # during N4's iterations

    with pytest.raises(Cancelled):
        correct_bias_field(biased, case.brain, spacing, cancel=cancel_later)
    assert len(calls) > 3


def test_bias_field_bad_inputs(biased_case):
    case, spacing, _, biased = biased_case
    with pytest.raises(InputError):
        correct_bias_field(biased, case.brain[:-1], spacing)
    with pytest.raises(InputError):
        correct_bias_field(biased, case.brain, (1.0, 0.0, 1.0))
    with pytest.raises(InputError):
        correct_bias_field(biased, np.zeros_like(case.brain), spacing)


# ============================================================================ comparing masks


def test_dice_physical_across_grids():
    head = synthetic_head()
    vol = Volume(head.data, head.affine)
    other = reoriented(Volume(head.head.astype(np.float32), head.affine))
    assert dice_physical(head.head, head.affine, other.data > 0.5, other.affine) == pytest.approx(1.0)
    back = resample_mask(other.data > 0.5, other.affine, vol.shape, vol.affine)
    assert np.array_equal(back, head.head)
    assert dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0


# ============================================================================ deepbet


def test_missing_deepbet_gives_install_hint(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepbet" else real(name, *a))
    with pytest.raises(MissingDependencyError, match=r"anomalyseg\[raw\]"):
        deepbet_model_files()
    with pytest.raises(MissingDependencyError):
        extract_brain(Volume(np.ones((8, 8, 8), np.float32), np.eye(4)))


def _fake_archive(path: Path, payload) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(payload, protocol=2))
    return path


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def test_unknown_model_file_with_python_globals_is_refused(tmp_path):
    from AnomalySegLib.data.raw_input import _verify_torchscript_file

    _verify_torchscript_file(_fake_archive(tmp_path / "ok.pt", {"a": 1}))  # no globals at all: accepted
    with pytest.raises(ModelFileError, match="refusing"):
        _verify_torchscript_file(_fake_archive(tmp_path / "evil.pt", _Evil()))
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(ModelFileError):
        _verify_torchscript_file(tmp_path / "junk.pt")


def test_unknown_model_file_with_custom_ops_is_refused(tmp_path):
    from AnomalySegLib.data.raw_input import _verify_torchscript_file

    path = tmp_path / "custom.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"a": 1}, protocol=2))
        z.writestr("archive/code/__torch__.py", "def forward(self, x):\n    return ops.evil.run(x)\n")
    with pytest.raises(ModelFileError, match="ops.evil"):
        _verify_torchscript_file(path)


@needs_deepbet
def test_deepbet_files_pass_the_audit_without_pinned_hashes(monkeypatch):
    import AnomalySegLib.data.raw_input as raw_input

    monkeypatch.setattr(raw_input, "KNOWN_DEEPBET_SHA256", {})
    model, bbox = deepbet_model_files(verify=True)
    assert model.name == "model.pt" and bbox.name == "bbox_model.pt"


@pytest.fixture(scope="module")
def ch2_mask():
    vol = read_volume(CH2)
    return vol, extract_brain(vol, threads=2)


@pytest.mark.deepbet
@needs_deepbet
@needs_colin
def test_deepbet_colin27_matches_ch2bet(ch2_mask):
    vol, mask = ch2_mask
    assert mask.dtype == bool and mask.shape == vol.shape
    ref = read_volume(CH2BET)
    brain = ndimage.binary_fill_holes(ref.data > 0)
    score = dice_physical(mask, vol.affine, brain, ref.affine)
    assert score >= 0.93, score
    # the brain mask is one closed component
    assert ndimage.label(mask)[1] == 1
    assert skull_check(Volume(np.where(mask, vol.data, 0), vol.affine)).has_skull is False


@pytest.mark.deepbet
@needs_deepbet
@needs_colin
def test_deepbet_mask_follows_the_voxel_grid(ch2_mask):
    vol, mask = ch2_mask
    other = reoriented(vol)
    other_mask = extract_brain(other, threads=2)
    assert other_mask.shape == other.shape
    expected = reoriented(Volume(mask.astype(np.float32), vol.affine)).data > 0.5
    assert np.array_equal(other_mask, expected)  # reorientation is exact: same voxels


@pytest.mark.deepbet
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # deepbet's own torch.jit.load on torch >= 2.10
@needs_deepbet
@needs_colin
def test_deepbet_same_mask_as_deepbet_itself(ch2_mask):
    """Our array re-implementation reproduces deepbet's own file-based run voxel for voxel."""
    pytest.importorskip("cc3d", reason="deepbet's own run needs its full dependencies")
    pytest.importorskip("fill_voids", reason="deepbet's own run needs its full dependencies")
    import torch
    from deepbet import BrainExtraction

    vol, mask = ch2_mask
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _, their_mask, _ = BrainExtraction(no_gpu=True).run(str(CH2))
    finally:
        torch.set_num_threads(threads)
    theirs = np.asarray(their_mask.dataobj) > 0
    assert theirs.shape == mask.shape
    assert int(np.count_nonzero(theirs != mask)) == 0


@pytest.mark.deepbet
@needs_deepbet
def test_deepbet_cancel_and_progress():
    head = synthetic_head()
    vol = Volume(head.data, head.affine)
    with pytest.raises(Cancelled):
        extract_brain(vol, cancel=lambda: True)
    calls, events = [], []

    def cancel_second():
        calls.append(1)
        return len(calls) >= 2  # after loading the models, before the first network pass

    with pytest.raises(Cancelled):
        extract_brain(vol, cancel=cancel_second, progress=events.append, threads=1)
    assert events and events[0].stage == "skullstrip"


@pytest.mark.deepbet
@needs_deepbet
def test_deepbet_constant_volume_is_an_input_error():
    with pytest.raises(InputError, match="non-constant"):
        extract_brain(Volume(np.ones((40, 40, 40), np.float32), np.eye(4)), threads=1)
