"""Taxonomy files: parsing, every user error, label mapping, tree queries, and the taxonomy command."""

from __future__ import annotations

from pathlib import Path

import pytest

from hiercls.cli import main
from hiercls.errors import DataError, TaxonomyError
from hiercls.taxonomy import TaxonomyWarning, load_taxonomy

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "tree.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path: Path) -> str:
    with pytest.raises(TaxonomyError) as info:
        load_taxonomy(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    return message


# -- parsing and errors ---------------------------------------------------------------


def test_shipped_trees_load():
    leukemia = load_taxonomy(REPO / "taxonomy" / "leukemia.yaml")
    assert leukemia.leaves == ("Normal", "Reactive", "ALL", "AML", "APML", "CLL", "CML")
    assert leukemia.internal_nodes == ("root", "Leukemia", "Acute", "Chronic")
    assert leukemia.max_depth == 3
    for name in ("blood-cells", "all-subtypes"):
        assert load_taxonomy(REPO / "taxonomy" / f"{name}.yaml").num_nodes > 3


def test_yaml_syntax_error_names_line(tmp_path):
    path = write(tmp_path, "name: t\nchildren:\n  - a\n  - b: c: d\n")
    message = error_of(path)
    assert "YAML syntax error" in message
    assert f"{path}:4:" in message


def test_duplicate_node(tmp_path):
    path = write(tmp_path, "children:\n  - name: a\n    children: [x, y]\n  - name: x\n")
    message = error_of(path)
    assert "duplicate node name 'x'" in message


def test_alias_clashing_with_a_node(tmp_path):
    path = write(tmp_path, "children:\n  - name: a\n    aliases: [b]\n  - b\n")
    message = error_of(path)
    assert "alias 'b' of 'a' is also a node name" in message


def test_alias_given_to_two_nodes(tmp_path):
    path = write(tmp_path, "children:\n  - name: a\n    aliases: [z]\n  - name: b\n    aliases: [z]\n")
    message = error_of(path)
    assert "alias 'z' is given to both 'a' and 'b'" in message


LINE_CASES = [
    ("children:\n  - name: a\n    children: [x, y]\n  - name: x\n", 4),  # duplicate node
    ("children:\n  - name: a\n    aliases: [b]\n  - b\n", 3),  # alias is a node name
    ("children:\n  - name: a\n    colour: red\n  - b\n", 3),  # unknown key
]


@pytest.mark.parametrize("text, line", LINE_CASES)
def test_semantic_errors_name_the_line(tmp_path, text, line):
    path = write(tmp_path, text)
    assert f"{path}:{line}" in error_of(path)


@pytest.mark.parametrize("text", ["", "name: t\n", "name: t\nchildren: []\n"])
def test_empty_tree(tmp_path, text):
    message = error_of(write(tmp_path, text))
    assert "empty" in message


def test_unknown_key_names_key_and_allowed(tmp_path):
    path = write(tmp_path, "children:\n  - name: a\n    colour: red\n  - b\n")
    message = error_of(path)
    assert "unknown key 'colour'" in message
    assert "aliases" in message


def test_non_string_name(tmp_path):
    message = error_of(write(tmp_path, "children:\n  - name: 12\n  - b\n"))
    assert "12" in message and "not a string" in message


def test_top_level_must_be_mapping(tmp_path):
    assert "mapping" in error_of(write(tmp_path, "- a\n- b\n"))


def test_missing_file(tmp_path):
    assert "not found" in error_of(tmp_path / "absent.yaml")


def test_single_child_warning(tmp_path):
    path = write(tmp_path, "children:\n  - name: a\n    children: [only]\n  - b\n")
    with pytest.warns(TaxonomyWarning, match="'a' has a single child 'only'"):
        taxonomy = load_taxonomy(path)
    assert any("single child" in w for w in taxonomy.warnings)


# -- labels ---------------------------------------------------------------------------


def test_names_and_aliases_resolve(tiny_taxonomy):
    assert tiny_taxonomy.resolve("kitty") == "cat"
    assert tiny_taxonomy.resolve("beast") == "animal"
    assert tiny_taxonomy.resolve_labels(["cat", "kitty", "tree"]) == ["cat", "cat", "tree"]
    assert tiny_taxonomy.encode(["kitty", "flower"]).tolist() == [
        tiny_taxonomy.index["cat"],
        tiny_taxonomy.index["flower"],
    ]


def test_unknown_labels_listed_with_counts_and_suggestions(tiny_taxonomy):
    with pytest.raises(DataError) as info:
        tiny_taxonomy.resolve_labels(["Cat", "Cat", "dgo", "cat", "zebra"], source="data.csv")
    message = str(info.value)
    assert message.startswith("data.csv: 3 label(s) not in taxonomy")
    assert "'Cat' x2 (closest: cat)" in message
    assert "'dgo' x1 (closest: dog" in message
    assert "'zebra' x1" in message


def test_root_is_not_a_label(tiny_taxonomy):
    with pytest.raises(DataError):
        tiny_taxonomy.resolve("root")


def test_partial_labels_are_internal_nodes(tiny_taxonomy):
    assert tiny_taxonomy.resolve("animal") == "animal"
    assert not tiny_taxonomy.is_leaf("animal")
    assert tiny_taxonomy.leaves_under("animal") == ("cat", "dog")


# -- tree queries ---------------------------------------------------------------------


def test_order_levels_paths(tiny_taxonomy):
    t = tiny_taxonomy
    assert t.nodes == ("root", "animal", "cat", "dog", "plant", "tree", "flower")
    assert t.levels == (("root",), ("animal", "plant"), ("cat", "dog", "tree", "flower"))
    assert t.path("dog") == ("root", "animal", "dog")
    assert t.ancestors("dog") == ("animal",)
    assert t.depth("flower") == 2


def test_lca_and_distance(tiny_taxonomy):
    t = tiny_taxonomy
    assert t.lowest_common_ancestor("cat", "dog") == "animal"
    assert t.lowest_common_ancestor("cat", "tree") == "root"
    assert t.distance("cat", "cat") == 0
    assert t.distance("cat", "dog") == 2
    assert t.distance("cat", "flower") == 4
    assert t.distance("animal", "cat") == 1
    matrix = t.distance_matrix
    assert (matrix == matrix.T).all()
    assert matrix[t.index["cat"], t.index["flower"]] == 4


def test_exclude_drops_subtree(tiny_taxonomy):
    smaller = tiny_taxonomy.exclude(["plant"])
    assert smaller.nodes == ("root", "animal", "cat", "dog")
    assert smaller.resolve("kitty") == "cat"
    assert smaller.fingerprint != tiny_taxonomy.fingerprint
    with pytest.raises(TaxonomyError):
        tiny_taxonomy.exclude(["nope"])
    with pytest.raises(TaxonomyError, match=r"cannot exclude 'plnat'.*\(closest: plant\b"):
        tiny_taxonomy.exclude(["plnat"])  # a typo gets the name it was meant to be, as unknown labels do


def test_yaml_round_trip(tiny_taxonomy, tmp_path):
    path = tmp_path / "out.yaml"
    tiny_taxonomy.to_yaml(path)
    again = load_taxonomy(path)
    assert again == tiny_taxonomy
    assert again.fingerprint == tiny_taxonomy.fingerprint


# -- the taxonomy command -------------------------------------------------------------


def test_validate_ok(capsys, tiny_taxonomy_file):
    assert main(["taxonomy", "validate", str(tiny_taxonomy_file)]) == 0
    assert "OK: 7 nodes, 4 leaves, depth 2" in capsys.readouterr().out


def test_validate_prints_warnings(capsys, tmp_path):
    path = write(tmp_path, "children:\n  - name: a\n    children: [only]\n  - b\n")
    assert main(["taxonomy", "validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "OK: 4 nodes, 2 leaves, depth 2" in out
    assert "single child" in out


def test_validate_bad_file_exits_2_with_one_line(capsys, tmp_path):
    path = write(tmp_path, "children:\n  - name: a\n    colour: red\n")
    assert main(["taxonomy", "validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'colour'" in err
    assert "Traceback" not in err


def test_show_draws_tree_with_counts(capsys, tiny_taxonomy_file, class_folder, make_image):
    make_image(class_folder / "beast" / "partial.png", seed=99)  # a partial label via alias
    assert main(["taxonomy", "show", str(tiny_taxonomy_file), "--data", str(class_folder)]) == 0
    out = capsys.readouterr().out
    assert "aliases: kitty" in out
    animal = next(line for line in out.splitlines() if " animal " in line)
    assert "7 images" in animal and "(1 labelled here)" in animal
    cat = next(line for line in out.splitlines() if " cat " in line)
    assert "3 images" in cat and "•" in cat
    root = out.splitlines()[0]
    assert "tiny" in root and "13 images" in root


def test_show_unknown_folder_label_is_one_line_error(capsys, tiny_taxonomy_file, class_folder, make_image):
    make_image(class_folder / "zebra" / "z.png")
    assert main(["taxonomy", "show", str(tiny_taxonomy_file), "--data", str(class_folder)]) == 2
    err = capsys.readouterr().err
    assert "'zebra' x1" in err and str(class_folder) in err
