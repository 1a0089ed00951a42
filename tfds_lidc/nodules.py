"""Reader annotations on the series grid, clustering into lesions, what the series holds of each, and the consensus
mask."""
from __future__ import annotations

import dataclasses

import numpy as np
import SimpleITK as sitk
from scipy.sparse.csgraph import connected_components
from scipy.spatial.distance import cdist

from tfds_lidc import ct_series
from tfds_lidc import xml_reader

# Why a lesion is not written, without particulars (the kinds a build report counts).
NO_MARK_IN_SERIES = 'no mark in this series'
INCOMPLETE = 'incomplete: marks outside the series'
SMALL = 'smaller than 3 mm (no contour)'


@dataclasses.dataclass(frozen=True)
class Contour:
    """One contour of an annotation: on slice `k` of the series, or (`in_series` False) on a slice the series does
    not hold, `k` then being the index that slice would have in the series (for clustering by distance)."""
    k: int                 # slice index in the series
    inclusion: bool
    ij: np.ndarray         # int (row, column) = (y, x) pixel indices
    z: float | None = None  # the reader XML's imageZposition (mm)
    in_series: bool = True


@dataclasses.dataclass(frozen=True)
class Annotation:
    """One reader's marking of one nodule placed on the series grid: an outline with characteristics (>= 3 mm), or
    (characteristics None) the mark of a nodule < 3 mm, usually one point."""
    reader: int
    nodule_id: str
    characteristics: tuple[int, ...] | None
    contours: tuple[Contour, ...]
    issues: tuple[str, ...] = ()  # what placing it left out or could not match, for the report

    @property
    def points(self) -> np.ndarray:
        """All contour points as (i, j, k) indices, as pylidc's `Annotation.contours_matrix` (over the whole scan, so
        with the marks on slices the series does not hold)."""
        return _points(self.contours)

    @property
    def series_contours(self) -> tuple[Contour, ...]:
        """The contours on slices of the series: the ones a mask is made of."""
        return tuple(c for c in self.contours if c.in_series)

    def describe(self) -> str:
        """`reader <r> nodule '<id>'`, as report lines name an annotation."""
        return f'reader {self.reader} nodule {self.nodule_id!r}'


def _points(contours) -> np.ndarray:
    return np.vstack([np.c_[c.ij, np.full(len(c.ij), c.k)] for c in sorted(contours, key=lambda c: c.k)]
                     + [np.zeros((0, 3), np.int64)])


def slice_index(z: float, z_positions: np.ndarray, slice_spacing: float) -> int:
    """The index a slice at `z` mm has or would have in a series with slices at `z_positions` (sorted along the slice
    normal): interpolated between its slices, extrapolated by `slice_spacing` beyond them (from 0 when the series
    has no slice), rounded as pylidc indexes a scan's slices."""
    if len(z_positions) == 0:
        return int(round(z / slice_spacing))
    step = slice_spacing if len(z_positions) < 2 or z_positions[-1] >= z_positions[0] else -slice_spacing
    ks = np.arange(len(z_positions), dtype=np.float64)
    zs, ks = (z_positions, ks) if step > 0 else (z_positions[::-1], ks[::-1])
    if z < zs[0]:
        return int(round(ks[0] + (z - zs[0]) / step))
    if z > zs[-1]:
        return int(round(ks[-1] + (z - zs[-1]) / step))
    return int(round(np.interp(z, zs, ks)))


def place_annotations(reader_xml: xml_reader.ReaderXml, sop_uids: list[str], z_positions: np.ndarray,
                      slice_spacing: float, *, small: bool = False) -> tuple[list[Annotation], list[str]]:
    """Matches every roi to a slice (by SOP UID, else by z within half a slice); returns the annotations and the
    issues of readers' nodules left out.

    Only nodules with characteristics (>= 3 mm) are placed, as in pylidc; with `small`, only those without (marks of
    nodules < 3 mm). An roi that matches no slice is kept off the series (`Contour.in_series` False, placed by its z
    for clustering) and named in its annotation's issues; single-point rois of outlined nodules are dropped (pylidc
    drops them), and a nodule left with no roi is named in the returned issues.
    """
    uid_to_k = {uid: k for k, uid in enumerate(sop_uids)}
    annotations, issues = [], []
    for nod in reader_xml.nodules:
        if (nod.characteristics is None) != small:
            continue
        name = f'reader {nod.reader} nodule {nod.nodule_id!r}'
        contours, notes = [], []
        for roi in nod.rois:
            if len(roi.xy) < (1 if small else 2):
                notes.append(f'{name}: single-point roi at z={roi.z:.2f} dropped')
                continue
            k = uid_to_k.get(roi.sop_uid)
            if k is None and len(z_positions):
                nearest = int(np.argmin(np.abs(z_positions - roi.z)))
                if abs(z_positions[nearest] - roi.z) <= 0.5 * slice_spacing:
                    k = nearest
            if k is None:
                notes.append(f'{name}: roi at z={roi.z:.2f} (SOP {roi.sop_uid}) matches no slice')
            ij = np.round(roi.xy[:, ::-1]).astype(np.int64)
            contours.append(Contour(k=slice_index(roi.z, z_positions, slice_spacing) if k is None else k,
                                    inclusion=roi.inclusion, ij=ij, z=roi.z, in_series=k is not None))
        if not contours:
            issues.extend(notes + [f'{name}: no usable roi; annotation dropped'])
            continue
        annotations.append(Annotation(reader=nod.reader, nodule_id=nod.nodule_id, characteristics=nod.characteristics,
                                      contours=tuple(contours), issues=tuple(notes)))
    return annotations, issues


