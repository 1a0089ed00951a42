"""predict and export on a trained workdir: generator scans against the built dataset's examples (scored by the
trainer's own evaluation path), both backends, every nodule source, bad inputs, report pictures and radiomic
attributions, CSV batch prediction and the export's model card."""

import csv
import glob
import gzip
import json
import os
import re
import shutil

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import tensorflow_datasets as tfds
from transformers import Aimv2Model

import tfds_lidc
from autorad_jax import export
from autorad_jax import ct_input, predictor as predictor_lib
from autorad_jax.data import pipeline, preprocess
from autorad_jax.ct_input import read_ct
from autorad_jax.errors import PredictInputError
from autorad_jax.predict import predict
from autorad_jax.train import checkpointing, experiment, trainer
from autorad_jax.weights.torch_model import ExportFolderError
from compiled import forward
from fault_checks import assert_one_line_error, cli, cli_exit, snapshot
from lidc_testdata import read_split
from real_lidc import real_patient  # noqa: F401  (a fixture)
from test_train import train_config


@pytest.fixture(scope="module")
def trained(lidc_data, tmp_path_factory):
    """The tiny model trained for 2 steps by the trainer: (config, workdir)."""
    workdir = str(tmp_path_factory.mktemp("predict_workdir"))
    config = train_config(lidc_data, num_steps=2)
    trainer.train_and_evaluate(config, workdir)
    return config, workdir


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    return export.export(trained[1], str(tmp_path_factory.mktemp("predict_export")))


def scored_examples(trained, data_dir: str) -> dict:
    """{(series_uid, nodule_index): (class probabilities, stored example)} of every stored example of the dataset in
    `data_dir`, scored by the trained model through the trainer's evaluation path (the 3-class scheme keeps every
    example of a split, in stored order)."""
    config, workdir = trained
    config = config.copy_and_resolve_references()
    config.data.data_dir = data_dir
    manager = checkpointing.make_manager(workdir, config.train.keep_checkpoints, read_only=True)
    step = checkpointing.best_step(manager)
    _, stats_json, spec = checkpointing.restore_meta(manager, step)
    stats = pipeline.RadiomicsStats.from_json(stats_json)
    exp = experiment.make_experiment(config, spec)
    state = checkpointing.restore_state(manager, step, exp.abstract_state)
    out = {}
    for split in tfds.builder("lidc_idri/crop32_1mm", data_dir=data_dir).info.splits.keys():
        recs = pipeline.records(config.data, split)
        probs = trainer.predict_records(exp, state, recs, stats)
        examples = read_split(data_dir, split)
        assert len(examples) == len(probs)
        for p, ex in zip(probs, examples):
            out[(ex["series_uid"].decode(), int(ex["nodule_index"]))] = (p, ex)
    manager.close()
    return out


@pytest.fixture(scope="module")
def reference(trained, lidc_data):
    """scored_examples of the dataset the model was trained on."""
    return scored_examples(trained, lidc_data)


@pytest.fixture(scope="module")
def scan(lidc_data, reference):
    """(series folder, reader XML, keys of its stored nodules) of the generated scan with the most stored nodules."""
    best = None
    for series_dir in sorted(glob.glob(os.path.join(os.path.dirname(lidc_data), "scans", "*", "*", "*"))):
        uid = os.path.basename(series_dir)
        keys = sorted(k for k in reference if k[0] == uid)
        if keys and (best is None or len(keys) > len(best[2])):
            best = (series_dir, glob.glob(os.path.join(series_dir, "*.xml"))[0], keys)
    return best


def probabilities(nodule: dict) -> np.ndarray:
    return np.array(list(nodule["probabilities"].values()))


@pytest.mark.parametrize("source,backend", [("workdir", "jax"), ("workdir", "torch"), ("export", "jax"),
                                            ("export", "torch")])
