#!/usr/bin/env python3
"""Fails when ferrule's modules import each other in a circle.

The house style wants imports in one direction: each stage of the flow uses only the stages below it. This
reads every `src/**/*.rs`, collects the module paths each file refers to (`use` trees and `crate::`/`super::`
paths in code, not comments or `#[cfg(test)]` modules), and checks two graphs for cycles:

- layers: one node per top-level module (`app`, `connection`, `server`...), an edge when any file of one refers
  to the other;
- files: one node per file, an edge when a file refers to an item of another (re-exports included). So a
  folder's `mod.rs` sits above its children: it may use and re-export them, and a child that uses an item
  defined in its `mod.rs` closes a cycle; what children share lives in a child file of its own.

and the order of the layers: `lib.rs` declares the top-level modules from the bottom of the flow up, and a
module may refer only to modules declared before it. A reference upward fails even where it closes no cycle
yet, so the order written in `lib.rs` (and explained in ARCHITECTURE.md) is the order the code keeps.

It also checks the Python boundary: only `app/` and the entry module (`entry.rs`) may refer to pyo3.

Usage: .ci/import_cycles.py [SRC_DIR]   (default: src next to this script's parent). Exit 1 on a cycle, an
upward reference or pyo3 outside the boundary.
A parser of Rust's `use` syntax good enough for this code base, not for Rust in general: it is cheap (no
rust-analyzer build, unlike `cargo modules`) and says which references close each circle.
"""

import re
import sys
from pathlib import Path

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
# The only top-level modules that may touch pyo3: the app layer and the extension module's entry point.
PYTHON_BOUNDARY = ("app", "entry")


def module_of(src: Path, file: Path) -> tuple:
    rel = file.relative_to(src).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] in ("mod", "lib"):
        parts.pop()
    return tuple(parts)


def strip_code(text: str) -> str:
    """The file without comments, string literals, char literals and its #[cfg(test)] modules."""
    cut = re.search(r"^\s*#\[cfg\(test\)\]\s*\n\s*(pub(\([a-z]+\))?\s+)?mod\s+\w+\s*\{", text, re.M)
    if cut:
        text = text[: cut.start()]
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            i = n if j < 0 else j + 2
        elif c == '"' or (c == "r" and re.match(r'r#*"', text[i:])):
            m = re.match(r'r(#*)"', text[i:])
            if m:
                end = '"' + m.group(1)
                j = text.find(end, i + len(m.group(0)))
                i = n if j < 0 else j + len(end)
            else:
                j = i + 1
                while j < n and text[j] != '"':
                    j += 2 if text[j] == "\\" else 1
                i = j + 1
            out.append('""')
        elif c == "'" and re.match(r"'(\\.|[^\\'])'", text[i:]):
            i += len(re.match(r"'(\\.[^']*|[^\\'])'", text[i:]).group(0))
        else:
            out.append(c)
            i += 1
    return "".join(out)


def expand_use_tree(tree: str) -> list:
    """`a::{b, c::{d, e}}` -> [['a','b'], ['a','c','d'], ['a','c','e']]."""
    tree = re.sub(r"\s+as\s+[A-Za-z_][A-Za-z0-9_]*", "", tree)  # renames do not change the target
    tree = re.sub(r"\s+", "", tree)
    paths = []

    def walk(prefix, s):
        # s is one tree: path segments, optionally ending in {list}, or `*`, or `x as y`.
        brace = s.find("{")
        if brace < 0:
            segs = [p for p in s.split("::") if p and p != "*"]
            if segs and segs[-1] == "self":
                segs = segs[:-1]
            paths.append(prefix + segs)
            return
        head = [p for p in s[:brace].split("::") if p]
        inner = s[brace + 1 : s.rfind("}")]
        depth, start = 0, 0
        for k, ch in enumerate(inner + ","):
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            elif ch == "," and depth == 0:
                part = inner[start:k]
                start = k + 1
                if part:
                    walk(prefix + head, part)

    walk([], tree)
    return paths


def references(code: str, children: set):
    """(path segments, is_reexport) for every `use`, and every path in code that starts at `crate`, `super`,
    `self` or a child module."""
    refs = []
    use_re = re.compile(r"(?:^|[;{}\s])(pub(?:\([a-z]+\))?\s+)?use\s+([^;]+);", re.M)
    for m in use_re.finditer(code):
        for path in expand_use_tree(m.group(2)):
            refs.append((path, bool(m.group(1))))
    without_uses = use_re.sub(" ", code)
    starts = "|".join(["crate", "super", "self", *sorted(children)])
    for m in re.finditer(rf"(?<![A-Za-z0-9_:])((?:{starts})(?:::{IDENT})+)", without_uses):
        refs.append((m.group(1).split("::"), False))
    return refs


