"""Data never runs code (docs/security.md): an artifact, a manifest or a state file may *name* model code
(`path/to/file.py:factory`, `package.module:factory`), and that code is imported only when the user
consented on the command line, by naming exactly that code (export's `--model`) or with
`--trust-model-code`. `builtin:` and `torchvision:` specs run no user code and need no consent.

Also the model spec's parsing, which is plain string work: this module imports without torch, so that the
runtime (which may run on a box without torch) can carry a consent to a checkpoint runner."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from gprebn_edge.errors import ModelError

__all__ = ["CodeConsent", "TRUST_ALL", "split_spec", "names_code", "same_code", "require_consent", "FORMS"]

FORMS = "builtin:NAME, torchvision:NAME, path/to/file.py:factory or package.module:factory"
_MODULE_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def split_spec(spec: str) -> tuple[str, str, str]:
    """-> (kind, target, factory name) with kind one of builtin, torchvision, file, module."""
    head, sep, rest = spec.partition(":")
    if not sep:
        raise ModelError(f"model spec {spec!r} has no ':': use {FORMS}")
    if head in ("builtin", "torchvision"):
        if not rest:
            raise ModelError(f"model spec {spec!r} names no model: use {head}:NAME")
        return head, rest, ""
    # rsplit so that a Windows drive letter ("C:\\net.py:make") stays in the path.
    target, _, factory = spec.rpartition(":")
    if target.endswith(".py"):
        kind = "file"
    elif _MODULE_RE.match(target):
        kind = "module"
    elif "/" in target or "\\" in target:
        raise ModelError(f"model file {target!r} must be a Python file ending in .py: use {FORMS}")
    else:
        raise ModelError(f"model spec {spec!r} is not understood: use {FORMS}")
    if not factory.isidentifier():
        raise ModelError(f"model spec {spec!r} needs a factory function name after the last ':'")
    return kind, target, factory


def names_code(spec: str) -> bool:
    """Whether building `spec` imports user code (a file or a module), which needs consent."""
    return split_spec(spec)[0] in ("file", "module")


def _identity(spec: str) -> tuple[str, str, str]:
    kind, target, factory = split_spec(spec)
    if kind == "file":  # the file that would run: symlinks and `..` resolved, relative to the working folder
        target = str(Path(target).expanduser().resolve())
    return kind, target, factory


def same_code(a: str, b: str) -> bool:
    """Whether two specs build the model from the same code: the same resolved file and factory, or the same
    module:factory (or the same builtin/torchvision name)."""
    return _identity(a) == _identity(b)


@dataclass(frozen=True)
class CodeConsent:
    """The model code the user consented, on the command line, to import when an artifact names it.

    `spec`: exactly this code (export's --model SPEC); `any_code`: whatever the artifact names
    (--trust-model-code). `flag` is the option that names code on the command at hand ("--model" for export,
    None where there is none): the refusal advises it. A library caller that trusts its artifacts passes
    TRUST_ALL."""

    spec: str | None = None
    any_code: bool = False
    flag: str | None = None


TRUST_ALL = CodeConsent(any_code=True)


def require_consent(spec: str, consent: CodeConsent | None, where: str) -> None:
    """Refuse, in one line that says how to consent, to build the model `spec` that `where` (a file) names
    unless it runs no user code or the user consented to it. Runs nothing: the spec is only parsed."""
    consent = consent or CodeConsent()
    code = names_code(spec)  # a malformed spec fails here, before anything is imported
    if consent.spec is not None and not same_code(consent.spec, spec):
        trust = " if you trust it" if code else ""
        raise ModelError(f"{where} names model {spec}, not the {consent.flag or '--model'} {consent.spec} you gave: "
                         f"pass {consent.flag or '--model'} {spec}{trust}")
    if not code or consent.any_code or consent.spec is not None:
        return
    how = f"{consent.flag} {spec} (or --trust-model-code)" if consent.flag else "--trust-model-code"
    raise ModelError(f"{where} names model code {spec}; it is not imported without your consent: pass {how} "
                     "if you trust it")
