"""Hospital CTs, on the real LIDC-IDRI slices: the series stored in any orientation predicts as the DICOM series, the
slices re-encoded in compressed transfer syntaxes build the uncompressed examples, a missing decoder is one line and
never cached, and a folder with a localizer, a second series and stray files builds the same nodule and names every
file it left out."""

import glob
import gzip
import io
import json
import os
import re
import shutil

import gdcm
import numpy as np
import PIL.Image
import pydicom
import pytest
import SimpleITK as sitk
from pydicom import uid as dicom_uid

import tfds_lidc
from autorad_jax import batch_predict, ct_input, predict as predict_lib, predictor as predictor_lib
from autorad_jax import report as report_lib
from autorad_jax.data import pipeline
from autorad_jax.errors import PredictInputError
from fault_checks import cli_exit
from lidc_testdata import CONFIG, read_all, tiny_config
from real_lidc import real_patient  # noqa: F401  (a fixture)
from tfds_lidc import (crop, ct_series, nodule_sample, orientation, radiomics_features, report, series_cache,
                       series_examples)

XML = "72.xml"


@pytest.fixture(scope="module")
def series_dir(real_patient) -> str:  # pylint: disable=redefined-outer-name
    """The real series folder (11 slices and 72.xml), a private copy."""
    (folder,) = {os.path.dirname(p) for p in glob.glob(os.path.join(real_patient, "*", "*", "*.dcm"))}
    return folder


def _copy_series(series_dir: str, dest) -> str:  # pylint: disable=redefined-outer-name
    """A copy of the series folder at dest/LIDC-IDRI-0003/<study>/<series> (a manual_dir of one patient)."""
    rel = os.path.relpath(series_dir, os.path.dirname(os.path.dirname(os.path.dirname(series_dir))))
    shutil.copytree(series_dir, os.path.join(dest, rel))
    return os.path.join(dest, rel)


def _task(manual: str, folder: str, cache_dir: str) -> series_examples.SeriesTask:
    config = pipeline.builder_config(CONFIG)
    return series_examples.SeriesTask(manual, os.path.relpath(folder, manual), "LIDC-IDRI-0003", config.crop_size,
                                      config.spacing_mm, config.consensus_level, config.radiomics_params, cache_dir,
                                      "test")


def _examples(manual: str, folder: str, cache_dir: str) -> tuple[dict, list[dict]]:
    entry = series_examples.process_series(_task(manual, folder, cache_dir))
    return entry, [features for _, features in series_examples.tfds_examples(cache_dir, entry, 0)]


# ------------------------------------------------------------------------------------------------------------------
# One orientation: the series as NIfTI in LPS, RAS and with permuted axes predicts as the DICOM series.
# ------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def random_model_predictor() -> predictor_lib.Predictor:
    """predict's model for crop32_1mm examples: a fixed random projection of the whole view and the radiomics to
    three logits (the orientation claims are about the model's inputs, which every logit here depends on)."""
    config = tiny_config("unused")
    names = list(radiomics_features.feature_names(pipeline.builder_config(CONFIG).radiomics_params))
    rng = np.random.default_rng(0)
    view_weights, radiomics_weights = rng.normal(size=(3, 32 * 32 * 3)), rng.normal(size=(3, len(names)))

    def probabilities(view: np.ndarray, radiomics: np.ndarray) -> np.ndarray:
        logits = (view_weights @ (view.ravel() / 1000.0) / 30.0
                  + radiomics_weights @ (np.sign(radiomics) * np.log1p(np.abs(radiomics))) / 10.0)
        return np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()

    stats = pipeline.RadiomicsStats(mean=np.zeros(len(names)), std=np.ones(len(names)))
    return predictor_lib.Predictor(
        data_config=config.data, stats=stats, feature_names=names, labels=["benign", "unsure", "malignant"],
        class_names=["benign", "unsure", "malignant"], probabilities=probabilities, source={"model": "random"},
        preprocessing={"builder_config": CONFIG, "crop_size": 32, "spacing_mm": 1.0, "consensus_level": 0.5})


