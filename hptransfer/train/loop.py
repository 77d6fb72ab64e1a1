"""One training run into one run folder: config.yaml, metrics.jsonl, heartbeat.json, result.json.

A diverged run is a result (status `diverged`), an exception is a result (`failed`, with the
traceback); result.json is written once, atomically. Periodic checkpoints let a requeued job
resume where it stopped, seeing the same batches (they depend on seed and step only).
"""

import json
import math
import os
import platform
import socket
import sys
import time
import traceback
from contextlib import nullcontext, suppress
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

import hptransfer
from hptransfer.config.derived import FLOPS_FORMULA, steps_of, train_flops
from hptransfer.config.frozen import load_yaml, run_id, to_yaml
from hptransfer.errors import HptError
from hptransfer.files import DISK_FULL_EXIT, append_lines, disk_full, write_atomic, write_json_atomic
from hptransfer.provenance import git_state
from hptransfer.train.data import Batches, make_batches
from hptransfer.train.optim import lr_factor, set_lr
from hptransfer.train.rules import apply_rules
from hptransfer.train.step import clipped_steps, evaluate, pick_device, setup, train_step
from hptransfer.train.trackers import Trackers


def environment(device: torch.device) -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "hptransfer": hptransfer.__version__,
        "python": platform.python_version(),
        "host": socket.gethostname(),
        **git_state(),
    }


def _finite_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def train_folder(run_dir: Path, *, progress: bool = False) -> dict[str, Any]:
    """What a job runs: train the frozen config in `run_dir/config.yaml`. Never raises for a bad run."""
    run_dir = Path(run_dir)
    try:
        cfg = load_yaml(run_dir / "config.yaml")
    except HptError as err:
        return _write_failed(run_dir, None, err, sweep=run_dir.parent.name)
    try:
        return train(cfg, run_dir, progress=progress, sweep=run_dir.parent.name, raise_bad_input=False)
    except Exception as err:  # a full disk is no result: the job exits DISK_FULL_EXIT, to be resumed later
        if not disk_full(err):
            raise
        with suppress(OSError):
            print(f"hpt: {err}", file=sys.stderr, flush=True)
        raise SystemExit(DISK_FULL_EXIT) from None


def _write_failed(run_dir: Path, cfg: DictConfig | None, err: BaseException, sweep: str | None) -> dict:
    result = {
        "run_id": run_id(cfg) if cfg is not None else run_dir.name,
        "sweep": sweep,
        "status": "failed",
        "error": f"{type(err).__name__}: {err}\n{''.join(traceback.format_exception(err))}",
        "final_train_loss": None,
        "final_val_loss": None,
        "diverged_at_step": None,
        "env": environment(torch.device("cpu")),
    }
    write_json_atomic(run_dir / "result.json", result)
    return result


def train(cfg: DictConfig, run_dir: Path, *, progress: bool = True, sweep: str | None = None,
          raise_bad_input: bool = True) -> dict[str, Any]:
    """Train `cfg` into `run_dir` and return the result record (also written to result.json).

    A finished folder is never trained again: its result is returned as it is.
    """
    run_dir = Path(run_dir)
    rid = run_id(cfg)
    frozen, done = run_dir / "config.yaml", run_dir / "result.json"
    if frozen.exists() and run_id(load_yaml(frozen)) != rid:
        raise HptError(f"{run_dir} holds a different run's config.yaml: choose another --run-dir")
    if done.exists():
        return json.loads(done.read_text())
    # HPT_LOG_TO, never the config: `hpt train` stops on a bad tracker before writing, a job warns and trains.
    tracked = Trackers.from_env(strict=raise_bad_input)
    try:
        # Bad input (missing data, no GPU) is found before anything is written for `hpt train`.
        batches, device = make_batches(cfg, scan_tokens=raise_bad_input), pick_device(cfg)
    except HptError as err:
        if raise_bad_input:
            raise
        return _write_failed(run_dir, cfg, err, sweep)
    if not frozen.exists():
        write_atomic(frozen, to_yaml(cfg))
    result = None
    try:
        result = _train(cfg, run_dir, rid, batches, device, tracked, progress=progress, sweep=sweep)
    except Exception as err:  # a crash in training is a result, with its traceback
        if disk_full(err):  # but a full disk is not the run's fault: no result, the run resumes later
            raise
        result = _write_failed(run_dir, cfg, err, sweep)
    finally:
        tracked.close(result["status"] if result else None)  # None: the attempt was cut (preempted, killed)
    return result


