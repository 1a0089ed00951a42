"""The build report: every series read, skipped or failed, every file of a series folder left out of its series and
every lesion written or skipped, with reasons."""
from __future__ import annotations

import collections
import json
import os
import re

REPORT_NAME = 'build_report.json'


def lesion(source: str, status: str, *, key: str = '', kind: str = '', reason: str = '', issues=(),
           **details) -> dict:
    """One lesion's report entry, the shape every builder gives a nodule it met (a lesion of a reader XML, a row of a
    nodule table): `source` says where it is in its input, in words a person finds it by; status 'written' with the
    example's `key` (`build` adds the split and fold), or 'skipped' with one `reason` and its `kind` (the reason
    without particulars, which the report counts); `issues`, what was left out or noted on the way; `details`, the
    builder's own fields."""
    return {'source': source, 'status': status, 'key': key, 'kind': kind, 'reason': reason, 'issues': list(issues),
            **details}


def build(entries: list[dict], assignment: dict[str, tuple[str, int]], empty_splits: dict[str, str],
          fingerprint: str, manual_dir: str) -> dict:
    """The report of one build from its series entries, the patients' (split, fold) and the empty splits.

    'lesions' counts every lesion met, written and skipped per reason; 'lesion_entries' lists them (each with its
    series folder and patient, and where written its split and fold), in series order.
    """
    entries = sorted(entries, key=lambda e: e['series_dir'])
    read = [e for e in entries if e['status'] == 'read']
    per_split = collections.Counter()
    for e in read:
        if e['patient_id'] in assignment:
            per_split[assignment[e['patient_id']][0]] += len(e['nodules_written'])
    lesions = []
    for e in entries:
        for entry in e.get('lesions', []):
            placed = {'series_dir': e['series_dir'], 'patient_id': e['patient_id']}
            if entry['status'] == 'written' and e['patient_id'] in assignment:
                placed.update(zip(('split', 'fold'), assignment[e['patient_id']]))
            lesions.append(dict(entry, **placed))
    return {
        'lesions': lesion_counts(lesions),
        'manual_dir': manual_dir,
        'series_fingerprint': fingerprint,
        'series_found': len(entries),
        'series_read': len(read),
        'series_from_cache': sum(bool(e.get('cached')) for e in entries),
        'nodules_written': sum(len(e['nodules_written']) for e in read),
        'nodules_per_split': {s: per_split.get(s, 0) for s in ('train', 'validation', 'test')},
        'empty_splits': empty_splits,
        'patients': {p: {'split': s, 'fold': f} for p, (s, f) in sorted(assignment.items())},
        'series_skipped': [{k: e[k] for k in ('series_dir', 'patient_id', 'reason')}
                           for e in entries if e['status'] == 'skipped'],
        'errors': [{k: e[k] for k in ('series_dir', 'patient_id', 'reason', 'traceback')}
                   for e in entries if e['status'] == 'error'],
        'lesion_entries': lesions,
        'files_ignored': [dict(f, series_dir=e['series_dir'], patient_id=e['patient_id'])
                          for e in entries for f in e.get('files_ignored', [])],
        'issues': [{'series_dir': e['series_dir'], 'issue': i} for e in entries for i in e['issues']],
        'series': entries,
    }


def lesion_counts(lesions: list[dict]) -> dict:
    """{'found': n, 'written': n, 'skipped': {kind: n, ...} (most frequent first)} of lesion entries."""
    skipped = collections.Counter(entry['kind'] for entry in lesions if entry['status'] == 'skipped')
    return {'found': len(lesions), 'written': sum(entry['status'] == 'written' for entry in lesions),
            'skipped': dict(skipped.most_common())}


def write(report: dict, *dirs: str) -> list[str]:
    """Writes build_report.json into each folder; returns the paths."""
    paths = []
    for d in dirs:
        os.makedirs(d, exist_ok=True)
        paths.append(os.path.join(d, REPORT_NAME))
        with open(paths[-1], 'w') as f:
            json.dump(report, f, indent=1)
    return paths


def reason_kind(reason: str) -> str:
    """A reason without its particulars (file names, positions, numbers), to count reasons of one kind."""
    return re.split(r'[\d(:]', reason, maxsplit=1)[0].strip() or reason


def summary(report: dict, report_path: str) -> str:
    """A few lines saying what a build did."""
    counts = report['lesions']
    lines = [f"lidc_idri: {report['series_found']} series folders, {report['series_read']} read "
             f"({report['series_from_cache']} of them from the series cache of an earlier run), "
             f"{report['nodules_written']} nodules written: "
             + ', '.join(f'{s} {n}' for s, n in report['nodules_per_split'].items()),
             f"lesions marked by the readers: {counts['found']}, written {counts['written']}, skipped "
             f"{counts['found'] - counts['written']}"
             + ''.join(f'; {n} x {kind}' for kind, n in counts['skipped'].items())]
    for title, items in (('series skipped', report['series_skipped']),
                         ('files left out of their folder\'s series', report['files_ignored']),
                         ('series failed (unexpected error)', report['errors'])):
        kinds = collections.Counter(reason_kind(i['reason']) for i in items)
        if kinds:
            lines.append(f'{title}: ' + '; '.join(f'{n} x {k}' for k, n in kinds.most_common()))
    for split, why in report['empty_splits'].items():
        lines.append(f'split {split} is empty: {why}')
    lines.append(f'report: {report_path}')
    return '\n'.join(lines)