@pytest.fixture
def predict(monkeypatch, random_model_predictor):  # pylint: disable=redefined-outer-name
    """predict.predict with the random-projection model."""
    monkeypatch.setattr(predictor_lib, "check_model_source", lambda workdir, export_dir: None)
    monkeypatch.setattr(predictor_lib, "load_predictor", lambda **_: random_model_predictor)
    return lambda **kw: predict_lib.predict(workdir="unused", **kw)


def _axes(image: sitk.Image) -> str:
    """Where the image's x, y, z index axes point, as DICOM letters ('LPS', 'RAS', 'SLP', ...)."""
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())


def _assert_same_nodule(got: dict, want: dict) -> None:
    np.testing.assert_allclose(list(got["probabilities"].values()), list(want["probabilities"].values()), atol=1e-4)
    np.testing.assert_allclose(got["centroid_mm"], want["centroid_mm"], atol=1e-3)
    np.testing.assert_allclose(got["diameter_mm"], want["diameter_mm"], atol=1e-3)
    np.testing.assert_allclose(list(got["radiomics"].values()), list(want["radiomics"].values()), rtol=1e-4,
                               atol=1e-6)


def _nifti_ras_point(path: str, index: np.ndarray) -> np.ndarray:
    """RAS mm of a continuous voxel index by the NIfTI-1 file's own sform (srow_x/y/z), as NIfTI tools show it."""
    with gzip.open(path, "rb") as f:
        header = f.read(348)
    assert np.frombuffer(header, "<i2", 1, 254)[0] > 0  # sform_code: the sform holds the scanner's coordinates
    affine = np.frombuffer(header, "<f4", 12, 280).reshape(3, 4).astype(np.float64)
    return affine[:, :3] @ index + affine[:, 3]


STORED = {"LPS": lambda image: image, "RAS": lambda image: sitk.DICOMOrient(image, "RAS"),
          "SLP": lambda image: sitk.PermuteAxes(image, [2, 0, 1])}  # z, x, y as the file's first, second, third axes


