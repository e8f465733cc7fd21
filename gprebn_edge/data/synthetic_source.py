"""Built-in synthetic data as an image source: synthetic:DOMAIN[:SEVERITY][:key=value...], generated on
first use."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from gprebn_edge.data.arrays import ArraySource
from gprebn_edge.data.preprocess import Preprocess
from gprebn_edge.data.source_base import Batch, ImageSource
from gprebn_edge.errors import InputError

__all__ = ["SyntheticSource"]

_SYNTHETIC_KEYS = {"n": 2000, "split": "calib", "seed": 0}
_NO_SEVERITY = ("clean", "style")  # domains.load_domain ignores the severity of these


def _parse_synthetic(spec: str) -> dict:
    """'synthetic:DOMAIN[:SEVERITY][:key=value...]' -> domain, severity, n, split, seed (all checked)."""
    from gprebn_edge.data.corruptions import SEVERITIES
    from gprebn_edge.data.domains import DOMAINS
    from gprebn_edge.data.synthetic import SPLITS

    parts = spec.split(":")[1:]
    domain = parts[0] if parts else ""
    if domain not in DOMAINS:
        raise InputError(f"unknown synthetic domain {domain!r} in {spec!r}: choose one of "
                         f"{', '.join(DOMAINS)}")
    out: dict = {"domain": domain, "severity": 5, **_SYNTHETIC_KEYS}
    given: set[str] = set()
    for pos, part in enumerate(parts[1:], start=1):
        key, eq, value = part.partition("=")
        if not eq:
            if pos != 1 or not part.isdecimal() or int(part) not in SEVERITIES:
                raise InputError(f"bad severity {part!r} in {spec!r}: use synthetic:DOMAIN[:SEVERITY]"
                                 f"[:key=value...] with SEVERITY one of {', '.join(map(str, SEVERITIES))}")
            out["severity"] = int(part)
            continue
        if key not in _SYNTHETIC_KEYS or key in given:
            what = "repeated" if key in given else "unknown"
            raise InputError(f"{what} key {key!r} in {spec!r}: valid keys are n, split, seed")
        given.add(key)
        if key == "split":
            if value not in SPLITS:
                raise InputError(f"bad split {value!r} in {spec!r}: choose one of {', '.join(SPLITS)}")
            out["split"] = value
        elif not value.isdecimal() or (key == "n" and int(value) < 1):
            raise InputError(f"bad {key}={value!r} in {spec!r}: {key} must be a "
                             f"{'positive' if key == 'n' else 'non-negative'} integer")
        else:
            out[key] = int(value)
    return out


class SyntheticSource(ImageSource):
    """Built-in procedural data, generated on first use; already in random order, so never shuffled."""

    kind = "synthetic"

    def __init__(self, spec: str, preprocess: Preprocess, *, limit: int | None) -> None:
        self.params = p = _parse_synthetic(spec)
        severity = "" if p["domain"] in _NO_SEVERITY else f":{p['severity']}"
        self.canonical = f"synthetic:{p['domain']}{severity}:n={p['n']}:split={p['split']}:seed={p['seed']}"
        super().__init__(spec, preprocess, p["n"], shuffle=False, seed=0, limit=limit)
        self.has_labels = True
        self.class_names = [str(d) for d in range(10)]
        self._arrays: ArraySource | None = None

    def _batches(self, batch_size: int) -> Iterator[Batch]:
        if self._arrays is None:
            from gprebn_edge.data.domains import load_domain

            p = self.params
            images, labels = load_domain(p["domain"], severity=p["severity"], split=p["split"], n=p["n"],
                                         seed=p["seed"])
            self._arrays = ArraySource(images, labels, self.canonical, self.preprocess, name=self.canonical,
                                       shuffle=False, seed=0, limit=self.limit)
        yield from self._arrays._batches(batch_size)

    def describe(self) -> dict:
        return {**super().describe(), "canonical": self.canonical}

    def _hash(self, update: Callable[[bytes], None]) -> None:
        update(f"{self.canonical}\0count={len(self)}".encode())
