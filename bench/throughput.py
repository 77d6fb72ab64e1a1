"""Training-step throughput: tokens/s, achieved FLOP/s and MFU, one line per variant.

The model, optimizer, batches and schedule are built exactly as `hpt train` builds them
(config.compose_run, rules.apply_rules, model.build, optim.build_optimizer, data.make_batches),
and the timed step is the training loop's step. Each variant runs warm-up windows first (the
compile happens there), then `--windows` timed windows of `--steps` steps; the figure is the
median window. Losses stay on the device inside a window and are read back at its end, as the
training loop reads them back only at logging steps.

Examples:
  python bench/throughput.py                                   # small CPU config, eager and compile
  python bench/throughput.py --device cuda --width 768 --n-layers 12 --seq-len 1024 --batch-size 16 \\
      model.head_dim=64 data.vocab_size=50304                  # GPT-2 small shape, all four variants
"""

import argparse
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from hptransfer.config.compose import compose_run
from hptransfer.config.derived import FLOPS_FORMULA, steps_of, train_flops
from hptransfer.errors import HptError
from hptransfer.train.data import make_batches
from hptransfer.train.model import build
from hptransfer.train.optim import lr_factor, set_lr
from hptransfer.train.rules import apply_rules
from hptransfer.train.step import pick_device, setup, train_step

VARIANTS = ("eager-fp32", "compile-fp32", "eager-bf16", "compile-bf16")


@dataclass(frozen=True)
class Peak:
    """Approximate vendor dense peaks in TFLOP/s (no sparsity): bf16 tensor cores, and plain FP32.

    The fp32 variants run true FP32 matmuls (PyTorch's default float32 matmul precision is
    'highest': no TF32, and the training loop does not change it), so they are measured
    against the FP32 (non-tensor-core) peak, not TF32.
    """

    bf16: float
    fp32: float


# First substring match of the CUDA device name wins: specific names before general ones.
PEAKS: tuple[tuple[str, Peak], ...] = (
    ("H200", Peak(bf16=989.0, fp32=67.0)),       # H200 SXM: same compute as H100 SXM
    ("H100 PCIe", Peak(bf16=756.0, fp32=51.0)),
    ("H100", Peak(bf16=989.0, fp32=67.0)),       # H100 SXM ("NVIDIA H100 80GB HBM3")
    ("A100", Peak(bf16=312.0, fp32=19.5)),
    ("L40S", Peak(bf16=362.0, fp32=91.6)),
    ("4090", Peak(bf16=165.0, fp32=82.6)),       # bf16 with FP32 accumulate
    ("V100", Peak(bf16=125.0, fp32=15.7)),       # no bf16 tensor cores: its fp16 peak
)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    # The load says how much of the CPU other processes took: on a shared machine the figures move with it.
    threads = f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}"
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return f"CPU {line.split(':', 1)[1].strip()}, {threads}"
    return f"CPU, {threads}"


def peak_flops(name: str, bf16: bool, given_tflops: float | None) -> float | None:
    """Peak FLOP/s for MFU: the one given, else the table's for a known GPU, else None (CPU: MFU n/a)."""
    if given_tflops is not None:
        return given_tflops * 1e12
    for key, peak in PEAKS:
        if key in name:
            return (peak.bf16 if bf16 else peak.fp32) * 1e12
    return None


