"""Tests for lm.masking: teacher forcing, attention masks, role-based loss masks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from lm.losses import cross_entropy
from lm.masking import (ROLE_ASSISTANT, ROLE_PAD, ROLE_SYSTEM, ROLE_USER, attention_mask,
                        causal_mask, loss_mask_from_roles, segment_mask, segment_positions,
                        shift_tokens)

SETTINGS = settings(max_examples=30, deadline=None)

WIDTH = 9  # one row width, so that each jitted function compiles once


@st.composite
def packed_row(draw):
    """Segment ids of one packed row: contiguous documents 1, 2, ... then padding 0."""
    lengths = draw(st.lists(st.integers(1, WIDTH), min_size=0, max_size=4))
    row = [doc for doc, size in enumerate(lengths, start=1) for _ in range(size)][:WIDTH]
    return row + [0] * (WIDTH - len(row))


def test_shift_tokens_teacher_forcing():
    tokens = jnp.array([[5, 6, 7, 8], [9, 0, 0, 1]])  # 0 is a real token here, not padding
    inputs, targets, mask = shift_tokens(tokens)
    np.testing.assert_array_equal(inputs, [[5, 6, 7], [9, 0, 0]])
    np.testing.assert_array_equal(targets, [[6, 7, 8], [0, 0, 1]])
    assert mask.dtype == jnp.float32 and np.all(np.asarray(mask) == 1.0)


def test_shift_tokens_aligns_the_loss_mask_with_targets():
    tokens = jnp.array([10, 11, 12, 13, 14])
    per_token = jnp.array([0.0, 0.0, 1.0, 1.0, 0.0])  # learn to produce tokens 12 and 13
    _, targets, mask = shift_tokens(tokens, loss_mask=per_token)
    np.testing.assert_array_equal(np.asarray(targets)[np.asarray(mask) == 1], [12, 13])


def test_shift_tokens_masks_targets_across_documents_and_padding():
    tokens = jnp.array([1, 2, 3, 4, 5, 6, 7])
    segments = jnp.array([1, 1, 1, 2, 2, 0, 0])
    inputs, targets, mask = shift_tokens(tokens, segment_ids=segments)
    # 1→2, 2→3 in doc 1; 3→4 crosses into doc 2; 4→5 in doc 2; 5→6, 6→7 are padding
    np.testing.assert_array_equal(mask, [1, 1, 0, 1, 0, 0])


@SETTINGS
@given(packed_row() | st.lists(st.integers(0, 3), min_size=WIDTH, max_size=WIDTH))
def test_shift_tokens_mask_matches_a_loop(segments):
    segments = np.array(segments)
    tokens = np.arange(len(segments)) + 100
    weights = np.linspace(0.5, 2.0, len(segments))
    _, _, mask = shift_tokens(tokens, loss_mask=weights, segment_ids=segments)
    expected = [weights[t + 1] if segments[t] == segments[t + 1] != 0 else 0.0
                for t in range(len(segments) - 1)]
    np.testing.assert_allclose(mask, expected, rtol=1e-6)


def test_shift_tokens_rejects_bad_shapes():
    with pytest.raises(ValueError, match="segment_ids"):
        shift_tokens(jnp.zeros((2, 5), jnp.int32), segment_ids=jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="at least 2"):
        shift_tokens(jnp.zeros((3, 1), jnp.int32))


def test_causal_mask_is_lower_triangular_and_handles_decoding_offsets():
    idx = jnp.arange(5)
    np.testing.assert_array_equal(causal_mask(idx, idx), np.tril(np.ones((5, 5), bool)))
    # decoding: 2 new queries at positions 3, 4 against a cache of 6 slots
    mask = causal_mask(jnp.array([[3, 4]]), jnp.arange(6)[None])
    np.testing.assert_array_equal(mask[0], [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]])


def test_segment_mask_example():
    seg = jnp.array([[1, 1, 2, 0]])
    expected = [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    np.testing.assert_array_equal(segment_mask(seg, seg)[0], np.array(expected, bool))


attention_mask_jit = jax.jit(attention_mask)
segment_positions_jit = jax.jit(segment_positions)


@SETTINGS
@given(st.lists(packed_row(), min_size=3, max_size=3))
def test_attention_mask_matches_a_loop(rows):
    seg = np.array(rows)
    idx = np.broadcast_to(np.arange(WIDTH), seg.shape)
    mask = np.asarray(attention_mask_jit(seg, seg, idx, idx))
    assert mask.shape == (3, WIDTH, WIDTH) and mask.dtype == bool
    for b in range(3):
        for q in range(WIDTH):
            for k in range(WIDTH):
                assert mask[b, q, k] == (k <= q and seg[b, q] == seg[b, k] != 0)
    # per-document positions (restarting at 0) give the same mask as absolute ones
    pos = np.asarray(segment_positions_jit(seg))
    np.testing.assert_array_equal(np.asarray(attention_mask_jit(seg, seg, pos, pos)), mask)


def test_segment_positions_restart_per_document():
    seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0], [4, 4, 4, 4, 4, 4, 4, 4]])
    np.testing.assert_array_equal(segment_positions(seg),
                                  [[0, 1, 2, 0, 1, 0, 0, 0], [0, 1, 2, 3, 4, 5, 6, 7]])


CHAT_ROLES = jnp.array([ROLE_SYSTEM, ROLE_USER, ROLE_USER, ROLE_ASSISTANT, ROLE_ASSISTANT,
                        ROLE_USER, ROLE_ASSISTANT, ROLE_PAD])


def test_loss_mask_from_roles_modes():
    np.testing.assert_array_equal(loss_mask_from_roles(CHAT_ROLES), [0, 0, 0, 1, 1, 0, 1, 0])
    np.testing.assert_array_equal(loss_mask_from_roles(CHAT_ROLES, train_on="all"),
                                  [1, 1, 1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(loss_mask_from_roles(CHAT_ROLES, train_on=("user", ROLE_ASSISTANT)),
                                  [0, 1, 1, 1, 1, 1, 1, 0])
    assert loss_mask_from_roles(CHAT_ROLES).dtype == jnp.float32
    with pytest.raises(ValueError, match="unknown role"):
        loss_mask_from_roles(CHAT_ROLES, train_on="assistnat")


def test_assistant_only_loss_scores_exactly_the_assistant_tokens():
    tokens = jnp.arange(8) + 20
    inputs, targets, mask = shift_tokens(tokens, loss_mask=loss_mask_from_roles(CHAT_ROLES))
    assistant_tokens = np.asarray(tokens)[np.asarray(CHAT_ROLES) == ROLE_ASSISTANT]
    np.testing.assert_array_equal(np.asarray(targets)[np.asarray(mask) == 1], assistant_tokens)
    # the loss then averages over assistant targets only; user targets can be anything
    logits = jnp.log(jnp.full((7, 40), 1 / 40)).at[jnp.arange(7), targets].set(jnp.log(0.5))
    ce = jax.jit(cross_entropy)
    out = ce(logits, targets, mask)
    assert float(out.count) == 3.0
    np.testing.assert_allclose(out.mean, -np.log(0.5 / (0.5 + 39 / 40)), rtol=1e-5)
    assert float(ce(logits, jnp.where(mask == 0, 0, targets), mask).sum) == float(out.sum)
