"""The post-training ablation grid; `ablate.py` is its command line.

Its modules, each importing only those before it: cells.py (a cell, its train.py flags, its records,
training it, its status), checks.py (the grid checked whole), config.py (the YAML settings), launcher.py
(where cells train), slurm.py and local.py (the two launchers), report.py (measuring and reporting),
runner.py (the driver); processes.py (the grid's lock, workers that die with the driver) stands apart.
Loading the settings checks the cells, so config.py sits above cells.py and checks.py, which take the
settings as an argument and name their type for type checkers only.
"""
from training.grid.config import AblationConfig
from training.grid.runner import run_grid

__all__ = ["AblationConfig", "run_grid"]