def test_any_stored_orientation_predicts_as_the_dicom_series(series_dir, predict, tmp_path):
    dicom = predict(ct=series_dir, xml=os.path.join(series_dir, XML))
    (by_readers,) = dicom["nodules"]
    centre = by_readers["centroid_mm"]
    (by_centre,) = predict(ct=series_dir, center=centre, diameter=10.0)["nodules"]
    image, series = ct_input.read_ct(series_dir)
    consensus = next(m for m, _ in ct_input.xml_masks(os.path.join(series_dir, XML), series, 0.5) if m is not None)
    full_mask = sitk.Resample(consensus, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    for code, store in STORED.items():
        ct_path, mask_path = str(tmp_path / f"ct_{code}.nii.gz"), str(tmp_path / f"mask_{code}.nii.gz")
        sitk.WriteImage(store(image), ct_path)
        sitk.WriteImage(store(full_mask), mask_path)
        assert _axes(sitk.ReadImage(ct_path)) == code  # the file stores those axes
        (nodule,) = predict(ct=ct_path, mask=mask_path)["nodules"]
        _assert_same_nodule(nodule, by_readers)
        (nodule,) = predict(ct=ct_path, center=centre, diameter=10.0)["nodules"]
        _assert_same_nodule(nodule, by_centre)
    # The centre in RAS mm, as the RAS file's own affine gives it, with coordinates='ras'.
    ras_path = str(tmp_path / "ct_RAS.nii.gz")
    index = np.asarray(sitk.ReadImage(ras_path).TransformPhysicalPointToContinuousIndex(centre))
    ras_centre = _nifti_ras_point(ras_path, index)
    assert not np.allclose(ras_centre, centre, atol=1.0)  # a point off the centre, were it read as LPS
    (nodule,) = predict(ct=ras_path, center=list(ras_centre), diameter=10.0, coordinates="ras")["nodules"]
    _assert_same_nodule(nodule, by_centre)


def _flip_rows_and_columns(folder: str) -> None:
    """Rewrites the series as a scanner stores a prone scan: rows run to the patient's right and columns to anterior
    (ImageOrientationPatient -1,0,0,0,-1,0), the same voxels at the same patient positions; the reader XML's pixel
    coordinates moved with them."""
    for path in ct_series.dicom_files(folder):
        ds = pydicom.dcmread(path)
        rows, columns = ds.Rows, ds.Columns
        dy, dx = (float(v) for v in ds.PixelSpacing)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.PixelData = np.ascontiguousarray(ds.pixel_array[::-1, ::-1]).tobytes()
        ds.ImageOrientationPatient = [-1, 0, 0, 0, -1, 0]
        ds.ImagePositionPatient = [x + (columns - 1) * dx, y + (rows - 1) * dy, z]
        ds.save_as(path)
    xml = os.path.join(folder, XML)
    with open(xml) as f:
        text = f.read()
    for tag, size in (("xCoord", columns), ("yCoord", rows)):
        text = re.sub(f"<{tag}>(\\d+)</{tag}>", lambda m, t=tag, n=size: f"<{t}>{n - 1 - int(m.group(1))}</{t}>", text)
    with open(xml, "w") as f:
        f.write(text)


def test_a_dicom_series_stored_prone_builds_and_predicts_as_stored_supine(series_dir, uncompressed, predict,
                                                                          tmp_path):
    manual = str(tmp_path)
    folder = _copy_series(series_dir, manual)
    _flip_rows_and_columns(folder)
    assert _axes(ct_series.load_ct_series(folder).image) == "RAS"
    entry, examples = _examples(manual, folder, str(tmp_path / "cache"))
    assert entry["nodules_written"] == uncompressed[0]["nodules_written"] != []
    for got, expected in zip(examples, uncompressed[1], strict=True):
        for name in series_cache.ARRAY_FEATURES:
            np.testing.assert_allclose(got[name], expected[name], rtol=1e-6, err_msg=name)
    (nodule,) = predict(ct=folder, xml=os.path.join(folder, XML))["nodules"]
    (supine,) = predict(ct=series_dir, xml=os.path.join(series_dir, XML))["nodules"]
    _assert_same_nodule(nodule, supine)


@pytest.mark.parametrize("view", sorted(report_lib.VIEW_AXES))
def test_report_letters_name_the_side_the_patients_left_back_and_top_are_on(view):
    """A volume bright only at the patient's left, posterior and superior of a nodule, stored in RAS: in each picture
    of the view the bright quarter lies at the sides whose letters are L, P or S."""
    lps = np.full((40, 40, 40), -800, np.int16)  # (z, y, x): x to the left, y to the back, z up
    lps[18:, 18:, 18:] = 1000
    mask = np.zeros(lps.shape, np.uint8)
    mask[17:23, 17:23, 17:23] = 1  # centroid at index 19.5: the crop's central slices lie at 19, 20, 21: bright
    image, nodule = sitk.GetImageFromArray(lps), sitk.GetImageFromArray(mask)
    sample = nodule_sample.nodule_example(sitk.DICOMOrient(image, "RAS"), sitk.DICOMOrient(nodule, "RAS"),
                                          crop_size=16, spacing_mm=1.0)
    pictures = pipeline.extract_view(sample.ct, view)
    for i, axes in enumerate(report_lib.VIEW_AXES[view]):
        rows, columns = np.nonzero(pictures[..., i] > 0)
        top, bottom, left, right = orientation.view_letters(*axes)
        assert rows.size and columns.size
        assert (bottom if rows.mean() > 8 else top) in "LPS" and (right if columns.mean() > 8 else left) in "LPS"
        assert {top, bottom} & set("LPS") and {left, right} & set("RAI")


def test_nodule_csv_takes_ras_rows_by_their_coordinates_column(series_dir, predict, tmp_path):
    """A CSV row in RAS mm (coordinates column 'ras'), one in LPS mm, one in the default convention (the option) and
    one with an unknown convention: the first three are the same nodule, the last a one-line error of its row."""
    (by_centre,) = predict(ct=series_dir, center=[72.5, 77.2, -190.4], diameter=10.0)["nodules"]
    rows = [("ras", "-72.5", "-77.2"), ("lps", "72.5", "77.2"), ("", "-72.5", "-77.2"), ("xyz", "72.5", "77.2")]
    with open(tmp_path / "nodules.csv", "w") as f:
        f.write("ct,coordX,coordY,coordZ,diameter_mm,coordinates\n")
        f.writelines(f"{series_dir},{x},{y},-190.4,10,{c}\n" for c, x, y in rows)
    summary = batch_predict.predict_csv(str(tmp_path / "nodules.csv"), str(tmp_path / "out"), workdir="unused",
                                        coordinates="ras")
    with open(summary["json"]) as f:
        results = json.load(f)["nodules"]
    for nodule in results[:3]:
        _assert_same_nodule(nodule, by_centre)
        assert nodule["series"]["slices"] == 11
    assert "coordinates 'xyz'" in results[3]["error"] and "\n" not in results[3]["error"]


def test_an_oblique_ct_is_cropped_along_the_patient_axes():
    """A gantry-tilted volume holding HU that grow linearly with the LPS position (which linear resampling reproduces
    exactly): the crop holds that function on the LPS grid around the nodule."""
    def hounsfield(points_mm: np.ndarray) -> np.ndarray:
        return points_mm @ np.array([3.0, -2.0, 5.0]) - 100.0

    tilt = np.radians(15.0)  # about x, as a gantry tilt; then 10 degrees about z
    direction = (np.array([[1, 0, 0], [0, np.cos(tilt), -np.sin(tilt)], [0, np.sin(tilt), np.cos(tilt)]])
                 @ np.array([[np.cos(0.17), -np.sin(0.17), 0], [np.sin(0.17), np.cos(0.17), 0], [0, 0, 1]]))
    origin, spacing, size = np.array([-20.0, -25.0, -15.0]), np.array([0.8, 0.8, 1.5]), np.array([50, 50, 30])
    index = np.stack(np.meshgrid(*(np.arange(n) for n in size), indexing="ij"), -1).reshape(-1, 3)
    points = origin + (index * spacing) @ direction.T
    values = np.round(hounsfield(points)).reshape(*size).transpose(2, 1, 0).astype(np.int16)
    ct = sitk.GetImageFromArray(values)
    mask = sitk.GetImageFromArray(np.pad(np.ones((6, 8, 8), np.uint8), ((12, 12), (21, 21), (21, 21))))
    for image in (ct, mask):
        image.SetOrigin(tuple(origin))
        image.SetSpacing(tuple(spacing))
        image.SetDirection(tuple(direction.ravel()))
    sample = nodule_sample.nodule_example(ct, mask, crop_size=8, spacing_mm=1.0)
    grid = np.stack(np.meshgrid(*(np.arange(8) - 3.5,) * 3, indexing="ij"), -1)  # (x, y, z) offsets, LPS axes
    expected = hounsfield(sample.centroid_mm + grid.reshape(-1, 3)).reshape(8, 8, 8).transpose(2, 1, 0)
    np.testing.assert_allclose(sample.ct, expected, atol=1.0)  # int16 rounding of the volume and of the crop


# ------------------------------------------------------------------------------------------------------------------
# Compressed DICOM: each lossless syntax builds the uncompressed examples; a syntax no decoder reads is one line.
# ------------------------------------------------------------------------------------------------------------------

SYNTAXES = {dicom_uid.JPEGLosslessSV1: gdcm.TransferSyntax.JPEGLosslessProcess14_1,
            dicom_uid.JPEGLSLossless: gdcm.TransferSyntax.JPEGLSLossless,
            dicom_uid.JPEG2000Lossless: gdcm.TransferSyntax.JPEG2000Lossless,
            dicom_uid.RLELossless: gdcm.TransferSyntax.RLELossless}


def _encode(folder: str, syntax) -> None:
    """Every slice of `folder` re-encoded in place by GDCM in the transfer syntax `syntax`."""
    for path in ct_series.dicom_files(folder):
        reader = gdcm.ImageReader()
        reader.SetFileName(path)
        assert reader.Read(), path
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(syntax))
        change.SetInput(reader.GetImage())
        assert change.Change(), path
        writer = gdcm.ImageWriter()
        writer.SetFileName(path)
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        assert writer.Write(), path


