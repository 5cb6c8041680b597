"""Sparse inverse-Cholesky (SIC) approximations of GP covariances (Schäfer et al.; Cao et al. 2023).

Conventions used throughout (coarse-to-fine, "reverse maximin" read from the coarse end):

* :func:`maximin_ordering` puts first the point nearest the centroid, then repeatedly the point
  farthest from all points chosen so far. Its length scale ``scales[k]`` is that distance (the
  distance from point k to the nearest *earlier* point; ``inf`` for the first point), so scales are
  non-increasing. Schäfer, Katzfuss and Owhadi's "reverse maximin" order is this order reversed.
* :func:`sic_pattern`: point i conditions on the earlier points j < i with
  ``|x_i - x_j| <= rho * scales[i]`` (Euclidean distance in the kernel's ARD-scaled space, i.e.
  divide the inputs by the lengthscales first), keeping the ``max_neighbors`` nearest.
* :class:`SparseInverseCholesky` stores an *upper*-triangular U column by column: column i has its
  diagonal entry in slot 0 and entries at the rows of i's neighbours in the other slots. For the
  KL-optimal U of a covariance K (``from_covariance``), U Uᵀ ≈ K⁻¹ and the approximate density is the
  Vecchia product  p(f) = Π_i p(f_i | f_{neighbours of i}).

Padding: every column has the same number of slots M = max_neighbors + 1; unused slots point at the
column's own index and hold 0, so scatter-adds through them are no-ops and nothing loops over points.
Duplicate inputs make K[s_i, s_i] singular; they are rejected (``ValueError``) before any factorising.
"""
from __future__ import annotations

import heapq
import warnings

import numpy as np
import torch
from linear_operator.operators import LinearOperator
from scipy.sparse import csc_array, csr_array
from scipy.sparse.linalg import spsolve_triangular
from scipy.spatial import cKDTree

from .cholesky import safe_cholesky

__all__ = ["maximin_ordering", "sic_pattern", "SparseInverseCholesky", "check_points", "sic_columns",
           "ancestor_closure", "transposed_solve", "triangular_structure"]


# ---------------------------------------------------------------------------------------- checks
def _as_points(X, name: str = "X") -> np.ndarray:
    arr = X.detach().cpu().numpy() if isinstance(X, torch.Tensor) else np.asarray(X, dtype=float)
    arr = np.asarray(arr, dtype=float)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise ValueError(f"`{name}` must be a non-empty (n, d) array; got shape {arr.shape}.")
    if not np.isfinite(arr).all():
        raise ValueError(f"`{name}` contains NaN or infinite values; drop or impute them first.")
    return arr


def check_points(X, name: str = "X") -> np.ndarray:
    """(n, d) float array without NaN/inf or duplicated rows (``ValueError`` naming ``name``).

    Duplicates are refused because two identical inputs give identical latent values: their
    covariance block is singular and no inverse-Cholesky factor exists. Average replicate
    observations (or jitter the inputs) before fitting."""
    arr = _as_points(X, name)
    n_unique = np.unique(arr, axis=0).shape[0]
    if n_unique < arr.shape[0]:
        raise ValueError(f"`{name}` has {arr.shape[0] - n_unique} duplicated row(s); the SIC approximation "
                         "needs distinct inputs (average replicate observations or add tiny jitter).")
    return arr


def _scale(arr: np.ndarray, ard) -> np.ndarray:
    if ard is None:
        return arr
    ard = np.asarray(ard.detach().cpu().numpy() if isinstance(ard, torch.Tensor) else ard, dtype=float).ravel()
    if ard.size not in (1, arr.shape[1]) or not (np.isfinite(ard).all() and (ard > 0).all()):
        raise ValueError(f"`ard` must be one positive lengthscale or one per input column ({arr.shape[1]}).")
    return arr / ard