def test_predict_with_reader_xml_gives_the_dataset_examples_probabilities(trained, exported, reference, scan,
                                                                           source, backend):
    series_dir, xml, keys = scan
    where = {"workdir": trained[1]} if source == "workdir" else {"export_dir": exported}
    result = json.loads(json.dumps(predict(ct=series_dir, xml=xml, backend=backend, **where)))  # JSON-ready
    found = {(os.path.basename(series_dir), n["nodule_index"]): n for n in result["nodules"]}
    assert set(keys) <= set(found)
    for key in keys:
        expected, example = reference[key]
        nodule = found[key]
        np.testing.assert_allclose(probabilities(nodule), expected, atol=1e-5)
        assert nodule["label"] == list(nodule["probabilities"])[int(np.argmax(expected))]
        np.testing.assert_allclose(nodule["centroid_mm"], example["centroid_mm"], atol=1e-4)
        np.testing.assert_allclose(nodule["diameter_mm"], example["diameter_mm"], rtol=1e-6)
        np.testing.assert_allclose(list(nodule["radiomics"].values()), example["radiomics"], rtol=1e-6)
        assert nodule["volume_mm3"] > 0
    assert result["model"]["backend"] == backend


def test_real_slices_predict_with_the_reader_xml_as_their_dataset_example(trained, real_patient, tmp_path, capsys,
                                                                          monkeypatch):
    """LIDC-IDRI-0003's 11 real slices with the series' complete reader XML, through `run.py predict --ct --xml`: the
    one nodule the slices hold gets the probabilities the trainer's evaluation gives its dataset example; the three
    others are named with the reason."""
    from absl import flags
    from autorad_jax import cli as cli_lib, console
    data_dir = str(tmp_path / "data")
    tfds_lidc.prepare(os.path.dirname(real_patient), data_dir, "crop32_1mm")
    ((key, (expected, example)),) = scored_examples(trained, data_dir).items()
    (series_dir,) = glob.glob(os.path.join(real_patient, "*", "*"))
    monkeypatch.setattr(console, "quiet_third_party", lambda: None)  # process-wide filters, not for a test worker
    capsys.readouterr()
    try:
        cli_lib.main(cli_lib._parse_flags(["run.py", "predict", f"--ct={series_dir}",
                                           f"--xml={os.path.join(series_dir, '72.xml')}", f"--workdir={trained[1]}"]))
    finally:
        flags.FLAGS.unparse_flags()
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{"):])
    (nodule,) = result["nodules"]
    assert (os.path.basename(series_dir), nodule["nodule_index"]) == key and nodule["complete"]
    np.testing.assert_allclose(probabilities(nodule), expected, atol=1e-5)
    np.testing.assert_allclose(nodule["centroid_mm"], example["centroid_mm"], atol=1e-4)
    np.testing.assert_allclose(list(nodule["radiomics"].values()), example["radiomics"], rtol=1e-6)
    assert sorted(nodule["reader_malignancy"]) == sorted(r for r in example["ratings"] if r)
    skipped = result["nodules_skipped"]
    assert [n["nodule_index"] for n in skipped] == [i for i in range(4) if i != key[1]]
    none_here = r"marks on slices z = \S+ mm, none in this series \(the series holds -204\.0\.\.\.-179\.0\)"
    assert all(re.fullmatch(none_here, n["skipped"]) for n in skipped), skipped


def _full_grid_mask(series_dir: str, xml: str) -> tuple[sitk.Image, sitk.Image]:
    """The CT and the first nodule's consensus mask resampled onto the CT's whole grid."""
    image, series = ct_input.read_ct(series_dir)
    block = next(m for m, _ in ct_input.xml_masks(xml, series, 0.5) if m is not None)
    return image, sitk.Resample(block, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)


def test_predict_with_nifti_ct_and_nrrd_mask(exported, reference, scan, tmp_path):
    series_dir, xml, keys = scan
    image, mask = _full_grid_mask(series_dir, xml)
    sitk.WriteImage(image, str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(mask, str(tmp_path / "mask.nrrd"))
    result = predict(ct=str(tmp_path / "ct.nii.gz"), mask=str(tmp_path / "mask.nrrd"), export_dir=exported,
                     backend="torch")
    (nodule,) = result["nodules"]
    expected, example = reference[keys[0]]
    np.testing.assert_allclose(probabilities(nodule), expected, atol=1e-5)
    np.testing.assert_allclose(nodule["centroid_mm"], example["centroid_mm"], atol=1e-3)


def test_predict_with_centre_and_diameter_uses_a_sphere_and_says_so(exported, reference, scan):
    series_dir, _, keys = scan
    _, example = reference[keys[0]]
    center = [f"{v:.3f}" for v in example["centroid_mm"]]
    result = predict(ct=series_dir, center=center, diameter=8.0, export_dir=exported, backend="torch")
    (nodule,) = result["nodules"]
    assert "sphere" in nodule["mask"] and "sphere" in nodule["note"]
    assert abs(sum(nodule["probabilities"].values()) - 1) < 1e-5
    np.testing.assert_allclose(nodule["centroid_mm"], example["centroid_mm"], atol=1.0)
    assert 4 * np.pi / 3 * 4.0 ** 3 * 0.6 < nodule["volume_mm3"] < 4 * np.pi / 3 * 4.0 ** 3 * 1.6


def test_a_sphere_nodule_reads_only_the_slices_its_example_can_reach(exported, scan, tmp_path):
    """Of a DICOM series of even slices, a centre and diameter read the slices the largest crop reaches: the part of
    the whole series' grid, giving the whole series' example; a series with a missing slice is read whole."""
    whole, series = read_ct(scan[0])
    centre = whole.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in whole.GetSize()[:2]] + [2.0])
    center = [f"{v:.2f}" for v in centre]
    part, part_series = read_ct(scan[0], around=ct_input.sphere_region(center, 6.0))
    k0 = whole.TransformPhysicalPointToIndex(part.GetOrigin())[2]
    assert part_series.slices_not_read == whole.GetSize()[2] - part.GetSize()[2] > 0
    np.testing.assert_allclose(part.GetOrigin(), whole.TransformIndexToPhysicalPoint((0, 0, k0)), atol=1e-9)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(part),
                                  sitk.GetArrayFromImage(whole)[k0:k0 + part.GetSize()[2]])
    z = sorted(part.TransformIndexToPhysicalPoint((0, 0, k))[2] for k in (0, part.GetSize()[2] - 1))
    assert z[0] <= max(float(center[2]) - ct_input.CROP_REACH_MM, whole.GetOrigin()[2]) + 1e-6
    assert z[1] >= float(center[2]) + ct_input.CROP_REACH_MM
    samples = []
    for image, image_series in ((whole, series), (part, part_series)):
        (mask, _), = ct_input.nodule_masks(image, image_series, mask=None, center=center, diameter=6.0, xml=None,
                                            consensus_level=0.5)
        samples.append(tfds_lidc.nodule_example(image, mask, crop_size=64, spacing_mm=1.0))
    for name in ("ct", "mask", "radiomics", "centroid_mm", "padded"):
        np.testing.assert_array_equal(getattr(samples[1], name), getattr(samples[0], name), err_msg=name)
    result = predict(ct=scan[0], center=center, diameter=6.0, export_dir=exported)
    assert (result["series"]["slices"], result["series"]["slices_read"]) == (whole.GetSize()[2], part.GetSize()[2])
    np.testing.assert_allclose(result["nodules"][0]["centroid_mm"], samples[0].centroid_mm)

    gapped = shutil.copytree(scan[0], tmp_path / "gapped")
    os.remove(sorted(glob.glob(str(gapped / "*.dcm")), key=lambda p: float(pydicom.dcmread(
        p, stop_before_pixels=True).ImagePositionPatient[2]))[len(series.sop_uids) // 2])
    read_whole = read_ct(str(gapped))[0]
    read_part, gapped_series = read_ct(str(gapped), around=ct_input.sphere_region(center, 6.0))
    assert gapped_series.slices_not_read == 0 and any("interpolated" in n for n in gapped_series.notes)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_part), sitk.GetArrayFromImage(read_whole))


