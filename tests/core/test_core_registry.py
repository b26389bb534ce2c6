import pytest

from dynnet.core import Registry, UnknownNameError


def test_register_get_and_list() -> None:
    reg: Registry[int] = Registry("thing")
    reg.register("a", 1)

    @reg.register("b")
    def b() -> int:
        return 2

    assert reg.get("a") == 1 and reg.get("b") is b
    assert reg.names() == ["a", "b"] and "a" in reg and len(reg) == 2


def test_duplicate_name_raises() -> None:
    reg: Registry[int] = Registry("thing")
    reg.register("a", 1)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a", 2)
    assert reg.get("a") == 1


def test_unknown_name_lists_known() -> None:
    reg: Registry[int] = Registry("recipe")
    reg.register("skipnet", 1)
    with pytest.raises(UnknownNameError, match=r"unknown recipe 'nope'; known recipes: skipnet"):
        reg.get("nope")


@pytest.mark.parametrize("bad", ["", "Upper", "has space"])
def test_bad_names_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match="lowercase"):
        Registry("thing").register(bad, 1)


def test_a_recipe_must_declare_its_budget_policy_and_a_reachable_default() -> None:
    import dataclasses

    from dynnet.core.budget import BudgetPolicy
    from dynnet.core.recipe import RECIPES, RecipeSpec, register_recipe

    @dataclasses.dataclass(frozen=True)
    class Config:
        budget: float = 0.2

    spec = RecipeSpec(name="undeclared_budget", family="f", config_cls=Config, convert=lambda *a: None, paper="p")
    with pytest.raises(TypeError, match="declare how it honours a budget"):
        register_recipe(spec)
    narrow = dataclasses.replace(spec, budget=BudgetPolicy("calibrated", reachable=(0.4, 1.0)))
    with pytest.raises(ValueError, match=r"default budget 0.2 is outside its reachable \[0.4, 1.0\]"):
        register_recipe(narrow)
    assert "undeclared_budget" not in RECIPES
