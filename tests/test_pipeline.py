"""Input pipeline against numpy (and jax.image for resizing), on generator data built with the real builder."""

import shutil

import grain.python as grain
import jax
import numpy as np
import pytest

from autorad_jax.data import pipeline, preprocess
from lidc_testdata import read_split, tiny_config

# Jitted: called eagerly, each of their operations would compile on its own (most of these tests' time).
images_of = jax.jit(preprocess.images, static_argnums=1)
augment = jax.jit(preprocess.augment)
augment_batch = jax.jit(jax.vmap(preprocess.augment))


def test_views_are_centre_slices():
    ct = np.random.default_rng(0).integers(-1000, 400, (9, 9, 9)).astype(np.int16)
    v = pipeline.extract_view(ct, "2.5d")
    np.testing.assert_array_equal(v, np.stack([ct[3], ct[4], ct[5]], -1))
    v = pipeline.extract_view(ct, "planes")
    np.testing.assert_array_equal(v[..., 0], ct[4])
    np.testing.assert_array_equal(v[..., 1], ct[:, 4, :])
    np.testing.assert_array_equal(v[..., 2], ct[:, :, 4])


@pytest.mark.parametrize("view", ["2.5d", "planes"])
def test_example_to_inputs_and_device_preprocessing_match_numpy(lidc_data, view):
    config = tiny_config(lidc_data, view=view)
    example = read_split(lidc_data, "train")[0]
    stats = pipeline.RadiomicsStats(mean=np.zeros_like(example["radiomics"]), std=np.ones_like(example["radiomics"]))
    out = pipeline.example_to_inputs(example, config.data, stats)

    ct, c = example["ct"], example["ct"].shape[0] // 2
    slices = [ct[c - 1], ct[c], ct[c + 1]] if view == "2.5d" else [ct[c], ct[:, c], ct[:, :, c]]
    np.testing.assert_array_equal(out["view"], np.stack(slices, -1))
    assert out["view"].dtype == np.int16 and out["label"] == example["label"]

    windowed = np.clip((np.stack(slices, -1).astype(np.float64) + 1000.0) / 1400.0, 0, 1)
    resized = np.asarray(jax.image.resize(windowed, (56, 56, 3), method="linear", antialias=False))
    expected = (resized - np.array([0.48145466, 0.4578275, 0.40821073])) / np.array(
        [0.26862954, 0.26130258, 0.27577711])
    image = images_of(out["view"][None], preprocess.Preprocessing.from_config(config.data))[0]
    assert image.shape == (56, 56, 3) and image.dtype == np.float32
    np.testing.assert_allclose(image, expected, atol=1e-5)


def test_augmentation_is_keyed_and_keeps_shape_and_range():
    windowed = np.random.default_rng(2).random((8, 32, 32, 3)).astype(np.float32)
    out = np.asarray(augment_batch(windowed, preprocess.augmentation_draws(0, 5, 8)))
    assert out.shape == windowed.shape and out.min() >= 0 and out.max() <= 1
    assert all(not np.allclose(o, w) for o, w in zip(out, windowed))
    again = augment_batch(windowed, preprocess.augmentation_draws(0, 5, 8))
    np.testing.assert_array_equal(again, out)
    other_step = augment_batch(windowed, preprocess.augmentation_draws(0, 6, 8))
    assert not np.allclose(other_step, out)


def test_augmentation_parameters_are_uniform_over_their_documented_ranges():
    """Over 8192 samples each parameter takes exactly its documented values, each about equally often (within 5
    binomial standard deviations), and the jitters are uniform on [-1, 1) (mean and variance of U(-1, 1))."""
    n, size = 8192, 32
    m = int(round(preprocess.SHIFT_FRACTION * size))
    draws = preprocess.augmentation_draws(3, 11, n)
    flip_x, flip_y, k, dy, dx, contrast, brightness = (np.asarray(v) for v in jax.vmap(
        preprocess.augmentation_parameters, (0, None))(draws, size))
    for values, support in ((flip_x, [False, True]), (flip_y, [False, True]), (k, range(4)),
                            (dy, range(-m, m + 1)), (dx, range(-m, m + 1))):
        counts = np.array([(values == v).sum() for v in support])
        p = 1 / len(support)
        assert counts.sum() == n and np.all(np.abs(counts - n * p) < 5 * np.sqrt(n * p * (1 - p))), counts
    for jitter in (contrast, brightness):
        assert jitter.min() >= -1 and jitter.max() < 1
        assert abs(jitter.mean()) < 5 * np.sqrt(1 / 3 / n) and abs(jitter.var() - 1 / 3) < 0.02