def test_export_holds_transformers_towers_and_the_dataset_radiomics_names(trained, exported, lidc_data):
    config, _ = trained
    _, info = Aimv2Model.from_pretrained(os.path.join(exported, "aimv2"), output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
    with open(os.path.join(exported, "autorad_lung.json")) as f:
        export_config = json.load(f)
    import tensorflow_datasets as tfds
    names = tfds.builder("lidc_idri/crop32_1mm", data_dir=lidc_data).info.metadata["radiomics_feature_names"]
    assert export_config["radiomics"]["feature_names"] == list(names)
    assert export_config["checkpoint"]["step"] == config.train.num_steps
    assert export_config["preprocessing"]["view"] == config.data.view


# ------------------------------------------------------------------------------------------------------------------
# Bad input.
# ------------------------------------------------------------------------------------------------------------------

def test_unreadable_ct_is_named(scan, tmp_path, exported):
    garbage = tmp_path / "ct.nrrd"
    garbage.write_bytes(b"NRRD0004\nnot really a volume\n" + os.urandom(64))
    with pytest.raises(PredictInputError, match=f"unreadable CT {garbage}"):
        predict(ct=str(garbage), center=["0", "0", "0"], diameter=5.0, export_dir=exported)
    series = shutil.copytree(scan[0], tmp_path / "series")
    first = sorted(glob.glob(str(series / "*.dcm")))[0]
    with open(first, "r+b") as f:
        f.truncate(300)
    with pytest.raises(PredictInputError, match="unreadable CT .*corrupt or truncated DICOM"):
        predict(ct=str(series), center=["0", "0", "0"], diameter=5.0, export_dir=exported)


def test_mask_on_another_grid_is_refused(scan, tmp_path, exported):
    image, mask = _full_grid_mask(scan[0], scan[1])
    mask.SetSpacing(tuple(s * 2 for s in mask.GetSpacing()))
    sitk.WriteImage(mask, str(tmp_path / "mask.nrrd"))
    with pytest.raises(PredictInputError, match=r"not on the CT's grid: its spacing \(mm\) is \([0-9.]+, "):
        predict(ct=scan[0], mask=str(tmp_path / "mask.nrrd"), export_dir=exported)


def test_centre_outside_the_volume_is_refused(scan, exported):
    with pytest.raises(PredictInputError,
                       match=r"centre \(0, 0, 5000\) mm is outside the CT volume, which spans \(-?\d"):
        predict(ct=scan[0], center=["0", "0", "5000"], diameter=6.0, export_dir=exported)


def test_incomplete_checkpoint_is_named(trained, tmp_path, scan):
    workdir = shutil.copytree(trained[1], tmp_path / "workdir")
    step_dir = workdir / "checkpoints" / str(trained[0].train.num_steps)
    shutil.rmtree(step_dir / "state")
    with pytest.raises(checkpointing.IncompatibleCheckpointError, match="lacks state: it is incomplete"):
        export.export(str(workdir), str(tmp_path / "out"), step=trained[0].train.num_steps)
    shutil.rmtree(workdir / "checkpoints")
    with pytest.raises(FileNotFoundError, match="No checkpoint folder"):
        predict(ct=scan[0], xml=scan[1], workdir=str(workdir))
    with pytest.raises(FileNotFoundError, match="No checkpoint folder"):  # said before the CT (not a CT) is read
        predict(ct=str(tmp_path), center=["0", "0", "5000"], diameter=6.0, workdir=str(workdir))


def test_checkpoint_of_another_model_is_refused(trained, tmp_path):
    workdir = shutil.copytree(trained[1], tmp_path / "workdir")
    for metadata in glob.glob(str(workdir / "checkpoints" / "*" / "model_spec" / "metadata")):
        spec = json.loads(open(metadata).read())
        spec["towers"]["text_config"]["hidden_size"] = 32  # the saved spec says: another architecture
        with open(metadata, "w") as f:
            json.dump(spec, f)
    with pytest.raises(checkpointing.IncompatibleCheckpointError, match="does not fit"):
        export.export(str(workdir), str(tmp_path / "out"))


def test_export_folder_incomplete_through_predict(exported, scan, tmp_path):
    folder = shutil.copytree(exported, tmp_path / "export")
    os.remove(folder / "aimv2" / "model.safetensors")
    with pytest.raises(ExportFolderError, match="missing aimv2/model.safetensors"):
        predict(ct=scan[0], xml=scan[1], export_dir=str(folder), backend="torch")


# ------------------------------------------------------------------------------------------------------------------
# Inputs predict refuses, or accepts only when told
# ------------------------------------------------------------------------------------------------------------------

def nifti_ct(scan, path) -> sitk.Image:
    image = sitk.Cast(read_ct(scan[0])[0], sitk.sitkInt16)
    sitk.WriteImage(image, str(path), True)
    return image


def test_truncated_nifti_ct_is_refused_naming_the_file(scan, exported, tmp_path):
    ct = tmp_path / "ct.nii.gz"
    image = nifti_ct(scan, ct)
    data = ct.read_bytes()
    ct.write_bytes(data[:len(data) * 2 // 3])
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(ct))).shape  # SimpleITK itself reads it, zero-filled
    promised = 352 + int(np.prod(image.GetSize())) * 2  # NIfTI-1: 348-byte header + extension flag, int16 voxels
    before = snapshot(tmp_path)
    proc = cli("predict", f"--ct={ct}", "--center=0,0,0", "--diameter=8", f"--export={exported}", cwd=tmp_path)
    assert_one_line_error(proc, f"CT {ct} is truncated", f"promises {promised} bytes")
    assert snapshot(tmp_path) == before
    whole = gzip.decompress(data)
    assert len(whole) == promised  # the reference count is what the intact file holds


def test_ct_values_outside_hounsfield_range_are_refused_unless_allowed(scan, tmp_path):
    ct = tmp_path / "ct.nrrd"
    image = nifti_ct(scan, tmp_path / "ct.nii.gz")
    scaled = sitk.Cast(image, sitk.sitkFloat32) * 10.0
    sitk.WriteImage(scaled, str(ct))
    values = sitk.GetArrayFromImage(scaled)
    with pytest.raises(PredictInputError, match=re.escape(f"{ct} has values from {values.min():g} to "
                                                          f"{values.max():g}, outside the plausible CT range")):
        read_ct(str(ct))
    wide = (float(values.min()), float(values.max()))
    assert read_ct(str(ct), hu_range=wide)[0].GetSize() == image.GetSize()
    scaled[0, 0, 0] = float("nan")
    sitk.WriteImage(scaled, str(ct))
    with pytest.raises(PredictInputError, match=f"{ct} holds 1 non-finite voxel values"):
        read_ct(str(ct), hu_range=wide)


def test_zero_nifti_spacing_is_refused(scan, tmp_path):
    ct = tmp_path / "ct.nii"
    nifti_ct(scan, ct)
    header = bytearray(ct.read_bytes())
    header[88:92] = np.float32(0.0).tobytes()  # pixdim[3], the slice spacing (SimpleITK would read it as 1 mm)
    ct.write_bytes(bytes(header))
    with pytest.raises(PredictInputError, match=re.escape(f"{ct} has voxel spacing (NIfTI pixdim) [") +
                       r".*, 0\.0\] mm"):
        read_ct(str(ct))


def test_patient_folder_as_ct_names_the_series_folders_below_it(scan, tmp_path):
    patient = os.path.dirname(os.path.dirname(scan[0]))  # <patient>/<study>/<series>, the TCIA layout
    with pytest.raises(PredictInputError, match=re.escape(f"unreadable CT {patient}: no DICOM files in the folder "
                                                          f"itself; give one series folder as --ct: {scan[0]}.")):
        read_ct(patient)
    with pytest.raises(PredictInputError, match=re.escape(f"unreadable CT {tmp_path}: no DICOM files in it or in "
                                                          "its subfolders.")):
        read_ct(str(tmp_path))
    linked = tmp_path / "linked_patient" / "study"  # a patient folder whose series are symlinks, one to itself too
    linked.mkdir(parents=True)
    os.symlink(scan[0], linked / "series")
    os.symlink(linked, linked / "loop")
    with pytest.raises(PredictInputError, match=re.escape(f"give one series folder as --ct: {linked / 'series'}.")):
        read_ct(str(tmp_path / "linked_patient"))


def test_implausible_diameter_or_mask_volume_is_refused(scan, exported, tmp_path):
    image, series = read_ct(scan[0])
    centre = image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in image.GetSize()])
    for diameter in (500.0, 1.0):
        with pytest.raises(PredictInputError, match=f"--diameter from 3 to 60 mm.*got {diameter}"):
            predict(ct=scan[0], center=list(centre), diameter=diameter, export_dir=exported)
    whole = sitk.Image(image.GetSize(), sitk.sitkUInt8) + 1
    whole.CopyInformation(image)
    sitk.WriteImage(whole, str(tmp_path / "lung.nrrd"))
    volume = np.prod(image.GetSize()) * np.prod(image.GetSpacing())
    with pytest.raises(PredictInputError, match=f"holds {np.prod(image.GetSize())} voxels, {volume:.1f} mm"):
        predict(ct=scan[0], mask=str(tmp_path / "lung.nrrd"), export_dir=exported)


