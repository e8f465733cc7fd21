"""The device loop, above the three stages: serves with the runtime, re-adapts and re-exports in a
background thread, and swaps in a candidate only after it passed its gates (see docs/design.md)."""

__all__: list[str] = []
