"""Read and write the safetensors format with numpy alone (no torch, no extra dependency).

A file is: an 8-byte little-endian header length N, N bytes of JSON, then the raw tensor bytes.
The JSON maps each tensor name to {"dtype": "F32"|"BF16"|..., "shape": [...], "data_offsets":
[begin, end]} (offsets into the bytes after the header), plus an optional "__metadata__" of
string pairs. Tensors are little-endian, C order. A sharded checkpoint has an index file
`model.safetensors.index.json` whose "weight_map" names the shard file of every tensor.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping

import ml_dtypes
import numpy as np

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def _header(path: str) -> tuple[dict, int]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a safetensors file (its header is not JSON: {e})") from None
    return header, 8 + n


def read_file(path: str) -> dict[str, np.ndarray]:
    """Every tensor of one .safetensors file, as numpy arrays (memory-mapped, read-only)."""
    header, start = _header(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which lm cannot read "
                             f"(known: {sorted(DTYPES)})")
        begin, end = info["data_offsets"]
        dtype = np.dtype(DTYPES[info["dtype"]]).newbyteorder("<")
        out[name] = data[start + begin:start + end].view(dtype).reshape(info["shape"])
    return out


def read_dir(directory: str) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory: model.safetensors, or the shards its index names."""
    index = os.path.join(directory, INDEX_FILE)
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(read_file(os.path.join(directory, shard)))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise ValueError(f"{index} names tensors its shards do not hold, e.g. {missing[:3]}")
        return tensors
    single = os.path.join(directory, SINGLE_FILE)
    if os.path.exists(single):
        return read_file(single)
    found = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors")) if os.path.isdir(directory) else []
    raise FileNotFoundError(f"{directory}: no {SINGLE_FILE} and no {INDEX_FILE}"
                            + (f" (found {found}: which one is the model?)" if found else ""))


def write_file(path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """Write `tensors` (name → array) as one .safetensors file, in name order."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    arrays = []
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        if a.dtype not in _NAMES:
            raise ValueError(f"tensor {name!r}: dtype {a.dtype} has no safetensors name")
        a = a.astype(a.dtype.newbyteorder("<"), copy=False)
        header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for a in arrays:
            f.write(a.tobytes())
    os.replace(tmp, path)

