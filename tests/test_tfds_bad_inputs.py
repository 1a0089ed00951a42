"""Every kind of bad LIDC-IDRI input is handled and recorded in build_report.json."""
import collections
import os
import re
import shutil

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

import tfds_lidc
from tfds_lidc import ct_series, nodules, radiomics_features, report, series_examples, xml_reader

CONFIG = 'crop32_1mm'


@pytest.fixture(scope='module')
def good(tmp_path_factory) -> str:
    """One demo series (downsampled, so small) in its own manual_dir."""
    out = str(tmp_path_factory.mktemp('good'))
    tfds_lidc.synth.generate(out, 1, seed=1, downsample=2, max_slices=40, verbose=False)
    return out


def _copy(good: str, dest: str, patient: str) -> str:  # pylint: disable=redefined-outer-name
    shutil.copytree(os.path.join(good, os.listdir(good)[0]), os.path.join(dest, patient))
    for root, _, files in os.walk(os.path.join(dest, patient)):
        if any(f.endswith('.dcm') for f in files):
            return root
    raise FileNotFoundError(patient)


def _middle(series_dir: str) -> str:
    files = ct_series.dicom_files(series_dir)
    return files[len(files) // 2]


def _xml(series_dir: str) -> str:
    return next(os.path.join(series_dir, f) for f in os.listdir(series_dir) if f.endswith('.xml'))


def _corrupt(d):
    path = _middle(d)
    data = open(path, 'rb').read()
    open(path, 'wb').write(data[:len(data) // 2])


def _missing_slice(d):
    os.remove(_middle(d))


def _uneven(d):
    path = _middle(d)
    ds = pydicom.dcmread(path)
    ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], float(ds.ImagePositionPatient[2]) + 0.4 *
                               float(ds.SliceThickness)]
    ds.save_as(path)


def _duplicate(d, change_pixels=False):
    """A second file of the middle slice (new SOP UID), with the same or different pixels."""
    ds = pydicom.dcmread(_middle(d))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    if change_pixels:
        ds.PixelData = (ds.pixel_array + 1).astype(ds.pixel_array.dtype).tobytes()
    ds.save_as(os.path.join(d, 'zz-duplicate.dcm'))


def _ratings(d):
    """Every malignancy of the first nodule's readers made invalid (0 or 7) and one of its rois a single point."""
    text = open(_xml(d)).read()
    text = re.sub(r'<malignancy>\d</malignancy>', '<malignancy>0</malignancy>', text)
    text = text.replace('<malignancy>0</malignancy>', '<malignancy>7</malignancy>', 1)
    text = re.sub(r'(<roi>(?:(?!</roi>).)*?</edgeMap>)(?:\s*<edgeMap>.*?</edgeMap>)+(\s*</roi>)', r'\1\2', text,
                  count=1, flags=re.S)
    open(_xml(d), 'w').write(text)


def _bad_xml(d):
    open(_xml(d), 'w').write('<LidcReadMessage xmlns="http://www.nih.gov"><readingSession>')


def _roi_no_slice(d):
    text = open(_xml(d)).read()
    text = re.sub(r'<imageZposition>[^<]*</imageZposition>\s*<imageSOP_UID>[^<]*</imageSOP_UID>',
                  '<imageZposition>99999.0</imageZposition><imageSOP_UID>1.2.3.4</imageSOP_UID>', text, count=1)
    open(_xml(d), 'w').write(text)


def _no_nodules(d):
    text = open(_xml(d)).read()
    text = re.sub(r'<characteristics>.*?</characteristics>', '', text, flags=re.S)
    open(_xml(d), 'w').write(text)


def _second_xml(d):
    shutil.copy(_xml(d), os.path.join(d, 'zz-second.xml'))


VARIANTS = {
    'LIDC-IDRI-9001': (_corrupt, 'corrupt or truncated DICOM'),
    'LIDC-IDRI-9004': (_bad_xml, 'reader XML does not parse'),
    'LIDC-IDRI-9008': (lambda d: _duplicate(d, change_pixels=True), 'two different slices at position'),
}
# Read, with a note in the report: interpolated onto a regular grid, or a duplicate slice dropped.
NOTED = {'LIDC-IDRI-9002': (_missing_slice, 'interpolated'), 'LIDC-IDRI-9003': (_uneven, 'interpolated'),
         'LIDC-IDRI-9009': (_duplicate, 'duplicate slice'),
         'LIDC-IDRI-9011': (_second_xml, 'zz-second.xml not read (the same file content)')}


def test_missing_or_empty_manual_dir_fails_with_instructions(tmp_path):
    for manual in (str(tmp_path / 'absent'), str(tmp_path)):
        with pytest.raises(FileNotFoundError, match='LIDC-IDRI-0001/'):
            tfds_lidc.prepare(manual, str(tmp_path / 'data'), CONFIG)


def _task(manual: str, series_dir: str, patient: str, cache_dir: str) -> series_examples.SeriesTask:
    return series_examples.SeriesTask(manual, os.path.relpath(series_dir, manual), patient, 32, 1.0, 0.5,
                                      radiomics_features.DEFAULT_PARAMS, cache_dir, 'test')


def test_bad_series_are_skipped_and_reported(good, tmp_path):  # pylint: disable=redefined-outer-name
    manual, cache_dir = str(tmp_path / 'manual'), str(tmp_path / 'cache')
    dirs = {}
    for patient, (damage, _) in list(VARIANTS.items()) + list(NOTED.items()):
        dirs[patient] = _copy(good, manual, patient)
        damage(dirs[patient])
    dirs['LIDC-IDRI-9005'] = _copy(good, manual, 'LIDC-IDRI-9005')
    _roi_no_slice(dirs['LIDC-IDRI-9005'])
    dirs['LIDC-IDRI-9006'] = _copy(good, manual, 'LIDC-IDRI-9006')
    _no_nodules(dirs['LIDC-IDRI-9006'])
    dirs['LIDC-IDRI-9010'] = _copy(good, manual, 'LIDC-IDRI-9010')
    _ratings(dirs['LIDC-IDRI-9010'])
    entries = [series_examples.process_series(_task(manual, d, p, cache_dir)) for p, d in dirs.items()]
    written = {e['patient_id']: e['nodules_written'] for e in entries}
    rep = report.build(entries, {}, {}, '', manual)
    skipped = {e['patient_id']: e['reason'] for e in rep['series_skipped']}
    assert skipped.keys() == VARIANTS.keys()
    for patient, (_, reason) in VARIANTS.items():
        assert reason in skipped[patient], skipped[patient]
        assert not written[patient]
    issues = {e['patient_id']: e['issues'] for e in rep['series']}
    for patient, (_, note) in NOTED.items():
        assert any(note in i for i in issues[patient]), issues[patient]
        assert written[patient]
    outlined = collections.defaultdict(list)  # each patient's lesions with readers' outlines (>= 3 mm)
    for lesion in rep['lesion_entries']:
        if lesion['readers']:
            outlined[lesion['patient_id']].append(lesion)
    num_lesions = len(outlined['LIDC-IDRI-9011'])  # the XML as generated
    assert num_lesions and [les['status'] for les in outlined['LIDC-IDRI-9011']] == ['written'] * num_lesions
    # A series that cannot be read lists its XML's lesions as skipped with the series' reason; a bad XML none.
    for patient in ('LIDC-IDRI-9001', 'LIDC-IDRI-9008'):
        assert len(outlined[patient]) == num_lesions
        assert all(les['reason'] == f'series skipped: {skipped[patient]}' for les in outlined[patient])
    assert not [les for les in rep['lesion_entries'] if les['patient_id'] == 'LIDC-IDRI-9004']
    # No valid malignancy anywhere: every nodule is skipped and named, none labelled; the single-point roi dropped.
    assert not written['LIDC-IDRI-9010'] and len(outlined['LIDC-IDRI-9010']) == num_lesions
    assert any('single-point roi' in i for les in outlined['LIDC-IDRI-9010'] for i in les['issues'])
    assert all('no reader gave a valid malignancy' in les['reason'] for les in outlined['LIDC-IDRI-9010'])
    # An roi on a slice the series lacks: its lesion is incomplete, skipped and named with the roi, the others written.
    (cut,) = [les for les in outlined['LIDC-IDRI-9005'] if les['status'] == 'skipped']
    assert cut['kind'] == nodules.INCOMPLETE and cut['reason'].startswith('marks on 1 of ')
    assert any('z=99999.00 (SOP 1.2.3.4) matches no slice' in i for i in cut['issues'])
    assert len(written['LIDC-IDRI-9005']) == num_lesions - 1 and not cut['complete']
    assert any('no nodule with characteristics' in i for i in issues['LIDC-IDRI-9006'])
    assert not written['LIDC-IDRI-9006']
    assert rep['series_read'] == 7 and not rep['errors']


def test_slices_without_extension_are_read_and_a_dicomdir_left_out(good, tmp_path):  # pylint: disable=redefined-outer-name
    series_dir = _copy(good, str(tmp_path), 'LIDC-IDRI-0001')
    bare = tmp_path / 'bare'
    bare.mkdir()
    for i, path in enumerate(ct_series.dicom_files(series_dir)):
        shutil.copy(path, bare / f'IM{i:05d}')
    shutil.copy(_middle(series_dir), bare / 'DICOMDIR')  # an index file beside the slices (a real one is no image)
    (bare / 'notes.txt').write_text('not DICOM')
    ours, reference = ct_series.load_ct_series(str(bare)), ct_series.load_ct_series(series_dir)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ours.image), sitk.GetArrayFromImage(reference.image))
    assert (ours.image.GetOrigin(), ours.image.GetSpacing()) == (reference.image.GetOrigin(),
                                                                 reference.image.GetSpacing())
    assert ours.sop_uids == reference.sop_uids and ours.notes == reference.notes == []


