"""Property-based fuzzing of recipe files: any YAML gives a valid recipe or a clear FnpruneError, never a crash."""

from __future__ import annotations

import dataclasses

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fnprune.data import resolve_task
from fnprune.errors import FnpruneError
from fnprune.recipe import Recipe, dump_recipe, load_recipe, recipe_from_dict

SECTIONS = {f.name: f.type for f in dataclasses.fields(Recipe)}
FIELDS = {name: [f.name for f in dataclasses.fields(getattr(Recipe(), name))]
          for name in SECTIONS if dataclasses.is_dataclass(getattr(Recipe(), name))}

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                    st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=False), st.text(max_size=20))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=6)
# Mostly real section/field names (so the checks behind them are reached), sometimes junk.
section = st.sampled_from(sorted(FIELDS)).flatmap(
    lambda s: st.tuples(st.just(s), st.dictionaries(st.sampled_from(FIELDS[s] + ["junk"]), values, max_size=4)))
recipes = st.one_of(
    st.lists(section, max_size=6).map(dict),
    values,
)


def _exercise(data) -> None:
    try:
        recipe = recipe_from_dict(data)
        recipe.validate()
        resolve_task(recipe.task)
    except FnpruneError:
        return
    assert recipe_from_dict(yaml.safe_load(dump_recipe(recipe))) == recipe


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(recipes)
def test_fuzzed_recipe_data(data):
    _exercise(data)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_fuzzed_recipe_text(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "r.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_recipe(path)
    except FnpruneError:
        pass
