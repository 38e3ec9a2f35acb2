"""Time a SCAO basis refresh with and without a process group (gloo, CPU processes).

    python docs/examples/distributed_refresh.py --world 2 --dim 512 --leaves 8

Every rank runs ``kronecker_precondition`` with a refresh at every step on the same gradients,
first alone (``process_group=None``: each rank decomposes every factor), then with
``process_group=WORLD`` (each factor decomposed by its owner, results broadcast). Prints the
median update time of each, the factors each rank decomposed, and checks that both give the
same state bit for bit.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import scao_fx as sf


def run(tx, params, grads) -> tuple[list[float], object]:
    state = tx.init(params)
    times = []
    for g in grads:
        start = time.perf_counter()
        _, state = tx.update(g, state, params=params)
        times.append(time.perf_counter() - start)
    return times, state


def worker(rank: int, world: int, store_path: str, args) -> None:
    torch.set_num_threads(args.threads)
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    gen = torch.Generator().manual_seed(0)
    params = {f"w{i}": torch.randn(args.dim, args.dim, generator=gen) for i in range(args.leaves)}
    grads = [{k: torch.randn(v.shape, generator=gen) for k, v in params.items()} for _ in range(args.steps)]

    def make(group):
        return sf.kronecker_precondition(
            rank=sf.full_rank() if args.full_rank else sf.spectral_mass_rank(),
            eigensolver="eigh",
            precond_freq=1,
            process_group=group,
        )

    t_local, s_local = run(make(None), params, grads)
    t_dist, s_dist = run(make(dist.group.WORLD), params, grads)
    same = all(
        torch.equal(a, b) for a, b in zip(sf._tree.flatten(s_local)[0], sf._tree.flatten(s_dist)[0])
    )
    owners = sf.assign_owners([float(args.dim) ** 3] * (2 * args.leaves), world)
    mine = owners.count(rank)
    print(
        f"rank {rank}: local refresh step {1e3 * statistics.median(t_local[1:]):.1f} ms, "
        f"distributed {1e3 * statistics.median(t_dist[1:]):.1f} ms; decomposes {mine} of "
        f"{len(owners)} factors; identical state: {same}",
        flush=True,
    )
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--leaves", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--full-rank", action="store_true", help="full-width bases (k = dim)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(worker, args=(args.world, os.path.join(tmp, "store"), args), nprocs=args.world, start_method="spawn")


if __name__ == "__main__":
    main()