def test_augmentation_is_the_documented_steps_in_order():
    """The one-gather augmentation equals flip left-right, flip up-down, np.rot90 k times, shift with air, jitter,
    applied one after another in numpy with the same parameters."""
    image = np.random.default_rng(4).random((20, 20, 3)).astype(np.float32)
    m = int(round(preprocess.SHIFT_FRACTION * 20))
    for draws in preprocess.augmentation_draws(2, 7, 24):
        flip_x, flip_y, k, dy, dx, contrast, brightness = (np.asarray(v) for v in
                                                           preprocess.augmentation_parameters(draws, 20))
        x = image[:, ::-1] if flip_x else image
        x = x[::-1] if flip_y else x
        x = np.rot90(x, int(k), axes=(0, 1))
        x = np.pad(x, ((m, m), (m, m), (0, 0)))[m - dy:m - dy + 20, m - dx:m - dx + 20]
        expected = np.clip(x * (1 + preprocess.CONTRAST_JITTER * contrast) + preprocess.BRIGHTNESS_JITTER * brightness,
                           0, 1)
        np.testing.assert_allclose(np.asarray(augment(image, draws)), expected, atol=1e-6)


def test_augmentation_moves_pixels_as_a_flip_turn_and_shift():
    """With the intensity jitter undone, each augmented image is a dihedral transform of the input shifted by at most
    the documented fraction (zeros filling in): found by brute force over the 8 transforms and all shifts."""
    image = np.random.default_rng(3).random((16, 16, 1)).astype(np.float32) * 0.5 + 0.25
    m = int(round(preprocess.SHIFT_FRACTION * 16))
    for draws in preprocess.augmentation_draws(1, 0, 6):
        out = np.asarray(augment(image, draws))[..., 0]
        matches = 0
        for flip in (False, True):
            for k in range(4):
                moved = np.rot90(image[:, ::-1] if flip else image, k)[..., 0]
                for dy in range(-m, m + 1):
                    for dx in range(-m, m + 1):
                        shifted = np.zeros_like(moved)
                        shifted[max(dy, 0):16 + min(dy, 0), max(dx, 0):16 + min(dx, 0)] = \
                            moved[max(-dy, 0):16 + min(-dy, 0), max(-dx, 0):16 + min(-dx, 0)]
                        inside = shifted > 0
                        a, b = np.polyfit(shifted[inside], out[inside], 1)  # contrast and brightness
                        fit = np.clip(a * shifted + b, 0, 1)
                        matches += np.allclose(fit, out, atol=1e-5) and abs(a - 1) <= 0.1 + 1e-6
        assert matches >= 1


def test_epoch_sampler_draws_every_record_once_per_epoch_fixed_by_the_seed():
    keys = lambda sampler, n: np.array([sampler[k].record_key for k in range(n)])  # noqa: E731
    epochs = keys(pipeline.EpochSampler(23, seed=5), 3 * 23).reshape(3, 23)
    for epoch in epochs:
        np.testing.assert_array_equal(np.sort(epoch), np.arange(23))
    assert not np.array_equal(epochs[0], epochs[1])
    np.testing.assert_array_equal(keys(pipeline.EpochSampler(23, seed=5), 3 * 23), epochs.ravel())
    assert not np.array_equal(keys(pipeline.EpochSampler(23, seed=6), 23), epochs[0])


def test_radiomics_statistics_come_from_the_train_split(lidc_data):
    config = tiny_config(lidc_data)
    x = np.stack([ex["radiomics"] for ex in read_split(lidc_data, "train")]).astype(np.float64)
    stats = pipeline.RadiomicsStats.fit(pipeline.records(config.data, "train").radiomics)
    std = x.std(axis=0)
    np.testing.assert_allclose(stats.mean, x.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.std, np.where(std > 1e-12, std, 1.0), rtol=1e-5)
    z = stats.apply(x[:3])
    np.testing.assert_allclose(z, np.nan_to_num((x[:3] - x.mean(0)) / np.where(std > 1e-12, std, 1.0)),
                               rtol=1e-4, atol=1e-4)
    restored = pipeline.RadiomicsStats.from_json(stats.to_json())
    np.testing.assert_array_equal(restored.mean, stats.mean)
    np.testing.assert_array_equal(restored.std, stats.std)


