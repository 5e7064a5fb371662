"""SAM-Med3D in JAX/Flax.

Subpackages: ``model`` (Flax Linen modules), ``data`` (NIfTI I/O, preprocessing, Grain pipelines, clicks),
``checkpoint`` (PyTorch .pth reader, converter, Orbax I/O), ``training`` and ``evaluation``.
"""

__version__ = "0.1.0"