@pytest.fixture(scope="module")
def uncompressed(series_dir, tmp_path_factory):  # pylint: disable=redefined-outer-name
    """(entry, examples) of the real series as stored (explicit VR little endian)."""
    manual = str(tmp_path_factory.mktemp("uncompressed"))
    return _examples(manual, _copy_series(series_dir, manual), os.path.join(manual, "cache"))


@pytest.mark.parametrize("syntax", sorted(SYNTAXES), ids=lambda s: dicom_uid.UID(s).keyword)
def test_compressed_slices_build_the_uncompressed_examples(series_dir, uncompressed, syntax, tmp_path):
    manual = str(tmp_path)
    folder = _copy_series(series_dir, manual)
    _encode(folder, SYNTAXES[syntax])
    assert {pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID
            for p in ct_series.dicom_files(folder)} == {syntax}
    entry, examples = _examples(manual, folder, str(tmp_path / "cache"))
    want_entry, want = uncompressed
    assert entry["status"] == "read" and entry["nodules_written"] == want_entry["nodules_written"] != []
    for got, expected in zip(examples, want, strict=True):
        for name in series_cache.ARRAY_FEATURES:
            np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_jpeg_baseline_slices_read_as_pillow_decodes_them(series_dir, tmp_path):
    """JPEG baseline holds 8 bits: the slices at 8 HU per level (slope 8, intercept -1000), lossy-encoded by GDCM,
    read as Pillow decodes each frame (an independent JPEG decoder), and close to the 8-bit slices."""
    folder = _copy_series(series_dir, str(tmp_path))
    levels = {}
    for path in ct_series.dicom_files(folder):
        ds = pydicom.dcmread(path)
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        levels[float(ds.ImagePositionPatient[2])] = np.clip((hu + 1000) / 8, 0, 255).astype(np.uint8)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.RescaleSlope, ds.RescaleIntercept = 8, -1000
        ds.PixelData = levels[float(ds.ImagePositionPatient[2])].tobytes()
        ds.save_as(path)
    _encode(folder, gdcm.TransferSyntax.JPEGBaselineProcess1)
    series = ct_series.load_ct_series(folder)
    volume = sitk.GetArrayFromImage(series.image)
    for k, path in enumerate(sorted(ct_series.dicom_files(folder), key=lambda p: float(pydicom.dcmread(
            p, stop_before_pixels=True).ImagePositionPatient[2]))):
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == dicom_uid.JPEGBaseline8Bit
        frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
        by_pillow = np.asarray(PIL.Image.open(io.BytesIO(frame))).astype(np.int32)
        np.testing.assert_array_equal(volume[k], by_pillow * 8 - 1000)
        error = np.abs(by_pillow - levels[float(ds.ImagePositionPatient[2])])
        assert error.mean() < 0.25 and error.max() <= 4  # lossy: GDCM's default quality keeps nearly every level