def _edit_xml(xml: str, out, pattern: str, repl: str) -> str:
    text = open(xml).read()
    edited, n = re.subn(pattern, repl, text, count=1, flags=re.S)
    assert n == 1
    out.write_text(edited)
    return str(out)


def test_xml_without_series_uid_needs_the_users_word(scan, exported, tmp_path):
    anonymous = _edit_xml(scan[1], tmp_path / "reader.xml", r"<SeriesInstanceUid>[^<]*</SeriesInstanceUid>", "")
    with pytest.raises(PredictInputError, match=f"reader XML {anonymous} names no series.*--xml_matches_ct"):
        predict(ct=scan[0], xml=anonymous, export_dir=exported)
    got = predict(ct=scan[0], xml=anonymous, export_dir=exported, xml_matches_ct=True)
    want = predict(ct=scan[0], xml=scan[1], export_dir=exported)
    assert [n["probabilities"] for n in got["nodules"]] == [n["probabilities"] for n in want["nodules"]]


def test_nodule_with_reader_marks_on_no_slice_is_incomplete_and_predicted_only_when_asked(scan, exported, tmp_path):
    # One more outline, on a slice 10 m away that no series holds, in the first nodule that has characteristics.
    stray = ("<roi><imageZposition>10000.0</imageZposition><imageSOP_UID>1.2.3.stray</imageSOP_UID>"
             "<inclusion>TRUE</inclusion><edgeMap><xCoord>10</xCoord><yCoord>10</yCoord></edgeMap>"
             "<edgeMap><xCoord>11</xCoord><yCoord>11</yCoord></edgeMap></roi>")
    xml = _edit_xml(scan[1], tmp_path / "reader.xml", r"(<characteristics>.*?</characteristics>)", r"\1" + stray)
    whole = {n["nodule_index"]: n for n in predict(ct=scan[0], xml=scan[1], export_dir=exported)["nodules"]}
    got = predict(ct=scan[0], xml=xml, export_dir=exported)
    (cut,) = [n for n in got["nodules_skipped"] if not n["complete"]]  # the others: the demo's mark < 3 mm
    assert cut["skipped"].startswith("marks on 1 of ") and "outside the series: incomplete" in cut["skipped"]
    assert all(n["complete"] for n in got["nodules"])
    assert [i for i in cut["xml_issues"] if "z=10000.00 (SOP 1.2.3.stray) matches no slice" in i], cut["xml_issues"]
    assert len(got["nodules"]) == len(whole) - 1
    kept = predict(ct=scan[0], xml=xml, export_dir=exported, keep_incomplete=True)["nodules"]
    (flagged,) = [n for n in kept if not n["complete"]]
    assert len(kept) == len(whole) and flagged["nodule_index"] == cut["nodule_index"]
    # The series holds the same outlines: the same mask, the same probabilities (lesions are ordered by their marks'
    # mean slice, which the far outline moves, so the nodule is found by its centroid).
    (same,) = [n for n in whole.values() if np.allclose(n["centroid_mm"], flagged["centroid_mm"])]
    assert flagged["probabilities"] == same["probabilities"]


