"""Label protocols at read time: hand-computed rules, and the pipeline's records under each of them."""
import numpy as np
import pytest

from autorad_jax.data import labels, pipeline
from lidc_testdata import read_split, tiny_config

# Per-reader ratings (0 = no reader / no valid rating; 7 is invalid) and the class each rule gives, worked by hand.
# Columns: mean, median, mean_exclude3, mean_3benign, mean_3malignant, median_exclude3.
CASES = [
    ((1, 2, 0, 0), (0, 0, 0, 0, 0, 0)),      # mean 1.5, median 1.5
    ((2, 3, 0, 0), (1, 1, 0, 0, 0, 0)),      # mean 2.5 (unsure: 2.5 is in the band), median 2.5
    ((2, 4, 0, 0), (1, 1, -1, 0, 2, -1)),    # mean 3, median 3
    ((3, 3, 4, 0), (1, 1, 2, 2, 2, -1)),     # mean 3.33, median 3
    ((4, 4, 3, 5), (2, 2, 2, 2, 2, 2)),      # mean 4, median 4
    ((1, 1, 5, 0), (0, 0, 0, 0, 0, 0)),      # mean 7/3 < 2.5, median 1
    ((0, 0, 0, 0), (-1, -1, -1, -1, -1, -1)),  # no rating: never labelled
    ((7, 3, 0, 0), (1, 1, -1, 0, 2, -1)),    # 7 is not a rating: mean 3
]
RULES = ('mean', 'median', 'mean_exclude3', 'mean_3benign', 'mean_3malignant', 'median_exclude3')


@pytest.mark.parametrize('column,rule', list(enumerate(RULES)))
def test_rules_match_hand_computation(column, rule):
    ratings = np.array([c[0] for c in CASES])
    np.testing.assert_array_equal(labels.labels(ratings, rule), [c[1][column] for c in CASES])


def test_cohort_and_rule_names():
    ratings = np.array([[1, 2, 3, 0], [4, 0, 0, 0], [2, 9, 0, 0]])
    np.testing.assert_array_equal(labels.cohort(ratings, np.array([5.0, 12.0, 8.0]), min_readers=2), [1, 0, 0])
    np.testing.assert_array_equal(labels.cohort(ratings, np.array([5.0, 12.0, 8.0]), min_diameter_mm=6), [0, 1, 1])
    with pytest.raises(ValueError, match='mean_exclude3'):
        labels.parse_rule('average')
    assert labels.is_binary('median_3benign') and not labels.is_binary('median')


def test_default_rule_reproduces_stored_labels(lidc_data):
    examples = read_split(lidc_data, 'train')
    ratings = np.stack([ex['ratings'] for ex in examples])
    np.testing.assert_array_equal(labels.labels(ratings), [ex['label'] for ex in examples])


def test_records_follow_the_protocol(lidc_data):
    examples = read_split(lidc_data, 'train')
    ratings = np.stack([ex['ratings'] for ex in examples]).astype(float)
    diameter = np.array([ex['diameter_mm'] for ex in examples])
    # numpy reference: median of the valid ratings, 3 left out, at least 2 readers, >= 5 mm
    median = np.array([np.median(r[r > 0]) for r in ratings])
    keep = (median != 3) & ((ratings > 0).sum(1) >= 2) & (diameter >= 5)
    data = tiny_config(lidc_data, label_scheme='binary', label_rule='median_exclude3', min_readers=2,
                       min_diameter_mm=5.0).data
    assert keep.any() and not keep.all()  # the demo data exercises both sides of the protocol
    recs = pipeline.records(data, 'train')
    np.testing.assert_array_equal(recs.labels, (median[keep] > 3).astype(np.int32))
    np.testing.assert_array_equal(recs.radiomics, np.stack([ex['radiomics'] for ex in examples])[keep])


def test_binary_rule_needs_the_binary_scheme(lidc_data):
    with pytest.raises(ValueError, match='label_scheme=binary'):
        pipeline.records(tiny_config(lidc_data, label_rule='mean_3benign').data, 'train')
