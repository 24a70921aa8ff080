"""benchmarks/hlo_flops.py: matmul FLOPs of a compiled module with loop bodies × trip counts
(XLA's cost_analysis counts a loop body once), checked against hand counts on XLA:CPU."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "hlo_flops.py"
_spec = importlib.util.spec_from_file_location("hlo_flops", _PATH)
hlo_flops = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hlo_flops)


def _f(x, ws, a):
    def body(x, w):
        y = jnp.tanh(x @ w)
        s = jnp.einsum("bqd,bkd->bqk", y.reshape(4, 16, 64), x.reshape(4, 16, 64))  # a batched product
        return y + (s @ y.reshape(4, 16, 64)).reshape(64, 64), None

    return (jax.lax.scan(body, x @ a, ws)[0] ** 2).sum()


@pytest.mark.parametrize("layers", [1, 5])
def test_scan_counted_per_iteration(layers):
    args = (jnp.ones((64, 64)), jnp.ones((layers, 64, 64)), jnp.ones((64, 64)))
    forward = 2 * 64 * 64 * 64 * (1 + layers) + layers * 2 * (4 * 16 * 16 * 64) * 2
    assert hlo_flops.matmul_flops(jax.jit(_f).lower(*args).compile().as_text()) == forward
    grad = jax.jit(jax.grad(_f, argnums=(0, 1, 2))).lower(*args).compile()
    assert hlo_flops.matmul_flops(grad.as_text()) == 3 * forward  # each product: forward + two in the backward


def test_taps_of_a_dilated_window():
    # XLA:TPU's batched matmul: batch 4 as a spatial dim, window 4, stride 3, lhs dilation 4: one tap each
    assert hlo_flops._taps(4, 4, size=4, stride=3, pad_lo=0, lhs_dilate=4, rhs_dilate=1) == 4
    assert hlo_flops._taps(3, 5, size=3, stride=1, pad_lo=0, lhs_dilate=1, rhs_dilate=1) == 9  # a plain window
    assert hlo_flops._taps(5, 5, size=3, stride=1, pad_lo=1, lhs_dilate=1, rhs_dilate=1) == 13  # padded edges


_STEP_TWO = """HloModule m

%body (p: (u32[], f32[4,8], f32[8,16])) -> (u32[], f32[4,8], f32[8,16]) {
  %p = (u32[], f32[4,8], f32[8,16]) parameter(0)
  %i = u32[] get-tuple-element(%p), index=0
  %x = f32[4,8] get-tuple-element(%p), index=1
  %w = f32[8,16] get-tuple-element(%p), index=2
  %d = f32[4,16] dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %c2 = u32[] constant(2)
  %ic = u32[] copy(%i)
  %next = u32[] add(%ic, %c2)
  ROOT %t = (u32[], f32[4,8], f32[8,16]) tuple(%next, %x, %w)
}

%cond (q: (u32[], f32[4,8], f32[8,16])) -> pred[] {
  %q = (u32[], f32[4,8], f32[8,16]) parameter(0)
  %limit = u32[] constant(8)
  %j = u32[] get-tuple-element(%q), index=0
  ROOT %lt = pred[] compare(%j, %limit), direction=LT
}

ENTRY %main (a: f32[4,8], b: f32[8,16]) -> f32[4,8] {
  %a = f32[4,8] parameter(0)
  %b = f32[8,16] parameter(1)
  %zero = u32[] constant(0)
  %init = (u32[], f32[4,8], f32[8,16]) tuple(%zero, %a, %b)
  %loop = (u32[], f32[4,8], f32[8,16]) while(%init), condition=%cond, body=%body
  ROOT %out = f32[4,8] get-tuple-element(%loop), index=1
}
"""


def test_loop_stepping_by_two():
    # XLA:TPU's windowed (collective) matmul loops advance their counter by 2 (through a copy): i = 0, 2, 4, 6
    assert hlo_flops.matmul_flops(_STEP_TWO) == 4 * 2 * 4 * 16 * 8
    assert hlo_flops.matmul_flops(_STEP_TWO.replace("constant(0)", "constant(4)")) == 2 * 2 * 4 * 16 * 8
