"""`python -m shard_server.filter_ties`: how much of the filtered ground truth of the 1M synthetic benchmark
(`shard_server.compare --vectors 1000000`) are the query's cluster mates?

A query's cluster mates have cosine ~0.5 with it; points of other clusters are far less similar.
With ~100 vectors per cluster, a 10 % filter leaves Binomial(100, 0.1) matching mates, fewer than 10
for about a third of the queries; the rest of their filtered top-10 is the best of ~90k matching
points of other clusters, scattered over the IVF lists (docs/benchmarks.md, "1M vectors")."""

import argparse

import numpy as np

from shard_server.compare import ground_truth, synthetic_data


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(prog="python -m shard_server.filter_ties", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    data = synthetic_data(n=1_000_000, dim=512, n_queries=200, seed=0)
    q = data.queries[:100]
    for s in (0.5, 0.1, 0.01):
        truth = ground_truth(data, s, queries=q)
        scores = np.einsum("qd,qkd->qk", q, data.vectors[truth])
        mates = scores > 0.25
        others = np.median(scores[~mates]) if (~mates).any() else float("nan")
        print(f"selectivity {s}: truth entries that are cluster mates (cos > 0.25): {mates.mean():.3f}; "
              f"cos of the others: median {others:.3f}, "
              f"queries with < 10 matching mates: {(mates.sum(1) < 10).mean():.2f}")


if __name__ == "__main__":
    main()