def test_a_syntax_no_installed_decoder_reads_is_one_line_and_never_cached(series_dir, predict, monkeypatch,
                                                                        tmp_path):  # predict: its model for the CLI
    """HTJ2K (no decoder of it is installed here) stands for any syntax whose decoder is missing."""
    manual = str(tmp_path)
    folder = _copy_series(series_dir, manual)
    _encode(folder, gdcm.TransferSyntax.JPEG2000Lossless)
    for path in ct_series.dicom_files(folder):
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = dicom_uid.HTJ2KLossless
        ds.save_as(path)
    entry = series_examples.process_series(_task(manual, folder, str(tmp_path / "cache")))
    reason = entry["reason"]
    assert entry["status"] == "skipped" and "\n" not in reason
    assert "High-Throughput JPEG 2000" in reason and dicom_uid.HTJ2KLossless in reason
    assert "install pylibjpeg>=2.0 and pylibjpeg-openjpeg>=2.0" in reason and "corrupt" not in reason
    assert series_cache.load_entry(str(tmp_path / "cache"), entry["cache_key"])[0] is None  # read again next run
    assert "series_key" not in entry  # and out of the dataset's fingerprint, so the dataset is not reused as whole
    summary = report.summary(report.build([entry], {}, {}, "", manual), "build_report.json")
    assert "series skipped: 1 x no installed decoder reads transfer syntax High-Throughput JPEG" in summary
    message = cli_exit(monkeypatch, "predict", "--ct", folder, "--xml", os.path.join(folder, XML))
    assert isinstance(message, str) and "\n" not in message and "PredictInputError" in message
    assert "High-Throughput JPEG 2000" in message and "pylibjpeg-openjpeg" in message


