"""Malignancy of a nodule in a new CT, with a trained workdir or an export folder, in JAX or PyTorch.

    CT (DICOM series folder | NIfTI / NRRD / MetaImage file) + nodule (mask on the CT grid | centre and diameter ->
    sphere | LIDC reader XML -> readers' marks clustered into nodules, consensus masks)
      -> tfds_lidc.nodule_example (the dataset builder's own crop, mask and radiomics code)
      -> autorad_jax.data.pipeline.example_to_inputs (the training pipeline's own per-example inputs)
      -> the model, preprocessing included (autorad_jax.data.preprocess, or AutoRadLungTorch.preprocess)
      -> class probabilities, as a JSON-ready dict.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

from autorad_jax import ct_input, predictor as predictor_lib
from tfds_lidc import image_checks


def predict(*, ct: str, mask: Optional[str] = None, center=None, diameter: Optional[float] = None,
            xml: Optional[str] = None, workdir: Optional[str] = None, export_dir: Optional[str] = None,
            backend: str = "jax", report_dir: Optional[str] = None,
            hu_range: Sequence[float] = image_checks.DEFAULT_HU_RANGE, xml_matches_ct: bool = False,
            series: Optional[str] = None, coordinates: str = "lps", keep_incomplete: bool = False) -> dict[str, Any]:
    """Malignancy class probabilities of the nodule(s) given by `mask` / `center` + `diameter` / `xml` in the CT `ct`.

    `center` is x, y, z in patient LPS mm (DICOM's and LUNA16's convention), or RAS mm with `coordinates='ras'`. Of a
    DICOM folder, the series `series` is read, else the one the reader XML names, else the largest axial CT stack;
    with a centre, only its slices that the nodule's crop can reach (ct_input.sphere_region).
    Returns a JSON-serialisable dict: the model used, the CT (and the series read, with the folder's files it left
    out), and per nodule the class probabilities, label, centroid (x, y, z patient LPS mm), axial diameter (mm),
    volume (mm^3) and the radiomic features used. With `xml`, each nodule says whether the series holds all its
    readers' marks ('complete'); the XML's lesions not predicted are listed with the reason under 'nodules_skipped'
    (incomplete ones are, unless `keep_incomplete`).
    With `report_dir`, a picture per nodule (views, saliency, radiomic attributions) and an index.html go there.
    Raises PredictInputError naming what is wrong with the CT (see read_ct), the nodule or the model.
    """
    predictor_lib.check_model_source(workdir, export_dir)  # a mistyped workdir is said before the CT is read
    region = ct_input.sphere_region(center, diameter, coordinates) if mask is None and xml is None else None
    image, dicom = ct_input.read_ct(ct, hu_range, ct_input.series_wanted(ct, series, xml), region)
    nodules = dict(mask=mask, center=center, diameter=diameter, xml=xml, xml_matches_ct=xml_matches_ct,
                   coordinates=coordinates, keep_incomplete=keep_incomplete)
    masks = (None if xml is not None  # the others fail early, before the model loads
             else ct_input.nodule_masks(image, dicom, **nodules, consensus_level=0.0))
    predictor = predictor_lib.load_predictor(workdir=workdir, export_dir=export_dir, backend=backend)
    if masks is None:
        masks = ct_input.nodule_masks(image, dicom, **nodules,
                                      consensus_level=float(predictor.preprocessing["consensus_level"]))
    skipped = [info for m, info in masks if m is None]
    masks = [(m, info) for m, info in masks if m is not None]
    inputs = [predictor_lib.nodule_inputs(predictor, image, m) for m, _ in masks]
    result = {
        "model": predictor.source,
        "ct": os.path.abspath(ct),
        **ct_input.series_description(dicom),
        "classes": {label: name for label, name in zip(predictor.labels, predictor.class_names)},
        "nodules": [{**info, **predictor_lib.score_nodule(predictor, x)} for (_, info), x in zip(masks, inputs)],
        **({"nodules_skipped": skipped} if skipped else {}),
    }
    if report_dir is not None:
        from autorad_jax import report  # matplotlib and the saliency program load only for a report
        result["report"] = report.write_reports(predictor, inputs, result["nodules"], report_dir,
                                                titles=[os.path.basename(os.path.normpath(ct))] * len(inputs))
    return result
