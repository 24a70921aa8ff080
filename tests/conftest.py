"""Test-session setup: 8 virtual CPU devices (before jax is imported) and shared fixtures.

Single-device tests build their mesh over `jax.devices()[:1]`; the mesh tests use all 8.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from lm.data.markov import MarkovSource  # noqa: E402

ALPHABET = "abcdefghijklmnop"


@pytest.fixture(scope="session")
def markov():
    return MarkovSource(alphabet=ALPHABET, order=1, concentration=0.5, seed=0)


def markov_batch(source: MarkovSource, start: int, batch_size: int, seq_len: int) -> dict:
    """A batch of the contract from documents start..start+B−1, tokens = alphabet index."""
    docs = [source.document(start + i, seq_len + 1) for i in range(batch_size)]
    tokens = np.array([[ALPHABET.index(ch) for ch in d] for d in docs], np.int32)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "loss_mask": np.ones((batch_size, seq_len), np.float32),
        "segment_ids": np.ones((batch_size, seq_len), np.int32),
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch_size, seq_len)).copy(),
    }
