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


def test_type_registry_looks_up_along_the_mro_and_loads_builtins_lazily() -> None:
    from torch import nn

    from dynnet.core.registry import TypeRegistry

    loaded: list[bool] = []

    class Base(nn.Module):
        def forward(self, x):
            return x

    class Same(Base):  # inherits Base's forward
        pass

    class Other(Base):  # computes otherwise
        def forward(self, x):
            return 2 * x

    def loader() -> None:
        loaded.append(True)
        strict.register(Base, "base")

    strict = TypeRegistry("thing", same_forward=True, loader=loader)
    assert not loaded  # nothing imported before first use
    assert strict.lookup(Same()) == "base" and loaded == [True]
    assert strict.lookup(Other()) is None and strict.lookup(nn.ReLU()) is None
    strict.register(Other, "other")
    assert strict.lookup(Other()) == "other" and Other in strict
    assert [n.rsplit(".", 1)[-1] for n in strict.names()] == ["Base", "Other"]
    with pytest.raises(ValueError, match="already registered"):
        strict.register(Base, "again")
    assert strict.unregister(Other) == "other" and strict.lookup(Other()) is None
    loose = TypeRegistry("thing")
    loose.register(Base, "base")
    assert loose.lookup(Other()) == "base"  # any subclass inherits without same_forward
