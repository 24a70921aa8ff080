"""Connected components of a graph given as a PCollection of edges, computed in Beam.

The alternating large-star / small-star algorithm (Kiveris et al., "Connected Components in
MapReduce and Beyond", SoCC 2014): each round is two GroupByKeys over the edge list, no node's
neighbourhood ever has to hold more than its edges, and the graph contracts to one star per
component centred on its smallest node in O(log^2 n) rounds (a handful for the small clusters
duplicates form). Beam graphs are static, so the number of rounds is fixed (`max_rounds`); the
transform checks the result and counts nodes whose component had not converged (their label
is still a node of the same component, so a component never loses all its documents).

  large-star: for each node u with neighbours N(u), m = min(N(u) + u): link every v in N(u), v > u, to m
  small-star: for each node u with neighbours N(u) <= u,  m = min(N(u) + u): link every v in N(u) + u, v != m, to m
"""

from __future__ import annotations

import apache_beam as beam


def _both_ways(edge):
    a, b = edge
    return [(a, b), (b, a)]


def _large_star(kv):
    u, neighbours = kv
    neighbours = set(neighbours)
    m = min(min(neighbours), u)
    return [(v, m) for v in neighbours if v > u]


def _small_star(kv):
    u, smaller = kv
    group = set(smaller) | {u}
    m = min(group)
    return [(v, m) for v in group if v != m]


def _label(kv):
    u, neighbours = kv
    return u, min(min(neighbours), u)


def _unconverged(kv):
    """(node m, {'label': [label of m], 'child': [nodes labelled m]}) -> children of a non-root."""
    m, groups = kv
    labels = list(groups['label'])
    if labels and labels[0] != m:
        n = sum(1 for _ in groups['child'])
        if n:
            yield n


class ConnectedComponents(beam.PTransform):
    """edges (a, b) of ints -> {'labels': (node, smallest node of its component), 'unconverged': ints}."""

    def __init__(self, max_rounds: int, label: str | None = None):
        super().__init__(label=label)
        self.max_rounds = max_rounds

    def expand(self, edges):
        edges = edges | 'no_loops' >> beam.Filter(lambda e: e[0] != e[1])
        for r in range(self.max_rounds):
            edges = (edges
                     | f'large{r}_both' >> beam.FlatMap(_both_ways)
                     | f'large{r}_group' >> beam.GroupByKey()
                     | f'large{r}' >> beam.FlatMap(_large_star)
                     | f'small{r}_key' >> beam.Map(lambda e: (max(e), min(e)))
                     | f'small{r}_group' >> beam.GroupByKey()
                     | f'small{r}' >> beam.FlatMap(_small_star))
        labels = (edges | 'final_both' >> beam.FlatMap(_both_ways) | 'final_group' >> beam.GroupByKey()
                  | 'label' >> beam.Map(_label))
        children = labels | 'children' >> beam.Filter(lambda nl: nl[1] != nl[0]) | beam.Map(lambda nl: (nl[1], nl[0]))
        unconverged = ({'label': labels, 'child': children} | 'check' >> beam.CoGroupByKey()
                       | 'unconverged' >> beam.FlatMap(_unconverged))
        return {'labels': labels, 'unconverged': unconverged}
