"""Kernel benchmark: time and achieved bandwidth of every kernel, reference vs Triton.

Run ``python -m scao_fx.bench.kernels`` (or ``scao-fx bench-kernels``). For each kernel and
each shape group of a GPT-2-medium-like model (24 layers, d_model 1024, MLP 4096: Kronecker
factors of 1024x1024 and 4096x4096 stacked per shape, parameters of 1024x1024, 1024x4096 and
4096x1024 stacked per shape) it reports the median time, the bytes the kernel must move, the
achieved GB/s and that as a percentage of the device's copy bandwidth measured in the same run
(a large ``Tensor.copy_``). Each group is run ``grouped`` (one call on the stacked tensor) and
as a per-layer ``loop`` (one call per leaf), to show what stacking saves.

Then the whole optimizer step (``tx.update`` + ``sf.apply_updates`` of ``sf.scao``) on the
model's parameters (matrices, biases, LayerNorm weights), ``grouped=True`` vs ``grouped=False``,
per backend (Triton only on CUDA): median of the non-refresh steps, of the refresh steps and the
mean over refresh windows, timed past the first refresh. On the CPU this section defaults to
fewer layers (``--step-layers``); ``--no-step`` skips it, ``--no-kernels`` runs only it. That
section lives in :mod:`scao_fx.bench.kernel_step`, the model's shapes in
:mod:`scao_fx.bench.kernel_shapes` (their names are importable from here too).

Timing: CUDA events on the GPU, ``time.perf_counter`` on the CPU; warmup runs, then the median
of the repeats. On the CPU only the reference backend runs (Triton on the CPU would be the
interpreter, meaningless for timing); ``--quick`` shrinks the model so this takes well under a
minute.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict
from typing import Callable, List, Optional, Sequence

import torch

from ..kernels import _dispatch, adam_epilogue, dequantize_blockwise, int8_ema_update, quantize_blockwise
from ..kernels._common import n_blocks
from .kernel_shapes import BenchResult, ModelShapes, model_groups, model_params  # noqa: F401
from .kernel_step import CPU_STEP_LAYERS, STEP_ROWS, _clone, scao_stepper, step_section, time_steps  # noqa: F401
from .progress import Timer

__all__ = ["main", "model_groups", "model_params", "measure_copy_bandwidth", "BenchResult",
           "scao_stepper", "time_steps"]


def measure_copy_bandwidth(device: torch.device, nbytes: int, timer: Timer) -> float:
    """GB/s of ``dst.copy_(src)`` on a ``nbytes`` float32 tensor (read + write counted)."""
    n = nbytes // 4
    src = torch.randn(n, device=device) if device.type == "cuda" else torch.rand(n)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    del src, dst
    return 2 * nbytes / (ms * 1e-3) / 1e9


def _elem_bytes(dt: torch.dtype) -> int:
    return torch.empty((), dtype=dt).element_size()


def _oom_types():
    types = [MemoryError]
    if hasattr(torch.cuda, "OutOfMemoryError"):
        types.append(torch.cuda.OutOfMemoryError)
    return tuple(types)


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    timer = Timer(device, args.warmup, args.repeats)
    bs = args.block_size

    backends: List[str] = []
    for b in args.backends.split(","):
        b = b.strip()
        if not b:
            continue
        if b == "triton":
            try:
                _dispatch.backend(device, "triton")
            except RuntimeError as e:
                print(f"# skipping triton: {e}", file=sys.stderr)
                continue
            if device.type == "cpu" and not args.allow_interpreter:
                print("# skipping triton on the CPU (interpreter timings are meaningless; "
                      "--allow-interpreter to force)", file=sys.stderr)
                continue
        backends.append(b)

    copy_gbps = measure_copy_bandwidth(device, args.copy_mb * 2**20, timer)
    results: List[BenchResult] = []

    def emit(res: BenchResult) -> None:
        results.append(res)
        _print_row(res)

    def record(kernel, group, count, elements, backend, mode, nbytes, fn, note=""):
        try:
            ms = timer(fn)
        except _oom_types() as e:  # pragma: no cover - depends on the device
            if device.type == "cuda":
                torch.cuda.empty_cache()
            emit(BenchResult(kernel, group, count, elements, backend, mode, None, nbytes, None,
                             None, None, f"out of memory: {type(e).__name__}"))
            return
        gbps = nbytes / (ms * 1e-3) / 1e9
        emit(BenchResult(kernel, group, count, elements, backend, mode, ms, nbytes, gbps,
                         100.0 * gbps / copy_gbps, timer.last_min, note))

    print(f"# device: {_device_name(device)}; copy bandwidth {copy_gbps:.1f} GB/s; "
          f"block_size {bs}; backends {','.join(backends)}")
    _print_header()

    if args.kernels:
        _kernel_section(args, device, backends, record)
    step_info = None
    if args.step:
        step_info = step_section(args, device, backends, timer, emit)

    return {
        "device": _device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": _triton_version(),
        "python": platform.python_version(),
        "model": {"layers": args.layers, "d_model": args.d_model, "d_mlp": args.d_mlp},
        "block_size": bs,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "copy_bandwidth_gbps": copy_gbps,
        "copy_mb": args.copy_mb,
        "step": step_info,
        "results": [asdict(r) for r in results],
        "summary": _summary(results),
    }


def _kernel_section(args: argparse.Namespace, device: torch.device, backends: List[str],
                    record: Callable) -> None:
    """One row per kernel, shape group, backend (and Triton tile size) and mode."""
    shapes = model_groups(args.layers, args.d_model, args.d_mlp)
    bs = args.block_size
    modes = ["grouped"] + (["loop"] if not args.no_loop else [])

    def variants(kind: str):
        """(label, backend, configure) per backend; Triton once per requested tile size."""
        out = []
        for b in backends:
            sizes = (args.codec_tiles if kind == "codec" else args.adam_blocks) or [None]
            if b != "triton":
                sizes = [None]
            for size in sizes:
                label = b if size is None else f"{b}/{size}"
                out.append((label, b, size))
        return out

    def configure(kind: str, size):
        if size is None:
            return
        from ..kernels import _triton

        if kind == "codec":
            _triton.CODEC_TILE = size
        else:
            _triton.ADAM_BLOCK = size
    # ------------------------------------------------------------- codec and EMA on factors
    for side, count in sorted(shapes.factor_groups.items()):
        n = side * side
        nb = n_blocks(n, bs)
        group = f"{count}x({side}x{side})"
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn((count, n), device=device, generator=gen)
        upd = torch.randn((count, n), device=device, generator=gen)
        codes = torch.empty((count, n), dtype=torch.int8, device=device)
        scales = torch.empty((count, nb), dtype=torch.float32, device=device)
        out_f = torch.empty((count, n), dtype=torch.float32, device=device)
        step = torch.zeros((), dtype=torch.int64, device=device)
        q_bytes = count * (n * (4 + 1) + nb * 4)
        d_bytes = count * (n * (1 + 4) + nb * 4)
        e_bytes = count * (n * (1 + 4 + 1) + nb * 4 * 2)
        for label, backend, size in variants("codec"):
            configure("codec", size)
            for mode in modes:
                rows = [slice(None)] if mode == "grouped" else [slice(i, i + 1)
                                                                  for i in range(count)]

                def q_near(rows=rows, backend=backend):
                    for r in rows:
                        quantize_blockwise(x[r], bs, out=(codes[r], scales[r]), backend=backend)

                def q_stoch(rows=rows, backend=backend):
                    for r in rows:
                        quantize_blockwise(x[r], bs, stochastic=True, seed=step,
                                           out=(codes[r], scales[r]), backend=backend)

                def deq(rows=rows, backend=backend):
                    for r in rows:
                        dequantize_blockwise(codes[r], scales[r], bs, out=out_f[r],
                                             backend=backend)

                def ema(rows=rows, backend=backend):
                    for r in rows:
                        int8_ema_update(codes[r], scales[r], upd[r], 0.999, block_size=bs,
                                        seed=step, out=(codes[r], scales[r]), backend=backend)

                record("quantize(nearest)", group, count, count * n, label, mode, q_bytes,
                       q_near)
                record("quantize(stochastic)", group, count, count * n, label, mode,
                       q_bytes, q_stoch)
                record("dequantize(fp32)", group, count, count * n, label, mode, d_bytes,
                       deq)
                record("int8_ema_update", group, count, count * n, label, mode, e_bytes, ema)
        del x, upd, codes, scales, out_f
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------- Adam epilogue on params
    for (m, n_), count in sorted(shapes.param_groups.items()):
        group = f"{count}x({m}x{n_})"
        numel = m * n_
        for pdt in args.param_dtypes:
            dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[pdt]
            gen = torch.Generator(device=device).manual_seed(1)
            p = torch.randn((count, m, n_), device=device, generator=gen).to(dt)
            g = torch.randn((count, m, n_), device=device, generator=gen).to(dt)
            pc = torch.randn((count, m, n_), device=device, generator=gen)
            mom = torch.zeros((count, m, n_), device=device)
            vel = torch.zeros((count, m, n_), device=device)
            eb = _elem_bytes(dt)
            # read p, g, precond, m, v; write p, m, v
            nbytes = count * numel * (2 * eb + eb + 4 + 4 * 4)
            lr = torch.tensor(1e-4, device=device)
            stp = torch.tensor(10, device=device)
            blend = torch.tensor(0.5, device=device)
            for label, backend, size in variants("adam"):
                configure("adam", size)
                for mode in modes:
                    rows = [slice(None)] if mode == "grouped" else [slice(i, i + 1)
                                                                      for i in range(count)]

                    def adam(rows=rows, backend=backend):
                        for r in rows:
                            adam_epilogue(p[r], g[r], mom[r], vel[r], lr=lr, beta1=0.9,
                                          beta2=0.999, eps=1e-8, weight_decay=0.01, step=stp,
                                          precond=pc[r], blend=blend, backend=backend)

                    record(f"adam_epilogue({pdt} param)", group, count, count * numel,
                           label, mode, nbytes, adam)
            if args.int8_moments:
                # moments as block-wise int8 (m and sqrt(v)), codes shaped (count, m*n)
                nbm = n_blocks(numel, bs)
                m8 = (torch.zeros((count, numel), dtype=torch.int8, device=device),
                      torch.zeros((count, nbm), device=device))
                v8 = (torch.zeros((count, numel), dtype=torch.int8, device=device),
                      torch.zeros((count, nbm), device=device))
                # read p, g, precond, codes x2, scales x2; write p, codes x2, scales x2
                nbytes8 = count * (numel * (2 * eb + eb + 4 + 2 * 2) + nbm * 4 * 4)
                for label, backend, size in variants("codec"):
                    configure("codec", size)
                    for mode in modes:
                        rows = [slice(None)] if mode == "grouped" else [
                            slice(i, i + 1) for i in range(count)]

                        def adam8(rows=rows, backend=backend):
                            for r in rows:
                                adam_epilogue(p[r], g[r], (m8[0][r], m8[1][r]),
                                              (v8[0][r], v8[1][r]), lr=lr, beta1=0.9,
                                              beta2=0.999, eps=1e-8, weight_decay=0.01,
                                              step=stp, precond=pc[r], blend=blend,
                                              moment_block_size=bs, seed=stp, backend=backend)

                        record(f"adam_epilogue({pdt}, int8 m/v)", group, count, count * numel,
                               label, mode, nbytes8, adam8)
                del m8, v8
            del p, g, pc, mom, vel
            if device.type == "cuda":
                torch.cuda.empty_cache()



def _summary(results: Sequence[BenchResult]) -> dict:
    """Per kernel and backend: the grouped run's bandwidth fraction (elementwise worst) and
    the loop/grouped time ratio."""
    out: dict = {}
    by = {(r.kernel, r.group, r.backend, r.mode): r for r in results}
    for r in results:
        if r.mode != "grouped" or r.ms is None:
            continue
        key = f"{r.kernel} [{r.backend}]"
        entry = out.setdefault(key, {"min_pct_copy_bw": None, "loop_over_grouped": []})
        if r.pct_copy_bw is not None:  # None for the whole step (no byte count)
            pct = entry["min_pct_copy_bw"]
            entry["min_pct_copy_bw"] = r.pct_copy_bw if pct is None else min(pct, r.pct_copy_bw)
        loop = by.get((r.kernel, r.group, r.backend, "loop"))
        if loop is not None and loop.ms is not None:
            entry["loop_over_grouped"].append(round(loop.ms / r.ms, 3))
    return out


_COLS = [("kernel", 28), ("group", 18), ("backend", 14), ("mode", 7), ("ms", 10),
         ("GB/s", 9), ("% copy", 7)]


def _print_header() -> None:
    print("  ".join(f"{name:<{w}}" for name, w in _COLS))
    print("  ".join("-" * w for _, w in _COLS))


def _print_row(r: BenchResult) -> None:
    ms = f"{r.ms:.3f}" if r.ms is not None else "-"
    gb = f"{r.gbps:.1f}" if r.gbps is not None else "-"
    pct = f"{r.pct_copy_bw:.1f}" if r.pct_copy_bw is not None else "-"
    vals = [r.kernel, r.group, r.backend, r.mode, ms, gb, pct]
    line = "  ".join(f"{v:<{w}}" for v, (_, w) in zip(vals, _COLS))
    print(line + (f"  {r.note}" if r.note else ""), flush=True)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _triton_version() -> Optional[str]:
    if not _dispatch.triton_available():
        return None
    try:
        import triton

        return triton.__version__
    except Exception:  # pragma: no cover
        return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scao-fx bench-kernels",
        description="Time the scao_fx kernels (reference vs Triton) on GPT-2-medium-like "
                    "shape groups and compare with the device's copy bandwidth.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backends", default=None,
                   help="comma-separated: reference,triton (default: both on CUDA, "
                        "reference on CPU)")
    p.add_argument("--quick", action="store_true",
                   help="small model (2 layers, d 64, MLP 256) and few repeats")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--d-model", type=int, default=None)
    p.add_argument("--d-mlp", type=int, default=None)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--param-dtypes", default="fp32,bf16",
                   help="parameter dtypes for the Adam epilogue (fp32,bf16)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--copy-mb", type=int, default=None,
                   help="size of the copy-bandwidth probe in MiB")
    p.add_argument("--no-loop", action="store_true", help="skip the per-layer loop runs")
    p.add_argument("--no-int8-moments", dest="int8_moments", action="store_false",
                   help="skip the Adam epilogue with 8-bit moments")
    p.add_argument("--codec-tiles", default="",
                   help="Triton codec/EMA tile sizes to sweep, e.g. 1024,2048,4096 (default: "
                        "the configured one, SCAO_FX_CODEC_TILE or 2048)")
    p.add_argument("--adam-blocks", default="",
                   help="Triton Adam block sizes to sweep, e.g. 1024,2048,4096")
    p.add_argument("--allow-interpreter", action="store_true",
                   help="also time the Triton interpreter on the CPU (not meaningful)")
    p.add_argument("--no-kernels", dest="kernels", action="store_false",
                   help="skip the per-kernel rows (only the whole step)")
    p.add_argument("--no-step", dest="step", action="store_false",
                   help="skip the whole-optimizer-step section")
    p.add_argument("--step-layers", type=int, default=None,
                   help=f"layers of the whole-step model (default 24 on CUDA; on the CPU "
                        f"reduced to {CPU_STEP_LAYERS}, about 2.5 minutes on 2 cores: "
                        f"--step-layers 24 for the full model; --quick: --layers)")
    p.add_argument("--step-precond-freq", type=int, default=10,
                   help="precond_freq of the whole step: steps per refresh window (>= 2)")
    p.add_argument("--step-windows", type=int, default=None,
                   help="refresh windows timed per mode (default 5 on CUDA, 1 on the CPU, "
                        "2 with --quick)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar (tqdm) for the whole step")
    p.add_argument("--json", dest="json_path", default=None, help="write results as JSON")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    if args.quick:
        defaults = dict(layers=2, d_model=64, d_mlp=256, warmup=1, repeats=3,
                        copy_mb=256 if cuda else 64)
    else:
        defaults = dict(layers=24, d_model=1024, d_mlp=4096, warmup=3, repeats=10,
                        copy_mb=1024 if cuda else 256)
    defaults["step_windows"] = 2 if args.quick else 5 if cuda else 1
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.step_layers is None:
        args.step_layers = args.layers if args.quick else 24 if cuda else CPU_STEP_LAYERS
    if args.backends is None:
        args.backends = "reference,triton" if cuda else "reference"
    args.param_dtypes = [s.strip() for s in args.param_dtypes.split(",") if s.strip()]
    args.codec_tiles = [int(v) for v in args.codec_tiles.split(",") if v.strip()]
    args.adam_blocks = [int(v) for v in args.adam_blocks.split(",") if v.strip()]
    for v in args.codec_tiles + args.adam_blocks:
        if v < 16 or v & (v - 1):
            raise SystemExit(f"tile/block sizes must be powers of two >= 16, got {v}")
    if args.step_precond_freq < 2 or args.step_layers < 1 or args.step_windows < 1:
        raise SystemExit("--step-precond-freq must be >= 2, --step-layers and --step-windows "
                         ">= 1")
    for s in args.param_dtypes:
        if s not in ("fp32", "bf16"):
            raise SystemExit(f"unknown param dtype {s!r} (fp32, bf16)")
    t0 = time.perf_counter()
    saved = None
    if args.codec_tiles or args.adam_blocks:
        from ..kernels import _triton

        saved = (_triton.CODEC_TILE, _triton.ADAM_BLOCK)
    try:
        report = run(args)
    finally:
        if saved is not None:
            _triton.CODEC_TILE, _triton.ADAM_BLOCK = saved
    report["wall_s"] = time.perf_counter() - t0
    print("# summary (grouped: worst % of copy bandwidth; loop/grouped time ratios):")
    for k, v in report["summary"].items():
        pct = v["min_pct_copy_bw"]
        pct = "-" if pct is None else f"{pct:.1f} %"
        print(f"#   {k}: {pct}; loop/grouped {v['loop_over_grouped']}")
    print(f"# wall time {report['wall_s']:.1f} s")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(report, f, indent=2)
        print(f"# wrote {args.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