def _min_distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(cdist(a.astype(np.float64), b.astype(np.float64)).min())


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
    dist = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            dist[i, j] = dist[j, i] = _min_distance(annotations[i].points, annotations[j].points)
    _, labels = connected_components(dist <= tol, directed=False)
    while np.bincount(labels).max() > 4 and tol * factor >= min_tol:
        tol *= factor
        _, labels = connected_components(dist <= tol, directed=False)
    clusters = [[annotations[i] for i in np.flatnonzero(labels == c)] for c in range(labels.max() + 1)]
    return sorted(clusters, key=lambda cl: np.mean([p[:, 2].mean() for p in (a.points for a in cl)]))


@dataclasses.dataclass(frozen=True)
class Lesion:
    """One lesion the readers marked: the outlines clustered into it (pylidc's cluster; none for a lesion every
    reader called smaller than 3 mm) and the marks of readers who called it smaller than 3 mm."""
    annotations: tuple[Annotation, ...]
    small_marks: tuple[Annotation, ...] = ()

    @property
    def issues(self) -> list[str]:
        """What placing its annotations left out or could not match (roi-level detail)."""
        return [i for a in self.annotations + self.small_marks for i in a.issues]

    def marked_z(self) -> np.ndarray:
        """Sorted distinct z (mm) of the slices its outlines (else its small marks) lie on."""
        contours = [c for a in (self.annotations or self.small_marks) for c in a.contours]
        return np.unique(np.round([c.z for c in contours], 2))

    def outside_z(self) -> np.ndarray:
        """Sorted distinct z (mm) of the slices holding its outlines that the series does not hold."""
        return np.unique(np.round([c.z for a in self.annotations for c in a.contours if not c.in_series], 2))

    @property
    def complete(self) -> bool:
        """The series holds every slice its outlines lie on."""
        return not len(self.outside_z())

    def skip_reason(self, z_positions: np.ndarray, keep_incomplete: bool = False) -> tuple[str, str] | None:
        """(kind, reason) why the lesion cannot be written from a series with slices at `z_positions` (mm); None
        when it can (incomplete, it can only with `keep_incomplete`)."""
        if not self.annotations:
            return SMALL, f'{SMALL}: marked by reader(s) {", ".join(str(a.reader) for a in self.small_marks)}'
        if not any(a.series_contours for a in self.annotations):
            z = self.marked_z()
            held = (f'the series holds {_span(z_positions)}' if len(z_positions) else 'the series holds no slice')
            return NO_MARK_IN_SERIES, f'marks on slices z = {_span(z)} mm, none in this series ({held})'
        outside = self.outside_z()
        if len(outside) and not keep_incomplete:
            return INCOMPLETE, (f'marks on {len(outside)} of {len(self.marked_z())} slices outside the series: '
                                f'incomplete (z = {_span(outside)} mm not in the series, which holds '
                                f'{_span(z_positions)})')
        return None


def _span(z: np.ndarray) -> str:
    """'lo...hi' of sorted positions in mm, one decimal."""
    return f'{min(z):.1f}...{max(z):.1f}'


def find_lesions(reader_xml: xml_reader.ReaderXml, sop_uids: list[str], z_positions: np.ndarray,
                 slice_spacing: float, tol: float) -> tuple[list[Lesion], list[str]]:
    """Every lesion of a reader XML, placed on a series (its slices' SOP UIDs and z positions; both empty when the
    series was not read), and the issues of marks that belong to no lesion.

    Outlines (>= 3 mm) are clustered as pylidc does (`cluster_annotations` with `tol`, the slice thickness), also
    where they lie on slices the series does not hold: the first lesions, in pylidc's order. Marks of nodules < 3 mm
    are clustered among themselves; a group within `tol` of a lesion's outlines joins it, the others follow as lesions
    of their own.
    """
    outlines, issues = place_annotations(reader_xml, sop_uids, z_positions, slice_spacing)
    marks, mark_issues = place_annotations(reader_xml, sop_uids, z_positions, slice_spacing, small=True)
    lesions = [Lesion(tuple(c)) for c in cluster_annotations(outlines, tol)]
    for group in cluster_annotations(marks, tol):
        points = np.vstack([a.points for a in group])
        near = [(_min_distance(points, np.vstack([a.points for a in les.annotations])), i)
                for i, les in enumerate(lesions) if les.annotations]
        distance, i = min(near, default=(np.inf, -1))
        if distance <= tol:
            lesions[i] = dataclasses.replace(lesions[i], small_marks=lesions[i].small_marks + tuple(group))
        else:
            lesions.append(Lesion((), tuple(group)))
    return lesions, issues + mark_issues


def xml_slice_spacing(reader_xml: xml_reader.ReaderXml) -> float:
    """The slice spacing a reader XML's marks suggest (the smallest gap between the z of its rois), for placing them
    where the series itself could not be read; 1 mm when they lie on one slice."""
    z = np.unique(np.round([roi.z for nod in reader_xml.nodules for roi in nod.rois], 3))
    gaps = np.diff(z)
    return float(gaps.min()) if len(gaps) else 1.0


def cluster_bbox(cluster: list[Annotation], shape: tuple[int, int, int], pad: int = 1) -> tuple[slice, ...]:
    """(z, y, x) slices of the extent of the cluster's contours on the series plus `pad`, clipped to the volume
    `shape` (z, y, x)."""
    pts = np.vstack([_points(a.series_contours) for a in cluster])
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
            for c in annotation.series_contours:
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
