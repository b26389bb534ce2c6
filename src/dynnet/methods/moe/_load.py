"""Expert load: how the trained router spreads the test images over the experts (the MoE recipes'
``RecipeSpec.bench_metrics`` in ``dynnet bench``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from dynnet.core import set_mode, trace

__all__ = ["expert_load"]


def expert_load(model: nn.Module, val: Iterable[Any] | None, test: Iterable[Any]) -> dict[str, Any]:
    """Each block's share of the routed samples per expert on ``test``, in sparse mode.

    Every MoE block records ``"<block>/load"`` (Tensor[E]: samples sent to each expert) in the trace; this sums them
    over the test batches. A balanced router gives every expert ``1 / E``; ``max_share`` is the busiest expert's
    share in any block (1.0: one expert takes everything); ``routed`` counts the (sample, expert) pairs each block
    sent to a real expert (a block whose samples all took the zero expert has shares of 0).

    Args:
        model: a trained MoE model (``sparse_moe``, ``hydranets``).
        val: unused (the signature of ``bench_metrics``).
        test: ``(Tensor[B, C, H, W], Tensor[B])`` batches.

    Returns:
        ``{"expert_load": {block: [share per expert]}, "routed": {block: int}, "max_share": float}``.
    """
    del val
    model.eval()
    set_mode(model, "sparse")
    device = next(model.parameters()).device
    loads: dict[str, Tensor] = {}
    with torch.no_grad():
        for x, *_ in test:
            with trace() as t:
                model(x.to(device))
            for key, value in t.outputs.items():
                if key.endswith("/load"):
                    block = key.removesuffix("/load")
                    loads[block] = loads.get(block, 0) + value.detach().double().cpu()
    shares = {b: (v / v.sum().clamp(min=1)).tolist() for b, v in loads.items()}
    return {
        "expert_load": {b: [round(s, 4) for s in v] for b, v in shares.items()},
        "routed": {b: int(v.sum()) for b, v in loads.items()},
        "max_share": max((max(v) for v in shares.values()), default=float("nan")),
    }
