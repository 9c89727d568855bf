"""Metrics against small cases worked out by hand (numbers in the comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from medidiff import metrics

# A 2x3 map with two anomalous voxels, at 0.9 and 0.2. Ranked: 0.9+ 0.8- 0.6- 0.4- 0.2+ 0.1-.
# AP = 1/2 * 1 (first hit at rank 1) + 1/2 * 2/5 (second at rank 5) = 0.7.
# AUROC = pairs (positive above negative) / (2 * 4) = (4 + 1) / 8 = 0.625.
MAP = np.array([[0.9, 0.4, 0.6], [0.2, 0.8, 0.1]])
LABEL = np.array([[1, 0, 0], [1, 0, 0]], dtype=bool)


def test_pooled_ap_and_auroc_of_a_hand_worked_map():
    assert metrics.pooled_average_precision([MAP], [LABEL]) == pytest.approx(0.7)
    assert metrics.pooled_auroc([MAP], [LABEL]) == pytest.approx(0.625)


def test_mask_drops_voxels_outside_the_foreground():
    # Without the 0.8 voxel: 0.9+ 0.6- 0.4- 0.2+ 0.1- -> AP = 1/2 + 1/2 * 2/4 = 0.75, AUROC 4/6.
    mask = MAP != 0.8
    assert metrics.pooled_average_precision([MAP], [LABEL], [mask]) == pytest.approx(0.75)
    assert metrics.pooled_auroc([MAP], [LABEL], [mask]) == pytest.approx(4 / 6)


def test_pooled_ap_differs_from_mean_per_case_ap():
    # Each case alone ranks its lesion first (AP 1), but pooled, case 2's lesion (0.2) ranks
    # below case 1's normal voxel (0.8): AP = 1/2 * 1 + 1/2 * 2/3 = 5/6.
    maps = [np.array([0.9, 0.8]), np.array([0.2, 0.1])]
    labels = [np.array([True, False]), np.array([True, False])]
    per_case = [average_precision_score(y, m) for m, y in zip(maps, labels, strict=True)]
    assert np.mean(per_case) == pytest.approx(1.0)
    assert metrics.pooled_average_precision(maps, labels) == pytest.approx(5 / 6)


def test_a_stacked_array_is_read_as_cases_along_the_first_axis():
    maps, labels = np.stack([MAP, MAP]), np.stack([LABEL, LABEL])
    assert metrics.pooled_auroc(maps, labels) == pytest.approx(0.625)


def test_one_class_gives_nan_not_an_error():
    healthy = np.zeros_like(LABEL)
    assert math.isnan(metrics.pooled_auroc([MAP], [healthy]))
    assert math.isnan(metrics.pooled_average_precision([MAP], [healthy]))


def test_mismatched_shapes_name_the_case():
    with pytest.raises(ValueError, match="case 1"):
        metrics.pooled_auroc([MAP, MAP], [LABEL, LABEL[:, :2]])


def test_dice_of_known_overlaps():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[0, :4] = True  # 4 voxels
    b[0, 2:4] = True  # 2 voxels, both inside a: 2*2 / (4+2)
    assert metrics.dice(a, b) == pytest.approx(4 / 6)
    assert metrics.dice(a, ~a) == 0.0
    assert metrics.dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0


def test_dice_per_class():
    pred = np.array([0, 1, 1, 2, 2, 2])
    target = np.array([0, 1, 2, 2, 2, 0])
    # label 1: pred {1,2} target {1} -> 2/3; label 2: pred {3,4,5} target {2,3,4} -> 4/6;
    # label 3 absent from both -> 1.0.
    assert metrics.dice_per_class(pred, target, [1, 2, 3]) == pytest.approx(
        {1: 2 / 3, 2: 4 / 6, 3: 1.0}
    )


def test_hd95_of_two_shifted_boxes():
    # Box b is box a moved 3 voxels along axis 0. Every surface voxel of a's leading face is
    # 3 voxels from b's surface and nothing is farther, and that face holds more than 5 % of
    # the surface, so the 95th percentile is 3 (6 mm at 2 mm spacing along the shift).
    a = np.zeros((30, 30), bool)
    b = np.zeros((30, 30), bool)
    a[10:20, 10:20] = True
    b[13:23, 10:20] = True
    assert metrics.hd95(a, b) == pytest.approx(3.0)
    assert metrics.hd95(a, b, spacing=(2.0, 1.0)) == pytest.approx(6.0)
    assert math.isnan(metrics.hd95(a, np.zeros_like(a)))


def test_psnr_of_a_known_mse():
    target = np.zeros((8, 8))
    pred = target + 0.1  # MSE 0.01 -> 10 log10(1 / 0.01) = 20 dB
    assert metrics.psnr(pred, target) == pytest.approx(20.0)
    assert metrics.psnr(target, target) == math.inf
    # Inside the mask the error is 0.1, outside it is 0.5: only the inside counts.
    pred[:, 4:] = 0.5
    mask = np.zeros((8, 8), bool)
    mask[:, :4] = True
    assert metrics.psnr(pred, target, mask=mask) == pytest.approx(20.0)
    assert metrics.psnr(pred, target, data_range=2.0, mask=mask) == pytest.approx(
        20.0 + 20 * math.log10(2)
    )


def test_ssim_is_one_for_equal_images_and_lower_inside_a_damaged_region():
    rng = np.random.default_rng(0)
    target = rng.random((16, 16, 16))
    assert metrics.ssim(target, target) == pytest.approx(1.0)
    pred = target.copy()
    pred[:8] = rng.random((8, 16, 16))
    damaged = np.zeros(target.shape, bool)
    damaged[:5] = True
    intact = np.zeros(target.shape, bool)
    intact[11:] = True
    assert metrics.ssim(pred, target, mask=intact) == pytest.approx(1.0)
    assert metrics.ssim(pred, target, mask=damaged) < 0.5
    assert metrics.ssim(pred[:, :, :4], target[:, :, :4]) < 1.0  # thin volume, window shrinks


def test_threshold_at_fpr_on_a_known_array():
    healthy = np.arange(100, dtype=float)
    # 5 % of 100 values may exceed: 95..99 do, so the threshold is 94.
    assert metrics.threshold_at_fpr([healthy], fpr=0.05) == 94.0
    assert metrics.threshold_at_fpr([healthy], fpr=0.0) == 99.0
    assert metrics.threshold_at_fpr([healthy], fpr=1.0) < 0.0
    # 0.29 * 100 rounds below 29 in floating point; the threshold must still let 29 exceed it.
    assert np.mean(healthy > metrics.threshold_at_fpr([healthy], fpr=0.29)) == pytest.approx(0.29)


def test_threshold_at_fpr_uses_only_the_foreground_and_accepts_scan_scores():
    healthy = np.arange(100, dtype=float).reshape(10, 10)
    mask = np.zeros((10, 10), bool)
    mask[:5] = True  # values 0..49; 10 % -> 5 exceed -> threshold 44
    assert metrics.threshold_at_fpr([healthy], fpr=0.1, masks=[mask]) == 44.0
    scan_scores = np.array([0.3, 0.1, 0.2, 0.5])
    assert metrics.threshold_at_fpr(scan_scores, fpr=0.25) == 0.3


def test_best_dice_is_one_when_a_perfect_threshold_exists():
    maps = [np.array([0.1, 0.7, 0.9]), np.array([0.3, 0.2, 0.8])]
    labels = [np.array([0, 1, 1], bool), np.array([0, 0, 1], bool)]
    value, threshold = metrics.best_dice(maps, labels)
    assert value == pytest.approx(1.0)
    assert metrics.dice_at_threshold(maps, labels, threshold) == pytest.approx((1.0, 1.0))


def test_exact_best_dice_matches_a_brute_force_search():
    rng = np.random.default_rng(1)
    maps = [rng.integers(0, 20, 300).astype(float) for _ in range(3)]  # many ties
    labels = [(m + rng.normal(0, 6, m.shape)) > 18 for m in maps]
    value, threshold = metrics.best_dice(maps, labels)
    scores, truth = np.concatenate(maps), np.concatenate(labels)
    candidates = np.append(np.unique(scores), scores.min() - 1)
    brute = max(metrics.dice(scores > t, truth) for t in candidates)
    assert value == pytest.approx(brute)
    assert metrics.dice_at_threshold(maps, labels, threshold)[0] == pytest.approx(value)
    coarse, _ = metrics.best_dice(maps, labels, n_thresholds=5)
    assert coarse <= value


def test_dice_at_threshold_pools_voxels_and_averages_lesioned_cases():
    maps = [np.array([0.9, 0.9, 0.1, 0.1]), np.array([0.9, 0.1]), np.array([0.9, 0.1])]
    labels = [np.array([1, 0, 0, 0], bool), np.array([1, 1], bool), np.zeros(2, bool)]
    # Predicted > 0.5: case 1 {0,1} vs {0}: 2/3; case 2 {0} vs {0,1}: 2/3; case 3 healthy, has
    # one false positive and is left out of the per-case mean. Pooled: overlap 2, predicted 4,
    # anomalous 3 -> 4/7.
    pooled, mean_case = metrics.dice_at_threshold(maps, labels, 0.5)
    assert pooled == pytest.approx(4 / 7)
    assert mean_case == pytest.approx(2 / 3)


def test_scan_metrics_and_their_single_class_nan():
    scores = [0.1, 0.4, 0.35, 0.8]
    anomalous = [False, False, True, True]
    # Pairs: 0.35 beats 0.1 only, 0.8 beats both -> 3/4. Ranked 0.8+ 0.4- 0.35+ -> AP 1/2 + 1/2*2/3.
    assert metrics.scan_auroc(scores, anomalous) == pytest.approx(0.75)
    assert metrics.scan_average_precision(scores, anomalous) == pytest.approx(5 / 6)
    assert math.isnan(metrics.scan_auroc(scores, [True] * 4))
    assert math.isnan(metrics.scan_average_precision(scores, [False] * 4))


def test_uncertainty_error_auroc():
    error = np.array([[True, False], [False, True]])
    assert metrics.uncertainty_error_auroc(np.array([[0.9, 0.1], [0.2, 0.8]]), error) == 1.0
    assert metrics.uncertainty_error_auroc(np.array([[0.1, 0.9], [0.8, 0.2]]), error) == 0.0
    mask = np.array([[True, True], [False, False]])
    assert metrics.uncertainty_error_auroc(np.ones((2, 2)), error, mask) == 0.5
    assert math.isnan(metrics.uncertainty_error_auroc(np.ones((2, 2)), np.zeros((2, 2), bool)))


def _cases():
    anomalous = {"map": MAP, "label": LABEL, "score": 0.9}
    healthy = {"map": np.array([[0.3, 0.5], [0.05, 0.7]]), "label": np.zeros((2, 2), bool),
               "mask": np.array([[True, True], [True, False]]), "score": 0.2}
    return [anomalous, healthy]


def test_evaluate_anomaly_pools_cases_and_reports_every_key():
    out = metrics.evaluate_anomaly(_cases(), voxel_threshold=0.5, scan_threshold=0.5)
    # Pooled voxels (0.7 masked out): 0.9+ 0.8- 0.6- 0.5- 0.4- 0.3- 0.2+ 0.1- 0.05-.
    assert out["pooled_ap"] == pytest.approx(0.5 + 0.5 * 2 / 7)
    assert out["pooled_auroc"] == pytest.approx((7 + 2) / 14)
    assert out["n_cases"] == 2 and out["n_anomalous_cases"] == 1
    # > 0.5 predicts 0.9, 0.8, 0.6: overlap 1 -> 2/5 both pooled and for the one lesioned case.
    assert out["dice_at_threshold"] == pytest.approx(2 / 5)
    assert out["mean_case_dice_at_threshold"] == pytest.approx(2 / 5)
    assert out["voxel_fpr_at_threshold"] == pytest.approx(2 / 7)
    # Best: > 0.8 predicts 0.9 only -> 2*1 / (1 + 2) = 2/3.
    assert out["best_dice_oracle"] == pytest.approx(2 / 3)
    assert out["best_dice_oracle_threshold"] == pytest.approx(0.8)
    assert out["scan_auroc"] == 1.0 and out["scan_ap"] == 1.0
    assert out["scan_sensitivity"] == 1.0 and out["scan_specificity"] == 1.0


def test_evaluate_anomaly_leaves_out_what_it_was_not_given():
    cases = [{k: v for k, v in case.items() if k != "score"} for case in _cases()]
    out = metrics.evaluate_anomaly(cases)
    assert "dice_at_threshold" not in out and "scan_auroc" not in out
    with pytest.raises(ValueError, match="score"):
        metrics.evaluate_anomaly([cases[0], _cases()[1]])


def test_pooled_metrics_handle_a_million_voxels_per_case_quickly():
    rng = np.random.default_rng(2)
    labels = [rng.random(1_000_000) < 0.01 for _ in range(3)]
    maps = [(rng.random(y.shape) + y).astype(np.float32) for y in labels]
    assert metrics.pooled_average_precision(maps, labels) == pytest.approx(1.0)
    assert metrics.best_dice(maps, labels)[0] == pytest.approx(1.0)