# ------------------------------------------------------------------------------------------------------------------
# Report pictures, radiomic attributions, batch prediction, the model card, the quiet command line.
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("source,backend", [("workdir", "jax"), ("export", "torch")])
def test_report_pictures_from_workdir_and_export(trained, exported, reference, scan, source, backend, tmp_path):
    from matplotlib import image as mpimg
    from autorad_jax import report
    _, example = reference[scan[2][0]]
    where = {"workdir": trained[1]} if source == "workdir" else {"export_dir": exported}
    result = predict(ct=scan[0], center=[f"{v:.3f}" for v in example["centroid_mm"]], diameter=8.0, backend=backend,
                     report_dir=str(tmp_path), **where)
    (picture,) = result["report"]["pictures"]
    height, width, _ = mpimg.imread(picture).shape
    assert (width, height) == (report.FIGSIZE[0] * report.DPI, report.FIGSIZE[1] * report.DPI)
    with open(result["report"]["html"]) as f:
        assert f'src="{os.path.basename(picture)}"' in f.read()
    (top,) = result["report"]["top_radiomics"]
    assert len(top) == report.TOP_FEATURES and set(top) <= set(result["nodules"][0]["radiomics"])


def test_top_radiomic_attributions_are_gradient_times_input_of_named_features(trained, reference, scan, lidc_data):
    import tensorflow_datasets as tfds
    from autorad_jax import report
    predictor = predictor_lib.load_predictor(workdir=trained[1])
    _, example = reference[scan[2][0]]
    view = pipeline.example_to_inputs(example, predictor.data_config, predictor.stats)["view"]
    image = np.asarray(preprocess.images(view[None], preprocess.Preprocessing.from_config(predictor.data_config))[0])
    explain_fn = report.explainer(predictor.jax_model)
    raw = np.asarray(example["radiomics"], np.float32)
    exp = report.explain(explain_fn, image, predictor.stats.apply(raw))
    top = report.top_features(exp.attributions)
    names = tfds.builder("lidc_idri/crop32_1mm", data_dir=lidc_data).info.metadata["radiomics_feature_names"]
    assert {predictor.feature_names[j] for j in top} <= set(names) and len(top) == report.TOP_FEATURES
    assert np.abs(exp.attributions[top[0]]) > 0
    assert all(exp.saliency[..., v].std() > 0 for v in range(3))  # where the model looked, over each view
    np.testing.assert_allclose(exp.probabilities, reference[scan[2][0]][0], atol=1e-5)

    def logit(z):  # the predicted class's logit by a plain forward pass
        logits, _ = forward(predictor.jax_model, image[None], z[None].astype(np.float32))
        return float(np.asarray(logits)[0, exp.predicted])

    z, h = predictor.stats.apply(raw).astype(np.float64), 1e-2
    for j in top[:2]:  # gradient x input against central differences
        step = np.eye(len(z))[j] * h
        expected = (logit(z + step) - logit(z - step)) / (2 * h) * z[j]
        np.testing.assert_allclose(exp.attributions[j], expected, rtol=0.05, atol=1e-4)
    changed = raw.copy()
    changed[top[0]] = predictor.stats.mean[top[0]] + 3 * predictor.stats.std[top[0]] * -np.sign(z[top[0]] or 1)
    moved = report.explain(explain_fn, image, predictor.stats.apply(changed))
    assert abs(moved.attributions[top[0]] - exp.attributions[top[0]]) > 1e-3 * abs(exp.attributions[top[0]])


