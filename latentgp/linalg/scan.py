"""Parallel prefix scans over the leading (time) axis, with no Python loop over time.

The recursion is the odd/even reduction of Blelloch (1990), as used for parallel Kalman
filtering/smoothing by Särkkä & García-Fernández (2021): combine neighbouring pairs, scan the
half-length sequence of pair results recursively, then fill in the even positions with one more
batched operation. Total work is O(T), and the Python-level recursion depth is ceil(log2 T); each
level makes a fixed number of batched calls, so nothing loops over time in Python.

* :func:`associative_scan` -- the generic inclusive scan of a tuple of tensors under an associative
  operator.
* :func:`state_scan` -- the same recursion when every inclusive prefix has a cheaper representation
  (a "state") than a general element: a filtered mean and covariance instead of a full filtering
  element, a vector instead of an affine map. The fill-in step then applies an element to a state,
  which is cheaper than combining two elements, and the top of the tree (few elements, where only
  the number of calls matters) is finished by Hillis & Steele (1986)'s doubling scan.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Elems = tuple[torch.Tensor, ...]


def _interleave(even: Elems, odd: Elems) -> Elems:
    """Merge ``even`` (positions 0, 2, ...) and ``odd`` (positions 1, 3, ...) along axis 0.

    ``len(even)`` is ``len(odd)`` or ``len(odd) + 1``. Built from stack/reshape/cat rather than
    in-place slice assignment so autograd sees plain differentiable ops.
    """
    out = []
    for e, o in zip(even, odd, strict=True):
        n_odd = o.shape[0]
        pairs = torch.stack((e[:n_odd], o), dim=1).reshape((2 * n_odd,) + o.shape[1:])
        out.append(torch.cat((pairs, e[n_odd:]), dim=0) if e.shape[0] > n_odd else pairs)
    return tuple(out)


def _scan(combine: Callable[[Elems, Elems], Elems], elems: Elems) -> Elems:
    n = elems[0].shape[0]
    if n < 2:
        return elems
    # Level reduction: r_k = e_{2k} (+) e_{2k+1}, k = 0 .. n//2 - 1.
    reduced = combine(tuple(e[0:-1:2] for e in elems), tuple(e[1::2] for e in elems))
    # The inclusive prefixes at the odd positions 1, 3, 5, ... are the prefixes of `reduced`.
    odd = _scan(combine, reduced)
    # Even positions 2, 4, ...: prefix at the preceding odd position combined with the element.
    n_even_rest = (n - 1) // 2  # number of even positions >= 2
    even_rest = combine(tuple(o[:n_even_rest] for o in odd), tuple(e[2::2] for e in elems))
    even = tuple(torch.cat((e[:1], r), dim=0) for e, r in zip(elems, even_rest, strict=True))
    return _interleave(even, odd)


def associative_scan(
    combine: Callable[[Elems, Elems], Elems], elems: Sequence[torch.Tensor], reverse: bool = False
) -> Elems:
    """Inclusive scan of ``elems`` under an associative binary operator ``combine``.

    Args:
        combine: ``combine(earlier, later) -> result``, where ``earlier`` and ``later`` are tuples of
            tensors with the same structure as ``elems`` and equal leading (time) length; it must act
            elementwise along axis 0, be associative, and return tensors of the same shapes as its
            inputs (so pre-broadcast ``elems`` to the full batch shape). Trailing axes are free.
        elems: tuple of tensors sharing the size ``T`` of their **leading axis 0**, which is the
            scanned (time) axis.
        reverse: if False, returns ``out[t] = e_0 (+) e_1 (+) ... (+) e_t``; if True, returns
            ``out[t] = e_t (+) e_{t+1} (+) ... (+) e_{T-1}`` (``combine`` still receives the earlier
            element first).

    Returns:
        tuple of tensors shaped like the (broadcast) outputs of ``combine``, with leading axis ``T``.
    """
    elems = tuple(elems)
    if not elems:
        raise ValueError("associative_scan needs at least one tensor.")
    n = elems[0].shape[0]
    if any(e.shape[0] != n for e in elems):
        lengths = [e.shape[0] for e in elems]
        raise ValueError(f"All elems must share the leading (time) axis length; got {lengths}.")
    if not reverse:
        return _scan(combine, elems)
    # Reverse scan = forward scan of the flipped sequence with the operands swapped back.
    flipped = _scan(lambda a, b: combine(b, a), tuple(e.flip(0) for e in elems))
    return tuple(e.flip(0) for e in flipped)


# --------------------------------------------------------------------------------------------------
# scan whose prefixes are "states"
# --------------------------------------------------------------------------------------------------
def _pad_axis(x: torch.Tensor, axis: int, left: int, right: int) -> torch.Tensor:
    """Zero-pad (negative = crop) ``x`` along ``axis`` in one call."""
    return torch.nn.functional.pad(x, (0, 0) * (x.dim() - 1 - axis) + (left, right))


def _hillis_steele(combine, first, e: torch.Tensor, axis: int) -> torch.Tensor:
    """Inclusive prefixes in ceil(log2 n) full-width levels and no fill-in (Hillis & Steele 1986).

    O(n log n) work but one call per level, so it replaces the top of the tree, where few elements
    remain and the cost is the number of calls. Position k combines with position k - d, or with
    zeros (nothing) when k < d.
    """
    n, d = e.shape[axis], 1
    while d < n:
        e = combine(_pad_axis(e, axis, d, -d), e)
        d *= 2
    return first(e)


def _state_scan(combine, apply, first, e: torch.Tensor, axis: int, base: int) -> torch.Tensor:
    n = e.shape[axis]
    if n <= base:
        return _hillis_steele(combine, first, e, axis)
    if n % 2:  # pair the last element with zeros; that pair's prefix is never used
        e = _pad_axis(e, axis, 0, 1)
    m = e.shape[axis]
    ev, od = e.reshape(e.shape[:axis] + (m // 2, 2) + e.shape[axis + 1 :]).unbind(axis + 1)
    odd = _state_scan(combine, apply, first, combine(ev, od), axis, base)  # prefixes at 1, 3, 5, ...
    # even positions 0, 2, 4, ...: the prefix one step earlier (zeros before position 0), then one element
    even = apply(_pad_axis(odd, axis, 1, -1), ev)
    out = torch.stack((even, odd), axis + 1)
    out = out.reshape(out.shape[:axis] + (m,) + out.shape[axis + 2 :])
    return out.narrow(axis, 0, n) if m != n else out


def state_scan(
    combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    apply: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    first: Callable[[torch.Tensor], torch.Tensor],
    elems: torch.Tensor,
    axis: int = 0,
    reverse: bool = False,
    base: int = 64,
) -> torch.Tensor:
    """Inclusive prefixes ``s_t = e_0 (+) e_1 (+) ... (+) e_t``, represented as states, of one packed tensor.

    For operators whose every prefix from ``e_0`` is described by a cheaper "state" (for a Kalman
    filter: the filtered mean and covariance; for an affine recursion ``x_t = E_t x_{t+1} + g_t``: the
    vector ``x``):

    * ``combine(earlier, later) -> element``: the associative operator on packed elements;
    * ``apply(state, element) -> state``: the state of ``prefix (+) element``;
    * ``first(element) -> state``: the state that a prefix (an element starting at ``e_0``) represents.

    All act elementwise along ``axis`` (time, length ``T``) and broadcast over every other axis.
    All-zero tensors stand for "nothing before": ``apply(0, e)`` must equal ``first(e)``, and
    ``combine(0, p)`` for a prefix ``p`` must act as ``p`` does (same state; later combines unchanged);
    an element may also be paired with zeros after the end (that result is discarded). Elements and
    states may differ in size off ``axis``. Work is O(T + base log base).

    Above ``base`` elements a level is the odd/even step of Blelloch (1990): one ``combine`` call on
    n/2 pairs, then one ``apply`` call on n/2 states (cheaper than a second combine); at most ``base``
    elements are finished by Hillis-Steele, one ``combine`` per level. Differentiable by autograd.

    With ``reverse=True``: ``s_t = e_t (+) e_{t+1} (+) ... (+) e_{T-1}``; ``combine`` still receives the
    earlier element first, ``apply(state, element)`` receives the state of the suffix after the element,
    and ``first`` sees suffixes.
    """
    if elems.shape[axis] == 0:
        raise ValueError("state_scan needs a non-empty time axis.")
    if not reverse:
        return _state_scan(combine, apply, first, elems, axis, base)
    out = _state_scan(lambda a, b: combine(b, a), apply, first, elems.flip(axis), axis, base)
    return out.flip(axis)
