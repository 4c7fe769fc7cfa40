#!/usr/bin/env python3
"""Checks the imports between the files of src/ (Python 3.11, stdlib only).

Fails (exit 1) when files import each other in a circle, printed as
`a.rs -> b.rs -> a.rs`, or when a file imports from its own layer or a layer
above it. The layers are the numbered list between `<!-- layers` and
`<!-- end of layers -->` in src/lib.rs's module doc: one layer per line, its
top-level modules in backticks before the first colon.

An import is a `use` (`pub use` included) or an inline path: `crate::a::b`,
`super::x`, `self::x`, a path that starts with a child module (`pool::Pools`
in smtp/mod.rs) and, in the binary, `<crate name>::x`. It resolves to the file
of the deepest module on the path (`crate::a::Item` to src/a.rs or
src/a/mod.rs); a path through a re-export (`crate::Item` where lib.rs says
`pub use a::Item`) resolves to where the item comes from. `mod x;` is a
declaration, not an import; `#[cfg(test)]` modules, comments and string
literals are ignored.

    python3 .ci/check-layers.py [SRC_DIR]   # default: src/ next to .ci/
    python3 .ci/check-layers.py --self-test
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


# --- reading Rust -------------------------------------------------------------


def strip_code(text: str) -> str:
    """`text` with comments and string/char literals blanked (newlines kept)."""
    out: list[str] = []
    i, n = 0, len(text)

    def blank(chunk: str) -> str:
        return "".join(c if c == "\n" else " " for c in chunk)

    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(blank(text[i:j]))
            i = j
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append(blank(text[i:j]))
            i = j
        elif (m := re.compile(r'b?r(#*)"').match(text, i)) and not (
            i and (text[i - 1].isalnum() or text[i - 1] == "_")
        ):
            end = '"' + m.group(1)
            j = text.find(end, m.end())
            j = n if j < 0 else j + len(end)
            out.append('""' + blank(text[i + 2 : j]))
            i = j
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            j = min(j + 1, n)
            out.append('""' + blank(text[i + 2 : j]))
            i = j
        elif c == "'" and (m := re.compile(r"'(\\(x[0-9a-fA-F]{2}|u\{[0-9a-fA-F]+\}|.)|[^\\'])'").match(text, i)):
            out.append(" " * (m.end() - i))
            i = m.end()
        else:
            out.append(c)
            i += 1
    return "".join(out)


def drop_test_modules(code: str) -> str:
    """`code` without `#[cfg(test)] mod x { ... }` blocks (newlines kept)."""
    pattern = re.compile(r"#\s*\[\s*cfg\s*\(\s*test\s*\)\s*\](\s*#\s*\[[^\]]*\])*\s*(pub(\([^)]*\))?\s+)?mod\s+" + IDENT + r"\s*\{")
    while m := pattern.search(code):
        depth, j = 1, m.end()
        while j < len(code) and depth:
            depth += {"{": 1, "}": -1}.get(code[j], 0)
            j += 1
        code = code[: m.start()] + "".join(c if c == "\n" else " " for c in code[m.start() : j]) + code[j:]
    return code


def use_tree_paths(tree: str) -> list[tuple[list[str], str | None]]:
    """Expands a use tree (`crate::a::{self, b::C as D, *}`) into paths, each
    with the name it brings into scope (`D`; `None` for a glob)."""
    tokens = re.findall(IDENT + r"|::|[{},*]", tree)
    pos = 0

    def parse(prefix: list[str]) -> list[tuple[list[str], str | None]]:
        nonlocal pos
        path = list(prefix)
        alias: str | None = None
        glob = False
        while pos < len(tokens):
            t = tokens[pos]
            if t == "{":
                pos += 1
                paths: list[tuple[list[str], str | None]] = []
                while pos < len(tokens) and tokens[pos] != "}":
                    if tokens[pos] == ",":
                        pos += 1
                        continue
                    paths += parse(path)
                pos += 1
                return paths
            if t in (",", "}"):
                break
            if t == "as":
                alias = tokens[pos + 1] if pos + 1 < len(tokens) else None
                pos += 2
                continue
            if t == "::":
                pos += 1
                continue
            if t == "*":
                glob = True
                pos += 1
                continue
            if t != "self" or not path:
                path.append(t)
            pos += 1
        name = None if glob or alias == "_" else (alias or (path[-1] if path else None))
        return [(path, name)]

    return parse([])


# --- the module tree ----------------------------------------------------------


class Tree:
    def __init__(self, src: Path, crate_name: str | None):
        self.src = src
        self.crate_name = crate_name
        self.files: dict[tuple[str, ...], Path] = {}  # module path -> file
        self.module_of: dict[Path, tuple[str, ...]] = {}
        self.bins: list[Path] = []
        for f in sorted(src.rglob("*.rs")):
            rel = f.relative_to(src)
            if rel == Path("lib.rs"):
                mod: tuple[str, ...] = ()
            elif rel == Path("main.rs") or rel.parts[0] == "bin":
                self.bins.append(f)
                continue
            elif rel.name == "mod.rs":
                mod = rel.parts[:-1]
            else:
                mod = rel.parts[:-1] + (rel.stem,)
            self.files[mod] = f
            self.module_of[f] = mod
        self.code = {f: drop_test_modules(strip_code(f.read_text(encoding="utf-8"))) for f in list(self.module_of) + self.bins}
        self.reexports: dict[tuple[str, ...], dict[str, list[str]]] = {}
        for f, mod in self.module_of.items():
            for _, path, name in self.use_paths(f, public_only=True):
                absolute = self.absolute(mod, path)
                if absolute and name:
                    self.reexports.setdefault(mod, {})[name] = absolute

    def name(self, f: Path) -> str:
        return f.relative_to(self.src).as_posix()

    def children(self, mod: tuple[str, ...]) -> set[str]:
        return {m[-1] for m in self.files if len(m) == len(mod) + 1 and m[:-1] == mod}

    def use_items(self, f: Path, public_only: bool = False):
        """(start, end, tree) of every `use` item of `f`."""
        code = self.code[f]
        vis = r"pub(\([^)]*\))?\s+" if public_only else r"(pub(\([^)]*\))?\s+)?"
        for m in re.finditer(r"(?<![\w:])" + vis + r"use\s+(?=::|\{|[A-Za-z_])", code):
            end = code.find(";", m.end())
            end = len(code) if end < 0 else end
            yield m.start(), end, code[m.end() : end]

    def use_paths(self, f: Path, public_only: bool = False):
        """(offset, path, name in scope) of every path in a `use` item of `f`."""
        for start, _, tree in self.use_items(f, public_only):
            for path, name in use_tree_paths(tree):
                yield start, path, name

    def absolute(self, mod: tuple[str, ...] | None, path: list[str]) -> list[str] | None:
        """The crate-absolute form of `path` written in module `mod` (`None`:
        the binary), or `None` if it leaves the crate."""
        if not path:
            return None
        head, rest = path[0], path[1:]
        if mod is None:  # the binary: only `<crate>::…` reaches the library
            return list(rest) if head == self.crate_name else None
        if head == "crate":
            return list(rest)
        if head in ("self", "super"):
            base = list(mod)
            while path and path[0] in ("self", "super"):
                if path[0] == "super":
                    if not base:
                        return None
                    base.pop()
                path = path[1:]
            return base + list(path)
        if head in self.children(mod):
            return list(mod) + list(path)
        return None

    def resolve(self, absolute: list[str], depth: int = 0) -> Path | None:
        """The file of the deepest module on `absolute`, following re-exports."""
        best = ()
        for k in range(len(absolute), -1, -1):
            if tuple(absolute[:k]) in self.files:
                best = tuple(absolute[:k])
                break
        rest = absolute[len(best) :]
        target = self.reexports.get(best, {}).get(rest[0]) if rest else None
        if target and depth < 8 and target[: len(best) + 1] != absolute[: len(best) + 1]:
            return self.resolve(target + rest[1:], depth + 1)
        return self.files[best]

    def imports(self) -> dict[Path, dict[Path, tuple[int, str]]]:
        """file -> {imported file: (line, the path as written)}."""
        edges: dict[Path, dict[Path, tuple[int, str]]] = {}
        inline = re.compile(r"(?<![\w:$])(" + IDENT + r")((?:\s*::\s*" + IDENT + r")+)")
        for f, code in self.code.items():
            mod = self.module_of.get(f)
            found = edges.setdefault(f, {})

            def add(offset: int, path: list[str]) -> None:
                absolute = self.absolute(mod, path)
                if absolute is None:
                    return
                target = self.resolve(absolute)
                if target and target != f and target not in found:
                    found[target] = (code.count("\n", 0, offset) + 1, "::".join(path))

            for offset, path, _ in self.use_paths(f):
                add(offset, path)
            spans = [(start, end) for start, end, _ in self.use_items(f)]
            for m in inline.finditer(code):
                if any(start <= m.start() < end for start, end in spans):
                    continue  # inside a use item: done above
                add(m.start(), [m.group(1)] + re.findall(IDENT, m.group(2)))
        return edges


# --- the checks ---------------------------------------------------------------


def find_cycles(edges: dict[Path, dict[Path, tuple[int, str]]]) -> list[tuple[list[Path], list[Path]]]:
    """One shortest cycle per strongly connected component with more than one
    file, with the component's files."""
    index: dict[Path, int] = {}
    low: dict[Path, int] = {}
    stack: list[Path] = []
    on_stack: set[Path] = set()
    components: list[list[Path]] = []

    def connect(v: Path) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, {})):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            connect(v)

    cycles = []
    for component in components:
        members = set(component)
        start = min(component)
        # The shortest way back to `start` inside the component.
        previous: dict[Path, Path] = {}
        frontier = [start]
        while frontier and start not in previous:
            nxt = []
            for v in frontier:
                for w in sorted(edges.get(v, {})):
                    if w in members and w not in previous:
                        previous[w] = v
                        nxt.append(w)
            frontier = nxt
        cycle = [start]
        v = previous[start]
        while v != start:
            cycle.append(v)
            v = previous[v]
        cycle.append(start)
        cycles.append((list(reversed(cycle)), sorted(component)))
    return cycles


