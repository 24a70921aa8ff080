"""A random Markov chain over characters whose cross-entropy floor is known exactly.

The chain has a fixed order k over an alphabet of S characters. Its state is the
last k characters; from each state the next character is drawn from a row of a
transition table sampled once from a symmetric Dirichlet(concentration), seeded.
A document is a window of the *stationary* chain: its first k characters are drawn
from the stationary distribution π over k-tuples, the rest by the transition table.

Because the process is stationary and fully known, the Bayes-optimal predictor of
x_t given x_<t is the chain itself, and its expected log-loss is

    H(x_t | x_<t) = H(x_0..x_t) − H(x_0..x_{t−1})        for t < k (marginals of π)
    H(x_t | x_<t) = Σ_s π(s) · H(P[s, ·]) = h (entropy rate)  for t ≥ k

(nats). No model can beat the mean of these over the scored targets; the gap
between a model's cross-entropy and it is KL(data ‖ model) per token.
"""

from __future__ import annotations

import bisect

import numpy as np


def _entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy in nats along `axis`, with 0 · log 0 = 0."""
    p = np.asarray(p, dtype=np.float64)
    logp = np.log(np.where(p > 0, p, 1.0))
    return -(p * logp).sum(axis=axis)


class MarkovSource:
    """Seeded random Markov chain of order `order` over the characters of `alphabet`.

    Attributes:
      transitions: [S**k, S] float64, row s = distribution of the next character
        after the k-tuple whose base-S digits (oldest first) are s.
      stationary: [S**k] float64, the stationary distribution over k-tuples.
    """

    def __init__(self, *, alphabet: str, order: int, concentration: float, seed: int):
        if len(set(alphabet)) != len(alphabet) or len(alphabet) < 2:
            raise ValueError(f"alphabet must hold >= 2 distinct characters, got {alphabet!r}")
        if not all(ord(c) < 128 for c in alphabet):
            raise ValueError(f"alphabet must be ASCII (one byte = one token), got {alphabet!r}")
        if order < 1:
            raise ValueError(f"order must be >= 1, got {order}")
        if concentration <= 0:
            raise ValueError(f"concentration must be > 0, got {concentration}")
        self.alphabet = alphabet
        self.order = order
        self.num_symbols = len(alphabet)
        self.num_states = self.num_symbols**order
        rng = np.random.default_rng(seed)
        self.transitions = rng.dirichlet(np.full(self.num_symbols, concentration), size=self.num_states)
        self.stationary = self._stationary_distribution()
        self._cum_transitions = [list(np.cumsum(row)) for row in self.transitions]
        self._cum_stationary = list(np.cumsum(self.stationary))

    def _next_state(self, state: int, symbol: int) -> int:
        return (state * self.num_symbols + symbol) % self.num_states

    def _stationary_distribution(self) -> np.ndarray:
        """π with π = π·P over k-tuples, by power iteration (the chain is ergodic: all P > 0 a.s.)."""
        s, n = self.num_symbols, self.num_states
        nxt = (np.arange(n)[:, None] * s + np.arange(s)[None, :]) % n  # [n, S]
        pi = np.full(n, 1.0 / n)
        for _ in range(100_000):
            new = np.bincount(nxt.ravel(), weights=(pi[:, None] * self.transitions).ravel(), minlength=n)
            if np.abs(new - pi).sum() < 1e-15:
                return new / new.sum()
            pi = new
        raise RuntimeError("stationary distribution did not converge")

    def document(self, index: int, length: int) -> str:
        """The `index`-th document: `length` characters of the stationary chain, deterministic."""
        if index < 0 or length < 0:
            raise ValueError(f"index and length must be >= 0, got {index}, {length}")
        rng = np.random.default_rng([int(index), 0x6D61726B])
        u = rng.random(length + 1).tolist()
        state = min(bisect.bisect_right(self._cum_stationary, u[0]), self.num_states - 1)
        digits = []
        rest = state
        for _ in range(self.order):
            digits.append(rest % self.num_symbols)
            rest //= self.num_symbols
        symbols = digits[::-1][:length]
        cum = self._cum_transitions
        last = self.num_symbols - 1
        for t in range(self.order, length):
            sym = min(bisect.bisect_right(cum[state], u[t + 1 - self.order]), last)
            symbols.append(sym)
            state = self._next_state(state, sym)
        return "".join(self.alphabet[i] for i in symbols)

    def entropy_rate(self) -> float:
        """h = Σ_s π(s) H(P[s]) in nats per character."""
        return float(self.stationary @ _entropy(self.transitions))

    def target_entropies(self, length: int) -> np.ndarray:
        """[length] nats: H(x_t | x_<t) for t = 0..length−1 under the stationary chain."""
        s, k = self.num_symbols, self.order
        joint = self.stationary.reshape((s,) * k)  # axes: x_0 .. x_{k-1}
        out = np.full(length, self.entropy_rate())
        prev = 0.0
        for t in range(min(k, length)):
            marginal = joint.sum(axis=tuple(range(t + 1, k))) if t + 1 < k else joint
            h_joint = float(_entropy(marginal.ravel()))
            out[t] = h_joint - prev
            prev = h_joint
        return out
