"""Files a run reads and writes: orbax checkpoints (checkpoint.py, checksum.py), metrics sinks
(metrics.py) and the run summary and plots (report.py)."""
