"""Task groupings from similarity: tasks whose updates are alike share a factor."""

from __future__ import annotations

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

from hydraopt_mobile.factored import FactoredModule


def row_space_similarity(fm: FactoredModule) -> torch.Tensor:
    """(T, T) overlap of the tasks' row spaces: mean squared cosine of their principal angles."""
    _, s, vh = torch.linalg.svd(fm.RA, full_matrices=False)  # batched over tasks
    return _overlap([vh[t][s[t] > (s[t][0] * 1e-6 if s[t][0] > 0 else 1)] for t in range(fm.n_tasks)])


def update_cosine(fm: FactoredModule) -> torch.Tensor:
    """(T, T) cosine similarity of the updates dW_t."""
    T, d_out, r = fm.B.shape
    gb = (fm.B.permute(1, 0, 2).reshape(d_out, T * r).T @ fm.B.permute(1, 0, 2).reshape(d_out, T * r)).reshape(T, r, T, r)
    ga = (fm.a.reshape(T * r, -1) @ fm.a.reshape(T * r, -1).T).reshape(T, r, T, r)
    # <dW_s, dW_t> = tr((B_s^T B_t)(a_t a_s^T)) = sum_ij gb[s,i,t,j] * ga[s,i,t,j]
    gram = (gb * ga).sum((1, 3))
    norms = fm.sq_norms.sqrt().clamp_min(1e-30)
    return gram / norms.view(-1, 1) / norms.view(1, -1)


def _overlap(bases: list[torch.Tensor]) -> torch.Tensor:
    n = len(bases)
    sim = torch.eye(n, dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1, n):
            k = min(bases[i].shape[0], bases[j].shape[0])
            v = float(((bases[i] @ bases[j].T) ** 2).sum() / k) if k else 0.0
            sim[i, j] = sim[j, i] = v
    return sim


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
