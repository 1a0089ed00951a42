"""The dataset's own errors: data it cannot use, named with the file or series and the reason."""


class LidcDataError(Exception):
    """A manual_dir, DICOM series, reader XML, nodule or existing dataset that cannot be used as given."""
