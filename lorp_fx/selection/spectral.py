"""Spectral clustering as the LoRP authors ran it (scikit-learn's), in numpy and scipy only.

scikit-learn is not a dependency, so its `spectral_clustering(affinity, n_clusters,
random_state=0)` with a precomputed affinity and k-means label assignment is rebuilt
here: normalised-Laplacian embedding, then best-of-10 k-means++ / Lloyd. Its labels on
the authors' SmolLM2 matrix are reproduced exactly (tests/test_selectors.py).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.linalg import eigh
from scipy.sparse.csgraph import laplacian

from lorp_fx.selection.common import renumber_by_depth


def spectral_embedding(affinity: np.ndarray, n_components: int) -> np.ndarray:
    """Normalised-Laplacian embedding, rows = nodes, as scikit-learn's `spectral_clustering` builds it.

    L = I - D^-1/2 A D^-1/2 (the diagonal of A is ignored for the degrees); the
    embedding is the eigenvectors of the `n_components` smallest eigenvalues of L
    (the first one kept), each divided by sqrt(degree) and sign-flipped so that its
    largest-magnitude entry is positive. scikit-learn finds them with ARPACK
    shift-invert on -L; a dense symmetric solver gives the same vectors up to sign
    and to a rotation inside a repeated eigenvalue, and Euclidean k-means sees
    neither, so the labels are the same.
    """
    lap, sqrt_degree = laplacian(np.asarray(affinity, dtype=np.float64), normed=True, return_diag=True)
    _, vectors = eigh(lap)
    maps = vectors[:, :n_components] / sqrt_degree[:, None]
    peaks = np.argmax(np.abs(maps), axis=0)
    signs = np.sign(maps[peaks, np.arange(n_components)])
    signs[signs == 0] = 1.0
    return maps * signs


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(axis=-1)


def _kmeans_plusplus(X: np.ndarray, k: int, rng: np.random.RandomState) -> np.ndarray:
    """Greedy k-means++ seeding (2 + log k candidates per centre), in scikit-learn's draw order."""
    n = X.shape[0]
    centers = np.empty((k, X.shape[1]))
    first = rng.choice(n, p=np.full(n, 1.0 / n))
    centers[0] = X[first]
    closest = _squared_distances(X[[first]], X)[0]
    potential = closest.sum()
    trials = 2 + int(np.log(k))
    for c in range(1, k):
        draws = rng.uniform(size=trials) * potential
        candidates = np.minimum(np.searchsorted(np.cumsum(closest), draws), n - 1)
        with_candidate = np.minimum(closest, _squared_distances(X[candidates], X))
        potentials = with_candidate.sum(axis=1)
        best = int(np.argmin(potentials))
        potential, closest = potentials[best], with_candidate[best]
        centers[c] = X[candidates[best]]
    return centers


def _update_centers(X: np.ndarray, labels: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Cluster means; an empty cluster takes over the point farthest from its centre."""
    k = centers.shape[0]
    sums = np.zeros_like(centers)
    np.add.at(sums, labels, X)
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        far = np.argsort(-((X - centers[labels]) ** 2).sum(axis=1), kind="stable")[: empty.size]
        for cluster, point in zip(empty, far):
            sums[labels[point]] -= X[point]
            counts[labels[point]] -= 1
            sums[cluster], counts[cluster] = X[point], 1
    new = centers.copy()
    filled = counts > 0
    new[filled] = sums[filled] / counts[filled, None]
    return new


def _lloyd(X: np.ndarray, centers: np.ndarray, tol: float, max_iter: int = 300) -> tuple[np.ndarray, float]:
    """Lloyd iterations until the labels repeat or the centres move less than `tol`; (labels, inertia)."""
    previous = None
    for _ in range(max_iter):
        labels = np.argmin(_squared_distances(X, centers), axis=1)
        new = _update_centers(X, labels, centers)
        shift = float(((new - centers) ** 2).sum())
        centers = new
        if previous is not None and np.array_equal(labels, previous):
            break
        if shift <= tol:
            break
        previous = labels
    labels = np.argmin(_squared_distances(X, centers), axis=1)
    return labels, float(((X - centers[labels]) ** 2).sum())


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True when the labelings differ only by a renaming of the clusters."""
    forward, backward = {}, {}
    for x, y in zip(a.tolist(), b.tolist()):
        if forward.setdefault(x, y) != y or backward.setdefault(y, x) != x:
            return False
    return True


def kmeans(
    X: np.ndarray, k: int, rng: np.random.RandomState, n_init: int = 10, tol: float = 1e-4
) -> np.ndarray:
    """Lloyd's k-means, best of `n_init` k-means++ starts, following scikit-learn's `k_means`.

    As there, the data are centred first, the tolerance is relative to the mean
    feature variance, and a later start replaces the best one only when its inertia
    is lower *and* its partition differs.
    """
    X = np.asarray(X, dtype=np.float64)
    X = X - X.mean(axis=0)
    tol = float(np.mean(np.var(X, axis=0))) * tol
    best_labels, best_inertia = None, math.inf
    for _ in range(n_init):
        labels, inertia = _lloyd(X, _kmeans_plusplus(X, k, rng), tol)
        if best_labels is None or (inertia < best_inertia and not _same_partition(labels, best_labels)):
            best_labels, best_inertia = labels, inertia
    return best_labels


def spectral_clustering(S: np.ndarray, n_clusters: int, random_state: int = 0, n_init: int = 10) -> list[int]:
    """The LoRP paper's clustering: spectral clustering of the affinity A = (S + 1) / 2.

    Normalised-Laplacian embedding into `n_clusters` dimensions, then k-means label
    assignment with `RandomState(random_state)` (scikit-learn's `spectral_clustering`
    with `affinity="precomputed"`). Labels are renumbered by depth of first member.
    """
    S = np.asarray(S, dtype=np.float64)
    n = S.shape[0]
    if n_clusters <= 1:
        return [0] * n
    rng = np.random.RandomState(random_state)
    # scikit-learn draws ARPACK's start vector from the same stream before k-means;
    # draw it too so the k-means seeds are the ones the authors got.
    rng.uniform(-1, 1, n)
    maps = spectral_embedding((S + 1.0) / 2.0, n_clusters)
    return renumber_by_depth(kmeans(maps, n_clusters, rng, n_init=n_init))
