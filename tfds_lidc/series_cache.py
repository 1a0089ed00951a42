"""Per-series results of a build, kept so that a build stopped part way resumes where it stopped.

A series is identified by its series UID, the files of its folder (names and sizes of the DICOM files, contents of
the reader XML), the builder config and the builder version (`key`; the dataset's fingerprint is made of these);
its cache entry adds the DICOM files' modification times (`cache_key`), so a changed series, config or code
misses the cache.
Each entry is `<key>.npz` (the series' nodule arrays) and `<key>.json` (its report entry), each written to a
temporary name and renamed, the JSON last, so a killed build never leaves a half-written entry that looks whole. An
entry damaged all the same (a full disk, a partial copy) is found when it is looked up, discarded and named, and its
series read again.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import zipfile

import numpy as np
import pydicom

from tfds_lidc import ct_series

ARRAY_FEATURES = ('ct', 'mask', 'radiomics', 'ratings', 'attributes', 'malignancy_mean', 'label', 'nodule_index',
                  'centroid_mm', 'diameter_mm', 'complete')
_TMP_SUFFIX = '.tmp'  # and the writing process's id


def _series_uid(slices: list[str]) -> str:
    try:
        return str(pydicom.dcmread(slices[0], stop_before_pixels=True).SeriesInstanceUID)
    except Exception:  # pylint: disable=broad-except  # unreadable: the series is read (and reported) as it is
        return ''


def key(directory: str, config: dict) -> str:
    """The identity of the series folder `directory` under the builder `config` (JSON-serialisable)."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    slices = ct_series.dicom_files(directory)  # listed once: without .dcm names it reads every file's preamble
    h.update(_series_uid(slices).encode())
    slice_names = {os.path.basename(path) for path in slices}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name in slice_names:
            h.update(f'{name}:{os.path.getsize(path)}'.encode())
        elif name.lower().endswith('.xml'):
            with open(path, 'rb') as f:
                h.update(name.encode() + hashlib.sha256(f.read()).digest())
    return h.hexdigest()[:32]


def cache_key(directory: str, series_key: str) -> str:
    """The cache key of a series: its `key` and the modification times of its DICOM files."""
    h = hashlib.sha256(series_key.encode())
    for path in ct_series.dicom_files(directory):  # sorted by name
        h.update(f'{os.path.basename(path)}:{os.stat(path).st_mtime_ns}'.encode())
    return h.hexdigest()[:32]


def _write(path: str, write) -> None:
    tmp = f'{path}{_TMP_SUFFIX}{os.getpid()}'
    write(tmp)
    os.replace(tmp, path)


def remove_temporary_files(cache_dir: str) -> list[str]:
    """Removes the temporary files of entries being written when a build was killed (call it only while no build of
    this cache's config runs); returns their paths."""
    if not os.path.isdir(cache_dir):
        return []
    pattern = re.compile(rf'[0-9a-f]{{32}}\.(npz|json){re.escape(_TMP_SUFFIX)}\d+')
    paths = [os.path.join(cache_dir, name) for name in sorted(os.listdir(cache_dir)) if pattern.fullmatch(name)]
    for path in paths:
        os.remove(path)
    return paths


def save(cache_dir: str, cache_key: str, entry: dict, examples: list[dict]) -> None:
    """Stores one series' report entry and nodule features."""
    os.makedirs(cache_dir, exist_ok=True)
    arrays = {name: np.stack([e[name] for e in examples]) for name in ARRAY_FEATURES} if examples else {}

    def write_npz(tmp: str) -> None:
        with open(tmp, 'wb') as f:
            np.savez(f, **arrays)

    def write_json(tmp: str) -> None:
        with open(tmp, 'w') as f:
            json.dump(entry, f)

    _write(os.path.join(cache_dir, f'{cache_key}.npz'), write_npz)
    _write(os.path.join(cache_dir, f'{cache_key}.json'), write_json)


def _damage(cache_dir: str, cache_key: str, entry: dict) -> str | None:
    """What is wrong with the arrays of a parsed entry (None when each of ARRAY_FEATURES has one row per nodule
    written; reading them checks the zip's CRCs)."""
    path = os.path.join(cache_dir, f'{cache_key}.npz')
    rows = len(entry.get('nodules_written', ()))
    try:
        with np.load(path) as data:
            shapes = {name: data[name].shape for name in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        return f'{path} cannot be read ({type(e).__name__}: {e})'
    expected = set(ARRAY_FEATURES) if rows else set()
    if set(shapes) != expected or any(shape[:1] != (rows,) for shape in shapes.values()):
        return f'{path} does not hold {rows} rows of {", ".join(sorted(expected)) or "nothing"}'
    return None


def load_entry(cache_dir: str, cache_key: str) -> tuple[dict | None, list[str]]:
    """(the stored report entry of a series, or None when it is not completely cached; a note naming the entry when
    it was damaged and has been discarded, for the series' report entry)."""
    path = os.path.join(cache_dir, f'{cache_key}.json')
    if not os.path.exists(path) or not os.path.exists(os.path.join(cache_dir, f'{cache_key}.npz')):
        return None, []
    try:
        with open(path) as f:
            entry = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
        problem = f'{path} is not valid JSON ({e})'
    else:
        problem = _damage(cache_dir, cache_key, entry)
    if problem is None:
        return entry, []
    for name in (f'{cache_key}.json', f'{cache_key}.npz'):
        os.remove(os.path.join(cache_dir, name))
    return None, [f'damaged series cache entry discarded and the series read again: {problem}']


def load_examples(cache_dir: str, entry: dict) -> list[dict]:
    """The stored nodule features of a series entry (without patient, series and fold)."""
    with np.load(os.path.join(cache_dir, f"{entry['cache_key']}.npz")) as data:
        arrays = {name: data[name] for name in data.files}
    return [{name: arrays[name][i] for name in arrays} for i in range(len(entry['nodules_written']))]


def fingerprint(series_keys) -> str:
    """One hash of a set of series (their `key`s), stored in the dataset's metadata."""
    return hashlib.sha256('\n'.join(sorted(series_keys)).encode()).hexdigest()[:32]
