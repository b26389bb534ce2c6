"""The budget check: every recipe reaches the budgets it declares, by `dynnet.calibrate`, on held-out images.

For every registered recipe: convert ``cifar_resnet20`` (1×28×28, Fashion-MNIST's shape; the recipe's own test
base where it cannot convert a ResNet-20), make its decisions input-dependent at random
(:func:`dynnet.testing.scramble_until_mixed`: an untrained policy of the same structure), calibrate on 1,024
Fashion-MNIST training images to budgets 0.5 and 0.75 (moved inside the recipe's declared range), and measure the
mean MAC fraction on 1,024 *test* images in sparse mode. A point passes when it is within 0.03 of its budget.

    python benchmarks/budget.py                  # → benchmarks/results/budget/{results.csv, report.md, machine.json}
    python benchmarks/budget.py --recipes convnet_aig,fbs --images 256

The decisions are those of random policies, not trained ones: the check is that the knob reaches the budget on
images it has not seen, which is what calibration promises; accuracy is not measured here.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import torch

import dynnet
from dynnet.bench.latency import machine_info
from dynnet.core import RECIPES
from dynnet.core.budget import mean_mac_fraction
from dynnet.data import build_loaders
from dynnet.testing import scramble_until_mixed

BUDGETS = (0.5, 0.75)
TOLERANCE = 0.03


def _images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    loaders = build_loaders("fashion_mnist", batch_size=n, val_fraction=0.0, seed=0)
    calib, _ = next(iter(loaders.train))
    held, _ = next(iter(loaders.test))
    return calib[:n], held[:n]


def _model(recipe: str, x: torch.Tensor) -> tuple[dynnet.DynamicModel, str]:
    torch.manual_seed(0)
    try:
        model = dynnet.create_model("cifar_resnet20", recipe, in_channels=1, num_classes=10)
        base = "cifar_resnet20"
        model.eval()(x[:2])
    except (ValueError, TypeError, RuntimeError):  # an architecture of its own (MSDNet, IMTA): its own base
        spec = RECIPES.get(recipe)
        model = dynnet.create_model(spec.test_base, recipe, in_channels=1, num_classes=10)
        base = f"{spec.test_base} (own)"
        model.eval()(x[:2])
    scramble_until_mixed(model, x[:16], across_inputs=RECIPES.get(recipe).input_dependent)
    return model.eval(), base


def _fraction(model: dynnet.DynamicModel, x: torch.Tensor) -> float:
    dynnet.sparse(model)
    return mean_mac_fraction(model, x.split(256))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default=None, help="comma-separated subset")
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--out", default="benchmarks/results/budget")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    known = dynnet.list_recipes()  # also registers every recipe
    recipes = args.recipes.split(",") if args.recipes else known
    calib, held = _images(args.images)
    rows = []
    for recipe in recipes:
        spec = RECIPES.get(recipe)
        lo, hi = spec.budget.reachable
        started = time.time()
        try:
            model, base = _model(recipe, calib)
        except Exception as err:  # a recipe that cannot convert either base: recorded, not hidden
            rows.append({"recipe": recipe, "how": spec.budget.how, "error": " ".join(str(err).split())[:200]})
            continue
        for b in BUDGETS:
            budget = round(min(max(b, lo), hi), 3)
            row = {"recipe": recipe, "family": spec.family, "how": spec.budget.how, "knob": spec.budget.knob,
                   "reachable": f"{lo:g}-{hi:g}", "base": base, "budget": budget}  # fmt: skip
            if not spec.budget.calibrated:
                row |= {"held_out": _fraction(model, held), "note": "not calibratable (fixed at conversion)"}
            else:
                try:
                    report = dynnet.calibrate(model, calib, budget)
                    row |= {"calibrated": report.mac_fraction, "held_out": _fraction(model, held),
                            "thresholds": json.dumps(report.thresholds)}  # fmt: skip
                except ValueError as err:
                    row["error"] = " ".join(str(err).split())[:200]
            held_out = row.get("held_out")
            row["pass"] = held_out is not None and abs(held_out - budget) <= TOLERANCE
            row["seconds"] = round(time.time() - started, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "results.jsonl"  # every row, one compact line each; --recipes replaces those recipes' rows only
    if args.recipes and store.exists():
        kept = [json.loads(line) for line in store.read_text().splitlines() if line.strip()]
        rows = [r for r in kept if r["recipe"] not in recipes] + rows
        rows.sort(key=lambda r: (known.index(r["recipe"]) if r["recipe"] in known else len(known), r.get("budget", 0)))
    store.write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows))
    fields = ["recipe", "family", "how", "knob", "reachable", "base", "budget", "calibrated", "held_out", "pass",
              "thresholds", "note", "error", "seconds"]  # fmt: skip
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    machine = machine_info()
    (out / "machine.json").write_text(json.dumps(machine, indent=1) + "\n")
    passed = sum(1 for r in rows if r.get("pass"))
    lines = [
        "# Budgets reached by calibration",
        "",
        f"{machine.get('date', '')}, {machine.get('machine', '')}, {args.threads} threads. Command: "
        f"`python benchmarks/budget.py` (last: `python benchmarks/budget.py"
        f"{' --recipes ' + args.recipes if args.recipes else ''}`, merged into `results.jsonl`).",
        "",
        f"cifar_resnet20 at 1×28×28 with random (scrambled) policies; calibrated on {args.images} Fashion-MNIST "
        f"training images, measured on {args.images} test images in sparse mode. Pass: held-out MAC fraction within "
        f"{TOLERANCE} of the budget. **{passed} of {len(rows)} points pass.**",
        "",
        "| recipe | how | knob | reachable | base | budget | calibrated | held-out | pass |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "budget" not in r:
            lines.append(f"| {r['recipe']} | {r['how']} | | | | | | error: {r.get('error', '')} | no |")
            continue
        cal = f"{r['calibrated']:.3f}" if "calibrated" in r else r.get("error", r.get("note", ""))
        held_out = f"{r['held_out']:.3f}" if "held_out" in r else "–"
        lines.append(f"| {r['recipe']} | {r['how']} | {r['knob']} | {r['reachable']} | {r['base']} | {r['budget']:g} "
                     f"| {cal} | {held_out} | {'yes' if r['pass'] else '**no**'} |")  # fmt: skip
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print(f"{passed}/{len(rows)} points within {TOLERANCE}: {out}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
