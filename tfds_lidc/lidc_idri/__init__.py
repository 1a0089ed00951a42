"""TFDS dataset folder of lidc_idri."""
from tfds_lidc.lidc_idri.lidc_idri_dataset_builder import Builder, BuildError, LidcIdriConfig

__all__ = ['Builder', 'BuildError', 'LidcIdriConfig']
