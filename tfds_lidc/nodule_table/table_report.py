"""The build report of a nodule table: one entry per nodule (a row, or each nodule of a reader XML row), written with
its split or skipped with its reason, and the counts per reason."""
from __future__ import annotations

import collections

from tfds_lidc import report as lidc_report
from tfds_lidc import splits as splits_lib

kind = lidc_report.reason_kind  # one way to count reasons in both reports


def _nodule_entries(entry: dict, assignment: dict[str, tuple[str, int]]) -> list[dict]:
    head = {k: entry[k] for k in ('row', 'patient_id') if k in entry}
    if entry.get('ct'):
        head['ct'] = entry['ct']
    if entry['status'] != 'read':
        return [dict(head, status='skipped', reason=entry['reason'])]
    split, fold = assignment.get(entry['patient_id'], ('', -1))
    out = [dict(head, nodule=key, mask=mask, label_source=entry['label_source'], status='written', split=split,
                fold=fold) for key, mask in zip(entry['nodules_written'], entry['masks'])]
    out += [dict(head, nodule_index=n['nodule_index'], status='skipped', reason=n['reason'])
            for n in entry['nodules_skipped']]
    return out


def build(entries: list[dict], assignment: dict[str, tuple[str, int]], empty_splits: dict[str, str],
          fingerprint: str, csv_path: str) -> dict:
    """The report of one build from its row entries, the patients' (split, fold) and the empty splits."""
    entries = sorted(entries, key=lambda e: e['row'])
    ok = [e for e in entries if e['status'] != 'error']
    nodules = [n for e in ok for n in _nodule_entries(e, assignment)]
    written = [n for n in nodules if n['status'] == 'written']
    per_split = collections.Counter(n['split'] for n in written)
    return {
        'dataset': 'nodule_table',
        'csv': csv_path,
        'series_fingerprint': fingerprint,
        'rows': len(entries),
        'rows_from_cache': sum(bool(e.get('cached')) for e in entries),
        'nodules_written': len(written),
        'nodules_per_split': {s: per_split.get(s, 0) for s in splits_lib.SPLITS},
        'sphere_masks': sum(n['mask'].startswith('sphere') for n in written),
        'skipped_reasons': dict(collections.Counter(kind(n['reason']) for n in nodules
                                                    if n['status'] == 'skipped').most_common()),
        'empty_splits': empty_splits,
        'patients': {p: {'split': s, 'fold': f} for p, (s, f) in sorted(assignment.items())},
        'errors': [{k: e[k] for k in ('row', 'patient_id', 'reason', 'traceback')}
                   for e in entries if e['status'] == 'error'],
        'nodules': nodules,
        'issues': [{'row': e['row'], 'issue': i} for e in entries for i in e['issues']],
    }


def summary(report: dict, report_path: str) -> str:
    """A few lines saying what a build did."""
    lines = [f"nodule_table: {report['rows']} rows ({report['rows_from_cache']} from the cache of an earlier run), "
             f"{report['nodules_written']} nodules written ({report['sphere_masks']} with a sphere mask from a centre "
             f"and diameter): " + ', '.join(f'{s} {n}' for s, n in report['nodules_per_split'].items())]
    if report['skipped_reasons']:
        lines.append('nodules skipped: ' + '; '.join(f'{n} x {k}' for k, n in report['skipped_reasons'].items()))
    for split, why in report['empty_splits'].items():
        lines.append(f'split {split} is empty: {why}')
    lines.append(f'report: {report_path}')
    return '\n'.join(lines)
