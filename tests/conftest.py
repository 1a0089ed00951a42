"""Test-wide setup: JAX on the CPU with 8 fake devices, so that sharding tests run on any machine."""

import os
import shutil
import tempfile

# Must happen before the first `import jax` anywhere in the test session. The tests' programs run a few steps each, so
# compiling them dominates: LLVM's optimisation level 0 compiles them about 40% faster, and XLA:CPU's elemental
# emitters instead of its newer MLIR fusion emitters compile the tiny train and eval steps about 2x faster (XLA's own
# passes still run; the results are the same operations, and the tests compare against references with tolerances or
# against runs of the same session).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


import pytest  # noqa: E402  (after the environment above is set)

_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"


def pytest_configure(config):
    """One persistent XLA compilation cache for the session: the main process makes it before the xdist workers start,
    and they and every subprocess a test runs inherit it, so a program compiled once (the tiny train step, say) is read
    back by the other tests. A size limit turns on JAX's file lock, which makes sharing it between processes safe."""
    if _CACHE_ENV not in os.environ:
        config._autorad_cache_dir = os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="autorad_jax_xla_cache_")
        os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(8 << 30)
        os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"


def pytest_unconfigure(config):
    """Removes the cache this process made (not one the caller set)."""
    if getattr(config, "_autorad_cache_dir", None):
        shutil.rmtree(config._autorad_cache_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def manual_dir(tmp_path_factory) -> str:
    """A few real-geometry scans at native resolution (so pylidc's masks apply on the same grid)."""
    import tfds_lidc
    from lidc_testdata import NUM_SCANS
    out = str(tmp_path_factory.mktemp("lidc_manual"))
    tfds_lidc.synth.generate(out, NUM_SCANS, seed=0, downsample=1, margin_mm=5.0, max_slices=40, verbose=False)
    return out


@pytest.fixture(scope="session")
def built(manual_dir, tmp_path_factory) -> str:
    """data_dir holding lidc_idri/crop32_1mm of `manual_dir`, built with 2 worker processes."""
    import tfds_lidc
    from lidc_testdata import CONFIG
    data_dir = str(tmp_path_factory.mktemp("lidc_data"))
    tfds_lidc.prepare(manual_dir, data_dir, CONFIG, num_workers=2)
    return data_dir


@pytest.fixture(scope="session")
def lidc_data(tmp_path_factory) -> str:
    """TFDS data dir holding lidc_idri/crop32_1mm built from 8 generated (downsampled) scans."""
    import tfds_lidc
    root = tmp_path_factory.mktemp("lidc")
    tfds_lidc.synth.generate(str(root / "scans"), 8, seed=0)
    tfds_lidc.prepare(str(root / "scans"), str(root / "tfds"), builder_config="crop32_1mm")
    return str(root / "tfds")
