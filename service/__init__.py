"""ML work driven by the daemon: dataset, model, training, evaluation, export, publishing."""

from service import cpu

# Must run before anything imports mlx.core (see service/cpu.py).
cpu.preload()

__version__ = "0.1.0"