# ------------------------------------------------------------------------------------------------------------------
# The right series out of a folder with a localizer, another reconstruction and stray files.
# ------------------------------------------------------------------------------------------------------------------

def _new_uids(ds: pydicom.Dataset, series_uid: str) -> pydicom.Dataset:
    ds.SeriesInstanceUID = series_uid
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    return ds


def _add_strays(folder: str) -> dict[str, str]:
    """Adds a localizer, a larger second reconstruction (13 slices: the largest stack), a dose report and a secondary
    capture to the series folder; returns {file: what it is}."""
    slices = sorted((pydicom.dcmread(p) for p in ct_series.dicom_files(folder)),
                    key=lambda ds: float(ds.ImagePositionPatient[2]))
    added = {}
    localizer = _new_uids(pydicom.dcmread(ct_series.dicom_files(folder)[5]), pydicom.uid.generate_uid())
    localizer.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    localizer.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # a coronal scout
    localizer.save_as(os.path.join(folder, "scout.dcm"))
    added["scout.dcm"] = "localizer"
    recon = pydicom.uid.generate_uid()
    spacing = float(slices[1].ImagePositionPatient[2]) - float(slices[0].ImagePositionPatient[2])
    for i in range(len(slices) + 2):  # the same slices and one more at each end: a larger stack than the XML's
        ds = _new_uids(pydicom.dcmread(slices[min(max(i - 1, 0), len(slices) - 1)].filename), recon)
        ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], float(slices[0].ImagePositionPatient[2])
                                   + (i - 1) * spacing]
        ds.save_as(os.path.join(folder, f"recon2-{i:02d}.dcm"))
        added[f"recon2-{i:02d}.dcm"] = "another series"
    dose = pydicom.Dataset()
    dose.file_meta = pydicom.dataset.FileMetaDataset()
    dose.file_meta.TransferSyntaxUID = dicom_uid.ExplicitVRLittleEndian
    dose.SOPClassUID = dose.file_meta.MediaStorageSOPClassUID = dicom_uid.XRayRadiationDoseSRStorage
    dose.Modality, dose.SeriesInstanceUID = "SR", pydicom.uid.generate_uid()
    dose.SOPInstanceUID = dose.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    dose.save_as(os.path.join(folder, "dose.dcm"), enforce_file_format=True)
    added["dose.dcm"] = "no image"
    capture = _new_uids(pydicom.dcmread(slices[0].filename), pydicom.uid.generate_uid())
    capture.SOPClassUID = capture.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    capture.save_as(os.path.join(folder, "capture.dcm"))
    added["capture.dcm"] = "secondary capture"
    return added


