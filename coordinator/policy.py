"""Compile "code is the policy" into ``node → entitled secret paths``.

A node is entitled to a path when

* one of its labels lists the path under ``secrets:`` (source ``label:NAME``), or
* one of its labels applies a Puppet class whose manifest calls ``lab::secret('PATH')``
  (source ``label:NAME → class:CLASS → FILE:LINE``).

Everything else is denied. Paths of secrets declared ``per_machine`` are granted as the logical
path; the store serves each node its own value (stored at ``PATH@NODE``).

**Manifest scanning.** Class ``foo::bar::baz`` lives in ``<modules>/foo/manifests/bar/baz.pp`` and
``foo`` in ``<modules>/foo/manifests/init.pp`` (Puppet's autoloader layout). The scanner is a small
lexer, not a regex over raw text: ``#`` and ``/* */`` comments are blanked (so a commented-out call
grants nothing), strings are read with Puppet's escapes in both quote styles (so ``#`` inside a
string is not a comment), and a call may span lines (``lab::secret(\\n  'x',\\n)``). A reference
whose argument is not a literal (a variable, or a double-quoted string with ``$`` interpolation)
cannot be resolved and grants nothing; it is reported as a warning with its file:line.

Classes a manifest declares are followed, transitively and cycle-safe: ``include``, ``contain``
and ``require`` (statement or function form, comma-separated, bare or quoted names) and
resource-like ``class { 'name': ... }``. Their ``lab::secret`` calls are granted too, with the
chain as the source (``label:web → class:web → class:web::tls (…/init.pp:4) → …/tls.pp:2``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Final

from lab.common.config import Definitions
from lab.common.identity import CertificateAuthority
from lab.common.targeting import Fleet, ServerLike
from lab.store.policy import STORE_LABEL, PolicyDocument, sign_policy
from lab.store.records import PATH_PATTERN

__all__ = [
    "ClassRef", "CompiledPolicy", "Finding", "SecretRef", "audit", "class_manifest", "compile_policy", "scan_classes",
    "scan_manifest", "scan_text",
]

_CLASS_RE: Final = re.compile(r"(?:::)?[a-z][a-z0-9_]*(?:::[a-z][a-z0-9_]*)*")
_CALL_RE: Final = re.compile(r"(?<![\w:$])(?:::)?lab::secret\s*\(\s*")
_PATH_RE: Final = re.compile(PATH_PATTERN)
_DQ_ESCAPES: Final = {"n": "\n", "t": "\t", "r": "\r", "s": " ", "\\": "\\", '"': '"', "'": "'", "$": "$"}


@dataclasses.dataclass(frozen=True, slots=True)
class SecretRef:
    """One ``lab::secret`` call: the path (None when not a literal), where, and why unresolved."""

    path: str | None
    file: str
    line: int
    problem: str | None = None

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclasses.dataclass(frozen=True, slots=True)
class ClassRef:
    """A class declared by a manifest (``include``, ``contain``, ``require``, ``class { 'x': }``)."""

    name: str
    file: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclasses.dataclass(frozen=True, slots=True)
class _Str:
    end: int
    value: str
    interpolated: bool


def _lex(text: str) -> tuple[str, dict[int, _Str]]:
    """Blank comments (keeping newlines) and string bodies; return (code, strings by start offset)."""
    out = list(text)
    strings: dict[int, _Str] = {}
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "#":
            while i < n and text[i] != "\n":
                out[i] = " "
                i += 1
        elif c == "/" and text.startswith("/*", i):
            end = text.find("*/", i + 2)
            end = n if end < 0 else end + 2
            for j in range(i, end):
                if text[j] != "\n":
                    out[j] = " "
            i = end
        elif c in "'\"":
            start, i = i, i + 1
            buf: list[str] = []
            interpolated = False
            while i < n and text[i] != c:
                ch = text[i]
                if ch == "\\" and i + 1 < n:
                    nxt = text[i + 1]
                    if c == "'":
                        buf.append(nxt if nxt in "\\'" else ch + nxt)
                    else:
                        buf.append(_DQ_ESCAPES.get(nxt, ch + nxt))
                    i += 2
                    continue
                if c == '"' and ch == "$":
                    interpolated = True
                buf.append(ch)
                i += 1
            i = min(i + 1, n)
            for j in range(start + 1, i - 1):
                if text[j] != "\n":
                    out[j] = " "
            strings[start] = _Str(i, "".join(buf), interpolated)
        else:
            i += 1
    return "".join(out), strings


def scan_text(text: str, file: str, *, _lexed: tuple[str, dict[int, _Str]] | None = None) -> list[SecretRef]:
    """Every ``lab::secret`` call in one manifest's text."""
    code, strings = _lexed or _lex(text)
    refs: list[SecretRef] = []
    for m in _CALL_RE.finditer(code):
        line = code.count("\n", 0, m.start()) + 1
        s = strings.get(m.end())
        if s is None:
            refs.append(SecretRef(None, file, line, "argument is not a string literal"))
            continue
        rest = code[s.end : s.end + 256].lstrip()
        if not rest or rest[0] not in ",)":
            refs.append(SecretRef(None, file, line, "argument is an expression, not a string literal"))
        elif s.interpolated:
            refs.append(SecretRef(None, file, line, "path uses $ interpolation"))
        elif not _PATH_RE.fullmatch(s.value) or "@" in s.value or s.value.startswith("_lab/"):
            refs.append(SecretRef(None, file, line, f"{s.value[:80]!r} is not a valid secret path"))
        else:
            refs.append(SecretRef(s.value, file, line))
    return refs


