"""Parser for the LIDC-IDRI reader XML (`LidcReadMessage`, namespace http://www.nih.gov)."""
from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET

import numpy as np

from tfds_lidc.errors import LidcDataError

# Semantic ratings in the order used by the dataset's `attributes` feature.
ATTRIBUTE_NAMES = ('subtlety', 'internalStructure', 'calcification', 'sphericity', 'margin',
                   'lobulation', 'spiculation', 'texture', 'malignancy')


class XmlError(LidcDataError, ValueError):
    """The reader XML cannot be used."""


@dataclasses.dataclass(frozen=True)
class Roi:
    """One contour of one reader on one slice; `xy` holds (x, y) pixel coordinates."""
    z: float
    sop_uid: str
    inclusion: bool
    xy: np.ndarray


@dataclasses.dataclass(frozen=True)
class ReaderNodule:
    """One `unblindedReadNodule` of one reading session."""
    reader: int
    nodule_id: str
    characteristics: tuple[int, ...] | None  # ATTRIBUTE_NAMES order; None for small nodules (< 3 mm)
    rois: tuple[Roi, ...]


@dataclasses.dataclass(frozen=True)
class ReaderXml:
    series_uid: str | None
    num_sessions: int
    nodules: tuple[ReaderNodule, ...]
    num_non_nodules: int


def _local(tag: str) -> str:
    return tag.rsplit('}', 1)[-1]


def _children(elem: ET.Element, name: str) -> list[ET.Element]:
    return [c for c in elem if _local(c.tag) == name]


def _text(elem: ET.Element, name: str) -> str | None:
    found = _children(elem, name)
    return found[0].text.strip() if found and found[0].text is not None else None


def _characteristics(nodule: ET.Element) -> tuple[int, ...] | None:
    """The nine ratings (0 where missing; malignancy 0 unless it is 1-5); None when the reader gave none."""
    found = _children(nodule, 'characteristics')
    if not found or all(_text(found[0], name) is None for name in ATTRIBUTE_NAMES):
        return None
    values = [int(float(_text(found[0], name) or 0)) for name in ATTRIBUTE_NAMES]
    values[-1] = values[-1] if 1 <= values[-1] <= 5 else 0
    return tuple(values)


def _roi(elem: ET.Element) -> Roi:
    points = [(float(_text(e, 'xCoord')), float(_text(e, 'yCoord'))) for e in _children(elem, 'edgeMap')]
    return Roi(z=float(_text(elem, 'imageZposition')),
               sop_uid=_text(elem, 'imageSOP_UID') or '',
               inclusion=(_text(elem, 'inclusion') or 'TRUE').upper() == 'TRUE',
               xy=np.asarray(points, dtype=np.float64).reshape(-1, 2))


def parse_reader_xml(path: str) -> ReaderXml:
    """Reads every reading session of one series' reader XML; raises `XmlError` when unusable."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        raise XmlError(f'reader XML does not parse: {e}') from e
    if _local(root.tag) != 'LidcReadMessage':
        raise XmlError(f'not a LidcReadMessage (root <{_local(root.tag)}>)')
    header = _children(root, 'ResponseHeader')
    series_uid = _text(header[0], 'SeriesInstanceUid') if header else None
    sessions = _children(root, 'readingSession')
    nodules, num_non_nodules = [], 0
    try:
        for reader, session in enumerate(sessions):
            num_non_nodules += len(_children(session, 'nonNodule'))
            for nod in _children(session, 'unblindedReadNodule'):
                nodules.append(ReaderNodule(reader=reader, nodule_id=_text(nod, 'noduleID') or '',
                                            characteristics=_characteristics(nod),
                                            rois=tuple(_roi(r) for r in _children(nod, 'roi'))))
    except (TypeError, ValueError) as e:
        raise XmlError(f'malformed reader XML: {e}') from e
    return ReaderXml(series_uid=series_uid, num_sessions=len(sessions), nodules=tuple(nodules),
                     num_non_nodules=num_non_nodules)
