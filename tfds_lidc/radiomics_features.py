"""pyradiomics feature extraction with the parameters of configs/radiomics.yaml."""
from __future__ import annotations

import functools
import logging
import os

import numpy as np
import radiomics
import SimpleITK as sitk
import yaml
from radiomics import featureextractor

DEFAULT_PARAMS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs',
                              'radiomics.yaml')

logging.getLogger('radiomics').setLevel(logging.ERROR)


@functools.lru_cache(maxsize=4)
def extractor(params_path: str = DEFAULT_PARAMS) -> featureextractor.RadiomicsFeatureExtractor:
    """The pyradiomics extractor of a parameter YAML, built once per file."""
    return featureextractor.RadiomicsFeatureExtractor(params_path)


def extract(image: sitk.Image, mask: sitk.Image, params_path: str = DEFAULT_PARAMS) -> dict[str, float]:
    """Ordered {feature name: value}, without pyradiomics' diagnostics entries."""
    result = extractor(params_path).execute(image, mask, label=1)
    return {k: float(v) for k, v in result.items() if not k.startswith('diagnostics_')}


@functools.lru_cache(maxsize=4)
def feature_names(params_path: str = DEFAULT_PARAMS) -> tuple[str, ...]:
    """Ordered feature names, found by running the extractor once on a small phantom sphere."""
    zz, yy, xx = np.mgrid[:16, :16, :16]
    sphere = ((zz - 7.5) ** 2 + (yy - 7.5) ** 2 + (xx - 7.5) ** 2) <= 25
    rng = np.random.default_rng(0)
    image = sitk.GetImageFromArray((rng.normal(0, 100, sphere.shape) + 40 * sphere).astype(np.int16))
    mask = sitk.GetImageFromArray(sphere.astype(np.uint8))
    return tuple(extract(image, mask, params_path))


def metadata(params_path: str = DEFAULT_PARAMS) -> dict:
    """What the dataset records about its radiomics: version, parameters and ordered names."""
    with open(params_path) as f:
        params = yaml.safe_load(f)
    return {'radiomics_feature_names': list(feature_names(params_path)),
            'pyradiomics_version': radiomics.__version__,
            'radiomics_params': params}
