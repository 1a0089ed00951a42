"""The build report: every series read or skipped and every nodule written or skipped, with reasons."""
from __future__ import annotations

import json

from etils import epath

REPORT_NAME = 'build_report.json'
PARTS_DIR = 'build_report_parts'


def write_part(data_dir: str, entry: dict) -> None:
    """Stores one series' entry; works from any worker process or Beam worker that sees data_dir."""
    parts = epath.Path(data_dir) / PARTS_DIR
    parts.mkdir(parents=True, exist_ok=True)
    (parts / f"{entry['key']}.json").write_text(json.dumps(entry))


def merge_parts(data_dir: str) -> dict:
    """Merges the per-series entries into build_report.json and removes them."""
    parts = epath.Path(data_dir) / PARTS_DIR
    entries = sorted((json.loads(p.read_text()) for p in parts.glob('*.json')), key=lambda e: e['series_dir']) \
        if parts.exists() else []
    read = [e for e in entries if e['status'] == 'read']
    report = {
        'series_found': len(entries),
        'series_read': len(read),
        'nodules_written': sum(len(e['nodules_written']) for e in read),
        'series_skipped': [{k: e[k] for k in ('series_dir', 'patient_id', 'reason')}
                           for e in entries if e['status'] != 'read'],
        'nodules_skipped': [dict(n, series_dir=e['series_dir']) for e in read for n in e['nodules_skipped']],
        'issues': [{'series_dir': e['series_dir'], 'issue': i} for e in entries for i in e['issues']],
        'series': entries,
    }
    (epath.Path(data_dir) / REPORT_NAME).write_text(json.dumps(report, indent=1))
    if parts.exists():
        parts.rmtree()
    return report