# -------------------------------------------------------------------------------------- ordering
def maximin_ordering(X, ard=None) -> tuple[np.ndarray, np.ndarray]:
    """Maximin ordering of the rows of ``X`` (coarse to fine) and the per-point length scales.

    Returns ``(order, scales)``: ``X[order]`` is the ordered point set and ``scales[k]`` the
    distance (after dividing the inputs by ``ard`` lengthscales, if given) from ``X[order[k]]`` to the
    nearest of ``X[order[:k]]`` (``scales[0] = inf``). Ties go to the lower row index.

    Complexity: a max-heap of each point's distance to the chosen set with lazy deletion; choosing a
    point at distance ℓ can only lower the distances of points within ℓ of it, which a KD-tree ball
    query finds -- O(n log² n) for quasi-uniform points instead of the naive O(n²).
    """
    pts = _scale(_as_points(X), ard)
    n = pts.shape[0]
    first = int(np.argmin(((pts - pts.mean(0)) ** 2).sum(1)))
    dist = np.sqrt(((pts - pts[first]) ** 2).sum(1))
    dist[first] = -np.inf  # chosen
    order = np.empty(n, dtype=np.int64)
    scales = np.empty(n)
    order[0], scales[0] = first, np.inf
    tree = cKDTree(pts)
    heap = [(-d, j) for j, d in enumerate(dist) if j != first]
    heapq.heapify(heap)
    k = 1
    while heap:
        neg, j = heapq.heappop(heap)
        if -neg != dist[j]:  # stale entry (the point's distance has shrunk since it was pushed)
            continue
        order[k], scales[k] = j, -neg
        k += 1
        radius = -neg
        dist[j] = -np.inf
        # Only points closer to x_j than to every earlier point change: they lie within `radius`.
        near = np.asarray(tree.query_ball_point(pts[j], radius * (1 + 1e-12) + 1e-300), dtype=np.int64)
        d = np.sqrt(((pts[near] - pts[j]) ** 2).sum(1))
        upd = d < dist[near]
        for jj, dd in zip(near[upd].tolist(), d[upd].tolist(), strict=True):
            dist[jj] = dd
            heapq.heappush(heap, (-dd, jj))
    return order, scales


def maximin_ordering_bruteforce(X, ard=None) -> tuple[np.ndarray, np.ndarray]:
    """O(n²) reference implementation of :func:`maximin_ordering` (same ties, same numbers)."""
    pts = _scale(_as_points(X), ard)
    n = pts.shape[0]
    first = int(np.argmin(((pts - pts.mean(0)) ** 2).sum(1)))
    dist = np.sqrt(((pts - pts[first]) ** 2).sum(1))
    dist[first] = -np.inf
    order, scales = [first], [np.inf]
    for _ in range(n - 1):
        j = int(np.argmax(dist))
        order.append(j)
        scales.append(dist[j])
        dist = np.minimum(dist, np.sqrt(((pts - pts[j]) ** 2).sum(1)))
        dist[j] = -np.inf
    return np.asarray(order, dtype=np.int64), np.asarray(scales)


# --------------------------------------------------------------------------------------- pattern
def _check_rho_m(rho, max_neighbors):
    if isinstance(rho, bool) or not isinstance(rho, (int, float, np.floating, np.integer)):
        raise TypeError(f"`rho` must be a number > 0; got {rho!r}.")
    if not (np.isfinite(rho) and rho > 0):
        raise ValueError(f"`rho` must be a finite number > 0; got {rho!r}.")
    if max_neighbors is not None:
        if isinstance(max_neighbors, bool) or not isinstance(max_neighbors, (int, np.integer)):
            raise TypeError(f"`max_neighbors` must be an integer >= 1 or None; got {max_neighbors!r}.")
        if max_neighbors < 1:
            raise ValueError(f"`max_neighbors` must be >= 1; got {max_neighbors}.")
    return float(rho), (None if max_neighbors is None else int(max_neighbors))


