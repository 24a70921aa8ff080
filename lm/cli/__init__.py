"""The command lines: train.py (python -m lm.cli.train), sample.py, sweep.py, launch.py; runtime.py
sets the process up for XLA:CPU before jax is imported."""
