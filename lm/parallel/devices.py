"""What an accelerator chip offers, from its vendor's published tables: dense bf16 peak FLOP/s and
memory (HBM) per chip, looked up by JAX `device_kind` or by Cloud TPU slice name.

Sources (vendors' spec pages; numbers per chip, dense, no sparsity):
  TPU v4    275 TFLOP/s bf16, 32 GiB HBM2     cloud.google.com/tpu/docs/v4
  TPU v5e   197 TFLOP/s bf16, 16 GB HBM2      cloud.google.com/tpu/docs/v5e
  TPU v5p   459 TFLOP/s bf16, 95 GB HBM2e     cloud.google.com/tpu/docs/v5p
  TPU v6e   918 TFLOP/s bf16, 32 GB HBM       cloud.google.com/tpu/docs/v6e
  A100      312 TFLOP/s bf16, 40 or 80 GB     nvidia.com/en-us/data-center/a100 (datasheet)
  H100 SXM  989 TFLOP/s bf16, 80 GB HBM3      nvidia.com/en-us/data-center/h100 (datasheet)
  H100 PCIe 756 TFLOP/s bf16, 80 GB HBM2e     (same datasheet)
  H200      989 TFLOP/s bf16, 141 GB HBM3e    nvidia.com/en-us/data-center/h200 (datasheet)

JAX names the chips by `device_kind`: 'TPU v4', 'TPU v5 lite' (v5e), 'TPU v5' / 'TPU v5p',
'TPU v6 lite' (v6e), 'NVIDIA A100-SXM4-40GB', 'NVIDIA H100 80GB HBM3', 'NVIDIA H200', ...
Slice names are Cloud TPU accelerator types: 'v4-32', 'v5litepod-16' / 'v5e-16', 'v5p-128', 'v6e-64'.
"""

from __future__ import annotations

import dataclasses
import re

GB, GiB = 1e9, 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str  # short name: v5p, h100, ...
    peak_bf16_flops: float  # dense bf16 FLOP/s per chip
    hbm_bytes: float  # memory per chip
    cores_per_chip_in_name: int = 1  # Cloud TPU slice names count TensorCores for v4/v5p (2 per chip)


TPU_V4 = Chip("v4", 275e12, 32 * GiB, 2)
TPU_V5E = Chip("v5e", 197e12, 16 * GB)
TPU_V5P = Chip("v5p", 459e12, 95 * GB, 2)
TPU_V6E = Chip("v6e", 918e12, 32 * GB)
A100_40 = Chip("a100-40gb", 312e12, 40 * GB)
A100_80 = Chip("a100-80gb", 312e12, 80 * GB)
H100_SXM = Chip("h100", 989e12, 80 * GB)
H100_PCIE = Chip("h100-pcie", 756e12, 80 * GB)
H200 = Chip("h200", 989e12, 141 * GB)

# device_kind patterns (case-insensitive regular expressions, tried in order) → chip
_KINDS = [
    (r"^tpu v4", TPU_V4),
    (r"^tpu v5 ?lite|^tpu v5e", TPU_V5E),
    (r"^tpu v5p?$|^tpu v5p", TPU_V5P),
    (r"^tpu v6 ?lite|^tpu v6e", TPU_V6E),
    (r"a100.*80", A100_80),
    (r"a100", A100_40),
    (r"h100.*pcie", H100_PCIE),
    (r"h100", H100_SXM),
    (r"h200", H200),
]

# slice-name prefixes → chip (the name's number counts cores for v4/v5p, chips otherwise)
_SLICES = {"v4": TPU_V4, "v5litepod": TPU_V5E, "v5e": TPU_V5E, "v5p": TPU_V5P, "v6e": TPU_V6E}


def chip_for_kind(device_kind: str) -> Chip | None:
    """The chip a JAX `device_kind` names, or None (a CPU, an unknown accelerator)."""
    kind = device_kind.strip().lower()
    for pattern, chip in _KINDS:
        if re.search(pattern, kind):
            return chip
    return None


def parse_slice(slice_name: str) -> tuple[Chip, int]:
    """'v5p-128' → (TPU_V5P, 64 chips); 'v6e-16' → (TPU_V6E, 16). ValueError names the known kinds."""
    match = re.fullmatch(r"(v4|v5litepod|v5e|v5p|v6e)-(\d+)", slice_name.strip().lower())
    if not match:
        raise ValueError(f"unknown TPU slice {slice_name!r}: expected <kind>-<size> with kind one of "
                         f"{sorted(_SLICES)} (e.g. v5p-128, v6e-64)")
    chip = _SLICES[match.group(1)]
    size = int(match.group(2))
    if size % chip.cores_per_chip_in_name:
        raise ValueError(f"TPU slice {slice_name!r}: {chip.name} slice sizes count TensorCores, "
                         f"{chip.cores_per_chip_in_name} per chip; {size} is not a multiple")
    return chip, size // chip.cores_per_chip_in_name


def topology_name(slice_name: str) -> str:
    """The `get_topology_desc` name of a slice: 'v5p-128' → 'v5p:4x4x4', 'v6e-64' → 'v6e:8x8'.
    2-D tori for v5e/v6e, 3-D for v4/v5p, as square as the chip count allows."""
    chip, chips = parse_slice(slice_name)
    if chip in (TPU_V5E, TPU_V6E):
        x = 1 << ((chips.bit_length() - 1) // 2)
        if x * (chips // x) != chips:
            raise ValueError(f"TPU slice {slice_name!r}: {chips} chips is not a 2-D torus")
        return f"{chip.name}:{x}x{chips // x}"
    dims = [1, 1, 1]
    n, i = chips, 0
    while n > 1:
        if n % 2:
            raise ValueError(f"TPU slice {slice_name!r}: {chips} chips is not a power-of-two 3-D torus")
        dims[i % 3] *= 2
        n //= 2
        i += 1
    dims = sorted(dims, reverse=chips < 8)  # 2x2x1 below a cube, then 2x2x2, 2x2x4, 2x4x4, 4x4x4, ...
    return f"{chip.name}:{'x'.join(map(str, dims))}"


def peak_flops(device_kind: str) -> float | None:
    """Dense bf16 peak FLOP/s per chip of `device_kind`, None where unknown (CPU)."""
    chip = chip_for_kind(device_kind)
    return chip.peak_bf16_flops if chip else None


def hbm_bytes(device_kind: str = "", slice_name: str = "") -> int | None:
    """Memory per chip by device kind, else by slice name; None where neither is known."""
    chip = chip_for_kind(device_kind) if device_kind else None
    if chip is None and slice_name:
        try:
            chip = parse_slice(slice_name)[0]
        except ValueError:
            chip = None
    return int(chip.hbm_bytes) if chip else None