def test_two_series_in_one_folder_read_the_larger_and_name_the_others_files(  # pylint: disable=redefined-outer-name
        good, tmp_path):
    series_dir = _copy(good, str(tmp_path), 'LIDC-IDRI-0001')
    files = ct_series.dicom_files(series_dir)
    reference = ct_series.load_ct_series(series_dir)
    other = pydicom.uid.generate_uid()
    for i, path in enumerate(files[:3]):  # three slices of another series copied in
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = other
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(os.path.join(series_dir, f'other-{i}.dcm'))
    series = ct_series.load_ct_series(series_dir)
    assert series.series_uid == reference.series_uid and series.sop_uids == reference.sop_uids
    assert [f['file'] for f in series.files_ignored] == [f'other-{i}.dcm' for i in range(3)]
    assert all(f['reason'].startswith(f'another series ({other}, 3 slices; the largest axial CT stack is '
                                      f'{reference.series_uid})') for f in series.files_ignored)
    chosen = ct_series.load_ct_series(series_dir, [other])  # the series asked for, the others' files named
    assert chosen.series_uid == other and len(chosen.sop_uids) == 3 and len(chosen.files_ignored) == len(files)
    with pytest.raises(ct_series.SeriesError, match=re.escape('no slice of series 1.2.3 in the folder; it holds ')):
        ct_series.load_ct_series(series_dir, ['1.2.3'])


