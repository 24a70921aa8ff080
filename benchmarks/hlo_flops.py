"""Matmul FLOPs of a compiled (optimized, partitioned) XLA module, per device, with loop bodies
counted as many times as they run.

XLA's `cost_analysis()` counts the body of a while loop once, so a step whose layers are a
`lax.scan` (model.scan_layers) or whose loss is chunked reports a fraction of its work. This
counts, from `compiled.as_text()`:

    dot          2 · |output| · ∏ lhs contracting dims
    convolution  2 · |output's non-spatial dims| · ∏ rhs non-spatial dims but the output feature
                 ('o' of dim_labels) · per spatial dim the window taps that land on input elements
                 (XLA:TPU writes matmuls as convolutions, batched ones with the batch as a
                 dilated spatial dim of one tap per output)

per computation, then multiplies through the call graph: a fusion / call / async op runs its
computation once per execution of the caller, a while loop its body `trip count` times (read from
the loop's backend_config known_trip_count, else from its condition `i < limit`, the step `i + c` in
its body and i's initial constant: XLA:TPU's windowed (collective) matmul loops step by 2).
Element-wise work, reductions and custom calls (Pallas kernels such as splash attention) are not
counted: the result is matmul FLOPs, what dominates a transformer step.

    python benchmarks/hlo_flops.py --self_test     # checks the counter on small programs
"""

from __future__ import annotations

import math
import re
from functools import lru_cache

import numpy as np

