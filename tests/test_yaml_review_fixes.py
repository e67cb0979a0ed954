"""YAML files hiercls reads refuse duplicate keys, and taxonomy mistakes get line-numbered,
how-to-fix messages instead of pydantic's wording."""

from __future__ import annotations

import pytest

from hiercls.cli import main
from hiercls.config import load_config
from hiercls.errors import CheckpointError, ConfigError, TaxonomyError
from hiercls.io import DuplicateYamlKey, YamlTooLarge, load_yaml
from hiercls.taxonomy import load_taxonomy

# -- duplicate keys ---------------------------------------------------------------------------


def test_a_second_children_key_is_refused_not_silently_dropping_the_first(tmp_path, capsys):
    path = tmp_path / "dupkey.yaml"
    path.write_text("name: t\nchildren:\n  - a\nchildren:\n  - b\n  - c\n")
    with pytest.raises(TaxonomyError, match=r"dupkey\.yaml:4: duplicate key 'children' \(first at line 2\); remove"):
        load_taxonomy(path)
    assert main(["taxonomy", "validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "dupkey.yaml:4: duplicate key 'children'" in err and "Traceback" not in err and "OK" not in err


def test_a_duplicate_key_inside_a_node_is_refused(tmp_path):
    path = tmp_path / "tree.yaml"
    path.write_text("children:\n  - name: a\n    children: [x, y]\n    children: [z, w]\n  - b\n")
    with pytest.raises(TaxonomyError, match=r"tree\.yaml:4: duplicate key 'children' \(first at line 3\)"):
        load_taxonomy(path)


def test_a_duplicate_option_in_a_config_file_is_refused(tmp_path):
    path = tmp_path / "fit.yaml"
    path.write_text("epochs: 1\nbatch_size: 4\nepochs: 2\n")
    with pytest.raises(ConfigError, match=r"fit\.yaml:3: duplicate key 'epochs' \(first at line 1\)"):
        load_config(path)


def test_a_duplicate_key_in_a_run_config_is_refused(tmp_path):
    from hiercls.inference import _read_run_config
    from hiercls.run import RunPaths

    (tmp_path / "config.yaml").write_text("epochs: 1\nepochs: 2\n")
    with pytest.raises(CheckpointError, match=r"config\.yaml: .*line 2: duplicate key 'epochs' \(first at line 1\)"):
        _read_run_config(RunPaths(tmp_path))


def test_duplicate_keys_in_a_flow_mapping_are_refused():
    with pytest.raises(DuplicateYamlKey, match=r"line 1: duplicate key 'a'"):
        load_yaml("{a: 1, a: 2}")


def test_merge_keys_may_still_be_overridden_and_aliases_shared():
    data = load_yaml("base: &b {x: 1, y: 2}\nd:\n  <<: *b\n  x: 3\nl: [*b, *b]\n")
    assert data["d"] == {"x": 3, "y": 2}
    assert data["l"] == [{"x": 1, "y": 2}] * 2


def test_the_alias_bound_still_holds():
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdef", "bcdefg")
    )
    with pytest.raises(YamlTooLarge):
        load_yaml(bomb)


# -- taxonomy messages ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("children:\n  - 12\n  - b\n", r":2: 12 is not a string; quote it in the YAML \(e\.g\. '12'\) at children\[0\]\.name"),
        ("children:\n  - a\n  - yes\n", r":3: True is not a string \(YAML reads an unquoted yes/no.*quote the name"),
        ("children:\n  - a\n  - name: 1.5\n", r":3: 1\.5 is not a string; quote it"),
        ("children:\n  - a\n  - name:\n  - b\n", r":3: the name is empty; write the node's name after 'name:'"),
        ("children:\n  - a\n  -\n  - b\n", r":3: an empty list item; write a node name after '-' or delete the line"),
        ('children: ["a b", "", "c"]\n', r":1: the name is empty; write the node's name, or delete the entry"),
        ("children:\n  a:\n    children: [x, y]\n", r":1: 'children' is a mapping but must be a list: write one '- name'"),
        ("children:\n  - name: a\n    children:\n  - b\n", r":3: 'children' is empty; list the child nodes"),
        ("children:\n  - name: a\n    aliases: [x, 3]\n  - b\n", r":3: 3 is not a string; quote it"),
    ],
)
def test_taxonomy_mistakes_name_the_line_and_the_fix(tmp_path, text, expected):
    path = tmp_path / "tree.yaml"
    path.write_text(text)
    with pytest.raises(TaxonomyError, match=r"tree\.yaml" + expected) as caught:
        load_taxonomy(path)
    message = str(caught.value)
    assert "Input should be" not in message and "'None'" not in message and "\n" not in message


def test_a_duplicate_key_in_a_run_taxonomy_is_refused_with_the_file(tmp_path):
    from hiercls.calibration import _run_taxonomy

    (tmp_path / "taxonomy.yaml").write_text("children: [a, b]\nroot: r\nchildren: [c, d]\n")
    with pytest.raises(CheckpointError, match=r"taxonomy\.yaml:3: duplicate key 'children' \(first at line 1\)"):
        _run_taxonomy(tmp_path)
