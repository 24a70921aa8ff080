"""A preference-learning benchmark with a known optimum, on the Markov chain of lm/data/markov.py.

Setting. The reference policy π_ref is the true chain P (order k, S characters, state = the
last k characters). A prompt of ≥ k characters fixes the start state s0 (its last k
characters); a response is a continuation x = x_1..x_N of N characters. The reward is additive
over the generated characters, ``r(x) = Σ_t g(x_t)``, with a fixed random ``g: [S]`` (seeded
standard normal times ``reward_scale``).

KL-regularized optimum. ``J(π) = E_π[r] − β·KL(π‖π_ref)`` over the N generated characters is
maximized by ``π*(x) ∝ π_ref(x)·exp(r(x)/β)``, and ``J(π*) = β·log E_ref[exp(r/β)]``. Because
r is additive and π_ref Markov, π* is a time-varying Markov chain given by backward recursion
(s' = the state after appending a to s):

    V_N(s) = 0
    Z_t(s) = Σ_a P(a|s)·exp((g(a) + V_{t+1}(s'))/β),    V_t(s) = β·log Z_t(s)
    π*_t(a|s) = P(a|s)·exp((g(a) + V_{t+1}(s'))/β) / Z_t(s)

and ``J(π*) = V_0(s0)`` (averaged over a start distribution: ``Σ_s μ(s)·V_0(s)``).

Preferences. A pair is two continuations drawn from π_ref for the same s0, labeled by
Bradley–Terry with the true reward: ``P(y1 ≻ y2) = σ(r(y1) − r(y2))``. There is no separate
temperature: ``reward_scale`` plays the role of 1/τ. The best possible reward model predicts
the pair member with the larger r and is right with probability σ(|r1 − r2|), so the Bayes
pairwise accuracy (against the sampled labels) is ``E[σ(|r1 − r2|)]`` (ties score 1/2).

Scores for a trained model: a reward model's pairwise accuracy against the Bayes accuracy; a
DPO policy's ``fraction_of_optimal_gain = (J(π) − J(π_ref)) / (J(π*) − J(π_ref))``, with J(π)
estimated by :meth:`MarkovReward.monte_carlo_objective` from the policy's own samples.

Everything here works on character indices in [0, S) (numpy, float64). A caller maps index i to
the character ``source.alphabet[i]`` and then to its token (one byte = one token under the
byte tokenizer: id ``ord(alphabet[i])``); a prompt's characters map back with
``alphabet.index``. States use MarkovSource's numbering: base-S digits, oldest first.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np


def symbol_rewards(num_symbols: int, *, seed: int, scale: float = 1.0) -> np.ndarray:
    """g: ``[S]`` float64, seeded standard normal times ``scale``."""
    return scale * np.random.default_rng([int(seed), 0x72657764]).standard_normal(num_symbols)


def state_of(symbols, *, order: int, num_symbols: int) -> int:
    """The chain state after a prompt (character indices, ≥ order of them): its last k characters."""
    symbols = [int(c) for c in symbols]
    if len(symbols) < order:
        raise ValueError(f"a prompt needs >= order={order} characters, got {len(symbols)}")
    state = 0
    for c in symbols[len(symbols) - order:]:
        if not 0 <= c < num_symbols:
            raise ValueError(f"character index {c} is outside [0, {num_symbols})")
        state = state * num_symbols + c
    return state


def draw_start_states(distribution, num: int, *, seed) -> np.ndarray:
    """``[num]`` start states drawn from ``distribution`` ``[n]`` (e.g. ``source.stationary``)."""
    p = np.asarray(distribution, np.float64)
    return np.random.default_rng(seed).choice(len(p), size=num, p=p / p.sum())


def fraction_of_optimal_gain(j_policy: float, j_reference: float, j_optimal: float) -> float:
    """``(J(π) − J(π_ref)) / (J(π*) − J(π_ref))``: 0 for the reference, 1 for the optimum."""
    return (j_policy - j_reference) / (j_optimal - j_reference)


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, np.float64)))


class Objective(NamedTuple):
    """Exact ``J = reward − β·kl`` of a Markov policy (floats, nats for kl)."""
    objective: float
    reward: float  # E_π[r]
    kl: float      # KL(π‖π_ref) over the N generated characters


class MonteCarloObjective(NamedTuple):
    """Sample estimate of J: the mean of ``r(x) − β·(log π(x) − log π_ref(x))`` over samples."""
    objective: float
    stderr: float  # standard error of `objective` (sample std / sqrt(M))
    reward: float  # mean r(x)
    kl: float      # mean log π(x) − log π_ref(x)


class PreferencePairs(NamedTuple):
    """M pairs of continuations from π_ref, labeled by Bradley–Terry with the true reward."""
    start_states: np.ndarray     # [M] int
    first: np.ndarray            # [M, N] int character indices
    second: np.ndarray           # [M, N]
    first_reward: np.ndarray     # [M] float64 r(first)
    second_reward: np.ndarray    # [M] float64 r(second)
    first_preferred: np.ndarray  # [M] bool, drawn with P = σ(r(first) − r(second))

    @property
    def chosen(self):
        return np.where(self.first_preferred[:, None], self.first, self.second)

    @property
    def rejected(self):
        return np.where(self.first_preferred[:, None], self.second, self.first)


@dataclass(frozen=True, eq=False)
class MarkovReward:
    """The benchmark: chain ``transitions`` [n = S**k, S], reward g ``[S]``, horizon N.

    A *policy* is an array of per-step transition tables ``[N, n, S]`` (row t, s: the
    distribution of the t-th generated character in state s), or one table ``[n, S]`` used at
    every step. A *start* is a state id or a distribution ``[n]`` over states.
    """
    transitions: np.ndarray
    symbol_rewards: np.ndarray
    horizon: int

    @classmethod
    def from_source(cls, source, *, horizon: int, reward_scale: float = 1.0, seed: int = 0):
        """The benchmark on a :class:`lm.data.markov.MarkovSource`, g seeded by ``seed``."""
        return cls(source.transitions, symbol_rewards(source.num_symbols, seed=seed, scale=reward_scale),
                   horizon)

    def __post_init__(self):
        n, s = np.shape(self.transitions)
        if np.shape(self.symbol_rewards) != (s,) or self.horizon < 1:
            raise ValueError(f"need symbol_rewards [{s}] and horizon >= 1, got "
                             f"{np.shape(self.symbol_rewards)} and {self.horizon}")
        object.__setattr__(self, "next_state", (np.arange(n)[:, None] * s + np.arange(s)[None, :]) % n)

    @property
    def num_states(self) -> int:
        return self.transitions.shape[0]

    @property
    def num_symbols(self) -> int:
        return self.transitions.shape[1]

    def reward(self, sequences) -> np.ndarray:
        """r(x) = Σ_t g(x_t): ``[M, N]`` character indices -> ``[M]``."""
        return self.symbol_rewards[np.asarray(sequences)].sum(axis=-1)

    def reference_policy(self) -> np.ndarray:
        return np.broadcast_to(self.transitions, (self.horizon,) + self.transitions.shape)

    def _policy(self, policy):
        policy = np.asarray(policy, np.float64)
        shape = (self.horizon, self.num_states, self.num_symbols)
        if policy.shape == shape[1:]:
            policy = np.broadcast_to(policy, shape)
        if policy.shape != shape or np.any(policy < 0) or not np.allclose(policy.sum(-1), 1.0):
            raise ValueError(f"a policy is [N, n, S] = {list(shape)} (or [n, S]) of distributions, "
                             f"got shape {policy.shape}")
        return policy

    def _start(self, start):
        if np.ndim(start) == 0:
            mu = np.zeros(self.num_states)
            mu[int(start)] = 1.0
            return mu
        mu = np.asarray(start, np.float64)
        if mu.shape != (self.num_states,) or not math.isclose(mu.sum(), 1.0, rel_tol=1e-9):
            raise ValueError(f"a start distribution is [{self.num_states}] summing to 1, got {mu.shape}")
        return mu

    def optimal_policy(self, beta: float):
        """π* by backward recursion: ``(policy [N, n, S], values [N+1, n])``, values[t] = V_t."""
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        with np.errstate(divide="ignore"):
            log_p = np.log(self.transitions)
        policy = np.empty((self.horizon, self.num_states, self.num_symbols))
        values = np.zeros((self.horizon + 1, self.num_states))
        for t in reversed(range(self.horizon)):
            logits = log_p + (self.symbol_rewards[None, :] + values[t + 1][self.next_state]) / beta
            top = logits.max(axis=1, keepdims=True)
            log_z = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
            policy[t] = np.exp(logits - log_z[:, None])
            values[t] = beta * log_z
        return policy, values

    def optimal_objective(self, beta: float, start) -> float:
        """J(π*) = Σ_s μ(s)·V_0(s)."""
        return float(self._start(start) @ self.optimal_policy(beta)[1][0])

    def objective(self, policy, beta: float, start) -> Objective:
        """Exact J(π) of a Markov policy by forward propagation of the state marginals."""
        policy, mu = self._policy(policy), self._start(start)
        with np.errstate(divide="ignore", invalid="ignore"):
            log_ratio = np.where(policy > 0, np.log(policy) - np.log(self.transitions), 0.0)
        reward = kl = 0.0
        for t in range(self.horizon):
            joint = mu[:, None] * policy[t]  # [n, S]: P(s_t = s, x_t = a)
            reward += float((joint @ self.symbol_rewards).sum())
            kl += float(np.sum(np.where(joint > 0, joint * log_ratio[t], 0.0)))
            mu = np.bincount(self.next_state.ravel(), weights=joint.ravel(), minlength=self.num_states)
        return Objective(reward - beta * kl, reward, kl)

    def sample(self, policy, start_states, *, seed):
        """Continuations from a Markov policy: ``(sequences [M, N] int, log π(x) [M])``."""
        policy, state = self._policy(policy), np.array(start_states, np.int64)
        rng = np.random.default_rng(seed)
        u = rng.random((len(state), self.horizon))
        sequences = np.empty((len(state), self.horizon), np.int64)
        logp = np.zeros(len(state))
        for t in range(self.horizon):
            rows = policy[t, state]
            sym = np.minimum((u[:, t:t + 1] >= np.cumsum(rows, axis=1)).sum(axis=1), self.num_symbols - 1)
            logp += np.log(rows[np.arange(len(state)), sym])
            sequences[:, t], state = sym, self.next_state[state, sym]
        return sequences, logp

    def token_logprobs(self, sequences, start_states) -> np.ndarray:
        """log P(x_t | s_t) of each character under the chain: ``[M, N]``."""
        sequences, state = np.asarray(sequences), np.array(start_states, np.int64)
        logp = np.zeros(sequences.shape)
        for t in range(sequences.shape[1]):
            logp[:, t] = np.log(self.transitions[state, sequences[:, t]])
            state = self.next_state[state, sequences[:, t]]
        return logp

    def reference_logprobs(self, sequences, start_states) -> np.ndarray:
        """log π_ref(x) = Σ_t log P(x_t | s_t): ``[M]``."""
        return self.token_logprobs(sequences, start_states).sum(axis=1)

    def monte_carlo_objective(self, sequences, policy_logprobs, start_states, beta: float):
        """Unbiased estimate of J(π) from the policy's own samples (any policy, e.g. a trained LM).

        Args: sequences ``[M, N]`` generated character indices; ``policy_logprobs`` the sampling
        policy's log π(x), ``[M]`` or per token ``[M, N]`` (summed); ``start_states`` ``[M]``.
        """
        logp = np.asarray(policy_logprobs, np.float64)
        logp = logp.sum(axis=1) if logp.ndim == 2 else logp
        log_ratio = logp - self.reference_logprobs(sequences, start_states)
        reward = self.reward(sequences)
        values = reward - beta * log_ratio
        stderr = values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else math.inf
        return MonteCarloObjective(float(values.mean()), float(stderr), float(reward.mean()),
                                   float(log_ratio.mean()))

    def preference_pairs(self, start_states, *, seed) -> PreferencePairs:
        """Two π_ref continuations per start state, labeled with P(first ≻ second) = σ(r1 − r2)."""
        rng = np.random.default_rng(seed)
        start_states = np.array(start_states, np.int64)
        first, _ = self.sample(self.transitions, start_states, seed=rng)
        second, _ = self.sample(self.transitions, start_states, seed=rng)
        r1, r2 = self.reward(first), self.reward(second)
        label = rng.random(len(start_states)) < _sigmoid(r1 - r2)
        return PreferencePairs(start_states, first, second, r1, r2, label)

    def num_reward_values(self) -> int:
        """Support size of r under π_ref: the compositions of N into S symbol counts."""
        return math.comb(self.horizon + self.num_symbols - 1, self.num_symbols - 1)

    def reward_distribution(self, start):
        """Exact law of r(x) under π_ref: ``(values [K], probs [K])``, K = :meth:`num_reward_values`.

        r depends on x only through the symbol counts c (r = c·g), so a dynamic program over
        (state, counts) propagates the law exactly; K grows as N^(S−1)/(S−1)!.
        """
        mu, s, n = self._start(start), self.num_symbols, self.num_states
        counts, prob, eye = np.zeros((1, s), np.int64), mu[:, None], np.eye(s, dtype=np.int64)
        for _ in range(self.horizon):
            successors = (counts[:, None, :] + eye).reshape(-1, s)  # [K_old·S, S]
            counts, inverse = np.unique(successors, axis=0, return_inverse=True)
            inverse = inverse.reshape(-1, s)  # [K_old, S] -> index among the new counts
            k = len(counts)
            index = self.next_state[:, None, :] * k + inverse[None, :, :]
            weight = prob[:, :, None] * self.transitions[:, None, :]
            prob = np.bincount(index.ravel(), weights=weight.ravel(), minlength=n * k).reshape(n, k)
        return counts @ self.symbol_rewards, prob.sum(axis=0)

    def bayes_pairwise_accuracy(self, start, *, max_support: int = 3000, num_samples: int = 200_000,
                                seed: int = 0):
        """``(accuracy, stderr)``: E[σ(|r1 − r2|)] over π_ref pairs sharing a start state.

        Exact (stderr 0) from :meth:`reward_distribution` when its support K ≤ ``max_support``
        (K² work per start state); otherwise a Monte-Carlo mean of σ(|r1 − r2|) over
        ``num_samples`` pairs (start states drawn from ``start``), with its standard error.
        """
        mu = self._start(start)
        if self.num_reward_values() <= max_support:
            total = 0.0
            for s0 in np.flatnonzero(mu):
                values, probs = self.reward_distribution(int(s0))
                for i in range(0, len(values), 512):
                    block = _sigmoid(np.abs(values[i:i + 512, None] - values[None, :]))
                    total += mu[s0] * float(probs[i:i + 512] @ block @ probs)
            return total, 0.0
        pairs = self.preference_pairs(draw_start_states(mu, num_samples, seed=seed), seed=seed + 1)
        hits = _sigmoid(np.abs(pairs.first_reward - pairs.second_reward))
        return float(hits.mean()), float(hits.std(ddof=1) / math.sqrt(num_samples))
