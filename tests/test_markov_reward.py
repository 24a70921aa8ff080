"""The known-optimum preference benchmark against brute-force enumeration on a tiny chain."""
import itertools
import math

import numpy as np
import pytest

from lm.data.markov import MarkovSource
from lm.data.markov_reward import (MarkovReward, draw_start_states, fraction_of_optimal_gain, state_of,
                                   symbol_rewards)

S, K, N, BETA = 3, 2, 4, 0.7


@pytest.fixture(scope="module")
def source():
    return MarkovSource(alphabet="abc", order=K, concentration=0.8, seed=2)


@pytest.fixture(scope="module")
def task(source):
    return MarkovReward.from_source(source, horizon=N, reward_scale=1.5, seed=5)


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def enumerate_all(task, policy_at, s0):
    """Every continuation from s0 with its probability under policy_at(t, state) -> [S], by loops."""
    g = task.symbol_rewards
    seqs, probs, rewards = [], [], []
    for x in itertools.product(range(S), repeat=N):
        p, state = 1.0, s0
        for t, a in enumerate(x):
            p *= policy_at(t, state)[a]
            state = (state * S + a) % S**K
        seqs.append(x)
        probs.append(p)
        rewards.append(sum(g[a] for a in x))
    return np.array(seqs), np.array(probs), np.array(rewards)


def brute_objective(task, policy_at, s0, beta):
    _, p, r = enumerate_all(task, policy_at, s0)
    _, p_ref, _ = enumerate_all(task, lambda t, s: task.transitions[s], s0)
    kl = np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1) / p_ref), 0))
    return p @ r - beta * kl, p @ r, kl


def random_policy(seed, concentration=1.0):
    return np.random.default_rng(seed).dirichlet(np.full(S, concentration), size=(N, S**K))