def sic_pattern(X, rho: float, lengthscales, max_neighbors: int | None = 30, *, ard=None,
                reference=None) -> np.ndarray:
    """Conditioning sets of the SIC pattern: an (n, M) int array, row i = [i, neighbours..., i, i].

    ``X`` are points already in maximin order, ``lengthscales`` their per-point scales (the second
    output of :func:`maximin_ordering`; ``inf`` = no radius limit). Row i lists ``i`` itself, then the
    earlier points ``j < i`` with ``|x_i - x_j| <= rho * lengthscales[i]`` nearest first, at most
    ``max_neighbors`` (``None``: no cap), padded with ``i``. Distances are in the space scaled by the
    ``ard`` kernel lengthscales.

    ``reference``: instead, return for every row of ``X`` its nearest points of ``reference`` (all of
    which count as earlier) as an (n, cap) array padded with -1 and without the row itself -- used to
    place prediction points after the training points.
    """
    rho, m = _check_rho_m(rho, max_neighbors)
    pts = _scale(_as_points(X), ard)
    n = pts.shape[0]
    radius = rho * np.broadcast_to(np.asarray(lengthscales, dtype=float), (n,))
    if np.isnan(radius).any() or (radius < 0).any():
        raise ValueError("`lengthscales` must be non-negative (one per point).")
    if reference is not None:
        ref = _scale(_as_points(reference, "reference"), ard)
        cap = ref.shape[0] if m is None else min(m, ref.shape[0])
        nb = _knn_within(cKDTree(ref), pts, radius, cap, np.full(n, ref.shape[0]))
        # Trim the padding to the widest row (without a cap, width `cap` would be all of `reference`).
        return nb[:, :max(1, int((nb >= 0).sum(1).max()))]
    cap = n - 1 if m is None else m
    nb = np.full((n, max(cap, 1)), -1, dtype=np.int64)
    # Blocks [b/2, b): a tree on the first b points holds every earlier point, and about half of any
    # point's tree neighbours are earlier ones, so a k-NN query of ~2m finds the m nearest earlier.
    b = 1
    while b < n:
        lo, hi = b, min(2 * b, n)
        rows = np.arange(lo, hi)
        nb[lo:hi] = _knn_within(cKDTree(pts[:hi]), pts[lo:hi], radius[lo:hi], cap, rows)
        b = hi
    width = max(1, int((nb >= 0).sum(1).max()) if n > 1 else 1)
    nb = nb[:, :width]
    own = np.arange(n)[:, None]
    return np.concatenate([own, np.where(nb < 0, own, nb)], axis=1)


def _knn_within(tree: cKDTree, q: np.ndarray, radius: np.ndarray, cap: int, limit: np.ndarray) -> np.ndarray:
    """For each query row r: up to ``cap`` nearest tree points with index < limit[r] within radius[r]."""
    out = np.full((q.shape[0], max(cap, 1)), -1, dtype=np.int64)
    todo = np.arange(q.shape[0])
    k = min(tree.n, 2 * cap + 4)
    while todo.size:
        k = min(k, tree.n)
        # The distance bound is per query; cKDTree takes a scalar, so filter afterwards.
        # cKDTree squares the bound, so below ~1e-154 it underflows to 0 and finds nothing (radius 0 for a
        # query that coincides with a tree point); the exact per-row filter `d <= radius` follows.
        bound = max(float(np.max(radius[todo])) * (1 + 1e-12), 1e-100)
        d, j = tree.query(q[todo], k=k, distance_upper_bound=bound)
        d, j = d.reshape(len(todo), k), j.reshape(len(todo), k)
        ok = (j < limit[todo, None]) & (d <= radius[todo, None])
        rank = np.cumsum(ok, axis=1)
        keep = ok & (rank <= cap)
        # Complete if cap found, or the query reached beyond the radius (or exhausted the tree).
        done = (rank[:, -1] >= cap) | (d[:, -1] > radius[todo]) | (k >= tree.n)
        for_rows = np.flatnonzero(done)
        if for_rows.size:
            r_idx, c_idx = np.nonzero(keep[for_rows])
            slot = rank[for_rows][r_idx, c_idx] - 1
            out[todo[for_rows][r_idx], slot] = j[for_rows][r_idx, c_idx]
        todo = todo[~done]
        k *= 2
    return out


def ancestor_closure(pattern: np.ndarray, start: np.ndarray) -> np.ndarray:
    """Sorted indices of ``start`` and all points they condition on, recursively.

    An upper-triangular solve U x = b with b supported on this set never leaves it, so solves on a
    minibatch only touch these rows (polylogarithmic in n for maximin orderings, per Cao et al.)."""
    n = pattern.shape[0]
    seen = np.zeros(n, dtype=bool)
    frontier = np.unique(np.asarray(start, dtype=np.int64))
    seen[frontier] = True
    while frontier.size:
        parents = np.unique(pattern[frontier, 1:])
        frontier = parents[~seen[parents]]
        seen[frontier] = True
    return np.flatnonzero(seen)


