"""Reader annotations on the series grid, clustering into nodules, and the consensus mask."""
from __future__ import annotations

import dataclasses

import numpy as np
import SimpleITK as sitk
from scipy.sparse.csgraph import connected_components
from scipy.spatial.distance import cdist

from tfds_lidc import ct_series
from tfds_lidc import xml_reader


@dataclasses.dataclass(frozen=True)
class Contour:
    """One contour of an annotation on one slice of the series."""
    k: int                 # slice index in the series
    inclusion: bool
    ij: np.ndarray         # int (row, column) = (y, x) pixel indices


@dataclasses.dataclass(frozen=True)
class Annotation:
    """One reader's marking of one nodule with characteristics, placed on the series grid."""
    reader: int
    nodule_id: str
    characteristics: tuple[int, ...]
    contours: tuple[Contour, ...]

    @property
    def points(self) -> np.ndarray:
        """All contour points as (i, j, k) indices, as pylidc's `Annotation.contours_matrix`."""
        return np.vstack([np.c_[c.ij, np.full(len(c.ij), c.k)] for c in sorted(self.contours, key=lambda c: c.k)])


def place_annotations(reader_xml: xml_reader.ReaderXml, sop_uids: list[str], z_positions: np.ndarray,
                      slice_spacing: float) -> tuple[list[Annotation], list[str]]:
    """Matches every roi to a slice (by SOP UID, else by z within half a slice); returns annotations and issues.

    Only nodules with characteristics (>= 3 mm) are kept, as in pylidc; single-point rois (pylidc drops them) and
    unmatched rois are dropped and reported.
    """
    uid_to_k = {uid: k for k, uid in enumerate(sop_uids)}
    annotations, issues = [], []
    for nod in reader_xml.nodules:
        if nod.characteristics is None:
            continue
        contours = []
        for roi in nod.rois:
            k = uid_to_k.get(roi.sop_uid)
            if k is None:
                nearest = int(np.argmin(np.abs(z_positions - roi.z)))
                if abs(z_positions[nearest] - roi.z) <= 0.5 * slice_spacing:
                    k = nearest
            if len(roi.xy) < 2:
                issues.append(f'reader {_describe(nod)}: single-point roi at z={roi.z:.2f} dropped')
                continue
            if k is None:
                issues.append(f'reader {_describe(nod)}: roi at z={roi.z:.2f} (SOP {roi.sop_uid}) matches no slice; dropped')
                continue
            ij = np.round(roi.xy[:, ::-1]).astype(np.int64)
            contours.append(Contour(k=k, inclusion=roi.inclusion, ij=ij))
        if not contours:
            issues.append(f'reader {_describe(nod)}: no roi matches the series; annotation dropped')
            continue
        annotations.append(Annotation(reader=nod.reader, nodule_id=nod.nodule_id,
                                      characteristics=nod.characteristics, contours=tuple(contours)))
    return annotations, issues


def _describe(nod: xml_reader.ReaderNodule) -> str:
    """Names one reader's nodule in issue messages: `<reader> nodule '<id>'`."""
    return f'{nod.reader} nodule {nod.nodule_id!r}'


def cluster_annotations(annotations: list[Annotation], tol: float, factor: float = 0.9,
                        min_tol: float = 0.1) -> list[list[Annotation]]:
    """Groups annotations of one lesion exactly as pylidc's `Scan.cluster_annotations()` (metric 'min').

    Annotations are adjacent when the minimum distance between their contour points (in index units) is
    <= tol (pylidc uses the slice thickness); `tol` shrinks by `factor` while a group holds more than 4.
    Groups are sorted by the mean slice index of their annotations' centroids.
    """
    n = len(annotations)
    if n == 0:
        return []
    points = [a.points.astype(np.float64) for a in annotations]
    dist = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            dist[i, j] = dist[j, i] = cdist(points[i], points[j]).min()
    _, labels = connected_components(dist <= tol, directed=False)
    while np.bincount(labels).max() > 4 and tol * factor >= min_tol:
        tol *= factor
        _, labels = connected_components(dist <= tol, directed=False)
    clusters = [[annotations[i] for i in np.flatnonzero(labels == c)] for c in range(labels.max() + 1)]
    return sorted(clusters, key=lambda cl: np.mean([p[:, 2].mean() for p in (a.points for a in cl)]))