def sizes(model: torch.nn.Module, specs: dict, cfg: DictConfig) -> tuple[int, int, int]:
    """(parameters, parameters except embeddings, training FLOPs of one step by FLOPS_FORMULA)."""
    n_params = sum(p.numel() for p in model.parameters())
    n_non_emb = n_params - sum(p.numel() for n, p in model.named_parameters() if specs[n].cls == "E")
    d, t = model.dims, cfg.train
    return n_params, n_non_emb, train_flops(n_non_emb, d.n_layers, d.width, t.seq_len, t.batch_size * t.seq_len)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_variant(overrides: list[str], variant: str, steps: int, windows: int, warmup: int,
                  given_tflops: float | None) -> str:
    """Time one variant; returns its report line."""
    mode, dtype = variant.split("-")
    n_windows = warmup + windows
    cfg = compose_run([*overrides, f"train.compile={mode == 'compile'}",
                       f"train.dtype={'bfloat16' if dtype == 'bf16' else 'float32'}",
                       f"train.steps={n_windows * steps}"])
    # As the training loop does: rules, then train.step's setup and step.
    device = pick_device(cfg)
    eff, _ = apply_rules(cfg)
    batches = make_batches(cfg)
    torch._dynamo.reset()  # each compile variant compiles afresh, not as a recompile of the last
    s = setup(eff, device)
    total = steps_of(cfg.train)

    times, warm_s, last_loss = [], 0.0, float("nan")
    for w in range(n_windows):
        sync(device)
        t0 = time.perf_counter()
        pending: list[torch.Tensor] = []
        for step in range(w * steps, (w + 1) * steps):
            # The training loop's step, without its logging.
            set_lr(s.opt, lr_factor(step, total, eff))
            pending.append(train_step(s, *batches.train_batch(step, device)))
        last_loss = pending[-1].item()  # the host sync: a logging step
        sync(device)
        elapsed = time.perf_counter() - t0
        if w < warmup:
            warm_s += elapsed
        else:
            times.append(elapsed)

    window_s = statistics.median(times)
    flops_per_s = sizes(s.model, s.specs, cfg)[2] * steps / window_s
    tokens = steps * cfg.train.batch_size * cfg.train.seq_len
    peak = peak_flops(device_name(device), dtype == "bf16", given_tflops)
    mfu = f"{100 * flops_per_s / peak:5.1f}%" if peak else "  n/a"
    spread = f"{min(times) / window_s:.2f}-{max(times) / window_s:.2f}x"
    return (f"{variant:<13} {tokens / window_s:>12,.0f} tok/s  {flops_per_s / 1e12:8.3f} TFLOP/s  MFU {mfu}  "
            f"{1e3 * window_s / steps:8.1f} ms/step  (windows {spread} of median, warm-up {warm_s:.1f} s, "
            f"loss {last_loss:.3f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--n-layers", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--param", default="sp", help="parameterization preset (default: sp)")
    ap.add_argument("--steps", type=int, default=10, help="training steps per timed window (default: 10)")
    ap.add_argument("--windows", type=int, default=5, help="timed windows; the median is reported (default: 5)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed windows first, compile included (default: 2)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--variants", default=None,
                    help=f"comma-separated, from {','.join(VARIANTS)} "
                         "(default: all four on CUDA, the fp32 two on CPU)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads (torch.set_num_threads; default: torch's, one per core)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="peak TFLOP/s for MFU (default: from the GPU name; none on CPU)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model.mlp=swiglu model.head_dim=64")
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    overrides = [f"model.width={args.width}", f"model.n_layers={args.n_layers}", f"train.seq_len={args.seq_len}",
                 f"train.batch_size={args.batch_size}", f"param={args.param}", f"train.device={args.device}",
                 *args.overrides]
    try:  # bad flags or overrides fail here, in one line, before any timing
        cfg = compose_run(overrides)
        device = pick_device(cfg)
    except HptError as err:
        ap.error(str(err))
    on_cuda = device.type == "cuda"
    variants = args.variants.split(",") if args.variants else list(VARIANTS if on_cuda else VARIANTS[:2])
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        ap.error(f"unknown variants {', '.join(unknown)} (choose from {', '.join(VARIANTS)})")

    n_params, n_non_emb, flops = sizes(*build(cfg), cfg)
    print(f"device: {device_name(device)}; torch {torch.__version__}")
    m, t = cfg.model, cfg.train
    print(f"model: {cfg.param.name}, width {m.width}, {m.n_layers} layers, seq {t.seq_len}, batch {t.batch_size} "
          f"({t.batch_size * t.seq_len:,} tokens/step), {n_params / 1e6:.2f}M params "
          f"({n_non_emb / 1e6:.2f}M non-embedding), {flops / 1e9:.2f} GFLOP/step")
    print(f"FLOPs: {FLOPS_FORMULA}; median of {args.windows} windows x {args.steps} steps after {args.warmup} warm-up")
    for v in variants:
        print(bench_variant(overrides, v, args.steps, args.windows, args.warmup, args.peak_tflops), flush=True)


if __name__ == "__main__":
    main()