def _train(cfg: DictConfig, run_dir: Path, rid: str, batches: Batches, device: torch.device, tracked: Trackers, *,
           progress: bool, sweep: str | None) -> dict[str, Any]:
    t_start = time.time()
    eff, effective = apply_rules(cfg)
    s = setup(eff, device)
    model, opt = s.model, s.opt
    total = steps_of(cfg.train)
    step0, losses, initial, vals = 0, [], None, []  # vals: the periodic evaluations so far, [step, val_loss]
    ckpt = run_dir / "checkpoint.pt"
    metrics = run_dir / "metrics.jsonl"
    if ckpt.exists():  # resume after requeue: same model, optimizer, and step
        state = torch.load(ckpt, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step0, losses, initial = state["step"], state["losses"], state["initial"]
        s.clipped.fill_(state.get("clipped", 0))  # a checkpoint written before clip counting: from 0
        vals = [tuple(v) for v in state.get("vals", [])]  # a checkpoint written before periodic evaluations: none
    # The loss curve on disk holds exactly the steps before step0 (a killed attempt may have logged more).
    write_atomic(metrics, _metric_lines(0, losses, vals))
    tracked.start(run_dir, cfg, rid, sweep, step0)
    eval_every, new_vals = cfg.train.eval_every, []
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
    pending: list[torch.Tensor] = []  # losses still on the device: read back only at log steps
    status, diverged_at = "completed", None
    t_train = time.time()
    bar = _progress(progress)
    step, last_ckpt = step0, step0
    with bar or nullcontext():
        task = bar.add_task("train", total=total, completed=step0, loss=float("nan"), tps=0.0) if bar else None
        for step in range(step0, total):
            set_lr(opt, factor := lr_factor(step, total, eff))
            pending.append(train_step(s, *batches.train_batch(step, device)))
            last = step == total - 1
            if eval_every and (step + 1) % eval_every == 0 and not last:  # the last step's is the final evaluation
                new_vals.append((step + 1, _finite_or_none(evaluate(s, batches, cfg.train.eval_batches))))
            if (step + 1) % cfg.train.log_every and not last:
                continue
            new = torch.stack(pending).double().tolist()
            first = step + 1 - len(new)
            pending.clear()
            losses.extend(new)
            initial = new[0] if initial is None else initial
            bad = [i for i, v in enumerate(new) if not math.isfinite(v) or v > cfg.train.diverge_factor * initial]
            if bad:  # a diverged run's evaluations stop before its diverged step
                new_vals = [(at, v) for at, v in new_vals if at < first + bad[0]]
            vals.extend(new_vals)
            append_lines(metrics, _metric_lines(first, new, new_vals))  # on a fresh line, whole lines or none
            elapsed = time.time() - t_train
            tps = (step + 1 - step0) * tokens_per_step / max(elapsed, 1e-9)
            if tracked:
                tracked.log([*((first + i, {"train/loss": v}) for i, v in enumerate(new)),
                             (step, {"train/lr": eff.optim.lr * factor, "train/tokens_per_s": tps}),
                             *((at, {"val/loss": v}) for at, v in new_vals)])
            new_vals = []
            write_json_atomic(run_dir / "heartbeat.json", {"pid": os.getpid(), "host": socket.gethostname(),
                                                           "step": step + 1, "time": time.time()})
            if bar:
                bar.update(task, completed=step + 1, loss=new[-1], tps=tps)
            if bad:
                status, diverged_at = "diverged", first + bad[0]
                break
            every = cfg.train.checkpoint_every
            if every and step + 1 - last_ckpt >= every and not last:  # only at log steps: losses are complete
                _save_checkpoint(ckpt, model, opt, step + 1, losses, initial, clipped_steps(s) or 0, vals)
                last_ckpt = step + 1
    steps_done = step + 1
    train_s = time.time() - t_train
    clipped = clipped_steps(s)
    val = evaluate(s, batches, cfg.train.val_batches) if status == "completed" else None
    window = losses[: len(losses) if diverged_at is None else diverged_at][-cfg.train.final_window :]
    n_params = sum(p.numel() for p in model.parameters())
    n_emb = sum(p.numel() for n, p in model.named_parameters() if s.specs[n].cls == "E")
    tokens = steps_done * tokens_per_step
    d = model.dims
    result = {
        "run_id": rid,
        "sweep": sweep,
        "status": status,
        "final_train_loss": _finite_or_none(sum(window) / len(window)) if window else None,
        "final_val_loss": _finite_or_none(val),
        "steps": steps_done,
        "tokens": tokens,
        "batch_size": cfg.train.batch_size,
        "seq_len": cfg.train.seq_len,
        "n_params": n_params,
        "n_params_non_embedding": n_params - n_emb,
        "flops": train_flops(n_params - n_emb, d.n_layers, d.width, cfg.train.seq_len, tokens),
        "flops_formula": FLOPS_FORMULA,
        "wall_s": time.time() - t_start,
        "tokens_per_s": (steps_done - step0) * tokens_per_step / max(train_s, 1e-9),
        "diverged_at_step": diverged_at,
        "clip_fraction": None if clipped is None else clipped / steps_done,
        "initial_loss": _finite_or_none(initial),
        "effective": effective,
        "env": environment(device),
    }
    if val is not None:
        append_lines(metrics, json.dumps({"step": steps_done, "val_loss": result["final_val_loss"]}) + "\n")
        tracked.log([(steps_done, {"val/loss": result["final_val_loss"]})])
    write_json_atomic(run_dir / "result.json", result)
    ckpt.unlink(missing_ok=True)
    return result


def _save_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, step: int,
                     losses: list[float], initial: float | None, clipped: int, vals: list) -> None:
    tmp = path.with_suffix(".tmp")
    try:  # through a Python file: a full disk then surfaces as the OSError behind torch's RuntimeError
        with open(tmp, "wb") as f:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "losses": losses,
                        "initial": initial, "clipped": clipped, "vals": vals}, f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # no half checkpoint left behind
        raise


def _metric_lines(first: int, losses: list[float], vals: list[tuple[int, float | None]]) -> str:
    """metrics.jsonl's lines for the training losses from step `first` on, each evaluation {step: s, val_loss}
    right after the training step s - 1 it follows (so a resumed run rewrites its file as it was written)."""
    after: dict[int, list[str]] = {}
    for at, v in vals:
        after.setdefault(at - 1, []).append(json.dumps({"step": at, "val_loss": v}) + "\n")
    return "".join(json.dumps({"step": first + i, "loss": v if math.isfinite(v) else None}) + "\n"
                   + "".join(after.get(first + i, ())) for i, v in enumerate(losses))


def _progress(enabled: bool):  # noqa: ANN202
    if not enabled:
        return None
    # here: only an interactive `hpt train` draws a bar
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
        TimeRemainingColumn(), transient=False,
    )
