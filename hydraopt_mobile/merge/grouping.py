"""Task groupings from similarity (hydraopt_mobile/similarity.py): tasks whose updates are alike share a factor."""

from __future__ import annotations

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform


def cluster(similarity: torch.Tensor, k: int) -> list[int]:
    """Average-linkage clustering into ``k`` groups; group ids numbered by first appearance."""
    n = similarity.shape[0]
    if k >= n:
        return list(range(n))
    if k <= 1:
        return [0] * n
    dist = (1 - similarity.abs()).clamp_min(0).numpy().astype(np.float64)
    np.fill_diagonal(dist, 0)
    labels = fcluster(linkage(squareform((dist + dist.T) / 2, checks=False), "average"), k, "maxclust")
    remap: dict[int, int] = {}
    return [remap.setdefault(int(lbl), len(remap)) for lbl in labels]