def test_a_folder_with_a_localizer_and_another_series_builds_the_same_nodule_and_names_the_rest(
        series_dir, uncompressed, predict, monkeypatch, capsys, tmp_path):
    manual = str(tmp_path / "manual")
    folder = _copy_series(series_dir, manual)
    added = _add_strays(folder)
    data_dir = tfds_lidc.prepare(manual, str(tmp_path / "data"), CONFIG)
    (counted,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("files left out")]
    assert sorted(counted.split(": ", 1)[1].split("; ")) == ["1 x localizer", "1 x no image", "1 x secondary capture",
                                                           "13 x another series"]
    with open(os.path.join(data_dir, report.REPORT_NAME)) as f:
        rep = json.load(f)
    ignored = {i["file"]: i["reason"] for i in rep["files_ignored"]}
    assert ignored.keys() == added.keys()
    for name, kind in added.items():
        assert ignored[name].startswith(kind), (name, ignored[name])
    (written,) = read_all(str(tmp_path / "data")).values()
    (expected,) = uncompressed[1]
    assert written["series_uid"].decode() == uncompressed[0]["series_uid"]
    for name in series_cache.ARRAY_FEATURES:
        np.testing.assert_array_equal(written[name], expected[name], err_msg=name)
    # predict reads the series the XML names, says so, and names the files it left out
    result = predict(ct=folder, xml=os.path.join(folder, XML))
    assert result["series"]["series_uid"] == uncompressed[0]["series_uid"] and result["series"]["slices"] == 11
    assert {i["file"] for i in result["series"]["files_ignored"]} == added.keys()
    # without an XML the largest axial stack, unless --series names another
    centre = list(result["nodules"][0]["centroid_mm"])
    assert predict(ct=folder, center=centre, diameter=10.0)["series"]["slices"] == 13
    chosen = predict(ct=folder, center=centre, diameter=10.0, series=uncompressed[0]["series_uid"])
    assert chosen["series"]["series_uid"] == uncompressed[0]["series_uid"]
    message = cli_exit(monkeypatch, "predict", "--ct", folder, "--series", "1.2.3", "--center",
                       ",".join(map(str, centre)), "--diameter", "10")
    assert "\n" not in message and "no slice of series 1.2.3 in the folder; it holds " in message


def test_a_slice_of_another_size_is_named_by_its_file(series_dir, tmp_path):
    folder = _copy_series(series_dir, str(tmp_path))
    path = ct_series.dicom_files(folder)[3]
    ds = pydicom.dcmread(path)
    ds.PixelData, ds.Rows = ds.pixel_array[:256].tobytes(), 256
    ds.save_as(path)
    with pytest.raises(PredictInputError, match=re.escape(
            f"slices differ from the others in orientation, size or pixel spacing: 1 of 11, {os.path.basename(path)} "
            f"({os.path.basename(path)}: size (256, 512) (the others: (512, 512)))")):
        ct_input.read_ct(folder)


@pytest.mark.parametrize("slope, intercept", [(None, None), (2, -2048), (0.5, -1024.25), (1.7, -1000.6)])
def test_hounsfield_units_are_read_as_simpleitk_rescales_the_slices(series_dir, slope, intercept, tmp_path):
    """The series in HU, to the nearest integer, as SimpleITK's GDCM series reader rescales it: the slices as stored
    (slope 1, intercept -1024), an integral rescale, and fractional ones (read through float64)."""
    folder = _copy_series(series_dir, str(tmp_path))
    if slope is not None:
        for path in ct_series.dicom_files(folder):
            ds = pydicom.dcmread(path)
            ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
            ds.save_as(path)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(folder))
    by_simpleitk = sitk.GetArrayFromImage(reader.Execute()).astype(np.float64)
    assert slope is not None or np.all(by_simpleitk == np.round(by_simpleitk))  # stored: integral HU
    ours = sitk.GetArrayFromImage(ct_series.load_ct_series(folder).image)
    assert ours.dtype == np.int16
    np.testing.assert_array_equal(ours, np.clip(np.round(by_simpleitk), -32768, 32767))


def test_the_crop_interpolates_the_int16_ct_as_its_float32_copy(series_dir):
    """crop.resample_ct on the stored int16 HU equals SimpleITK's linear resampling of the float32 volume, rounded."""
    ct, _ = ct_input.read_ct(series_dir)
    rng = np.random.default_rng(0)
    for _ in range(4):
        centre = ct.TransformContinuousIndexToPhysicalPoint(rng.uniform(0, np.array(ct.GetSize()) - 1).tolist())
        grid = crop.Grid(tuple(np.asarray(centre) - 15.3), (32, 32, 32), 0.9, tuple(np.eye(3).ravel()))
        reference = sitk.Resample(sitk.Cast(ct, sitk.sitkFloat32), grid.reference(), sitk.Transform(),
                                  sitk.sitkLinear, float(crop.AIR_HU), sitk.sitkFloat32)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(crop.resample_ct(ct, grid)),
                                      np.round(sitk.GetArrayFromImage(reference)))