def test_backward_recursion_matches_brute_force_optimum(task):
    policy, values = task.optimal_policy(BETA)
    for s0 in (0, 4, 7):
        seqs, p_ref, r = enumerate_all(task, lambda t, s: task.transitions[s], s0)
        weight = p_ref * np.exp(r / BETA)  # π*(x) ∝ π_ref(x)·exp(r(x)/β)
        pi_star = weight / weight.sum()
        j_star = BETA * np.log(weight.sum())  # β·log E_ref[exp(r/β)]
        np.testing.assert_allclose(values[0, s0], j_star, rtol=1e-12)
        np.testing.assert_allclose(task.optimal_objective(BETA, s0), j_star, rtol=1e-12)
        # E_π*[r] − β·KL(π*‖π_ref) over the enumeration equals the same number
        np.testing.assert_allclose(pi_star @ r - BETA * pi_star @ np.log(pi_star / p_ref), j_star, rtol=1e-10)
        np.testing.assert_allclose(task.objective(policy, BETA, s0).objective, j_star, rtol=1e-10)
        # every per-step conditional π*(x_t | x_<t) of the enumeration is the recursion's table row
        for t in range(N):
            for prefix in itertools.product(range(S), repeat=t):
                has_prefix = np.all(seqs[:, :t] == prefix, axis=1)
                conditional = np.array([pi_star[has_prefix & (seqs[:, t] == a)].sum() for a in range(S)])
                state = state_of([s0 // S, s0 % S, *prefix], order=K, num_symbols=S)
                np.testing.assert_allclose(policy[t, state], conditional / conditional.sum(), rtol=1e-10)


def test_exact_objective_of_any_markov_policy_matches_enumeration(task, source):
    pol = random_policy(0)
    for s0 in (1, 8):
        want = brute_objective(task, lambda t, s: pol[t, s], s0, BETA)
        np.testing.assert_allclose(task.objective(pol, BETA, s0), want, rtol=1e-10)
        ref = task.objective(task.transitions, BETA, s0)  # J(π_ref) = E_ref[r], KL = 0
        _, p_ref, r = enumerate_all(task, lambda t, s: task.transitions[s], s0)
        np.testing.assert_allclose([ref.objective, ref.reward, ref.kl], [p_ref @ r, p_ref @ r, 0.0], atol=1e-12)
    mixed = task.objective(pol, BETA, source.stationary).objective
    np.testing.assert_allclose(mixed, sum(source.stationary[s] * task.objective(pol, BETA, s).objective
                                          for s in range(S**K)), rtol=1e-10)


def test_optimum_beats_every_other_policy(task, source):
    start = source.stationary
    pi_star, _ = task.optimal_policy(BETA)
    j_star = task.optimal_objective(BETA, start)
    np.testing.assert_allclose(task.objective(pi_star, BETA, start).objective, j_star, rtol=1e-12)
    others = [random_policy(seed, c) for seed, c in enumerate((0.3, 1.0, 5.0))]
    others += [task.reference_policy(), 0.9 * pi_star + 0.1 * random_policy(9), 0.99 * pi_star + 0.01 / S]
    gaps = [j_star - task.objective(pol, BETA, start).objective for pol in others]
    assert min(gaps) > 1e-6, gaps
    j_ref = task.objective(task.transitions, BETA, start).objective
    assert fraction_of_optimal_gain(j_star, j_ref, j_star) == 1.0
    assert fraction_of_optimal_gain(j_ref, j_ref, j_star) == 0.0


@pytest.mark.parametrize("which", ["random", "optimal"])
def test_monte_carlo_estimate_agrees_with_exact_objective(task, source, which):
    policy = random_policy(3) if which == "random" else task.optimal_policy(BETA)[0]
    starts = draw_start_states(source.stationary, 20_000, seed=1)
    seqs, logp = task.sample(policy, starts, seed=2)
    est = task.monte_carlo_objective(seqs, logp, starts, BETA)
    exact = task.objective(policy, BETA, source.stationary)
    assert abs(est.objective - exact.objective) < 4 * est.stderr, (est, exact)
    assert 0 < est.stderr < 0.05
    assert abs(est.reward - exact.reward) < 0.05 and abs(est.kl - exact.kl) < 0.05
    # the policy's log-probs of its own samples are the exact ones (checked by enumeration's rule)
    s0, x = starts[0], seqs[0]
    direct = sum(math.log(policy[t, state_of([s0 // S, s0 % S, *x[:t]], order=K, num_symbols=S), x[t]])
                 for t in range(N))
    np.testing.assert_allclose(logp[0], direct, rtol=1e-12)


def test_reward_law_and_bayes_accuracy_match_enumeration(task, source):
    start = source.stationary
    want = 0.0
    for s0 in range(S**K):
        _, p, r = enumerate_all(task, lambda t, s: task.transitions[s], s0)
        values, probs = task.reward_distribution(s0)
        assert len(values) == task.num_reward_values() == math.comb(N + S - 1, S - 1)
        for f in (lambda v: v, lambda v: v**2, lambda v: np.exp(v / BETA)):
            np.testing.assert_allclose(probs @ f(values), p @ f(r), rtol=1e-12)
        want += start[s0] * p @ sigmoid(np.abs(r[:, None] - r[None, :])) @ p
    exact, stderr = task.bayes_pairwise_accuracy(start)
    assert stderr == 0.0
    np.testing.assert_allclose(exact, want, rtol=1e-12)
    sampled, stderr = task.bayes_pairwise_accuracy(start, max_support=0, num_samples=50_000, seed=3)
    assert 0 < stderr and abs(sampled - want) < 4 * stderr
    assert 0.5 < want < 1.0


def test_pair_labels_follow_bradley_terry(task, source):
    starts = draw_start_states(source.stationary, 40_000, seed=4)
    pairs = task.preference_pairs(starts, seed=5)
    np.testing.assert_array_equal(pairs.first_reward, task.reward(pairs.first))
    np.testing.assert_array_equal(pairs.second_reward, task.reward(pairs.second))
    prob = sigmoid(pairs.first_reward - pairs.second_reward)
    label = pairs.first_preferred.astype(float)
    for lo, hi in ((0, 0.3), (0.3, 0.5), (0.5, 0.7), (0.7, 1.0)):
        bin_ = (prob >= lo) & (prob < hi)
        gap = label[bin_].mean() - prob[bin_].mean()
        assert abs(gap) < 4 * math.sqrt(0.25 / bin_.sum()), (lo, hi, gap)
    chosen_reward = task.reward(pairs.chosen)
    assert np.all(np.where(pairs.first_preferred, pairs.first_reward, pairs.second_reward) == chosen_reward)
    assert np.all((pairs.chosen == pairs.first) | (pairs.chosen == pairs.second))
    # continuations come from π_ref: the first character after state s0 follows P[s0]
    s0 = np.bincount(starts).argmax()
    freq = np.bincount(pairs.first[starts == s0, 0], minlength=S) / (starts == s0).sum()
    np.testing.assert_allclose(freq, task.transitions[s0], atol=0.03)
    again = task.preference_pairs(starts[:100], seed=5)
    np.testing.assert_array_equal(again.first, pairs.first[:100])


def test_states_rewards_and_bad_arguments():
    assert state_of([2, 0, 1], order=2, num_symbols=3) == 0 * 3 + 1  # the last k characters
    assert state_of([1, 2], order=2, num_symbols=3) == 5
    with pytest.raises(ValueError, match="order=2"):
        state_of([1], order=2, num_symbols=3)
    g = symbol_rewards(4, seed=0, scale=2.0)
    np.testing.assert_array_equal(g, symbol_rewards(4, seed=0, scale=2.0))
    assert g.shape == (4,) and not np.array_equal(g, symbol_rewards(4, seed=1, scale=2.0))
    task = MarkovReward(np.full((3, 3), 1 / 3), g[:3], 2)
    with pytest.raises(ValueError, match="policy"):
        task.objective(np.ones((2, 3, 3)), 1.0, 0)
    with pytest.raises(ValueError, match="beta"):
        task.optimal_policy(0.0)
    with pytest.raises(ValueError, match="symbol_rewards"):
        MarkovReward(np.full((3, 3), 1 / 3), g, 2)
