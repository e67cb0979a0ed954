"""Label trees: YAML file -> validated pydantic model -> networkx DiGraph -> ``Taxonomy``.

A taxonomy file looks like this (``taxonomy/leukemia.yaml``)::

    name: leukemia
    root: root
    children:
      - Normal                      # a bare string is a leaf
      - name: Leukemia
        aliases: [leukaemia]        # other spellings found in folders or manifests
        display_name: Leukemia
        children:
          - name: Acute
            children: [ALL, AML, APML]

Every node, leaf or internal, can be a label: an image labelled at an internal node
(a *partial label*) is known to lie somewhere under that node.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from hiercls.errors import DataError, TaxonomyError
from hiercls.io import BoundedSafeLoader, YamlTooLarge, load_yaml, read_user_text, yaml_error_message

__all__ = ["NodeSpec", "Taxonomy", "TaxonomySpec", "TaxonomyWarning", "UnknownNodeError", "load_taxonomy"]


class TaxonomyWarning(UserWarning):
    """A taxonomy that is valid but probably not what was meant (e.g. a node with one child)."""


class UnknownNodeError(TaxonomyError, KeyError):
    """A name that is not a node of the tree was asked about (``taxonomy.depth("typo")``).

    A ``TaxonomyError``, so the command line reports it on one line; also a ``KeyError``,
    as a lookup of a missing key is in Python.
    """

    __str__ = Exception.__str__  # KeyError would quote the message


class NodeSpec(BaseModel):
    """One node of the tree as written in YAML."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    display_name: str | None = None
    description: str | None = None
    aliases: list[str] = Field(default_factory=list)
    children: list[NodeSpec] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _bare_string_is_leaf(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("an empty list item; write a node name after '-' or delete the line")
        if isinstance(value, (str, int, float)):  # a bare number or yes/no: the name check explains it
            return {"name": value}
        return value

    @field_validator("name", "aliases", mode="before")
    @classmethod
    def _names_are_strings(cls, value: Any) -> Any:
        items = value if isinstance(value, list) else [value]
        for item in items:
            if not isinstance(item, str):
                raise ValueError(_not_a_name(item))
            if not item:
                raise ValueError("the name is empty; write the node's name, or delete the entry")
            if item != item.strip():
                raise ValueError(f"{item!r} has leading or trailing spaces")
        return value


def _not_a_name(item: Any) -> str:
    """Why a YAML value is not a usable name, and how to write it."""
    if item is None:
        return "the name is empty; write the node's name after 'name:', or delete the entry"
    if isinstance(item, bool):
        return (f"{item} is not a string (YAML reads an unquoted yes/no/on/off/true/false as a boolean); "
                "quote the name as you mean it (e.g. 'yes')")
    if isinstance(item, (int, float)):
        return f"{item} is not a string; quote it in the YAML (e.g. '{item}')"
    return f"a {type(item).__name__} is not a name; write the name as text"


class TaxonomySpec(BaseModel):
    """A whole taxonomy file."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    description: str | None = None
    root: str = "root"
    children: list[NodeSpec] = Field(default_factory=list)


# ----------------------------------------------------------------------------------------
# YAML loading with line numbers, so semantic errors can point at the offending line.


class _LineStr(str):
    """A string scalar that remembers the (1-based) line it was read from."""

    line: int | None = None


class _LineList(list):
    """A YAML sequence that remembers the (1-based) line of each item, for items that are
    not strings (a bare ``- 12`` or an empty ``-``) and so cannot carry a line themselves."""

    lines: list[int]


class _LineLoader(yaml.SafeLoader):
    def construct_scalar(self, node):  # type: ignore[override]
        value = super().construct_scalar(node)
        if isinstance(value, str):
            value = _LineStr(value)
            value.line = node.start_mark.line + 1
        return value

    def construct_yaml_seq(self, node):  # type: ignore[override]
        data = _LineList()
        data.lines = [item.start_mark.line + 1 for item in node.value]
        yield data
        data.extend(self.construct_sequence(node))


_LineLoader.add_constructor("tag:yaml.org,2002:str", _LineLoader.construct_scalar)
_LineLoader.add_constructor("tag:yaml.org,2002:seq", _LineLoader.construct_yaml_seq)

MAX_DEPTH = 64


class _BoundedLineLoader(BoundedSafeLoader, _LineLoader):
    """``_LineLoader`` that refuses documents whose aliases expand beyond ``MAX_YAML_NODES``."""


def _where(source: str, value: Any) -> str:
    line = value if isinstance(value, int) else getattr(value, "line", None)
    return f"{source}:{line}" if line else source


def _name_lines(data: Any) -> dict[str, list[int]]:
    """Lines (in file order) where each node name (and ``alias:<name>``) is written, for errors.

    pydantic hands back plain strings, so the lines are read from the raw YAML data.
    """
    lines: dict[str, list[int]] = {}

    def note(value: Any, kind: str = "") -> None:
        if isinstance(value, str) and getattr(value, "line", None):
            lines.setdefault(kind + str(value), []).append(value.line)

    def walk(items: Any) -> None:
        for item in items if isinstance(items, list) else []:
            if isinstance(item, str):
                note(item)
            elif isinstance(item, dict):
                note(item.get("name"))
                for alias in item.get("aliases") or []:
                    note(alias, kind="alias:")
                walk(item.get("children"))

    if isinstance(data, dict):
        walk(data.get("children"))
    return lines


def _raw_key(data: Any, loc: tuple) -> Any:
    """The raw (line-aware) key object at ``loc`` in the YAML data, or the plain key."""
    node = data
    for part in loc[:-1]:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return loc[-1]
    if isinstance(node, dict):
        for key in node:
            if key == loc[-1]:
                return key
    return loc[-1]


def _format_validation_error(source: str, error: ValidationError, data: Any = None) -> str:
    first = error.errors()[0]
    loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"]).lstrip(".")
    if first["type"] == "extra_forbidden":
        key = _raw_key(data, first["loc"])
        allowed = ", ".join(NodeSpec.model_fields if len(first["loc"]) > 1 else TaxonomySpec.model_fields)
        message = f"unknown key '{key}' at {loc or 'top level'} (allowed keys: {allowed})"
        return f"{_where(source, key)}: {message}"
    message = _friendly_message(first)
    more = f" (and {len(error.errors()) - 1} more problems)" if len(error.errors()) > 1 else ""
    return f"{_where(source, _line_at(data, first['loc']))}: {message} at {loc or 'top level'}{more}"


def _friendly_message(error: dict[str, Any]) -> str:
    """pydantic's message, with the usual YAML slips told in the taxonomy's own terms."""
    if error["type"] == "list_type" and error["loc"][-1:] == ("children",):
        if isinstance(error["input"], dict):
            return ("'children' is a mapping but must be a list: write one '- name' (or '- name: ...' "
                    "with its own 'children') per line")
        if error["input"] is None:
            return "'children' is empty; list the child nodes under it, or delete the key for a leaf"
    if error["type"] in ("model_type", "dict_type") and error["loc"][-2:-1] == ("children",):
        return f"{error['input']!r} is not a node; write a name ('- a') or a mapping ('- name: a')"
    return error["msg"].removeprefix("Value error, ")


def _line_at(data: Any, loc: tuple) -> int | None:
    """The line of the value at pydantic's ``loc`` in the raw YAML data, or of the nearest
    enclosing entry whose line is known (keys and sequence items carry their lines)."""
    line, node = None, data
    for part in loc:
        if isinstance(node, dict):
            key = next((k for k in node if k == part), None)
            if key is None:
                break
            line, node = getattr(key, "line", None) or line, node[key]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            line, node = (getattr(node, "lines", None) or [line] * len(node))[part], node[part]
        else:
            break
    return line


MAX_FILE_BYTES = 16 * 2**20


def _too_deep(source: Any) -> str:
    return f"{source}: the tree is nested deeper than {MAX_DEPTH} levels, the most hiercls takes; flatten it"


def _nesting(data: Any) -> int:
    """How deeply lists and dicts nest in ``data`` (iterative: safe on any depth)."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            items = list(item.values())
        elif isinstance(item, list):
            items = item
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > 4 * MAX_DEPTH:
            return deepest
        stack.extend((child, depth + 1) for child in items)
    return deepest


def load_taxonomy(path: str | Path) -> Taxonomy:
    """Read and validate a taxonomy YAML file.

    Raises ``TaxonomyError`` with a one-line message naming the file (and line where
    known) for syntax errors, unknown keys, duplicate names, clashing aliases and empty trees.
    """
    path = Path(path)
    text = read_user_text(path, "taxonomy file", TaxonomyError, max_bytes=MAX_FILE_BYTES)
    try:
        data = load_yaml(text, _BoundedLineLoader)
    except yaml.YAMLError as exc:
        raise TaxonomyError(yaml_error_message(path, exc)) from None
    except YamlTooLarge as exc:
        raise TaxonomyError(f"{path}: {exc}") from None
    except RecursionError:
        raise TaxonomyError(_too_deep(path)) from None
    taxonomy = Taxonomy.from_dict(data, source=str(path))
    if not taxonomy.name:
        taxonomy.name = path.stem
    for message in taxonomy.warnings:
        warnings.warn(message, TaxonomyWarning, stacklevel=2)
    return taxonomy


# ----------------------------------------------------------------------------------------


class Taxonomy:
    """A validated label tree with the queries every other module needs.

    Nodes are ordered depth-first (pre-order) from the root; ``index[name]`` is a node's
    position in that order and the column of the node in every ``[N, num_nodes]`` array.
    """

    def __init__(self, spec: TaxonomySpec, source: str = "<taxonomy>", lines: dict[str, list[int]] | None = None):
        self.spec = spec
        self._lines = lines or {}
        self.source = source
        self.name = spec.name or ""
        self.description = spec.description
        self.root = spec.root
        self.warnings: list[str] = []
        self.graph = nx.DiGraph()
        self._alias_to_node: dict[str, str] = {}
        self._build(spec, source)

    # -- construction -------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> Taxonomy:
        if data is None:
            raise TaxonomyError(f"{source}: the file is empty; a taxonomy needs 'children'")
        if not isinstance(data, dict):
            raise TaxonomyError(
                f"{source}: the top level must be a mapping with 'children', not {type(data).__name__}"
            )
        if _nesting(data) > 2 * MAX_DEPTH + 2:  # a node and its 'children' list: two levels each
            raise TaxonomyError(_too_deep(source))
        try:
            spec = TaxonomySpec.model_validate(data)
        except ValidationError as exc:
            raise TaxonomyError(_format_validation_error(source, exc, data)) from None
        except RecursionError:
            raise TaxonomyError(_too_deep(source)) from None
        return cls(spec, source=source, lines=_name_lines(data))

    @classmethod
    def from_nested(cls, tree: dict[str, Any], root: str = "root", name: str = "") -> Taxonomy:
        """Build from a nested dict ``{"a": {"a1": {}, "a2": {}}, "b": {}}`` (handy in code and tests)."""

        def convert(children: dict[str, Any]) -> list[dict[str, Any]]:
            return [{"name": k, "children": convert(v or {})} for k, v in children.items()]

        return cls.from_dict({"name": name, "root": root, "children": convert(tree)}, source="<nested>")

    def _build(self, spec: TaxonomySpec, source: str) -> None:
        if not spec.children:
            raise TaxonomyError(f"{source}: the tree is empty; add nodes under 'children'")
        seen: dict[str, int | None] = {spec.root: None}
        occurrences: Counter = Counter()

        def line_of(name: str, occurrence: int = 0) -> int | None:
            found = self._lines.get(name, [])
            return found[occurrence] if occurrence < len(found) else None

        self.graph.add_node(spec.root, display_name=spec.root, description=spec.description, aliases=())

        def visit(node: NodeSpec, parent: str) -> None:
            occurrences[node.name] += 1
            here = line_of(node.name, occurrences[node.name] - 1)
            if node.name in seen:
                first = seen[node.name]
                raise TaxonomyError(
                    f"{_where(source, here)}: duplicate node name '{node.name}'"
                    + (f" (first defined at line {first})" if first else "")
                    + "; node names must be unique across the whole tree"
                )
            seen[node.name] = here
            self.graph.add_node(
                str(node.name),
                display_name=node.display_name or str(node.name),
                description=node.description,
                aliases=tuple(str(a) for a in node.aliases),
            )
            self.graph.add_edge(parent, str(node.name))
            if len(node.children) == 1:
                self.warnings.append(
                    f"{_where(source, here)}: node '{node.name}' has a single child "
                    f"'{node.children[0].name}'; its decision is trivial"
                )
            for child in node.children:
                visit(child, str(node.name))

        for child in spec.children:
            visit(child, spec.root)
        if len(spec.children) == 1:
            self.warnings.append(f"{source}: the root has a single child '{spec.children[0].name}'")

        for node in self.graph.nodes:
            for alias in self.graph.nodes[node]["aliases"]:
                alias_line = self._lines.get("alias:" + alias, [0])[-1]
                if alias in self.graph.nodes and alias != node:
                    raise TaxonomyError(
                        f"{_where(source, alias_line)}: alias '{alias}' of '{node}' is also a node name; "
                        "remove the alias or rename the node"
                    )
                other = self._alias_to_node.get(alias)
                if other is not None and other != node:
                    raise TaxonomyError(
                        f"{_where(source, alias_line)}: alias '{alias}' is given to both '{other}' and '{node}'; "
                        "an alias must map to exactly one node"
                    )
                self._alias_to_node[alias] = node

    # -- structure ----------------------------------------------------------------------

    @cached_property
    def nodes(self) -> tuple[str, ...]:
        """All nodes, root first, in depth-first pre-order (children in file order)."""
        return tuple(nx.dfs_preorder_nodes(self.graph, self.root, sort_neighbors=lambda n: n))

    @cached_property
    def index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.nodes)}

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    @cached_property
    def leaves(self) -> tuple[str, ...]:
        return tuple(n for n in self.nodes if self.graph.out_degree(n) == 0)

    @cached_property
    def internal_nodes(self) -> tuple[str, ...]:
        """Nodes with children, root included: one decision (one head, one model) each."""
        return tuple(n for n in self.nodes if self.graph.out_degree(n) > 0)

    def is_leaf(self, node: str) -> bool:
        return self.graph.out_degree(self._check(node)) == 0

    def parent(self, node: str) -> str | None:
        preds = list(self.graph.predecessors(self._check(node)))
        return preds[0] if preds else None

    def children(self, node: str) -> tuple[str, ...]:
        return tuple(self.graph.successors(self._check(node)))

    def children_indices(self, node: str) -> list[int]:
        return [self.index[c] for c in self.children(node)]

    def path(self, node: str) -> tuple[str, ...]:
        """Nodes from the root down to ``node``, both included."""
        return tuple(nx.shortest_path(self.graph, self.root, self._check(node)))

    def ancestors(self, node: str, include_root: bool = False) -> tuple[str, ...]:
        """Proper ancestors of ``node``, nearest last (root only when ``include_root``)."""
        path = self.path(node)[:-1]
        return path if include_root else path[1:]

    def depth(self, node: str) -> int:
        """Distance from the root (root 0, its children 1, ...)."""
        return len(self.path(node)) - 1

    @cached_property
    def levels(self) -> tuple[tuple[str, ...], ...]:
        """Nodes grouped by depth: ``levels[0] == (root,)``, ``levels[1]`` the root's children, ..."""
        by_depth: dict[int, list[str]] = {}
        for node in self.nodes:
            by_depth.setdefault(self.depth(node), []).append(node)
        return tuple(tuple(by_depth[d]) for d in sorted(by_depth))

    @property
    def max_depth(self) -> int:
        return len(self.levels) - 1

    def descendants(self, node: str) -> tuple[str, ...]:
        found = nx.descendants(self.graph, self._check(node))
        return tuple(n for n in self.nodes if n in found)

    def leaves_under(self, node: str) -> tuple[str, ...]:
        if self.is_leaf(node):
            return (node,)
        return tuple(n for n in self.descendants(node) if self.graph.out_degree(n) == 0)

    def is_ancestor(self, ancestor: str, node: str, inclusive: bool = True) -> bool:
        """True when ``ancestor`` lies on the path from the root to ``node``."""
        if inclusive and ancestor == node:
            return True
        return ancestor in self.path(node)[:-1]

    def lowest_common_ancestor(self, a: str, b: str) -> str:
        path_a, path_b = self.path(a), self.path(b)
        common = self.root
        for x, y in zip(path_a, path_b):
            if x != y:
                break
            common = x
        return common

    def distance(self, a: str, b: str) -> int:
        """Number of edges between two nodes in the tree (0 when equal)."""
        lca = self.lowest_common_ancestor(a, b)
        return self.depth(a) + self.depth(b) - 2 * self.depth(lca)

    @cached_property
    def distance_matrix(self) -> np.ndarray:
        """``[num_nodes, num_nodes]`` tree distances, in ``nodes`` order."""
        n = self.num_nodes
        out = np.zeros((n, n), dtype=np.int64)
        for i, a in enumerate(self.nodes):
            for j in range(i + 1, n):
                out[i, j] = out[j, i] = self.distance(a, self.nodes[j])
        return out

    # -- display ------------------------------------------------------------------------

    def display_name(self, node: str) -> str:
        return self.graph.nodes[self._check(node)]["display_name"]

    def node_description(self, node: str) -> str | None:
        return self.graph.nodes[self._check(node)]["description"]

    def aliases(self, node: str) -> tuple[str, ...]:
        return self.graph.nodes[self._check(node)]["aliases"]

    def __repr__(self) -> str:
        return (
            f"Taxonomy(name={self.name!r}, nodes={self.num_nodes}, leaves={len(self.leaves)}, "
            f"depth={self.max_depth})"
        )

    # -- labels -------------------------------------------------------------------------

    def resolve(self, label: str) -> str:
        """Map a label (node name or alias) to its node name; ``DataError`` when unknown."""
        node = self._lookup(label)
        if node is None:
            raise DataError(self._unknown_labels_message(Counter([label])))
        return node

    def resolve_labels(self, labels: Iterable[str], source: str = "") -> list[str]:
        """Resolve many labels at once; one error lists every unknown label with its count."""
        labels = list(labels)
        resolved = [self._lookup(label) for label in labels]
        unknown = Counter(lab for lab, node in zip(labels, resolved) if node is None)
        if unknown:
            raise DataError(self._unknown_labels_message(unknown, source))
        return resolved  # type: ignore[return-value]

    def encode(self, labels: Iterable[str]) -> np.ndarray:
        """Node indices (``int64``) of the given labels (names or aliases)."""
        return np.array([self.index[n] for n in self.resolve_labels(labels)], dtype=np.int64)

    def decode(self, indices: Iterable[int]) -> list[str]:
        return [self.nodes[int(i)] for i in indices]

    def _lookup(self, label: str) -> str | None:
        label = str(label).strip()
        if label == self.root:
            return None  # the root says nothing about an image
        if label in self.graph.nodes:
            return label
        return self._alias_to_node.get(label)

    def _unknown_labels_message(self, unknown: Counter, source: str = "") -> str:
        names = [n for n in self.nodes if n != self.root] + list(self._alias_to_node)
        parts = []
        for label, count in unknown.most_common():
            close = difflib.get_close_matches(str(label), names, n=3, cutoff=0.5)
            lowered = [n for n in names if n.lower() == str(label).lower()]
            hint = lowered or close
            suggestion = f" (closest: {', '.join(hint)})" if hint else ""
            parts.append(f"'{label}' x{count}{suggestion}")
        where = f"{source}: " if source else ""
        tax = f" '{self.name}'" if self.name else ""
        return (
            f"{where}{len(unknown)} label(s) not in taxonomy{tax}: " + "; ".join(parts)
            + ". Fix the labels or add them to the taxonomy as nodes or aliases."
        )

    def _check(self, node: str) -> str:
        if node not in self.graph.nodes:
            tax = f" '{self.name}'" if self.name else ""
            raise UnknownNodeError(
                f"{self.source}: '{node}' is not a node of taxonomy{tax}; use one of its node names "
                f"({', '.join(self.nodes[1:6])}{', ...' if self.num_nodes > 6 else ''}) or add it to the tree"
            )
        return node

    # -- serialisation and derived trees ------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A plain dict that ``from_dict`` turns back into an equal taxonomy."""

        def node_dict(node: str) -> dict[str, Any]:
            attrs = self.graph.nodes[node]
            out: dict[str, Any] = {"name": node}
            if attrs["display_name"] != node:
                out["display_name"] = attrs["display_name"]
            if attrs["description"]:
                out["description"] = attrs["description"]
            if attrs["aliases"]:
                out["aliases"] = list(attrs["aliases"])
            if self.children(node):
                out["children"] = [node_dict(c) for c in self.children(node)]
            return out

        data: dict[str, Any] = {"name": self.name, "root": self.root}
        if self.description:
            data["description"] = self.description
        data["children"] = [node_dict(c) for c in self.children(self.root)]
        return data

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(_plain(self.to_dict()), sort_keys=False, allow_unicode=True)
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    @cached_property
    def fingerprint(self) -> str:
        """Hash of the tree's structure (names and edges in order): equal trees, equal hash."""
        structure = [(n, self.parent(n)) for n in self.nodes]
        return hashlib.sha256(json.dumps(structure).encode()).hexdigest()[:16]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Taxonomy) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def exclude(self, nodes: Sequence[str]) -> Taxonomy:
        """A new taxonomy without ``nodes`` and their subtrees (the paper's "Without Reactive")."""
        for node in nodes:
            if node not in self.graph.nodes or node == self.root:
                names = [n for n in self.nodes if n != self.root]
                close = difflib.get_close_matches(str(node), names, n=3, cutoff=0.5)
                hint = f" (closest: {', '.join(close)})" if close else ""
                raise TaxonomyError(f"cannot exclude '{node}': not a (non-root) node of '{self.name}'{hint}")
        dropped = set(nodes)

        def prune(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
            kept = []
            for item in items:
                if item["name"] in dropped:
                    continue
                if "children" in item:
                    item = dict(item, children=prune(item["children"]))
                    if not item["children"]:
                        del item["children"]
                kept.append(item)
            return kept

        data = self.to_dict()
        data["children"] = prune(data["children"])
        return Taxonomy.from_dict(data, source=f"{self.source} without {', '.join(nodes)}")


def _plain(value: Any) -> Any:
    """Strip the line-number string subclass so YAML dumps plain strings."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, str):
        return str.__str__(value)
    return value
