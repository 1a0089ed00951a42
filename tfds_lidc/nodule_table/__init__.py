"""TFDS dataset folder of nodule_table."""
from tfds_lidc.nodule_table.nodule_table_dataset_builder import CSV_NAME, Builder, TableError

__all__ = ['CSV_NAME', 'Builder', 'TableError']
