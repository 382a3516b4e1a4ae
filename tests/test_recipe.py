"""Recipe validation: errors name the field path and YAML line, suggest close keys, exit 2 without traceback."""

import json

import pytest
from conftest import tiny_recipe

from workbench.cli import main
from workbench.errors import RecipeError
from workbench.recipe import load_recipe, parse_recipe


def test_valid_recipe_fills_defaults(images, tmp_path):
    recipe = parse_recipe(tiny_recipe(images, tmp_path / "runs"))
    stages = recipe.stage_list()
    assert [n for n, _ in stages] == ["calibrate", "export", "evaluate"]
    assert stages[0][1].method == "max"
    assert stages[0][1].percentile == 99.99  # default written out
    assert stages[1][1].opset == 17


def test_misspelt_key_names_path_line_and_suggestion(images, tmp_path):
    text = tiny_recipe(images, tmp_path / "runs").replace("batch_size: 4", "batch_sise: 4")
    with pytest.raises(RecipeError) as e:
        parse_recipe(text, source="r.yaml")
    msg = str(e.value)
    line = next(i for i, text_line in enumerate(text.splitlines(), 1) if "batch_sise" in text_line)
    assert f"r.yaml:{line}" in msg
    assert "data.batch_sise" in msg and "Did you mean 'batch_size'" in msg


def test_misspelt_stage_option_and_stage_name(images, tmp_path):
    text = tiny_recipe(images, tmp_path / "runs", stages="  - calibrate: {methd: max}\n  - evalute: {}\n")
    with pytest.raises(RecipeError) as e:
        parse_recipe(text, source="r.yaml")
    msg = str(e.value)
    assert "stages[0].calibrate.methd" in msg and "Did you mean 'method'" in msg
    assert "Did you mean 'evaluate'" in msg


def test_unknown_calibrator_lists_choices(images, tmp_path):
    text = tiny_recipe(images, tmp_path / "runs", stages="  - calibrate: {method: entropi}\n")
    with pytest.raises(RecipeError) as e:
        parse_recipe(text, source="r.yaml")
    assert "stages[0].calibrate.method" in str(e.value)
    assert "Did you mean 'entropy'" in str(e.value)
    assert "'mse'" in str(e.value)


def test_missing_required_key(images, tmp_path):
    text = tiny_recipe(images, tmp_path / "runs").replace('  spec: "import:helpers:tiny_cnn"\n', "")
    with pytest.raises(RecipeError, match=r"'model.spec' is required"):
        parse_recipe(text)


def test_percentile_out_of_range(images, tmp_path):
    text = tiny_recipe(images, tmp_path / "runs", stages="  - calibrate: {method: percentile, percentile: 150}\n")
    with pytest.raises(RecipeError, match=r"stages\[0\].calibrate.percentile: percentile is in percent"):
        parse_recipe(text)


def test_overrides_are_validated_like_the_file(images, tmp_path):
    text = tiny_recipe(images, tmp_path / "runs")
    recipe = parse_recipe(text, overrides=["stages.calibrate.method=percentile", "stages.calibrate.percentile=99.9",
                                           "data.batch_size=2"])
    opts = recipe.stage_list()[0][1]
    assert (opts.method, opts.percentile, recipe.data.batch_size) == ("percentile", 99.9, 2)
    recipe = parse_recipe(text, overrides=["stages.0.calibrate.method=mse"])
    assert recipe.stage_list()[0][1].method == "mse"
    with pytest.raises(RecipeError, match="Did you mean 'entropy'"):
        parse_recipe(text, overrides=["stages.calibrate.method=entropyy"])
    with pytest.raises(RecipeError, match="no stage 'qat'"):
        parse_recipe(text, overrides=["stages.qat.epochs=3"])
    with pytest.raises(RecipeError, match="missing an '=' sign"):
        parse_recipe(text, overrides=["data.batch_size"])


def test_unset_environment_variable_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv("WORKBENCH_ASSETS", raising=False)
    text = ("name: x\nmodel: {spec: 'cifar_resnet:resnet20', weights: '${WORKBENCH_ASSETS}/models/a.th'}\n"
            "data: {}\nstages: [{export: {}}]\n")
    with pytest.raises(RecipeError) as e:
        parse_recipe(text, source="r.yaml")
    assert "r.yaml:2" in str(e.value) and "WORKBENCH_ASSETS" in str(e.value) and "model.weights" in str(e.value)


def test_cli_validate_exit_codes_and_no_traceback(images, tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text(tiny_recipe(images, tmp_path / "runs"))
    assert main(["validate", str(good)]) == 0
    assert "valid" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(tiny_recipe(images, tmp_path / "runs").replace("stages:", "stagez:"))
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "stagez" in err and "Did you mean 'stages'" in err
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_schema_is_json_with_stage_options(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    text = json.dumps(schema)
    for word in ("calibrate", "entropy", "percentile", "opset", "trust_pickle"):
        assert word in text


def test_shipped_recipes_validate(monkeypatch, tmp_path):
    from pathlib import Path

    monkeypatch.setenv("WORKBENCH_ASSETS", str(tmp_path))
    for path in sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml")):
        load_recipe(path)
