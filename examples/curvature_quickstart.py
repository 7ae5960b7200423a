"""Learn Q(λ) ≈ (F + γI)⁻¹ for every layer of a small network, and check it against the exact one.

Runs in seconds on a CPU with synthetic data (no download):

    .venv/bin/python examples/curvature_quickstart.py

1. train a small MLP classifier, then freeze it;
2. capture per-example gradients from ordinary forward/backward passes (module hooks, no extra
   pass);
3. build one Kronecker block per layer, initialise it from K-FAC statistics, then refine it with
   the FishLeg auxiliary loss;
4. on the last layer (small enough), compare Q with the exact damped inverse empirical Fisher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_fls import (
    AuxiliaryOptimizer,
    GradientCapture,
    StructurePolicy,
    build_blocks,
    find_layers,
    relative_damping,
)


def main(aux_steps: int = 300) -> dict[str, float]:
    """Run the example; return the relative errors of Q for the last layer at each stage."""
    torch.manual_seed(0)
    x = torch.randn(4000, 20)
    y = (x @ torch.randn(20, 5) + 0.3 * torch.randn(4000, 5)).argmax(1)
    model = nn.Sequential(
        nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 5)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        idx = torch.randint(0, len(x), (100,))
        optimizer.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        optimizer.step()

    layers = find_layers(model)  # {"0.weight": adapter, "2.weight": ..., "4.weight": ...}
    capture = GradientCapture(layers)

    def batch_gradients(size: int = 100):  # type: ignore[no-untyped-def]
        idx = torch.randint(0, len(x), (size,))
        model.zero_grad()
        with capture:  # hooks on only while needed
            F.cross_entropy(model(x[idx]), y[idx]).backward()
        return capture.example_gradients()  # the loss was a batch mean: scaled by B inside

    # Exact damped inverse of the empirical Fisher of the last layer over all 4000 examples.
    key = "4.weight"
    all_grads = batch_gradients(len(x))
    per_example = all_grads[key].materialise().reshape(len(x), -1)
    fisher = per_example.T @ per_example / len(x)
    damping = relative_damping(all_grads, 1e-2)  # γ = 1e-2 · mean diag F
    gamma = damping[key]
    exact = torch.linalg.inv(fisher + gamma * torch.eye(fisher.shape[0]))

    def error() -> float:
        Q = blocks[key].to_dense()
        return float(torch.linalg.norm(Q - exact) / torch.linalg.norm(exact))

    blocks = build_blocks(layers, policy=StructurePolicy(default="kronecker"), init_scale=1 / gamma)
    errors = {"identity": error()}
    print(f"layer {key}: relative error of Q₀ = I/γ          {errors['identity']:.3f}")

    accumulators = {k: blocks[k].new_statistics() for k in layers}
    for _ in range(20):
        for k, grads in batch_gradients().items():
            accumulators[k].update(grads)
    for k, block in blocks.items():
        block.init_from_statistics(accumulators[k].result(), gamma)
    errors["kfac"] = error()
    print(f"layer {key}: after the K-FAC initialisation       {errors['kfac']:.3f}")

    aux = AuxiliaryOptimizer(blocks, lr=1e-3)
    for i in range(1, aux_steps + 1):
        result = aux.step({k: g.fvp for k, g in batch_gradients().items()}, damping)
        if i % 100 == 0 or i == aux_steps:
            loss = result.mean_loss
            print(f"layer {key}: after {i} aux steps (aux loss {loss:+.4f}) {error():.3f}")
    errors["refined"] = error()
    return errors


if __name__ == "__main__":
    main()
