"""autorad-jax: AutoRad-Lung in JAX/Flax, lung-nodule malignancy from CT (`autorad --help`)."""

__version__ = "0.2.0"
