"""Experiment configs (`get_config(arg)` per file) and the pyradiomics parameters, packaged with autorad-jax."""