def read_layers(lib: Path) -> list[list[str]] | None:
    text = lib.read_text(encoding="utf-8")
    m = re.search(r"<!--\s*layers.*?-->(.*?)<!--\s*end of layers\s*-->", text, re.S)
    if not m:
        return None
    layers = []
    for line in m.group(1).splitlines():
        line = re.sub(r"^\s*//!\s?", "", line)
        item = re.match(r"\s*\d+\.\s+((?:`" + IDENT + r"`\s*,?\s*)+)", line)
        if item:
            layers.append(re.findall(r"`(" + IDENT + r")`", item.group(1)))
    return layers


def check(src: Path, crate_name: str | None = None) -> list[str]:
    """The problems found, as lines to print; empty when all is well."""
    tree = Tree(src, crate_name)
    edges = tree.imports()
    problems = []
    for cycle, component in find_cycles(edges):
        problems.append("import cycle: " + " -> ".join(tree.name(f) for f in cycle))
        for a, b in zip(cycle, cycle[1:]):
            line, path = edges[a][b]
            problems.append(f"  {tree.name(a)}:{line} imports {tree.name(b)} ({path})")
        if len(component) > len(cycle) - 1:
            names = ", ".join(tree.name(f) for f in component)
            problems.append(f"  in all, {len(component)} files reach each other through imports: {names}")

    lib = src / "lib.rs"
    layers = read_layers(lib) if lib.exists() else None
    if layers is None:
        return problems + [f"{lib}: no layer list (`<!-- layers -->` … `<!-- end of layers -->`) in the module doc; add one"]
    layer_of = {m: i for i, names in enumerate(layers, 1) for m in names}
    top_level = sorted({mod[0] for mod in tree.files if mod})
    for m in top_level:
        if m not in layer_of:
            problems.append(f"module `{m}` is in no layer; add it to the layer list in src/lib.rs")
    for m in sorted(set(layer_of) - set(top_level)):
        problems.append(f"the layer list in src/lib.rs names `{m}`, which src/ does not have; remove it")
    for f, targets in sorted(edges.items()):
        mod = tree.module_of.get(f)
        if not mod:  # lib.rs and the binary sit on top
            continue
        for target, (line, path) in sorted(targets.items()):
            other = tree.module_of[target]
            if not other or other[0] == mod[0]:
                continue
            mine, theirs = layer_of.get(mod[0]), layer_of.get(other[0])
            if mine is not None and theirs is not None and theirs >= mine:
                where = "the same layer" if theirs == mine else "a higher layer"
                problems.append(
                    f"{tree.name(f)}:{line} imports {tree.name(target)} ({path}) from {where} "
                    f"(`{mod[0]}` is on layer {mine}, `{other[0]}` on layer {theirs}); "
                    "move the shared part down a layer or pass it in"
                )
    return problems


