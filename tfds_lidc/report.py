"""The build report: every series read, skipped or failed, every file of a series folder left out of its series and
every nodule written or skipped, with reasons."""
from __future__ import annotations

import collections
import json
import os
import re

REPORT_NAME = 'build_report.json'


def build(entries: list[dict], assignment: dict[str, tuple[str, int]], empty_splits: dict[str, str],
          fingerprint: str, manual_dir: str) -> dict:
    """The report of one build from its series entries, the patients' (split, fold) and the empty splits."""
    entries = sorted(entries, key=lambda e: e['series_dir'])
    read = [e for e in entries if e['status'] == 'read']
    per_split = collections.Counter()
    for e in read:
        if e['patient_id'] in assignment:
            per_split[assignment[e['patient_id']][0]] += len(e['nodules_written'])
    return {
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
        'nodules_skipped': [dict(n, series_dir=e['series_dir'], patient_id=e['patient_id'])
                            for e in read for n in e['nodules_skipped']],
        'files_ignored': [dict(f, series_dir=e['series_dir'], patient_id=e['patient_id'])
                          for e in entries for f in e.get('files_ignored', [])],
        'issues': [{'series_dir': e['series_dir'], 'issue': i} for e in entries for i in e['issues']],
        'series': entries,
    }


def write(report: dict, *dirs: str) -> list[str]:
    """Writes build_report.json into each folder; returns the paths."""
    paths = []
    for d in dirs:
        os.makedirs(d, exist_ok=True)
        paths.append(os.path.join(d, REPORT_NAME))
        with open(paths[-1], 'w') as f:
            json.dump(report, f, indent=1)
    return paths


def _kind(reason: str) -> str:
    """A reason without its particulars (file names, positions, numbers), to count reasons of one kind."""
    return re.split(r'[\d(:]', reason, maxsplit=1)[0].strip() or reason


def summary(report: dict, report_path: str) -> str:
    """A few lines saying what a build did."""
    lines = [f"lidc_idri: {report['series_found']} series folders, {report['series_read']} read "
             f"({report['series_from_cache']} of them from the series cache of an earlier run), "
             f"{report['nodules_written']} nodules written: "
             + ', '.join(f'{s} {n}' for s, n in report['nodules_per_split'].items())]
    for title, items in (('series skipped', report['series_skipped']), ('nodules skipped', report['nodules_skipped']),
                         ('files left out of their folder\'s series', report['files_ignored']),
                         ('series failed (unexpected error)', report['errors'])):
        counts = collections.Counter(_kind(i['reason']) for i in items)
        if counts:
            lines.append(f'{title}: ' + '; '.join(f'{n} x {k}' for k, n in counts.most_common()))
    for split, why in report['empty_splits'].items():
        lines.append(f'split {split} is empty: {why}')
    lines.append(f'report: {report_path}')
    return '\n'.join(lines)