_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\((.*)\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([a-z][\w\-]*)\((.*)$")
_SHAPE = re.compile(r"^\(?\s*[a-z0-9]+\[([0-9,]*)\]")
_PARAM = re.compile(r"([\w.\-]+):\s*[a-z0-9]+\[([0-9,]*)\]")


def _dims(text: str) -> list[int] | None:
    m = _SHAPE.match(text)
    return None if m is None else [int(x) for x in m.group(1).split(",") if x]


def _operands(rest: str) -> list[str]:
    """Names of the operands of an instruction (the text after `op(`)."""
    depth, out, cur = 0, [], ""
    for ch in rest:
        if ch in "({[":
            depth += 1
        elif ch in ")}]":
            if depth == 0:
                break
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return [o.strip().split()[-1].lstrip("%") for o in out if o.strip()]


def parse(hlo: str) -> tuple[dict, str]:
    """{computation: ([(name, op, shape dims, operands, attributes text)], {name: dims}, root name)},
    entry name."""
    comps, entry, cur, shapes, root = {}, None, None, {}, None
    for line in hlo.splitlines():
        if cur is None:
            m = _HEADER.match(line)
            if m:
                cur = m.group(1)
                comps[cur] = []
                shapes = {p: [int(x) for x in d.split(",") if x] for p, d in _PARAM.findall(m.group(2))}
                if line.startswith("ENTRY"):
                    entry = cur
            continue
        if line.strip() == "}":
            comps[cur] = (comps[cur], shapes, root)
            cur, root = None, None
            continue
        m = _INSTR.match(line)
        if m:
            name, shape, op, rest = m.groups()
            shapes[name] = _dims(shape)
            comps[cur].append((name, op, shapes[name], _operands(rest), rest))
            if line.lstrip().startswith("ROOT"):
                root = name
    if entry is None:
        raise ValueError("hlo_flops: no ENTRY computation in the module text")
    return comps, entry


def _op_flops(op: str, out: list[int] | None, operands: list[str], attrs: str, shapes: dict) -> float:
    if out is None:
        return 0.0
    if op == "dot":
        lhs = shapes.get(operands[0])
        m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", attrs)
        if lhs is None or m is None:
            raise ValueError(f"hlo_flops: cannot size dot operands {operands}")
        return 2.0 * math.prod(out) * math.prod(lhs[int(i)] for i in m.group(1).split(",") if i)
    if op == "convolution":
        lhs, rhs = shapes.get(operands[0]), shapes.get(operands[1])
        m = re.search(r"dim_labels=([^_]+)_([^-]+)->(\w+)", attrs)
        if lhs is None or rhs is None or m is None:
            raise ValueError(f"hlo_flops: cannot size convolution operands {operands}")
        lhs_l, rhs_l, out_l = m.groups()
        flops = 2.0 * math.prod(n for n, lab in zip(out, out_l) if not lab.isdigit())
        flops *= math.prod(n for n, lab in zip(rhs, rhs_l) if lab != "o" and not lab.isdigit())
        window = _window(attrs)
        for d in sorted({lab for lab in out_l if lab.isdigit()}):  # spatial dims: the taps that hit input
            w = {k: v[int(d)] for k, v in window.items()}
            flops *= _taps(out[out_l.index(d)], lhs[lhs_l.index(d)], **w)
        return flops
    return 0.0


def _window(attrs: str) -> dict:
    """Per spatial dim: size, stride, pad_lo, lhs_dilate, rhs_dilate of a convolution's window."""
    m = re.search(r"window=\{([^}]*)\}", attrs)
    fields = dict(f.split("=", 1) for f in (m.group(1).split() if m else []))
    n = len(fields["size"].split("x")) if "size" in fields else 0
    get = lambda key, default: [int(x) for x in fields[key].split("x")] if key in fields else [default] * n  # noqa: E731
    pads = [int(p.split("_")[0]) for p in fields["pad"].split("x")] if "pad" in fields else [0] * n
    return {"size": get("size", 1), "stride": get("stride", 1), "pad_lo": pads,
            "lhs_dilate": get("lhs_dilate", 1), "rhs_dilate": get("rhs_dilate", 1)}


def _taps(out: int, inp: int, size: int, stride: int, pad_lo: int, lhs_dilate: int, rhs_dilate: int) -> int:
    """Multiply-adds along one spatial dim summed over its output positions: window taps that land
    on an input element (not padding, not a hole of lhs dilation). XLA:TPU writes a batched matmul
    as a convolution whose batch dim is such a dim, with one tap per output."""
    o = np.arange(out)[:, None]
    k = np.arange(size)[None, :]
    p = o * stride - pad_lo + k * rhs_dilate
    return int(np.sum((p >= 0) & (p <= (inp - 1) * lhs_dilate) & (p % lhs_dilate == 0)))


def _trip_count(attrs: str, condition: tuple, body: tuple, init: int | None) -> int:
    """Iterations of a while loop: its known_trip_count, else from `i < limit` in the condition, the
    step of i in the body (`i + c`) and i's initial value (`init`, None: 0)."""
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', attrs)
    if m:
        return int(m.group(1))
    instrs = {name: (op, operands, rest) for name, op, _, operands, rest in condition[0]}
    consts = {n: int(c.group(1)) for n, (op, _, rest) in instrs.items()
              if op == "constant" and (c := re.match(r"\s*(-?\d+)\)", rest))}
    for name, (op, operands, rest) in instrs.items():
        if op == "compare" and "direction=LT" in rest and len(operands) == 2 and operands[1] in consts:
            limit, index = consts[operands[1]], _tuple_index(instrs.get(operands[0]))
            return -(-(limit - (init or 0)) // _step(body, index))
    raise ValueError(f"hlo_flops: no trip count for a while loop (condition constants {consts})")


def _tuple_index(instr) -> int | None:
    """k of `get-tuple-element(param), index=k`, else None."""
    if instr is None or instr[0] != "get-tuple-element":
        return None
    m = re.search(r"index=(\d+)", instr[2])
    return int(m.group(1)) if m else None


def _step(body: tuple, index: int | None) -> int:
    """c of the loop variable's update `gte(param, index) + constant(c)` in the body's root tuple; 1
    where it cannot be read."""
    instrs_list, _, root = body
    instrs = {name: (op, operands, rest) for name, op, _, operands, rest in instrs_list}
    if index is None or root not in instrs or instrs[root][0] != "tuple" or index >= len(instrs[root][1]):
        return 1
    update = instrs.get(instrs[root][1][index])
    if update is None or update[0] != "add":
        return 1
    for a, b in (update[1], update[1][::-1]):
        c = instrs.get(_source(instrs, b))
        if _tuple_index(instrs.get(_source(instrs, a))) == index and c and c[0] == "constant":
            value = re.match(r"\s*(-?\d+)\)", c[2])
            return max(int(value.group(1)), 1) if value else 1
    return 1


def _source(instrs: dict, name: str) -> str:
    """`name`, followed back through copies, bitcasts and converts."""
    seen = 0
    while name in instrs and instrs[name][0] in ("copy", "bitcast", "convert") and instrs[name][1] and seen < 32:
        name, seen = instrs[name][1][0], seen + 1
    return name


def _init(caller: tuple, operand: str, index: int | None) -> int | None:
    """The loop variable's initial value: element `index` of the while's operand tuple, a
    constant (through copies) in the caller; None where it is not one."""
    instrs = {name: (op, operands, rest) for name, op, _, operands, rest in caller[0]}
    t = instrs.get(operand)
    if index is None or t is None or t[0] != "tuple" or index >= len(t[1]):
        return None
    x = instrs.get(_source(instrs, t[1][index]))
    value = re.match(r"\s*(-?\d+)\)", x[2]) if x is not None and x[0] == "constant" else None
    return int(value.group(1)) if value else None


def _callees(op: str, operands: list, attrs: str, comps: dict, caller: str) -> list[tuple[str, float]]:
    """(computation, times it runs per execution of the instruction) for one instruction."""
    if op == "while":
        body = re.search(r"body=%?([\w.\-]+)", attrs).group(1)
        cond = re.search(r"condition=%?([\w.\-]+)", attrs).group(1)
        index = _loop_index(comps[cond])
        trips = _trip_count(attrs, comps[cond], comps[body], _init(comps[caller], operands[0], index))
        return [(body, trips), (cond, trips)]
    if op == "conditional":
        names = re.findall(r"%([\w.\-]+)", re.search(r"branch_computations=\{([^}]*)\}", attrs).group(1))
        return [(n, 1.0) for n in names]  # each branch once: an upper bound
    return [(c, 1.0) for key in ("calls", "to_apply") for c in re.findall(rf"\b{key}=%?([\w.\-]+)", attrs)
            if c in comps]


def _loop_index(condition: tuple) -> int | None:
    """The tuple index of the variable a loop condition compares (`gte(param, k) < c`)."""
    instrs = {name: (op, operands, rest) for name, op, _, operands, rest in condition[0]}
    for op, operands, rest in instrs.values():
        if op == "compare" and "direction=LT" in rest and operands:
            return _tuple_index(instrs.get(operands[0]))
    return None


def matmul_flops(hlo: str, by: str = "") -> float | dict:
    """Matmul FLOPs per device of one execution of the module's entry computation; with
    by='op_name', a dict of them by the products' source op names (metadata op_name)."""
    comps, entry = parse(hlo)
    if not by:
        @lru_cache(maxsize=None)
        def total(comp: str) -> float:
            instrs, shapes, _ = comps[comp]
            flops = 0.0
            for name, op, out, operands, attrs in instrs:
                flops += _op_flops(op, out, operands, attrs, shapes)
                if op == "conditional":
                    flops += max((total(c) for c, _ in _callees(op, operands, attrs, comps, comp)), default=0.0)
                else:
                    flops += sum(times * total(c) for c, times in _callees(op, operands, attrs, comps, comp))
            return flops

        return total(entry)
    found: dict[str, float] = {}

    def walk(comp: str, times: float) -> None:
        instrs, shapes, _ = comps[comp]
        for name, op, out, operands, attrs in instrs:
            f = _op_flops(op, out, operands, attrs, shapes)
            if f:
                m = re.search(r'op_name="([^"]*)"', attrs)
                key = m.group(1) if m else name
                found[key] = found.get(key, 0.0) + times * f
            for c, n in _callees(op, operands, attrs, comps, comp):
                walk(c, times * n)

    walk(entry, 1.0)
    return found


def _self_test() -> None:
    import os

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    import jax
    import jax.numpy as jnp
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    devs = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices
    mesh = Mesh(devs, ("d",))

    def f(x, ws, a):
        def body(x, w):
            y = jnp.tanh(x @ w)
            s = jnp.einsum("bqd,bkd->bqk", y.reshape(16, 32, 256), x.reshape(16, 32, 256))  # batched
            return y + (s @ y.reshape(16, 32, 256)).reshape(512, 256), None
        return (jax.lax.scan(body, x @ a, ws)[0].astype(jnp.float32) ** 2).sum()  # a cotangent that is not constant

    for n in (1, 8):
        args = (jax.ShapeDtypeStruct((512, 256), jnp.bfloat16, sharding=NamedSharding(mesh, P("d"))),
                jax.ShapeDtypeStruct((n, 256, 256), jnp.bfloat16, sharding=NamedSharding(mesh, P())),
                jax.ShapeDtypeStruct((256, 256), jnp.bfloat16, sharding=NamedSharding(mesh, P())))
        # per device, 128 rows: a (x @ a) + per layer (x @ w) + scores + (s @ y); the gradient: 3 times that
        want = 2 * 128 * 256 * 256 * (1 + n) + n * 2 * (4 * 32 * 32 * 256) * 2
        for name, fn, expected in (("forward", f, want), ("gradient", jax.grad(f, argnums=(0, 1, 2)), 3 * want)):
            got = matmul_flops(jax.jit(fn).lower(*args).compile().as_text())
            print(f"{name}, {n} layers: counted {got:,.0f}, expected {expected:,.0f}")
            assert abs(got - expected) <= 0.01 * expected, (got, expected)


if __name__ == "__main__":
    import sys

    if "--self_test" in sys.argv:
        _self_test()
