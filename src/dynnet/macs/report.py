"""Human-readable MAC reports (pure functions over the dicts that :class:`~dynnet.macs.MacCounter` returns)."""

from __future__ import annotations

__all__ = ["format_macs", "format_module_table"]

_UNITS = ((10**12, "T"), (10**9, "G"), (10**6, "M"), (10**3, "K"))


def format_macs(macs: float, precision: int = 2) -> str:
    """Formats a MAC count with a decimal unit, e.g. ``1_814_083_072 -> "1.81 GMACs"``.

    Args:
        macs: Number of MACs (a float after per-sample division).
        precision: Digits after the decimal point.

    Returns:
        The count with a K/M/G/T prefix and the unit ``MACs``.
    """
    for scale, prefix in _UNITS:
        if abs(macs) >= scale:
            return f"{macs / scale:.{precision}f} {prefix}MACs"
    return f"{macs:.{precision}f} MACs" if macs != int(macs) else f"{int(macs)} MACs"


def format_module_table(by_module: dict[str, int], total: int, max_depth: int = 2, per_sample_divisor: int = 1) -> str:
    """Formats per-module MACs as an indented table, like the reports of ptflops and fvcore.

    Example (``resnet18`` at ``1x3x224x224``, ``max_depth=1``)::

        Module           MACs      % total
        (model)       1.81 GMACs   100.00%
          conv1     118.01 MMACs     6.50%
          ...

    Args:
        by_module: Inclusive MACs keyed by dotted module path, root ``""``, in display order
            (as returned by :meth:`MacCounter.by_module`).
        total: The total the percentages refer to (usually :attr:`MacCounter.total`).
        max_depth: Deepest module shown; the root has depth 0, ``"layer1"`` depth 1, ``"layer1.0"`` depth 2.
        per_sample_divisor: Divides every count, e.g. the batch size to report MACs per sample.

    Returns:
        The table as a string, one module per line.

    Raises:
        ValueError: If ``max_depth`` is negative or ``per_sample_divisor`` is not positive.
    """
    if max_depth < 0:
        raise ValueError(f"max_depth must be >= 0, got {max_depth}")
    if per_sample_divisor < 1:
        raise ValueError(f"per_sample_divisor must be a positive integer, got {per_sample_divisor}")
    rows = [("Module", "MACs", "% total")]
    for name, macs in by_module.items():
        depth = name.count(".") + 1 if name else 0
        if depth > max_depth:
            continue
        label = "  " * depth + (name or "(model)")
        share = f"{100 * macs / total:.2f}%" if total else "-"
        rows.append((label, format_macs(macs / per_sample_divisor), share))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:>{widths[2]}}" for a, b, c in rows)
