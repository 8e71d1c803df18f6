"""ML work driven by the daemon: dataset, model, training, evaluation, export, publishing."""

from service import blas

# Must run before anything imports mlx.core (see service/blas.py).
blas.preload()

__version__ = "0.1.0"
