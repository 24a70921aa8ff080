"""Which platform a step is being compiled for, read while tracing: the one place the model asks.

What pays only on one backend (a custom VJP measured on XLA:CPU, a Pallas kernel) is chosen by
the platform of the devices the step is *compiled for*, not by `jax.default_backend()`: a
deviceless compile for a TPU topology on a CPU-only machine must trace the TPU code. The devices
come from, in order:

1. `mesh`, when the caller passes one;
2. `compiling_for(platform)`, a context that forces the answer (tests, tools);
3. the mesh in context: `jax.set_mesh(mesh)` (the abstract mesh knows its device platform) or
   the older `with mesh:`;
4. the mesh of the activation sharding hints the trainer traces its step under
   (lm/model/hints.py; on meshes of more than one device);
5. `jax.default_backend()`.

`cpu_kernels()` says whether the CPU-only kernels (lm/model/layers.py: `matmuls`, `swiglu` with
written-out VJPs and an optimization barrier) are used: on CPU, unless the environment variable
`LM_CPU_KERNELS` is `on` (everywhere) or `off` (nowhere).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

import jax

from lm.model import hints

_FORCED: contextvars.ContextVar[str | None] = contextvars.ContextVar("compiling_for", default=None)
PLATFORMS = ("cpu", "tpu", "gpu")


@contextlib.contextmanager
def compiling_for(platform: str | None) -> Iterator[None]:
    """Trace as if compiling for `platform` ('cpu', 'tpu', 'gpu'; None: detect)."""
    if platform is not None and platform not in PLATFORMS:
        raise ValueError(f"compiling_for: platform must be one of {PLATFORMS} or None, got {platform!r}")
    token = _FORCED.set(platform)
    try:
        yield
    finally:
        _FORCED.reset(token)


def _device_platform(device) -> str:
    """'cpu', 'tpu' or 'gpu' ('cuda' and 'rocm' devices are 'gpu')."""
    name = str(device.platform).lower()
    return "gpu" if name in ("gpu", "cuda", "rocm") else name


def context_mesh() -> jax.sharding.Mesh | jax.sharding.AbstractMesh | None:
    """The mesh the step is traced under (`jax.set_mesh`, `with mesh:`, or the activation hints'
    mesh), or None."""
    abstract = jax.sharding.get_abstract_mesh()
    if abstract is not None and not abstract.empty:
        return abstract
    from jax._src import mesh as mesh_lib  # the `with mesh:` context has no public getter

    physical = mesh_lib.thread_resources.env.physical_mesh
    if physical is not None and not physical.empty:
        return physical
    sharding = hints.sharding_for(("batch",), (1,))
    return getattr(sharding, "mesh", None)


def mesh_platform(mesh) -> str:
    """The platform of a Mesh's (or an AbstractMesh's) devices."""
    if isinstance(mesh, jax.sharding.AbstractMesh):
        device = mesh.abstract_device
        if device is None:
            raise ValueError(f"mesh_platform: the abstract mesh {mesh} names no device platform")
        return _device_platform(device)
    return _device_platform(mesh.devices.flat[0])


def compile_platform(mesh=None) -> str:
    """'cpu', 'tpu' or 'gpu': the platform the step being traced is compiled for (see the module
    docstring for where it is read from)."""
    if mesh is not None:
        return mesh_platform(mesh)
    forced = _FORCED.get()
    if forced is not None:
        return forced
    found = context_mesh()
    if found is not None and (not isinstance(found, jax.sharding.AbstractMesh) or found.abstract_device is not None):
        return mesh_platform(found)
    backend = jax.default_backend()
    return "gpu" if backend in ("gpu", "cuda", "rocm") else backend


def cpu_kernels(mesh=None) -> bool:
    """Whether to use the CPU-only kernels: `LM_CPU_KERNELS` = on | off | auto (unset: auto, which
    means: when compiling for CPU)."""
    flag = os.environ.get("LM_CPU_KERNELS", "auto").lower()
    if flag not in ("auto", "on", "off"):
        raise ValueError(f"environment variable LM_CPU_KERNELS must be auto, on or off, got {flag!r}")
    if flag != "auto":
        return flag == "on"
    return compile_platform(mesh) == "cpu"
