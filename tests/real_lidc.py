"""The real LIDC-IDRI slices of `<repo root>/../shared/real_lidc` (one patient, TCIA layout; see its README), for tests:
`real_patient` copies LIDC-IDRI-0003 into a temporary folder (the shared copy is read-only), or skips the test with
the reason when the slices are absent."""

import os
import shutil

import pytest

REAL_LIDC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.pardir, "shared", "real_lidc")
PATIENT = "LIDC-IDRI-0003"


@pytest.fixture(scope="module")
def real_patient(tmp_path_factory) -> str:
    """A copy of LIDC-IDRI-0003 (11 real slices and the series' reader XML 72.xml) under <tmp>/manual/."""
    source = os.path.join(REAL_LIDC, PATIENT)
    if not os.path.isdir(source):
        pytest.skip(f"real LIDC-IDRI slices absent: {os.path.normpath(source)} does not exist")
    manual = tmp_path_factory.mktemp("real_lidc") / "manual"
    shutil.copytree(source, manual / PATIENT)
    return str(manual / PATIENT)