def resolve(path, here, modules, children):
    """The module a path lands in: the longest prefix that names a module."""
    if not path:
        return None
    first, rest = path[0], path[1:]
    if first == "crate":
        base = ()
    elif first == "super":
        base = here[:-1]
        while rest and rest[0] == "super":
            base, rest = base[:-1], rest[1:]
    elif first == "self":
        base = here
    elif first in children.get(here, set()):
        base, rest = here + (first,), rest
    else:
        return None  # an external crate or std
    best = base if base in modules else None
    for k in range(1, len(rest) + 1):
        if base + tuple(rest[:k]) in modules:
            best = base + tuple(rest[:k])
    return best


def find_cycles(nodes, edges):
    """Strongly connected components with more than one node (Tarjan), each as a sorted list."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(nodes):
        if v not in index:
            strong(v)
    return out


def layer_order(lib: Path) -> list:
    """The top-level modules in the order `lib.rs` declares them: the bottom layer first."""
    code = strip_code(lib.read_text())
    return re.findall(rf"^\s*(?:pub(?:\([a-z]+\))?\s+)?mod\s+({IDENT})\s*;", code, re.M)


def report_upward(order, edges, why) -> bool:
    """Prints each reference from a layer to one declared after it in lib.rs; whether there was one."""
    rank = {m: k for k, m in enumerate(order)}
    found = False
    for a in sorted(edges):
        for b in sorted(edges[a]):
            if a not in rank or b not in rank:
                print(f"{a} -> {b}: both must be declared in lib.rs ({why[(a, b)]})")
                found = True
            elif rank[b] > rank[a]:
                print(f"upward import: {a} refers to {b}, declared above it in lib.rs ({why[(a, b)]})")
                found = True
    return found


def report_cycles(what, nodes, edges, why, show) -> bool:
    """Prints each cycle among `nodes` with the references that close it; whether there was one."""
    cycles = find_cycles(nodes, edges)
    for comp in cycles:
        print(f"import cycle between {what}: {', '.join(show(m) for m in comp)}")
        for a in comp:
            for b in sorted(edges.get(a, ())):
                if b in comp:
                    print(f"  {show(a)} -> {show(b)}   ({why[(a, b)]})")
    return bool(cycles)


def main() -> int:
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "src"
    files = sorted(src.rglob("*.rs"))
    modules = {module_of(src, f): f for f in files}
    children = {}
    codes = {}
    for f in files:
        here = module_of(src, f)
        code = strip_code(f.read_text())
        codes[here] = code
        children[here] = set(re.findall(rf"^\s*(?:pub(?:\([a-z]+\))?\s+)?mod\s+({IDENT})\s*;", code, re.M))

    file_edges, layer_edges, why = {}, {}, {}
    for here, code in codes.items():
        if here == ():
            continue  # lib.rs declares every module; it is the root, not a layer
        for path, _reexport in references(code, children[here]):
            target = resolve(path, here, modules, children)
            if target is None or target == () or target == here:
                continue
            shown = "::".join(path)
            file_edges.setdefault(here, set()).add(target)
            why.setdefault((here, target), shown)
            if here[0] != target[0]:
                layer_edges.setdefault(here[0], set()).add(target[0])
                why.setdefault((here[0], target[0]), f"{'/'.join(here)}: {shown}")

    name = lambda m: str(modules[m].relative_to(src.parent))  # noqa: E731
    failed = False
    for here, code in sorted(codes.items()):
        if here and here[0] not in PYTHON_BOUNDARY and re.search(r"\bpyo3\b", code):
            failed = True
            print(f"{name(here)} uses pyo3: only {', '.join(PYTHON_BOUNDARY)} may (the Python boundary)")
    layers = report_cycles("top-level modules", {m[0] for m in modules if m}, layer_edges, why, str)
    files = report_cycles("files", set(modules), file_edges, why, name)
    order = layer_order(src / "lib.rs")
    upward = report_upward(order, layer_edges, why)
    failed = failed or layers or files or upward
    if failed:
        print("modules must import only those below them in the flow, and only app/ and entry touch pyo3")
        print("(lib.rs declares the layers from the bottom up; ARCHITECTURE.md explains them)")
        return 1
    print(f"no import cycles among {len(modules)} files, no upward import among {len(order)} layers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
