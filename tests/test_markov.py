"""The known-entropy source: its stated entropies are the true conditional entropies."""

import numpy as np
import pytest

from lm.data.markov import MarkovSource


def test_documents_are_deterministic_and_use_the_alphabet():
    m = MarkovSource(alphabet="abcd", order=2, concentration=0.5, seed=3)
    assert m.document(7, 50) == m.document(7, 50)
    assert m.document(7, 50) != m.document(8, 50)
    assert set(m.document(1, 500)) <= set("abcd")
    assert len(m.document(0, 1)) == 1 and m.document(0, 0) == ""


def test_stationary_distribution_is_fixed_point():
    m = MarkovSource(alphabet="abc", order=2, concentration=1.0, seed=0)
    s, n = m.num_symbols, m.num_states
    nxt = (np.arange(n)[:, None] * s + np.arange(s)[None, :]) % n
    pushed = np.bincount(nxt.ravel(), weights=(m.stationary[:, None] * m.transitions).ravel(), minlength=n)
    np.testing.assert_allclose(pushed, m.stationary, atol=1e-12)


@pytest.mark.parametrize("order", [1, 2])
def test_empirical_log_loss_matches_target_entropies(order):
    """The mean of −log P_true(x_t | x_<t) over many documents converges to H(x_t | x_<t)."""
    m = MarkovSource(alphabet="abcde", order=order, concentration=0.7, seed=1)
    length, n_docs = 6, 4000
    losses = np.zeros(length)
    idx = {c: i for i, c in enumerate(m.alphabet)}
    for d in range(n_docs):
        x = [idx[c] for c in m.document(d, length)]
        for t in range(length):
            if t < order:  # conditional of the stationary k-tuple marginal
                joint = m.stationary.reshape((m.num_symbols,) * order)
                marg = joint.sum(axis=tuple(range(t + 1, order))) if t + 1 < order else joint
                num = marg[tuple(x[: t + 1])]
                den = marg.sum(axis=-1)[tuple(x[:t])] if t else 1.0
                p = num / den
            else:
                state = 0
                for c in x[t - order:t]:
                    state = state * m.num_symbols + c
                p = m.transitions[state, x[t]]
            losses[t] -= np.log(p)
    losses /= n_docs
    np.testing.assert_allclose(losses, m.target_entropies(length), rtol=0.05)
    assert m.target_entropies(length)[order:].std() < 1e-12  # the entropy rate after the warm-up


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="alphabet"):
        MarkovSource(alphabet="aa", order=1, concentration=1.0, seed=0)
    with pytest.raises(ValueError, match="order"):
        MarkovSource(alphabet="ab", order=0, concentration=1.0, seed=0)
    with pytest.raises(ValueError, match="concentration"):
        MarkovSource(alphabet="ab", order=1, concentration=0.0, seed=0)
