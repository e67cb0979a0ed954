"""Fuzzing the parsers and the metrics: any input gives a valid result or a ``HierclsError``.

Random YAML text and random nested structures for the taxonomy loader, random CSV text for
the manifest and predictions readers, and random label / prediction lists on random trees
for the metrics. Anything else escaping (KeyError, AttributeError, a pydantic or csv error)
would reach the user as a traceback, which is a bug.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hiercls.data import load_images
from hiercls.errors import HierclsError
from hiercls.metrics import evaluate_predictions
from hiercls.predictions import read_predictions_csv
from hiercls.probabilities import NodeProbabilities
from hiercls.taxonomy import Taxonomy, load_taxonomy

pytestmark = pytest.mark.filterwarnings("ignore::hiercls.taxonomy.TaxonomyWarning")

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Text made of the characters that matter to YAML and CSV, plus some unicode.
SYNTAX = list(":-[]{},'\"#&*!|>%@`\t\n\r ") + ["\\", "é", "中", "\x00", "\ufeff"]
WORDS = ["root", "name", "children", "aliases", "display_name", "description", "cat", "dog", "a", "b",
         "path", "label", "group", "prediction", "p:cat", "p:dog", "p:animal", "img.png", "0.5", "1", "-1", "nan"]
tokens = st.one_of(st.sampled_from(SYNTAX), st.sampled_from(WORDS), st.text(max_size=3))
syntax_text = st.lists(tokens, max_size=40).map("".join)

scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True),
                    st.text(max_size=6), st.sampled_from(WORDS))
structures = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(WORDS), st.text(max_size=4)), inner, max_size=4),
    ),
    max_leaves=20,
)


def node_spec(depth: int):
    """A plausible node: a name, or a mapping with name / children / aliases (sometimes wrong)."""
    name = st.one_of(st.sampled_from(["a", "b", "c", "d", "é", "root", "x y"]), st.text(max_size=3))
    if depth == 0:
        return name
    return st.one_of(
        name,
        st.fixed_dictionaries(
            {"name": name},
            optional={
                "children": st.lists(node_spec(depth - 1), max_size=3),
                "aliases": st.lists(name, max_size=2),
                "display_name": name,
            },
        ),
    )


taxonomy_like = st.fixed_dictionaries(
    {"children": st.lists(node_spec(2), max_size=4)},
    optional={"root": st.sampled_from(["root", "a", ""]), "name": st.text(max_size=4)},
)


def assert_valid(taxonomy: Taxonomy) -> None:
    assert taxonomy.nodes[0] == taxonomy.root
    assert len(set(taxonomy.nodes)) == len(taxonomy.nodes)
    assert taxonomy.leaves and all(taxonomy.is_leaf(leaf) for leaf in taxonomy.leaves)
    assert Taxonomy.from_dict(yaml.safe_load(taxonomy.to_yaml())).fingerprint == taxonomy.fingerprint


@FUZZ
@given(text=st.one_of(syntax_text, st.text(max_size=80)))
def test_taxonomy_loader_on_random_yaml_text(text):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "tree.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            taxonomy = load_taxonomy(path)
        except HierclsError as exc:
            event(f"refused: {type(exc).__name__}")
            assert str(exc) and "\n" not in str(exc).strip()
        else:
            event("accepted")
            assert_valid(taxonomy)


@FUZZ
@given(data=st.one_of(structures, taxonomy_like))
def test_taxonomy_from_random_structures(data):
    try:
        taxonomy = Taxonomy.from_dict(data, source="fuzz.yaml")
    except HierclsError as exc:
        event(f"refused: {type(exc).__name__}")
        assert str(exc).startswith("fuzz.yaml")
    else:
        event("accepted")
        assert_valid(taxonomy)


@FUZZ
@given(data=taxonomy_like)
def test_taxonomy_from_random_trees_written_as_yaml(data):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "tree.yaml"
        path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
        try:
            taxonomy = load_taxonomy(path)
        except HierclsError as exc:
            event(f"refused: {type(exc).__name__}")
            assert str(path) in str(exc)
        else:
            event("accepted")
            assert_valid(taxonomy)


TINY = Taxonomy.from_nested({"animal": {"cat": {}, "dog": {}}, "plant": {}})


@pytest.fixture(scope="module")
def image_folder():
    from PIL import Image

    with tempfile.TemporaryDirectory() as folder:
        for name in ("img.png", "a.png", "b b.png"):
            Image.new("RGB", (4, 4)).save(Path(folder) / name)
        yield Path(folder)


csv_cells = st.one_of(st.sampled_from(WORDS + ["a.png", "b b.png", "../x.png", "/etc/passwd", ""]), st.text(max_size=4))
csv_rows = st.lists(st.lists(csv_cells, max_size=5).map(lambda cells: ",".join(cells)), max_size=6)
good_row = st.tuples(st.sampled_from(["a.png", " b b.png ", "img.png", "./a.png"]),
                     st.sampled_from(["cat", "dog", "beast", "plant", "animal", " cat ", ""]),
                     st.sampled_from(["", "P1", "P2"])).map(",".join)
csv_text = st.one_of(
    syntax_text,
    st.lists(good_row, max_size=4).map(lambda rows: "path,label,group\n" + "\n".join(rows)),
    csv_rows.map("\n".join),
    st.tuples(st.sampled_from(["path,label", "path,label,group", "path", "label,path", "\ufeffpath , label"]), csv_rows)
    .map(lambda t: t[0] + "\n" + "\n".join(t[1])),
)


@FUZZ
@given(text=csv_text, labelled=st.booleans())
def test_manifest_parser_on_random_csv(image_folder, text, labelled):
    path = image_folder / "manifest.csv"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        table = load_images(path, TINY, require_labels=labelled)
    except HierclsError as exc:
        event(f"refused: {type(exc).__name__}")
        assert str(exc)
    else:
        event("accepted")
        assert len(table) > 0
        assert all(p.is_file() for p in table.paths)
        assert all(label is None or label in TINY.index for label in table.labels)
        if labelled:
            assert all(label is not None for label in table.labels)


PRED_HEADER = "path,label,prediction," + ",".join(f"p:{n}" for n in TINY.nodes[1:])
prob_cell = st.one_of(st.floats(-1, 2).map(lambda x: f"{x:.3f}"), st.sampled_from(["nan", "inf", "", "x", "1e400"]))
pred_row = st.tuples(
    csv_cells, st.sampled_from(list(TINY.nodes) + ["", "tree", "beast"]), st.sampled_from(list(TINY.nodes) + ["", "?"]),
    st.lists(prob_cell, min_size=len(TINY.nodes) - 1, max_size=len(TINY.nodes) - 1),
).map(lambda r: ",".join([r[0], r[1], r[2], *r[3]]))
consistent_row = st.tuples(st.floats(0, 1), st.floats(0, 1), st.sampled_from(list(TINY.nodes[1:]))).map(
    lambda r: f"x.png,cat,{r[2]},{r[0]:.6f},{r[0] * r[1]:.6f},{r[0] - r[0] * r[1]:.6f},{1 - r[0]:.6f}"
)
pred_text = st.one_of(
    csv_text,
    st.lists(st.one_of(pred_row, consistent_row), max_size=5).map(lambda rows: PRED_HEADER + "\n" + "\n".join(rows)),
)


@FUZZ
@given(text=pred_text)
def test_predictions_csv_reader_on_random_csv(image_folder, text):
    assert list(TINY.nodes[1:]) == ["animal", "cat", "dog", "plant"]  # the order consistent_row writes
    path = image_folder / "predictions.csv"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        predictions = read_predictions_csv(path, TINY)
    except HierclsError as exc:
        event(f"refused: {type(exc).__name__}")
        assert str(exc)
    else:
        event("accepted")
        assert all(p in TINY.index for p in predictions.predictions)
        if predictions.probs is not None:
            marginal = predictions.probs.marginal
            assert np.isfinite(marginal).all() and (marginal >= -1e-9).all() and (marginal <= 1 + 1e-9).all()


@st.composite
def trees_and_predictions(draw):
    """A random tree, random true / predicted node names (some not in the tree), optional probabilities."""
    counter = iter(range(10_000))

    def subtree(depth):
        if depth == 0:
            return {}
        n = draw(st.integers(0 if depth < 3 else 1, 3))
        return {f"n{depth}_{next(counter)}": subtree(depth - 1) for _ in range(n)}

    tree = subtree(3)
    taxonomy = Taxonomy.from_nested(tree)
    nodes = st.sampled_from(list(taxonomy.nodes))
    names = nodes if draw(st.integers(0, 3)) else st.one_of(nodes, st.sampled_from(["unknown", ""]))
    n = draw(st.integers(0, 8))
    true = draw(st.lists(st.one_of(names, names, st.none()), min_size=n, max_size=n))
    pred = draw(st.lists(names, min_size=n, max_size=n))
    probs = None
    if draw(st.booleans()) and n:
        leaf = np.array(draw(st.lists(st.lists(st.floats(0, 1), min_size=len(taxonomy.leaves),
                                                max_size=len(taxonomy.leaves)), min_size=n, max_size=n)))
        leaf = leaf + 1e-9
        probs = NodeProbabilities.from_leaf_probabilities(taxonomy, leaf / leaf.sum(axis=1, keepdims=True))
    return taxonomy, true, pred, probs


@FUZZ
@given(case=trees_and_predictions())
def test_metrics_on_random_labels_and_trees(case):
    taxonomy, true, pred, probs = case
    try:
        metrics = evaluate_predictions(taxonomy, true, pred, probs)
    except HierclsError as exc:
        event(f"refused: {type(exc).__name__}")
        assert str(exc)
        return
    event("accepted")
    assert metrics["n_images"] == sum(t is not None for t in true)
    for key in ("accuracy", "macro_f1", "hP", "hR", "hF", "auroc", "ece"):
        value = metrics[key]
        if isinstance(value, dict):
            value = value.get("macro")
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            assert -1e-9 <= float(value) <= 1 + 1e-9, (key, value)
