"""Faults a user meets: inputs predict must refuse (or accept only when told), a workdir two runs write at once, a
metrics log after resumes, and a diverged run continued as its error message says."""

import gzip
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from autorad_jax.predict import PredictInputError, predict, read_ct
from test_predict import exported, reference, scan, trained  # noqa: F401  (module fixtures, shared by import)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def snapshot(folder) -> dict[str, tuple[int, int]]:
    """path -> (size, mtime_ns) of every file under `folder`."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            st = os.stat(os.path.join(root, name))
            out[os.path.join(root, name)] = (st.st_size, st.st_mtime_ns)
    return out


def cli(*args: str, cwd) -> subprocess.CompletedProcess:
    """`python run.py ARGS` in `cwd`, on the CPU."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, *parts: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "Error:" in line]
    assert len(lines) == 1, proc.stderr
    for part in parts:
        assert part in lines[0], lines[0]


def nifti_ct(scan, path) -> sitk.Image:
    image = sitk.Cast(read_ct(scan[0])[0], sitk.sitkInt16)
    sitk.WriteImage(image, str(path), True)
    return image


# ------------------------------------------------------------------------------------------------------------------
# predict's inputs
# ------------------------------------------------------------------------------------------------------------------

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


def test_reader_marks_on_no_slice_are_listed(scan, exported, tmp_path):
    # One more outline, on a slice 10 m away that no series holds, in the first nodule that has characteristics.
    stray = ("<roi><imageZposition>10000.0</imageZposition><imageSOP_UID>1.2.3.stray</imageSOP_UID>"
             "<inclusion>TRUE</inclusion><edgeMap><xCoord>10</xCoord><yCoord>10</yCoord></edgeMap>"
             "<edgeMap><xCoord>11</xCoord><yCoord>11</yCoord></edgeMap></roi>")
    xml = _edit_xml(scan[1], tmp_path / "reader.xml", r"(<characteristics>.*?</characteristics>)", r"\1" + stray)
    got = predict(ct=scan[0], xml=xml, export_dir=exported)
    issues = got["nodules"][0]["xml_issues"]
    assert [i for i in issues if "z=10000.00 (SOP 1.2.3.stray) matches no slice" in i], issues
