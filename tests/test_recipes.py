import dataclasses
import typing

import pytest

from surgery.errors import SurgeryError
from surgery.recipe import Recipe, load_recipe, shipped_recipes


def test_shipped_recipes_all_parse():
    assert {"hybrid", "hybrid-selected", "linear", "vsa", "vmoba", "mixed"} <= set(shipped_recipes())
    for name in shipped_recipes():
        recipe = load_recipe(name)
        assert recipe.name == name and 0 < recipe.plan.budget <= 1


def test_overrides_set_single_fields():
    recipe = load_recipe("hybrid", ["stage1.steps=7", "stage2.mode=full", "plan.budget=0.3"])
    assert (recipe.stage1.steps, recipe.stage2.mode, recipe.plan.budget) == (7, "full", 0.3)


@pytest.mark.parametrize(
    "text,message",
    [
        ('name = "x"\n[stage1]\nstesp = 3\n', "x.toml.stage1: unknown key 'stesp'"),
        ('name = "x"\n[stage1]\nsteps = "many"\n', "stage1.steps must be int, got 'many'"),
        ('name = "x"\n[stage2]\nmode = "half"\n', "stage2.mode must be one of 'lora', 'full'"),
        ('name = "x"\n[plan]\nbudget = 1.5\n', "budget must be in (0, 1]"),
        ('name = "x"\nbogus = 1\n', "unknown key 'bogus'"),
        ('name = "x"\n[stage1\n', "not valid TOML"),
        ('name = "x"\n[stage1.lr_by_variant]\nvsb = 1e-3\n', "unknown variant 'vsb'"),
        ('name = "x"\n[stage1.lr_by_variant]\nvsa = "slow"\n', "stage1.lr_by_variant.vsa must be float"),
        ('name = "x"\n[stage1.lr_by_variant]\nvsa = -1.0\n', "lr_by_variant.vsa must be > 0"),
    ],
)
def test_bad_recipe_files_name_the_key(tmp_path, text, message):
    path = tmp_path / "x.toml"
    path.write_text(text)
    with pytest.raises(SurgeryError) as info:
        load_recipe(str(path))
    assert message in str(info.value) and "\n" not in str(info.value)


def _numeric_fields(cls, prefix=""):
    """section.key of every float and int setting of a recipe, recursing into optional sub-tables."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        table = next((a for a in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(a)), None)
        if table is not None:
            yield from _numeric_fields(table, f"{prefix}{f.name}.")
        elif hint in (float, int) and f.name != "seed":  # any integer is a seed
            yield f"{prefix}{f.name}", hint


NUMERIC_FIELDS = list(_numeric_fields(Recipe))


def test_every_numeric_field_is_checked_below():
    names = {name for name, _ in NUMERIC_FIELDS}
    assert {"stage1.lr", "stage2.sparsity_anneal.every", "train.checkpoint_every", "plan.budget"} <= names
    assert len(names) >= 20


@pytest.mark.parametrize("field,kind", NUMERIC_FIELDS)
def test_no_numeric_field_takes_a_negative_value_or_a_non_finite_float(field, kind):
    values = ["-1"] + (["nan", "inf", "-inf"] if kind is float else [])
    for value in values:
        with pytest.raises(SurgeryError, match=field.rpartition(".")[2]):
            load_recipe("hybrid", [f"{field}={value}"])


def test_per_variant_learning_rates_are_finite():
    with pytest.raises(SurgeryError, match="lr_by_variant.vsa must be a finite number"):
        load_recipe("hybrid", ["stage1.lr_by_variant.vsa=nan"])


@pytest.mark.parametrize("field", ["train.checkpoint_every", "data.batch_size", "data.samples", "plan.samples",
                                   "stage2.lora_rank", "stage2.lora_alpha", "stage2.sparsity_anneal.every"])
def test_counts_that_divide_or_size_something_reject_zero(field):
    with pytest.raises(SurgeryError, match=field.rpartition(".")[2]):
        load_recipe("hybrid", [f"{field}=0"])


def test_unknown_recipe_name_lists_the_shipped_ones():
    with pytest.raises(SurgeryError, match="shipped: hybrid"):
        load_recipe("hybird")


def test_stage1_lr_by_variant_scales_the_schedule():
    recipe = load_recipe("hybrid", ["stage1.lr=0.02", "stage1.lr_by_variant.vsa=0.001"])
    assert recipe.stage1.lr_scale("vsa") == pytest.approx(0.05) and recipe.stage1.lr_scale("hybrid") == 1.0


def test_params_by_variant_reach_every_candidate_of_the_variant():
    from surgery.sensitivity import default_candidates

    recipe = load_recipe("hybrid-selected", ["plan.params_by_variant.hybrid_selected.kind=polynomial"])
    candidates = default_candidates(recipe.plan.variants, recipe.plan.params_by_variant)
    selected = [c.config for c in candidates if c.variant == "hybrid_selected"]
    assert [c.sparsity for c in selected] == [0.5, 0.75, 0.875] and {c.kind for c in selected} == {"polynomial"}


@pytest.mark.parametrize("override, message", [
    ("plan.params_by_variant.hybrd.kind=polynomial", "params_by_variant: unknown variant 'hybrd'"),
    ("plan.params_by_variant.hybrid_selected.kind=elu", "plan.params_by_variant.hybrid_selected: kind must be one of"),
    ("plan.params_by_variant.hybrid_selected.top_k=0", "set exactly one of top_k and sparsity"),
])
def test_bad_params_by_variant_are_one_line_errors(override, message):
    with pytest.raises(SurgeryError) as info:
        load_recipe("hybrid-selected", [override])
    assert message in str(info.value) and "\n" not in str(info.value)
