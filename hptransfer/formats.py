"""Number formats shared by every command, so a learning rate reads the same wherever it is shown.

`hpt status`, `hpt sweep --dry-run` (the views) and `hpt analyze`, `hpt predict` (the analysis) all
print learning rates through `fmt_lr`; it lives here, below both layers, because the views may
import the analysis but not the other way round (docs/design.md#layers-and-imports).
"""

import math


def pow2_exponent(x: float) -> float | None:
    """k when x = 2^k for a whole or half-whole k (an octave or half-octave grid point), else None."""
    if not isinstance(x, int | float) or isinstance(x, bool) or not math.isfinite(x) or x <= 0:
        return None
    k = math.log2(x)
    return round(k * 2) / 2 if abs(k * 2 - round(k * 2)) < 1e-9 else None


def fmt_lr(lr: float | None, sep: str = " ") -> str:
    """A learning rate: 3 significant digits, and 2^k after them when it is a power of two.

    0.0078125 -> "0.00781 (2^-7)", 0.00975 -> "0.00975", None -> "-". `sep` goes between the
    two ("\\n": a two-line table header).
    """
    if lr is None:
        return "-"
    text = f"{lr:.3g}"
    k = pow2_exponent(lr)
    return text if k is None else f"{text}{sep}(2^{k:g})"