def test_nodule_at_volume_edge_is_padded_with_air(good, tmp_path):  # pylint: disable=redefined-outer-name
    """A slab ending at the nodule: the crop's planes beyond the last slice are -1000 HU."""
    series_dir = _copy(good, str(tmp_path), 'LIDC-IDRI-9007')
    series = ct_series.load_ct_series(series_dir)
    spacing_z = series.image.GetSpacing()[2]
    anns, _ = nodules.place_annotations(xml_reader.parse_reader_xml(_xml(series_dir)), series.sop_uids,
                                        series.z_positions, spacing_z)
    cluster = nodules.cluster_annotations(anns, series.slice_thickness)[0]
    top = max(c.k for a in cluster for c in a.contours)
    for path in ct_series.dicom_files(series_dir):   # drop every slice above the nodule's top contour
        if float(pydicom.dcmread(path).ImagePositionPatient[2]) > series.z_positions[top] + 1e-3:
            os.remove(path)
    entry = series_examples.process_series(_task(str(tmp_path), series_dir, 'LIDC-IDRI-9007', str(tmp_path / 'c')))
    ex = series_examples.tfds_examples(str(tmp_path / 'c'), entry, 0)[0][1]
    z_last = series.z_positions[top]
    plane_z = ex['centroid_mm'][2] + (np.arange(32) - 15.5)
    beyond = plane_z > z_last + 0.5 * spacing_z + 1e-3   # a slice covers half its spacing each side
    assert beyond.any()
    assert np.all(ex['ct'][beyond] == -1000)
    assert any('padded with air' in i for les in entry['lesions'] for i in les['issues'])
