"""Writes ``checkpoint_v1.pt``: a version-1 ``sf.SCAO`` checkpoint (written by the code of commit
1b0a80b, before the version-2 layout) and what 5 more steps give, for ``tests/test_optim.py``'s
test that checkpoints of the previous format still load and resume exactly.

Run from the repository root at a version-1 commit: ``python tests/data/make_checkpoint_v1.py``.
"""

import copy

import torch

import scao_fx as sf


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 5), torch.nn.Linear(5, 3))


def grads(step: int, params) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=gen) for p in params]


KW = dict(lr=1e-2, warmup_steps=2, blend_steps=2, min_precond_updates=1, precond_freq=3, k_min=1, k_max=4)


def run(m, opt, steps):
    for step in steps:
        for p, g in zip(m.parameters(), grads(step, list(m.parameters()))):
            p.grad = g
        opt.step()


if __name__ == "__main__":
    m = model()
    params = list(m.parameters())
    opt = sf.SCAO([{"params": params[:2]}, {"params": params[2:], "use_int8_ema": False}], **KW)
    run(m, opt, range(8))
    ckpt = {"model": {k: v.clone() for k, v in m.state_dict().items()}, "opt": opt.state_dict()}
    ckpt = copy.deepcopy(ckpt)
    run(m, opt, range(8, 13))
    ckpt["after_5_steps"] = {k: v.clone() for k, v in m.state_dict().items()}
    assert ckpt["opt"]["version"] == 1
    torch.save(ckpt, "tests/data/checkpoint_v1.pt")