@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_binary_scheme_drops_unsure(lidc_data, split):
    stored = np.array([ex["label"] for ex in read_split(lidc_data, split)])
    binary = tiny_config(lidc_data, label_scheme="binary").data
    if not np.any(stored != 1):
        with pytest.raises(pipeline.DatasetError, match="No .* examples"):
            pipeline.records(binary, split)
        return
    recs = pipeline.records(binary, split)
    assert len(recs) == int(np.sum(stored != 1))
    np.testing.assert_array_equal(recs.labels, (stored[stored != 1] == 2).astype(np.int32))
    three = pipeline.records(tiny_config(lidc_data).data, split)
    np.testing.assert_array_equal(three.labels, stored)


def _in_memory_records(n: int) -> pipeline.Records:
    """Records whose radiomics is the record number, so a batch tells which records it holds."""
    return pipeline.Records(views=np.full((n, 8, 8, 3), -1000, np.int16),
                            radiomics=np.arange(n, dtype=np.float32)[:, None], labels=np.zeros(n, np.int32))


@pytest.mark.parametrize("num_processes", [1, 2, 4])
def test_train_shards_are_disjoint_and_complete(num_processes):
    n, batch = 24, 4
    config = tiny_config("unused", batch_size=batch, image_size=8)
    stats = pipeline.RadiomicsStats(mean=np.zeros(1, np.float32), std=np.ones(1, np.float32))
    recs = _in_memory_records(n)
    seen = []
    for p in range(num_processes):
        loader = pipeline.train_loader(config.data, recs, stats, seed=0,
                                       shard_options=grain.ShardOptions(p, num_processes, drop_remainder=True))
        it = iter(loader)
        per_epoch = n // num_processes // (batch // num_processes)
        seen.append(np.concatenate([next(it)["radiomics"][:, 0] for _ in range(per_epoch)]).astype(int))
    everything = np.concatenate(seen)
    assert sorted(everything.tolist()) == list(range(n))  # complete and disjoint over one epoch


@pytest.mark.parametrize("num_processes", [1, 2, 4])
def test_eval_shards_are_disjoint_and_complete(num_processes):
    n, batch = 37, 8
    per_process = [np.concatenate(list(pipeline.eval_indices(n, batch, p, num_processes)))
                   for p in range(num_processes)]
    real = np.concatenate([i[i >= 0] for i in per_process])
    assert sorted(real.tolist()) == list(range(n))
    assert len({len(i) for i in per_process}) == 1  # every process runs the same number of batches


def test_missing_dataset_says_what_to_run(tmp_path):
    with pytest.raises(pipeline.DatasetError, match="autorad prepare"):
        pipeline.records(tiny_config(str(tmp_path)).data, "train")


def test_wrong_builder_config_is_named(lidc_data):
    with pytest.raises(pipeline.DatasetError, match="crop64_1mm.*autorad prepare"):
        pipeline.records(tiny_config(lidc_data, builder_config="crop64_1mm").data, "train")


def test_batches_match_example_to_inputs(lidc_data):
    """The in-memory records and the batched evaluation pass give what `example_to_inputs` gives per example."""
    config = tiny_config(lidc_data, eval_batch_size=4)
    examples = read_split(lidc_data, "train")
    recs = pipeline.records(config.data, "train")
    stats = pipeline.RadiomicsStats.fit(recs.radiomics)
    batch = next(pipeline.eval_batches(config.data, recs, stats))
    for row, i in enumerate(batch["index"]):
        expected = pipeline.example_to_inputs(examples[i], config.data, stats)
        np.testing.assert_array_equal(batch["view"][row], expected["view"])
        np.testing.assert_array_equal(batch["radiomics"][row], expected["radiomics"])
        assert recs.labels[i] == expected["label"]


def test_a_dataset_rebuilt_at_the_same_path_is_read_anew(lidc_data, built, tmp_path):
    """Within one process, records of a data_dir whose dataset was replaced come from the new dataset."""
    data_dir = tmp_path / "tfds"
    config = tiny_config(str(data_dir))
    lengths = {}
    for source in (lidc_data, built):
        if data_dir.exists():
            shutil.rmtree(data_dir)
        shutil.copytree(source, data_dir)
        lengths[source] = (len(pipeline.records(config.data, "train")), len(read_split(source, "train")))
    assert all(got == expected for got, expected in lengths.values())
    assert lengths[lidc_data] != lengths[built]
