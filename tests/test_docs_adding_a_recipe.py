"""docs/adding-a-recipe.md: its example recipe, run as written, registers and behaves like every recipe."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "adding-a-recipe.md"

CHECK = textwrap.dedent(
    """
    import copy, importlib.util, sys
    import torch
    import dynnet
    from dynnet.testing import diverse_inputs, scramble_until_mixed

    dynnet.list_recipes()  # the built-in recipes first, as in a real session
    name = "dynnet.methods.layer_skip.sigmoid_skip"
    spec = importlib.util.spec_from_file_location(name, sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)  # the page's file, as written: registering is importing
    assert "sigmoid_skip" in dynnet.list_recipes()
    assert dynnet.core.RECIPES.get("sigmoid_skip").family == "layer_skip"

    torch.manual_seed(0)
    base = dynnet.create_model("cifar_resnet8", in_channels=1).eval()
    x = diverse_inputs(8, (1, 28, 28))
    model = dynnet.convert(copy.deepcopy(base), "sigmoid_skip", budget=0.5).eval()
    with torch.no_grad():
        assert torch.allclose(model(x), base(x), atol=1e-5), "a fresh conversion must reproduce the base"
        scramble_until_mixed(model, x)
        dynnet.set_mode(model, "masked")
        with dynnet.trace() as t:
            masked = model(x)
        fractions = t.macs() / t.dense_macs()
        assert 0 < float(fractions.min()) < 1 and float(fractions.min()) < float(fractions.max()), fractions  # mixed
        dynnet.sparse(model)
        sparse = model(x)
        assert torch.allclose(sparse, masked, atol=1e-5), "sparse must equal masked"
        report = dynnet.count_macs(model, x)
        # what the kernels ran is what the trace says, and less than the dense network
        assert abs(float(report.executed.sum()) - report.total) <= 1e-6 * report.total
        assert report.total < report.dense * len(x), (report.total, report.dense)
    model.train()
    with dynnet.trace() as t:
        loss = model.compute_loss(model(x), torch.arange(8) % 10, t).total
    loss.backward()
    assert all(p.grad is not None for p in model.decision_parameters()), "gates must get gradients"
    print("ok")
    """
)


def test_the_example_recipe_of_the_page_registers_reproduces_the_base_and_skips_work(tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert blocks, "docs/adding-a-recipe.md has no python block"
    path = tmp_path / "sigmoid_skip.py"
    path.write_text(blocks[0])
    script = tmp_path / "check.py"
    script.write_text(CHECK)
    out = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
