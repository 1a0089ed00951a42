"""LIDC-IDRI (`lidc_idri`) and any table of labelled nodules (`nodule_table`) as TFDS datasets, and a demo-data
generator; importing registers the datasets."""
from tfds_lidc import synth
from tfds_lidc import nodule_table
from tfds_lidc.lidc_idri import Builder, BuildError, LidcIdriConfig
from tfds_lidc.nodule_sample import NoduleSample, nodule_example
from tfds_lidc.prepare import DatasetExistsError, prepare

__all__ = ['Builder', 'BuildError', 'DatasetExistsError', 'LidcIdriConfig', 'NoduleSample', 'nodule_example',
           'nodule_table', 'prepare', 'synth']