def _luna_csv(path, reference, keys, bad_uid: str) -> list[dict]:
    """A LUNA16 annotations.csv of the stored nodules `keys` (centre from the dataset, diameter 8 mm) with one row of a
    series that is not there, second."""
    rows = [{"seriesuid": uid, "coordX": c[0], "coordY": c[1], "coordZ": c[2], "diameter_mm": 8.0}
            for uid, c in ((k[0], reference[k][1]["centroid_mm"]) for k in keys)]
    rows.insert(1, {**rows[0], "seriesuid": bad_uid})
    with open(path, "w") as f:
        f.write("seriesuid,coordX,coordY,coordZ,diameter_mm\n")
        f.writelines(f"{r['seriesuid']},{r['coordX']:.3f},{r['coordY']:.3f},{r['coordZ']:.3f},{r['diameter_mm']}\n"
                     for r in rows)
    return rows


def test_luna16_csv_predicts_as_one_at_a_time_and_a_bad_row_keeps_its_error(exported, reference, scan, lidc_data,
                                                                             tmp_path):
    from autorad_jax import batch_predict
    series_dir, _, keys = scan
    rows = _luna_csv(tmp_path / "annotations.csv", reference, keys[:2], "1.2.3.404")  # 2 nodules, 1 bad row
    ct_root = os.path.join(os.path.dirname(lidc_data), "scans")
    summary = batch_predict.predict_csv(str(tmp_path / "annotations.csv"), str(tmp_path / "out"), export_dir=exported,
                                        ct_root=ct_root)
    assert (summary["rows"], summary["predicted"], summary["errors"]) == (len(rows), len(rows) - 1, 1)
    with open(summary["json"]) as f:
        out = json.load(f)["nodules"]
    with open(summary["csv"]) as f:
        table = list(csv.DictReader(f))
    assert [int(r["row"]) for r in table] == [r["row"] for r in out] == list(range(1, len(rows) + 1))
    assert "1.2.3.404 is not under --ct_root" in out[1]["error"] and "1.2.3.404" in table[1]["error"]
    for row, got, flat in zip(rows, out, table):
        if row["seriesuid"] == "1.2.3.404":
            continue
        alone = predict(ct=series_dir, center=[f"{row[c]:.3f}" for c in ("coordX", "coordY", "coordZ")],
                        diameter=8.0, export_dir=exported)["nodules"][0]
        np.testing.assert_allclose(probabilities(got), probabilities(alone), atol=1e-6)
        np.testing.assert_allclose([float(flat[f"p_{k}"]) for k in alone["probabilities"]], probabilities(alone),
                                   atol=1e-6)
        assert got["error"] == "" and got["label"] == alone["label"]