# ------------------------------------------------------------------------------------- columns
def sic_columns(K_blocks: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL-optimal column values from covariance blocks K[s_i, s_i] (B, M, M), slot 0 = point i.

    Column = K⁻¹e₁ / sqrt(e₁ᵀK⁻¹e₁). With the slot order reversed (i last) and K_rev = L Lᵀ this is
    L⁻ᵀ e_last: one batched Cholesky and one triangular solve, no explicit inverse. Padded slots
    (mask False) are replaced by identity rows/columns, which decouple them and give them value 0.
    """
    pair = mask.unsqueeze(-1) & mask.unsqueeze(-2)
    eye = torch.eye(K_blocks.shape[-1], dtype=K_blocks.dtype, device=K_blocks.device)
    K = torch.where(pair, K_blocks, eye)
    K_rev = K.flip(-1).flip(-2)
    L, _ = safe_cholesky(K_rev, what="SIC neighbourhood covariance")
    e_last = torch.zeros(K.shape[:-1] + (1,), dtype=K.dtype, device=K.device)
    e_last[..., -1, 0] = 1.0
    col = torch.linalg.solve_triangular(L.mT, e_last, upper=True)[..., 0]
    return col.flip(-1) * mask


# ----------------------------------------------------------------------- differentiable solves
def triangular_structure(rows: np.ndarray):
    """Compressed sparse index arrays of U, precomputable once per pattern (no per-solve sorting).

    Returns ``(perm, indices, indptr)``: U's real entries (padding dropped) grouped by row and sorted by
    column, as CSR arrays of U -- equivalently CSC arrays of Uᵀ -- with ``values.ravel()[perm]`` their data."""
    rows = np.asarray(rows)
    n, M = rows.shape
    cols = np.repeat(np.arange(n), M)
    r = rows.ravel()
    real = r != cols
    real[::M] = True
    idx = np.flatnonzero(real)
    perm = idx[np.lexsort((cols[idx], r[idx]))]
    indptr = np.concatenate([[0], np.cumsum(np.bincount(r[perm], minlength=n))])
    return perm, cols[perm].astype(np.int32), indptr.astype(np.int32)


def _unit_solve(kind, structure, values: np.ndarray, rows: np.ndarray, rhs: np.ndarray, transposed: bool):
    """Solve U x = rhs (or Uᵀ x = rhs) after scaling each equation by its diagonal entry, so that the
    canonical compressed arrays are used as they are (SuperLU through ``spsolve_triangular``)."""
    perm, indices, indptr = structure
    diag = values[:, 0]
    if len(diag) == 0:
        return rhs
    scale = diag[:, None] if transposed else diag[rows]   # the equation each stored entry belongs to
    A = kind(((values / scale).ravel()[perm], indices, indptr), shape=(len(diag), len(diag)))
    A.has_canonical_format = True
    b = rhs / diag.reshape((-1,) + (1,) * (rhs.ndim - 1))
    return spsolve_triangular(A, b, lower=transposed, unit_diagonal=True, overwrite_A=True, overwrite_b=True)


# MKL's sparse triangular solve (through torch's CSR tensors) is ~3x faster than SciPy's per call at the
# sizes of a minibatch's ancestor closure (no per-call format conversion). SciPy is the fallback where torch
# has no MKL (e.g. ARM builds), no longer has the (deprecated, sparse-capable) torch.triangular_solve, or
# raises for sparse inputs (torch builds its sparse-CSR solve only with MKL on Linux/macOS, not on Windows):
# the first failure switches to SciPy for the rest of the process. Tests run both paths.
USE_MKL = torch.backends.mkl.is_available() and hasattr(torch, "triangular_solve")
_csr_warning_silenced = False


def _mkl_solve(structure, values, rhs, transposed):
    global _csr_warning_silenced
    n = values.shape[0]
    perm, indices, indptr = structure
    entries = values.reshape(-1).index_select(0, torch.from_numpy(perm))
    if _csr_warning_silenced:
        U = torch.sparse_csr_tensor(torch.from_numpy(indptr), torch.from_numpy(indices), entries, (n, n))
    else:  # torch warns once per process that sparse CSR is "in beta"; silence that one call only
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            U = torch.sparse_csr_tensor(torch.from_numpy(indptr), torch.from_numpy(indices), entries, (n, n))
        _csr_warning_silenced = True
    return torch.triangular_solve(rhs.reshape(n, -1).to(values.dtype), U, upper=True, transpose=transposed).solution


def _solve(structure, values: torch.Tensor, rows: torch.Tensor, rhs: torch.Tensor, transposed: bool):
    """U⁻¹ rhs, or U⁻ᵀ rhs if ``transposed`` (no autograd), for U given by its padded ``values``/``rows``."""
    global USE_MKL
    n = values.shape[0]
    if n == 0:
        return rhs.clone()
    if USE_MKL and values.dtype in (torch.float32, torch.float64):
        try:
            return _mkl_solve(structure, values, rhs, transposed).reshape(rhs.shape).to(rhs.dtype)
        except (RuntimeError, NotImplementedError, AttributeError, TypeError):
            USE_MKL = False  # no sparse solve in this torch build: SciPy from now on
    # CSC arrays of Uᵀ (lower triangular) = the CSR arrays of U.
    x = _unit_solve(csc_array if transposed else csr_array, structure, values.cpu().numpy(), rows.cpu().numpy(),
                    rhs.cpu().numpy(), transposed=transposed)
    return torch.as_tensor(np.asarray(x).reshape(rhs.shape), dtype=rhs.dtype)


class _TriangularSolve(torch.autograd.Function):
    """x = U⁻¹ b (back substitution) or, ``transposed``, x = U⁻ᵀ b (forward substitution: x_c needs only x at
    c's neighbours, i.e. its ancestors) for the padded upper-triangular U.

    Backward, with a the adjoint solve of the incoming gradient (U⁻ᵀ g, resp. U⁻¹ g): ∂b = a, and
    ∂U[r, c] = -a_r x_c (from U x = b), resp. -x_r a_c (from Uᵀ x = b)."""

    @staticmethod
    def forward(ctx, values, rows, rhs, structure, transposed):
        structure = triangular_structure(rows.cpu().numpy()) if structure is None else structure
        x = _solve(structure, values.detach(), rows, rhs.detach(), transposed)
        ctx.save_for_backward(values, rows, x)
        ctx.structure, ctx.transposed = structure, transposed
        return x

    @staticmethod
    def backward(ctx, grad):
        values, rows, x = ctx.saved_tensors
        a = _solve(ctx.structure, values.detach(), rows, grad.contiguous(), not ctx.transposed)
        x2, a2 = x.reshape(x.shape[0], -1), a.reshape(a.shape[0], -1)
        row_side, col_side = (x2, a2) if ctx.transposed else (a2, x2)
        gv = -(row_side[rows] * col_side.unsqueeze(1)).sum(-1)
        return gv, None, a, None, None


def transposed_solve(values: torch.Tensor, rows: torch.Tensor, eps: torch.Tensor, structure=None) -> torch.Tensor:
    """U⁻ᵀ eps for the padded upper-triangular U (differentiable in ``values`` and ``eps``).

    If eps ~ N(0, I), U⁻ᵀ eps ~ N(0, (U Uᵀ)⁻¹): a draw of the centred field. The rows ``rows`` may be a
    local numbering of an ancestor-closed subset: the solve restricted to it is exact. ``structure``:
    :func:`triangular_structure` of ``rows``, when solving repeatedly with the same pattern."""
    return _TriangularSolve.apply(values, rows, eps, structure, True)


def upper_solve(values: torch.Tensor, rows: torch.Tensor, rhs: torch.Tensor, structure=None) -> torch.Tensor:
    """U⁻¹ rhs (differentiable in ``values`` and ``rhs``) by a sparse triangular solve (``structure`` as in
    :func:`transposed_solve`)."""
    return _TriangularSolve.apply(values, rows, rhs, structure, False)


# ------------------------------------------------------------------------------------ operator
class SparseInverseCholesky(LinearOperator):
    """Upper-triangular sparse inverse-Cholesky factor U (n × n) as a ``LinearOperator``.

    ``values`` (n, M): column i's entries, slot 0 = the diagonal U_ii > 0; ``pattern`` (n, M) int: their
    row indices (slot 0 = i; padding repeats i with value 0). ``transposed=True`` represents Uᵀ.
    ``matmul``, ``solve`` (sparse triangular), ``logdet`` (= Σ log U_ii) and ``diagonal`` never form
    the dense matrix; ``to_dense`` does (for tests).
    """

    def __init__(self, values: torch.Tensor, pattern, transposed: bool = False):
        pattern = torch.as_tensor(pattern, dtype=torch.long)
        if values.shape != pattern.shape or values.dim() != 2:
            raise ValueError(f"`values` {tuple(values.shape)} and `pattern` {tuple(pattern.shape)} "
                             "must both be (n, M).")
        super().__init__(values, pattern, transposed=transposed)
        self.values = values
        self.pattern = pattern
        self.transposed = bool(transposed)

    @classmethod
    def from_covariance(cls, kernel_blocks, pattern) -> SparseInverseCholesky:
        """KL-optimal factor from a callable ``kernel_blocks(index (B, M)) -> K[s, s] (B, M, M)``
        or from a dense covariance matrix."""
        pattern = torch.as_tensor(pattern, dtype=torch.long)
        if isinstance(kernel_blocks, torch.Tensor):
            K = kernel_blocks
            blocks = K[pattern.unsqueeze(-1), pattern.unsqueeze(-2)]
        else:
            blocks = kernel_blocks(pattern)
        return cls(sic_columns(blocks, pattern_mask(pattern)), pattern)

    # ------------------------------------------------------------- LinearOperator protocol
    def _size(self):
        n = self.values.shape[0]
        return torch.Size((n, n))

    def _transpose_nonbatch(self):
        return SparseInverseCholesky(self.values, self.pattern, transposed=not self.transposed)

    def _u_matmul(self, rhs):  # U @ rhs: scatter column c's entries times rhs[c]
        flat = rhs.reshape(rhs.shape[0], -1)
        contrib = self.values.unsqueeze(-1) * flat.unsqueeze(1)  # (n, M, k)
        out = torch.zeros_like(flat, dtype=contrib.dtype).index_add(0, self.pattern.reshape(-1),
                                                                    contrib.reshape(-1, flat.shape[1]))
        return out.reshape(rhs.shape)

    def _ut_matmul(self, rhs):  # Uᵀ @ rhs: gather
        flat = rhs.reshape(rhs.shape[0], -1)
        out = (self.values.unsqueeze(-1) * flat[self.pattern]).sum(1)
        return out.reshape(rhs.shape)

    def _matmul(self, rhs):
        return self._ut_matmul(rhs) if self.transposed else self._u_matmul(rhs)

    def _t_matmul(self, rhs):
        return self._u_matmul(rhs) if self.transposed else self._ut_matmul(rhs)

    def _diagonal(self):
        return self.values[:, 0]

    def to_dense(self):
        n = self.values.shape[0]
        cols = torch.arange(n).unsqueeze(-1).expand_as(self.pattern)
        dense = torch.zeros(n, n, dtype=self.values.dtype).index_put(
            (self.pattern.reshape(-1), cols.reshape(-1)), self.values.reshape(-1), accumulate=True)
        return dense.mT if self.transposed else dense

    def _expand_batch(self, batch_shape):
        raise NotImplementedError("SparseInverseCholesky has no batch dimensions.")

    # ------------------------------------------------------------------ structure-aware ops
    def solve(self, right_tensor, left_tensor=None):
        """Sparse triangular solve U⁻¹ b (or U⁻ᵀ b when transposed), differentiable in U and b."""
        if left_tensor is not None:
            return left_tensor @ self.solve(right_tensor)
        if self.transposed:
            return transposed_solve(self.values, self.pattern, right_tensor)
        return upper_solve(self.values, self.pattern, right_tensor)

    def logdet(self):
        """log det U = Σ log U_ii (triangular)."""
        return torch.log(self.values[:, 0]).sum()

    def inverse_covariance_matmul(self, rhs):
        """(U Uᵀ) rhs: the approximate precision K⁻¹ ≈ U Uᵀ applied to ``rhs``."""
        return self._u_matmul(self._ut_matmul(rhs))


def pattern_mask(pattern) -> torch.Tensor:
    """True at real slots: slot 0 and every slot whose index differs from the column's own."""
    pattern = torch.as_tensor(pattern, dtype=torch.long)
    own = pattern[:, :1]
    mask = pattern != own
    mask[:, 0] = True
    return mask
