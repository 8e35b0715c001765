#!/usr/bin/env python3
"""Picks at most CAP inputs of a fuzz corpus for the coverage edges they reach.

    fuzz_select.py CONTROL_FILE CAP

CONTROL_FILE is the merge control file libFuzzer writes with `-merge=1 -set_cover_merge=1
-use_counters=0 -merge_control_file=...` (each input's edges on an `FT <index> <edge>...`
line, its size on `STARTED <index> <size>`). Prints the paths of the inputs picked, greedily:
each time the input that adds the most edges not yet covered, the smaller one on a tie. Used by
scripts/fuzz.sh to keep the committed corpus small.
"""

import heapq
import sys


def main() -> None:
    lines = open(sys.argv[1]).read().split("\n")
    cap = int(sys.argv[2])
    n = int(lines[0])
    files = lines[2 : 2 + n]
    edges: dict[int, frozenset[int]] = {}
    size: dict[int, int] = {}
    for line in lines[2 + n :]:
        parts = line.split()
        if parts and parts[0] == "STARTED":
            size[int(parts[1])] = int(parts[2])
        elif parts and parts[0] == "FT":
            edges[int(parts[1])] = frozenset(map(int, parts[2:]))
    covered: set[int] = set()
    keep = []
    # Lazy greedy: a gain popped from the heap may be stale; it is recomputed and pushed back
    # unless it still beats the best gain left.
    heap = [(-len(e), size.get(i, 0), i) for i, e in edges.items()]
    heapq.heapify(heap)
    while heap and len(keep) < cap:
        _, s, i = heapq.heappop(heap)
        gain = len(edges[i] - covered)
        if gain == 0:
            continue
        if heap and gain < -heap[0][0]:
            heapq.heappush(heap, (-gain, s, i))
            continue
        keep.append(files[i])
        covered |= edges[i]
    print("\n".join(keep))


if __name__ == "__main__":
    main()