def cluster_bbox(cluster: list[Annotation], shape: tuple[int, int, int], pad: int = 1) -> tuple[slice, ...]:
    """(z, y, x) slices of the cluster's contour extent plus `pad`, clipped to the volume `shape` (z, y, x)."""
    pts = np.vstack([a.points for a in cluster])
    lo = np.maximum(pts.min(0)[[2, 0, 1]] - pad, 0)
    hi = np.minimum(pts.max(0)[[2, 0, 1]] + pad + 1, shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _fill(contour: Contour, grid: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Pixels of the (y, x) sub-grid inside the closed contour (pixel centres)."""
    from matplotlib import path as mplpath  # a second of imports that only a build's rasterisation needs
    pts = contour.ij
    if (pts[0] != pts[-1]).any():
        pts = np.vstack([pts, pts[:1]])
    return mplpath.Path(pts, closed=True).contains_points(grid + offset)


def annotation_mask(annotation: Annotation, bbox: tuple[slice, ...]) -> np.ndarray:
    """Boolean (z, y, x) mask of one annotation inside `bbox`, as pylidc's `boolean_mask()`.

    Inclusion contours are filled, then exclusion (inclusion FALSE) contours are cut out; the contour
    points themselves are outside the nodule (LIDC draws outlines just outside the lesion) unless that
    would leave the annotation empty, in which case they are kept.
    """
    shape = tuple(s.stop - s.start for s in bbox)
    offset = np.array([bbox[1].start, bbox[2].start])
    ii, jj = np.indices(shape[1:])
    grid = np.c_[ii.ravel(), jj.ravel()]

    def rasterise(with_points: bool) -> np.ndarray:
        mask = np.zeros(shape, dtype=bool)
        for include in (True, False):
            for c in annotation.contours:
                if c.inclusion != include or not bbox[0].start <= c.k < bbox[0].stop:
                    continue
                z = c.k - bbox[0].start
                inside = _fill(c, grid, offset).reshape(shape[1:])
                mask[z] = (mask[z] | inside) if include else (mask[z] & ~inside)
                local = c.ij - offset
                ok = np.all((local >= 0) & (local < shape[1:]), axis=1)
                if include and with_points:
                    mask[z, local[ok, 0], local[ok, 1]] = True
                elif not include or not with_points:
                    mask[z, local[ok, 0], local[ok, 1]] = False
        return mask

    mask = rasterise(with_points=False)
    return mask if mask.any() else rasterise(with_points=True)


def consensus_mask(cluster: list[Annotation], bbox: tuple[slice, ...], level: float = 0.5) -> np.ndarray:
    """Voxels marked by at least `level` of the cluster's readers (pylidc `utils.consensus`)."""
    return np.mean([annotation_mask(a, bbox) for a in cluster], axis=0) >= level


def consensus_mask_image(cluster: list[Annotation], image: sitk.Image, level: float = 0.5) -> sitk.Image | None:
    """The cluster's consensus mask as a uint8 image on `image`'s voxel grid (cropped to the cluster's bounding box);
    None when no voxel reaches `level` reader agreement.

    When `image` holds a series interpolated onto a regular grid (`ct_series.acquired_positions`), the mask is made
    on the slices the annotations index and interpolated the same way.
    """
    slice_positions = ct_series.acquired_positions(image)
    num_slices = image.GetSize()[2] if slice_positions is None else len(slice_positions)
    bbox = cluster_bbox(cluster, (num_slices,) + image.GetSize()[1::-1])
    consensus = consensus_mask(cluster, bbox, level)
    if not consensus.any():
        return None
    k0 = bbox[0].start
    if slice_positions is not None:
        spacing = image.GetSpacing()[2]
        k0, on_grid = ct_series.to_grid(consensus.astype(np.float32), slice_positions[bbox[0]], slice_positions[0],
                                        spacing, image.GetSize()[2])
        consensus = on_grid >= 0.5
        if not consensus.any():
            return None
    mask = sitk.GetImageFromArray(consensus.astype(np.uint8))
    mask.SetSpacing(image.GetSpacing())
    mask.SetDirection(image.GetDirection())
    mask.SetOrigin(image.TransformIndexToPhysicalPoint([bbox[2].start, bbox[1].start, int(k0)]))
    return mask


def select_readers(cluster: list[Annotation], max_readers: int = 4) -> tuple[list[Annotation], list[Annotation]]:
    """(kept, left out) annotations of a cluster: one per reader (the reader's first), at most `max_readers`, in
    reader order. LIDC has up to 4 readers per series; a larger cluster holds a reader's second mark of one
    lesion or two lesions that clustering could not split, and the mask and ratings then use the kept ones."""
    first = {}
    for ann in cluster:
        first.setdefault(ann.reader, ann)
    kept = [first[r] for r in sorted(first)][:max_readers]
    return kept, [a for a in cluster if not any(a is k for k in kept)]


def reader_ratings(cluster: list[Annotation], max_readers: int = 4) -> np.ndarray:
    """int32 [max_readers, 9] semantic ratings of `select_readers(cluster)`, 0 rows where no reader; a malignancy
    of 0 means no valid rating."""
    out = np.zeros((max_readers, len(xml_reader.ATTRIBUTE_NAMES)), dtype=np.int32)
    for row, ann in enumerate(select_readers(cluster, max_readers)[0]):
        out[row] = ann.characteristics
    return out
