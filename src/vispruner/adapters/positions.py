"""How kept tokens are numbered (pure Python: the CLI offers the choice before loading torch)."""

from __future__ import annotations

#: "compacted" (renumbered as if the short sequence had been the prompt, the papers' setting) or
#: "original" (the positions they had in the full sequence).
POSITIONS = ("compacted", "original")


def check_positions(positions: str) -> str:
    """``positions`` if it is one of :data:`POSITIONS`; ``ValueError`` naming them otherwise."""
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {', '.join(map(repr, POSITIONS))}; got {positions!r}")
    return positions
