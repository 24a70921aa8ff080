"""Devices and processes: the mesh and logical-axis sharding rules (sharding.py) and multi-process
start-up and failure handling (distributed.py)."""