# --- self-test ------------------------------------------------------------------

FAKE_LIB = """//! A fake crate.
//!
//! <!-- layers -->
//! 1. `base`: helpers
//! 2. `proto`: the protocol
//! 3. `server`: the listener
//! <!-- end of layers -->

pub mod base;
pub mod proto;
pub mod server;

pub use base::Thing;
"""

FAKE = {
    "lib.rs": FAKE_LIB,
    "base.rs": """
pub struct Thing;
// crate::server::run is mentioned in a comment: not an import.
pub const TEXT: &str = "crate::server::run";
#[cfg(test)]
mod tests {
    use crate::server::run;
}
""",
    "proto/mod.rs": """
pub mod session;
use crate::Thing;
pub fn serve() { session::run(); }
""",
    "proto/session.rs": """
use super::super::base::{self, Thing as T};
pub fn run() { let _c = '"'; let _ = crate::base::TEXT; }
""",
    "server.rs": """
use crate::proto::{self, session};
pub fn run() { crate::proto::serve(); }
""",
    "main.rs": """
fn main() { fake::server::run(); }
""",
}


def build(root: Path, files: dict[str, str]) -> Path:
    src = root / "src"
    for name, text in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text, encoding="utf-8")
    return src


def self_test() -> int:
    cases = [
        ("no cycle, layers kept", {}, []),
        (
            "a deliberate cycle: proto/session.rs imports server.rs",
            {"proto/session.rs": FAKE["proto/session.rs"] + "use crate::server::run as serve_all;\n"},
            [
                "import cycle: proto/mod.rs -> proto/session.rs -> server.rs -> proto/mod.rs",
                "proto/session.rs:4 imports server.rs (crate::server::run) from a higher layer",
            ],
        ),
        (
            "a cycle inside one module tree, through an inline path",
            {"proto/session.rs": FAKE["proto/session.rs"] + "pub fn back() { super::serve(); }\n"},
            ["import cycle: proto/mod.rs -> proto/session.rs -> proto/mod.rs"],
        ),
        (
            "a cycle through a re-export in lib.rs",
            {"base.rs": FAKE["base.rs"] + "use crate::proto::serve;\n"},
            ["import cycle: base.rs -> proto/mod.rs -> base.rs"],
        ),
        (
            "no cycle, but an import from the same layer",
            {"lib.rs": FAKE_LIB.replace("//! 1. `base`: helpers\n//! 2. `proto`: the protocol", "//! 1. `base`, `proto`: helpers and the protocol")},
            ["proto/mod.rs:3 imports base.rs (crate::Thing) from the same layer"],
        ),
    ]
    failed = 0
    for title, changes, expected in cases:
        with tempfile.TemporaryDirectory() as root:
            src = build(Path(root), {**FAKE, **changes})
            problems = check(src, "fake")
            exit_code = main(["check-layers.py", str(src)], quiet=True)
        ok = (
            bool(problems) == bool(expected)
            and exit_code == (1 if expected else 0)
            and all(any(p.startswith(e) for p in problems) for e in expected)
        )
        print(f"{'ok  ' if ok else 'FAIL'} {title}: {'fails' if problems else 'passes'}")
        for p in problems:
            print(f"       {p}")
        failed += not ok
    print("self-test " + ("passed" if not failed else f"FAILED ({failed} case(s))"))
    return 1 if failed else 0


def crate_name(root: Path) -> str | None:
    cargo = root / "Cargo.toml"
    if not cargo.exists():
        return None
    m = re.search(r'^\[package\][^\[]*?^name\s*=\s*"([^"]+)"', cargo.read_text(encoding="utf-8"), re.M | re.S)
    return m.group(1).replace("-", "_") if m else None


def main(argv: list[str], quiet: bool = False) -> int:
    if argv[1:] == ["--self-test"]:
        return self_test()
    if len(argv) > 2 or any(a.startswith("-") for a in argv[1:]):
        print(__doc__.strip().splitlines()[-2].strip(), file=sys.stderr)
        return 2
    src = Path(argv[1]) if len(argv) == 2 else Path(__file__).resolve().parent.parent / "src"
    problems = check(src, crate_name(src.parent) or "fake")
    if quiet:
        return 1 if problems else 0
    for p in problems:
        print(p)
    if problems:
        print(f"check-layers: {src} breaks the import rules (see the layer list in src/lib.rs)")
        return 1
    print(f"check-layers: no import cycle and every import goes down a layer in {src}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
