"""Train a tiny float64 net with OnlineNGD on WORLD CPU processes (DDP, gloo); save the state.

Used by ``test_online_ngd.py``: ``python online_ddp_script.py WORLD OUT_DIR``. Each rank takes its
contiguous share of every global batch; DDP all-reduces (averages) the gradients before the
optimizer reads ``.grad``, so the preconditioned step must equal the one-process full-batch step.
No biases: a bias factor sees one row per step, so rounding-level eigenpairs of its update differ
with the reduction order (see ``ConvNet`` in the test); ranks still agree bit for bit with them.
Writes ``OUT_DIR/rank{r}.pt`` with the parameters and every factor state.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_curvature.optim import OnlineNGD

STEPS, BATCH = 14, 32


def net() -> nn.Module:
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(6, 8, bias=False), nn.Tanh(), nn.Linear(8, 5, bias=False))
    return seq.double()


def data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(BATCH, 6, generator=g, dtype=torch.float64),
            torch.randint(0, 5, (BATCH,), generator=g),
        )
        for _ in range(STEPS)
    ]


def worker(rank: int, world: int, out: str, port: str) -> None:
    model = net()
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        dist.init_process_group("gloo", rank=rank, world_size=world)
        wrapped: nn.Module = DistributedDataParallel(model)
    else:
        wrapped = model
    opt = OnlineNGD(model.parameters(), lr=0.1, alpha=0.05, momentum=0.5)
    share = BATCH // world
    for x, y in data():
        xs, ys = x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]
        opt.zero_grad()
        nn.functional.cross_entropy(wrapped(xs), ys).backward()
        opt.step()
    factors = [
        {k: v for k, v in f.items()}
        for p in model.parameters()
        for f in opt.state[p]["factors"].values()
    ]
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save({"params": params, "factors": factors}, os.path.join(out, f"rank{rank}.pt"))
    if world > 1:
        dist.destroy_process_group()


def main() -> None:
    world, out = int(sys.argv[1]), sys.argv[2]
    os.makedirs(out, exist_ok=True)
    port = str(29500 + os.getpid() % 1000)
    if world == 1:
        worker(0, 1, out, port)
    else:
        mp.spawn(worker, args=(world, out, port), nprocs=world, join=True)


if __name__ == "__main__":
    main()