_DECLARE_RE: Final = re.compile(r"(?<![\w:$])(include|contain|require)\b(?!\s*=>)")
_RESOURCE_CLASS_RE: Final = re.compile(r"(?<![\w:$])class\s*\{\s*")
_BARE_CLASS_RE: Final = re.compile(r"(?:::)?[a-z][a-z0-9_]*(?:::[a-z][a-z0-9_]*)*")


def scan_classes(text: str, file: str, *, _lexed: tuple[str, dict[int, _Str]] | None = None) -> list[ClassRef]:
    """Every class one manifest declares (what it includes, contains, requires or declares)."""
    code, strings = _lexed or _lex(text)
    out: list[ClassRef] = []

    def name_at(pos: int) -> tuple[str | None, int]:
        s = strings.get(pos)
        if s is not None:
            return (None if s.interpolated else s.value), s.end
        m = _BARE_CLASS_RE.match(code, pos)
        return (m.group(0), m.end()) if m else (None, pos)

    def skip(pos: int) -> int:
        while pos < len(code) and code[pos] in " \t\r\n":
            pos += 1
        return pos

    for m in _DECLARE_RE.finditer(code):
        pos = skip(m.end())
        if pos < len(code) and code[pos] == "(":
            pos = skip(pos + 1)
        while True:
            name, end = name_at(pos)
            if name is None:
                break
            if _BARE_CLASS_RE.fullmatch(name):
                out.append(ClassRef(name.lstrip(":"), file, code.count("\n", 0, pos) + 1))
            pos = skip(end)
            if pos < len(code) and code[pos] == ",":
                pos = skip(pos + 1)
                continue
            break
    for m in _RESOURCE_CLASS_RE.finditer(code):
        name, end = name_at(m.end())
        rest = code[end : end + 64].lstrip()
        if name and rest.startswith(":") and _BARE_CLASS_RE.fullmatch(name):
            out.append(ClassRef(name.lstrip(":"), file, code.count("\n", 0, m.end()) + 1))
    return sorted(out, key=lambda r: r.line)  # stable: source order within a line


def class_manifest(modules: Path, cls: str) -> Path | None:
    """Where Puppet's autoloader finds class ``cls`` (None for a malformed class name)."""
    if not _CLASS_RE.fullmatch(cls):
        return None
    parts = cls.lstrip(":").split("::")
    if len(parts) == 1:
        return modules / parts[0] / "manifests" / "init.pp"
    return modules.joinpath(parts[0], "manifests", *parts[1:-1], parts[-1] + ".pp")


