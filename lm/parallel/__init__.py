"""Devices and processes: the mesh (with multi-slice DCN axes) and logical-axis sharding rules
(sharding.py), the chips' vendor tables of peak FLOP/s and HBM (devices.py), and multi-process
start-up and failure handling (distributed.py)."""
