"""A persistent XLA compilation cache in the workdir (or an export folder): a resumed run (after preemption, say) loads
its compiled init, train and eval programs from there instead of compiling them again, and a prediction its forward
pass."""

from __future__ import annotations

import os

import jax
from absl import logging

FOLDER = "compilation_cache"


def use_workdir_cache(enabled: bool, workdir: str, *, every_program: bool = False) -> str | None:
    """Keeps this process's compiled programs in <workdir>/compilation_cache when `enabled`, unless a cache folder is
    already set: JAX_COMPILATION_CACHE_DIR, or an earlier call in this process (cross-validation and the demo make
    one cache for all their runs). Returns the folder in use, or None.

    `every_program` caches also the programs that compile in under a second, which JAX leaves out by default: a
    prediction's forward pass of the large model compiles in about 0.9 s on a CPU and is read back in less.
    """
    current = jax.config.jax_compilation_cache_dir
    if every_program and (current or enabled):
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    if current or not enabled:
        return current or None
    folder = os.path.join(os.path.abspath(workdir), FOLDER)
    jax.config.update("jax_compilation_cache_dir", folder)
    logging.info("Compiled programs are cached in %s", folder)
    return folder
