"""LIDC-IDRI as a TFDS dataset (`lidc_idri`) and a demo-data generator; importing registers the dataset."""
from tfds_lidc import synth
from tfds_lidc.lidc_idri import Builder, BuildError, LidcIdriConfig
from tfds_lidc.nodule_sample import NoduleSample, nodule_example
from tfds_lidc.prepare import DatasetExistsError, prepare

__all__ = ['Builder', 'BuildError', 'DatasetExistsError', 'LidcIdriConfig', 'NoduleSample', 'nodule_example', 'prepare',
           'synth']
