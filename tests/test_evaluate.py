"""qaclims.evaluate against the reference vectors (cam_eval.npz) and by its properties."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from qaclims.evaluate import (best_threshold, cams_to_labels, confusion, default_thresholds, iou,
                              sweep_confusions, threshold_sweep)
from refdata import case_names, load_reference

REFERENCE = "cam_eval.npz"


def reference_thresholds(data):
    "{'thr_0.15': 0.15, ...} for every threshold case present."
    names = sorted({key.split("/")[0] for key in data if key.startswith("thr_")})
    return {name: float(name[len("thr_"):]) for name in names}


def reference_samples(data, gt_field="gt_raw"):
    return [(data[f"{im}/high_res"], data[f"{im}/keys"], data[f"{im}/{gt_field}"]) for im in case_names(data, "img")]


def naive_confusions(samples, thresholds, num_classes, ignore_index=255):
    "The per-threshold loop: [T, C, C]."
    out = np.zeros((len(thresholds), num_classes, num_classes), np.int64)
    for t, threshold in enumerate(thresholds):
        for cams, keys, gt in samples:
            out[t] += confusion(cams_to_labels(cams, keys, threshold), gt, num_classes, ignore_index)
    return out


# ---- reference vectors ---------------------------------------------------------------------------

def test_reference_has_cases():
    data = load_reference(REFERENCE)
    assert case_names(data, "img") and reference_thresholds(data)


@pytest.mark.parametrize("use_torch", [False, True])
def test_reference_per_threshold(use_torch):
    data = load_reference(REFERENCE)
    images = case_names(data, "img")
    for name, threshold in reference_thresholds(data).items():
        num_classes = data[f"{name}/confusion21"].shape[0]
        total_raw = np.zeros((num_classes, num_classes), np.int64)
        total_cv = np.zeros_like(total_raw)
        for im in images:
            cams, keys = data[f"{im}/high_res"], data[f"{im}/keys"]
            if use_torch:
                cams, keys = torch.from_numpy(cams), torch.from_numpy(keys)
            pred = cams_to_labels(cams, keys, threshold)
            pred = pred.numpy() if use_torch else pred
            assert pred.dtype == np.int64
            np.testing.assert_array_equal(pred, data[f"{name}/{im}/pred"], err_msg=f"{name}/{im}")
            total_raw += confusion(pred, data[f"{im}/gt_raw"], num_classes)
            total_cv += confusion(pred, data[f"{im}/gt_chainercv"], num_classes)
        np.testing.assert_array_equal(total_raw, data[f"{name}/confusion21"])
        np.testing.assert_array_equal(total_cv, data[f"{name}/confusion21"])
        # chainercv's matrix is the top-left block; the rest is empty
        small = data[f"{name}/confusion_chainercv"]
        n = small.shape[0]
        np.testing.assert_array_equal(total_raw[:n, :n], small)
        assert total_raw.sum() == small.sum()
        per_class, miou = iou(total_raw)
        np.testing.assert_array_equal(per_class, data[f"{name}/iou21"])  # NaNs in the same places
        assert miou == float(data[f"{name}/miou"])
        small_per_class, small_miou = iou(small)
        np.testing.assert_array_equal(small_per_class, data[f"{name}/iou_chainercv"])
        assert small_miou == miou


@pytest.mark.parametrize("gt_field", ["gt_raw", "gt_chainercv"])
def test_reference_by_sweep(gt_field):
    data = load_reference(REFERENCE)
    wanted = reference_thresholds(data)
    # the reference thresholds inside the default grid plus extras, shuffled: results follow the given order
    thresholds = np.unique(np.concatenate([default_thresholds(), list(wanted.values()), [0.0, 1.0, 0.333]]))
    thresholds = np.random.default_rng(1).permutation(thresholds)
    samples = (s for s in reference_samples(data, gt_field))  # a generator, read once
    confusions = sweep_confusions(samples, thresholds)
    miou, per_class = threshold_sweep(iter(reference_samples(data, gt_field)), thresholds)
    assert miou.shape == thresholds.shape and per_class.shape == (thresholds.size, 21)
    for name, threshold in wanted.items():
        t = int(np.flatnonzero(thresholds == threshold)[0])
        np.testing.assert_array_equal(confusions[t], data[f"{name}/confusion21"])
        np.testing.assert_array_equal(per_class[t], data[f"{name}/iou21"])
        assert miou[t] == float(data[f"{name}/miou"])
    # and every other threshold matches the per-threshold loop
    np.testing.assert_array_equal(confusions, naive_confusions(reference_samples(data, gt_field), thresholds, 21))


# ---- properties ----------------------------------------------------------------------------------

def random_labels(seed, shape, num_classes, ignore_fraction=0.2, ignore_value=255):
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, num_classes, shape)
    gt[rng.random(shape) < ignore_fraction] = ignore_value
    pred = rng.integers(0, num_classes, shape)
    return pred, gt


shapes = st.tuples(st.integers(1, 3), st.integers(1, 12), st.integers(1, 12))
fast = settings(max_examples=40, deadline=None)


@fast
@given(st.integers(0, 2**32 - 1), shapes, st.integers(1, 8), st.sampled_from([255, -1]))
def test_perfect_prediction_scores_one(seed, shape, num_classes, ignore_value):
    _, gt = random_labels(seed, shape, num_classes, ignore_value=ignore_value)
    pred = np.where(gt == ignore_value, 0, gt)
    per_class, miou = iou(confusion(pred, gt, num_classes))
    if (gt != ignore_value).any():
        assert miou == 1.0
        assert np.all((per_class == 1) | np.isnan(per_class))
    else:
        assert np.isnan(miou)


@fast
@given(st.integers(0, 2**32 - 1), shapes, st.integers(1, 8))
def test_total_is_the_number_of_counted_pixels(seed, shape, num_classes):
    pred, gt = random_labels(seed, shape, num_classes)
    conf = confusion(torch.from_numpy(pred), torch.from_numpy(gt), num_classes)
    assert conf.dtype == np.int64 and conf.shape == (num_classes, num_classes)
    assert conf.sum() == np.count_nonzero(gt != 255)
    np.testing.assert_array_equal(conf.sum(axis=1), np.bincount(gt[gt != 255], minlength=num_classes))


@fast
@given(st.integers(0, 2**32 - 1), shapes, st.integers(1, 8))
def test_ignored_pixels_never_count(seed, shape, num_classes):
    pred, gt = random_labels(seed, shape, num_classes, ignore_fraction=0.4)
    other = pred.copy()
    ignored = gt == 255
    other[ignored] = np.random.default_rng(seed + 1).integers(-5, 300, ignored.sum())  # even out of range
    np.testing.assert_array_equal(confusion(other, gt, num_classes), confusion(pred, gt, num_classes))
    chainercv_gt = np.where(ignored, -1, gt)
    np.testing.assert_array_equal(confusion(other, chainercv_gt, num_classes), confusion(pred, gt, num_classes))


def random_cam_samples(seed, n_images, num_classes, levels, dtype):
    "CAMs on a grid of `levels` values (many exact ties), random keys (k = 0 included), gt with 255."
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n_images):
        k = int(rng.integers(0, min(3, num_classes - 1) + 1))
        height, width = rng.integers(1, 9, 2)
        cams = (rng.integers(0, levels + 1, (k, height, width)) / levels).astype(dtype)
        keys = np.sort(rng.choice(num_classes - 1, k, replace=False))
        gt = rng.integers(0, num_classes, (height, width))
        gt[rng.random((height, width)) < 0.2] = 255
        samples.append((cams, keys, gt))
    return samples


@fast
@given(st.integers(0, 2**32 - 1), st.integers(0, 5), st.integers(2, 7), st.sampled_from([4, 10, 20]),
       st.sampled_from([np.float32, np.float64, np.float16]))
def test_permuting_images_changes_nothing(seed, n_images, num_classes, levels, dtype):
    samples = random_cam_samples(seed, n_images, num_classes, levels, dtype)
    thresholds = np.arange(levels + 1) / levels
    order = np.random.default_rng(seed).permutation(n_images)
    permuted = [samples[i] for i in order]
    np.testing.assert_array_equal(sweep_confusions(samples, thresholds, num_classes),
                                  sweep_confusions(permuted, thresholds, num_classes))
    preds = [cams_to_labels(c, k, 0.5) for c, k, _ in samples]
    total = sum((confusion(p, g, num_classes) for p, (_, _, g) in zip(preds, samples)), np.zeros((num_classes,) * 2, int))
    total_permuted = sum((confusion(preds[i], samples[i][2], num_classes) for i in order), np.zeros_like(total))
    np.testing.assert_array_equal(total, total_permuted)


@fast
@given(st.integers(0, 2**32 - 1), st.integers(0, 5), st.integers(2, 7), st.sampled_from([4, 10, 20]),
       st.sampled_from([np.float32, np.float64, np.float16]), st.booleans())
def test_sweep_equals_per_threshold_loop(seed, n_images, num_classes, levels, dtype, use_torch):
    samples = random_cam_samples(seed, n_images, num_classes, levels, dtype)
    if use_torch:
        samples = [(torch.from_numpy(c), torch.from_numpy(k), torch.from_numpy(g)) for c, k, g in samples]
    rng = np.random.default_rng(seed)
    # thresholds equal to CAM values (exact ties), random ones, repeats, out of [0, 1], unsorted
    grid = np.arange(levels + 1) / levels
    thresholds = rng.permutation(np.concatenate([grid, rng.random(3), grid[:2], [-0.5, 1.5]]))
    expected = naive_confusions(samples, thresholds, num_classes)
    np.testing.assert_array_equal(sweep_confusions(iter(samples), thresholds, num_classes), expected)
    miou, per_class = threshold_sweep(iter(samples), thresholds, num_classes)
    expected_per_class, expected_miou = iou(expected)
    np.testing.assert_array_equal(per_class, expected_per_class)
    np.testing.assert_array_equal(miou, expected_miou)


# ---- edges and errors ----------------------------------------------------------------------------

def test_float32_tie_goes_to_background():
    cams = np.full((2, 1, 3), np.float32(0.15))
    cams[1, 0, 2] = 0.2
    np.testing.assert_array_equal(cams_to_labels(cams, [4, 7], 0.15), [[0, 0, 8]])
    # at a float64 threshold just below float32(0.15) the first CAM wins the tie between the two CAMs
    np.testing.assert_array_equal(cams_to_labels(cams, [4, 7], 0.1499), [[5, 5, 8]])
    conf = sweep_confusions([(cams, [4, 7], np.array([[5, 0, 8]]))], [0.1499, 0.15], 21)
    assert conf[1, 5, 0] == 1 and conf[0, 5, 5] == 1


def test_no_keys_is_all_background():
    labels = cams_to_labels(np.zeros((0, 3, 4), np.float32), np.zeros(0, np.int64), 0.5)
    assert labels.shape == (3, 4) and not labels.any()
    conf = sweep_confusions([(np.zeros((0, 3, 4), np.float32), [], np.ones((3, 4), int))], [0.1, 0.9], 3)
    assert (conf[:, 1, 0] == 12).all() and conf.sum() == 24


def test_iou_marks_absent_and_unmatched_classes():
    per_class, miou = iou(np.array([[2, 1, 0], [0, 0, 0], [0, 0, 0]]))
    assert per_class[1] == 0 and np.isnan(per_class[2]) and miou == pytest.approx((2 / 3) / 2)


def test_best_threshold():
    assert best_threshold([0.2, 0.5, 0.4], [0.1, 0.2, 0.3]) == (0.2, 0.5)
    assert best_threshold([0.3, 0.2, 0.5], [0.1, 0.2, 0.3], greedy=True) == (0.1, 0.3)
    with pytest.raises(ValueError):
        best_threshold([np.nan, np.nan], [0.1, 0.2])


@pytest.mark.parametrize("call, error", [
    (lambda: confusion(np.array([0, 3]), np.array([0, 1]), 3), ValueError),
    (lambda: confusion(np.array([0, 1]), np.array([0, 3]), 3), ValueError),
    (lambda: confusion(np.array([0, 1]), np.array([0, 1, 1]), 3), ValueError),
    (lambda: confusion(np.array([0.0, 1.0]), np.array([0, 1]), 3), TypeError),
    (lambda: cams_to_labels(np.zeros((2, 2, 2), np.float32), [1], 0.1), ValueError),
    (lambda: cams_to_labels(np.zeros((1, 2, 2), np.float32), [1], float("inf")), ValueError),
    (lambda: sweep_confusions([(np.zeros((1, 2, 2), np.float32), [0], np.zeros((2, 2), int))], [0.1, np.nan]), ValueError),
    (lambda: sweep_confusions([(np.zeros((1, 2, 2), np.float32), [25], np.zeros((2, 2), int))], [0.1]), ValueError),
    (lambda: sweep_confusions([(np.zeros((1, 2, 2), np.float32), [0], np.zeros((3, 2), int))], [0.1]), ValueError),
    (lambda: sweep_confusions([np.zeros((1, 2, 2))], [0.1]), TypeError),
])
def test_bad_input_is_a_clear_error(call, error):
    with pytest.raises(error):
        call()