def scan_manifest(modules: Path, cls: str, root: Path | None = None) -> tuple[list[SecretRef], list[ClassRef], str | None]:
    """The secret references and declared classes of class ``cls``, and a warning when its
    manifest cannot be read."""
    path = class_manifest(modules, cls)
    if path is None:
        return [], [], f"class {cls!r}: not a valid Puppet class name"
    shown = str(path.relative_to(root)) if root is not None and path.is_relative_to(root) else str(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return [], [], f"class {cls}: no manifest at {shown}"
    except OSError as exc:
        return [], [], f"class {cls}: cannot read {shown}: {exc.strerror or exc}"
    lexed = _lex(text)
    return scan_text(text, shown, _lexed=lexed), scan_classes(text, shown, _lexed=lexed), None


@dataclasses.dataclass
class CompiledPolicy:
    """The entitlements with the reason for each (what `lab show secret` prints)."""

    grants: dict[str, dict[str, list[str]]]  # node → path → sources
    stores: list[str]
    per_machine: set[str]
    class_refs: dict[str, list[SecretRef]]  # class → its references, declared classes' included
    warnings: list[str]

    def paths_of(self, node: str) -> list[str]:
        return sorted(self.grants.get(node, {}))

    def consumers(self, path: str) -> dict[str, list[str]]:
        """node → sources, for every node entitled to ``path``."""
        return {n: g[path] for n, g in sorted(self.grants.items()) if path in g}

    def document(self, ca: CertificateAuthority, *, version: int, now: float) -> PolicyDocument:
        return sign_policy(
            ca, {n: list(g) for n, g in self.grants.items()}, self.stores, self.per_machine, version=version, now=now
        )


class _Scanner:
    def __init__(self, modules: Path | None) -> None:
        self.modules = modules
        self.cache: dict[str, list[SecretRef]] = {}
        self.declares: dict[str, list[ClassRef]] = {}
        self.warnings: list[str] = []

    def refs(self, cls: str) -> list[SecretRef]:
        """The class's own ``lab::secret`` calls."""
        cls = cls.lstrip(":")
        if cls not in self.cache:
            if self.modules is None:
                self.cache[cls], self.declares[cls] = [], []
            else:
                refs, classes, warning = scan_manifest(self.modules, cls, self.modules.parent)
                if warning:
                    self.warnings.append(warning)
                for r in refs:
                    if r.path is None:
                        self.warnings.append(f"{r.where}: lab::secret call in class {cls} grants nothing: {r.problem}")
                self.cache[cls], self.declares[cls] = refs, classes
        return self.cache[cls]

    def closure(self, cls: str) -> list[tuple[SecretRef, tuple[str, ...]]]:
        """The calls of ``cls`` and of every class it declares, transitively; each with the chain
        of declarations that leads to it (``class:X (file:line)`` steps). Cycles stop."""
        out: list[tuple[SecretRef, tuple[str, ...]]] = []
        seen = {cls.lstrip(":")}
        stack: list[tuple[str, tuple[str, ...]]] = [(cls.lstrip(":"), ())]
        while stack:
            name, chain = stack.pop(0)
            out.extend((r, chain) for r in self.refs(name))
            for decl in self.declares.get(name, ()):
                if decl.name not in seen:
                    seen.add(decl.name)
                    stack.append((decl.name, (*chain, f"class:{decl.name} ({decl.where})")))
        return out


def compile_policy(definitions: Definitions, servers: Iterable[ServerLike], modules: str | Path | None) -> CompiledPolicy:
    """Entitlements of every server from its labels' ``secrets:`` and their classes' manifests."""
    servers = list(servers)
    fleet = Fleet(definitions, servers)
    scanner = _Scanner(Path(modules) if modules is not None else None)
    grants: dict[str, dict[str, list[str]]] = {}
    for s in servers:
        view = fleet.server(s.name)
        g: dict[str, list[str]] = {}
        for item in view.secrets:
            for src in item.sources:
                g.setdefault(item.name, []).append(src)
        for item in view.puppet_classes:
            for ref, chain in scanner.closure(item.name):
                if ref.path is not None:
                    via = "".join(f" → {step}" for step in chain)
                    for src in item.sources:
                        g.setdefault(ref.path, []).append(f"{src} → class:{item.name}{via} → {ref.where}")
        grants[s.name] = g
    stores = sorted(s.name for s in servers if STORE_LABEL in s.labels)
    per_machine = {p for p, sec in definitions.secrets.items() if sec.per_machine}
    for label in definitions.labels.values():  # scan every class, applied or not (audit needs them)
        for cls in label.puppet_classes:
            scanner.closure(cls)
    class_refs = {cls: [r for r, _ in scanner.closure(cls)] for cls in scanner.cache}
    return CompiledPolicy(grants, stores, per_machine, class_refs, sorted(set(scanner.warnings)))


@dataclasses.dataclass(frozen=True, slots=True)
class Finding:
    level: str  # "ok" | "warning"
    kind: str  # orphaned | never-set | undefined | unreferenced-value | ok
    path: str | None
    message: str


def audit(definitions: Definitions, compiled: CompiledPolicy, stored: Mapping[str, bool]) -> list[Finding]:
    """What `lab secret audit` reports. ``stored``: path (or ``path@node``) → has a live value."""
    referenced: dict[str, list[str]] = {}
    for label in definitions.labels.values():
        for p in label.secrets:
            referenced.setdefault(p, []).append(f'label "{label.name}"')
        for cls in label.puppet_classes:
            for ref in compiled.class_refs.get(cls, ()):
                if ref.path is not None:
                    referenced.setdefault(ref.path, []).append(f'class "{cls}" ({ref.where})')
    live = {p.partition("@")[0] for p, ok in stored.items() if ok and not p.startswith("_lab/")}
    out: list[Finding] = []
    for p in sorted(definitions.secrets):
        if p not in referenced:
            out.append(Finding("warning", "orphaned", p, f'Secret "{p}" is defined but not referenced by any code — orphaned?'))
    for p in sorted(referenced):
        who = referenced[p][0]
        if p not in definitions.secrets:
            out.append(Finding("warning", "undefined", p, f'Secret "{p}" referenced by {who} is not defined in secrets'))
        if p not in live:
            out.append(Finding("warning", "never-set", p, f'Secret "{p}" referenced by {who} but never set — empty!'))
    for p in sorted(live - set(referenced) - set(definitions.secrets)):
        out.append(Finding("warning", "unreferenced-value", p, f'Secret "{p}" has a value but nothing defines or references it'))
    if not any(f.kind == "orphaned" for f in out):
        out.insert(0, Finding("ok", "ok", None, "All secrets are referenced by at least one applied class/label"))
    return out
