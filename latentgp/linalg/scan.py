"""Generic associative (parallel prefix) scan over the leading axis of a tuple of tensors.

The recursion is the odd/even reduction of Blelloch (1990), as used for parallel Kalman
filtering/smoothing by Särkkä & García-Fernández (2021): combine neighbouring pairs, scan the
half-length sequence of pair results recursively, then fill in the even positions with one more
combine. Total work is O(T) combines, and the Python-level recursion depth is ceil(log2 T); each
level calls ``combine`` once on a whole batch of elements, so nothing loops over time in Python.
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