def test_nodule_table_with_a_row_in_error_ends_the_command_with_status_1_after_writing_all(exported, tmp_path,
                                                                                          monkeypatch):
    from autorad_jax import cli as cli_lib
    (tmp_path / "nodules.csv").write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n1.2.3.404,1,2,3,8\n")
    table = tmp_path / "out" / "predictions.csv"
    code = cli_exit(monkeypatch, "predict", f"--nodules={tmp_path / 'nodules.csv'}", f"--ct_root={tmp_path}",
                    f"--export={exported}", f"--out={tmp_path / 'out'}")
    assert code == f"{cli_lib._PROG} predict: 1 of 1 rows could not be predicted; each row's error is in {table}."
    with open(table) as f:
        (row,) = csv.DictReader(f)
    assert "1.2.3.404 is not under --ct_root" in row["error"]


def test_export_has_a_model_card_naming_demo_data_and_the_workdir_metrics(trained, exported):
    import yaml
    text = open(os.path.join(exported, "README.md")).read()
    _, front, body = text.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "autorad-jax" and "demo-data" in meta["tags"]
    assert "SIMULATED" in body and "Research only" in body
    with open(os.path.join(trained[1], "metrics.json")) as f:
        metrics = json.load(f)
    low, high = metrics["ci95"]["accuracy"]
    assert f"| accuracy | {metrics['accuracy']:.3f} | {low:.3f} – {high:.3f} |" in body
    (result,) = meta["model-index"][0]["results"]
    assert {m["type"]: m["value"] for m in result["metrics"]}["accuracy"] == round(metrics["accuracy"], 4)
