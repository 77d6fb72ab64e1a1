"""One training run into one run folder: config.yaml, metrics.jsonl, heartbeat.json, result.json.

A diverged run is a result (status `diverged`), an exception is a result (`failed`, with the
traceback); result.json is written once, atomically. Periodic checkpoints let a requeued job
resume where it stopped, seeing the same batches (they depend on seed and step only).

A run of several processes (dist.py: torchrun, `hpt train --nproc N`, or the tasks of a SLURM job) trains
the same global batches on every rank; rank 0 alone writes the run folder, every other rank r its
heartbeat-rank<r>.json, and every rank returns the result. `python -m hptransfer.train.loop RUN_DIR` is one
such process of `hpt train --nproc N`.
"""

import json
import math
import os
import platform
import shutil
import socket
import sys
import time
import traceback
from contextlib import nullcontext, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

import hptransfer
from hptransfer.config.derived import FLOPS_FORMULA, steps_of, train_flops
from hptransfer.config.frozen import load_yaml, run_id, to_yaml
from hptransfer.config.schema import check_processes
from hptransfer.errors import HptError
from hptransfer.files import (
    DISK_FULL_EXIT,
    append_lines,
    disk_full,
    exit_process,
    read_json,
    signals_deferred,
    write_atomic,
    write_json_atomic,
)
from hptransfer.provenance import git_state
from hptransfer.train.data import Batches, make_batches
from hptransfer.train.dist import (
    SINGLE,
    World,
    broadcast,
    check_nproc,
    die_with_launcher,
    global_mean,
    launch,
    load_sharded,
    process_group,
    save_sharded,
)
from hptransfer.train.optim import lr_factor, set_lr
from hptransfer.train.rules import apply_rules
from hptransfer.train.step import Setup, clipped_steps, evaluate, pick_device, setup, train_step
from hptransfer.train.trackers import Trackers

SHARDED = "checkpoint"  # a distributed run's checkpoints: a folder of shards (dist.save_sharded)


@dataclass
class LoopState:
    """What a checkpoint holds besides the model and optimizer: where the loop was, and what it logged."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    initial: float | None = None
    clipped: int = 0  # a checkpoint written before clip counting: 0
    vals: list[tuple[int, float | None]] = field(default_factory=list)  # the periodic evaluations, [step, val_loss]


def environment(device: torch.device, processes: int = 1) -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "processes": processes,  # tokens_per_s is theirs together
        "hptransfer": hptransfer.__version__,
        "python": platform.python_version(),
        "host": socket.gethostname(),
        **git_state(),
    }


def _finite_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def train_folder(run_dir: Path, *, progress: bool = False, in_sweep: bool = True) -> dict[str, Any]:
    """What a job runs: train the frozen config in `run_dir/config.yaml`. Never raises for a bad run.

    `in_sweep`: the folder is a run of its parent folder's sweep (a job's); False: a lone run (`hpt train`).
    """
    run_dir = Path(run_dir)
    sweep, world = run_dir.parent.name if in_sweep else None, SINGLE
    try:
        world = World.from_env()
        cfg = load_yaml(run_dir / "config.yaml")
    except HptError as err:
        return _failed(run_dir, None, err, sweep, world)
    try:
        return train(cfg, run_dir, progress=progress, sweep=sweep, raise_bad_input=False)
    except Exception as err:  # a full disk is no result: the job exits DISK_FULL_EXIT, to be resumed later
        if not disk_full(err):
            raise
        with suppress(OSError):
            print(f"hpt: {err}", file=sys.stderr, flush=True)
        raise SystemExit(DISK_FULL_EXIT) from None


def _failed(run_dir: Path, cfg: DictConfig | None, err: BaseException, sweep: str | None, world: World) -> dict:
    """The failed result of `err`. Rank 0 writes it, with the errors other ranks reported first (theirs are
    the cause when a peer's death broke rank 0's collective); another rank prints its error and leaves it
    in its heartbeat file, for rank 0 to find."""
    error = f"{type(err).__name__}: {err}\n{''.join(traceback.format_exception(err))}"
    if not world.is_main:
        _heartbeat(run_dir, world, None, error=error)
        with suppress(OSError):
            print(f"hpt: rank {world.rank}: {error}", file=sys.stderr, flush=True)
    else:
        peers = [(int(f.stem.removeprefix("heartbeat-rank")), hb["error"]) for f in run_dir.glob("heartbeat-rank*.json")
                 if (hb := read_json(f)) and hb.get("error")]
        error = "".join(f"rank {r}: {e}\n" for r, e in sorted(peers)) + (f"rank 0: {error}" if peers else error)
    result = {
        "run_id": run_id(cfg) if cfg is not None else run_dir.name,
        "sweep": sweep,
        "status": "failed",
        "error": error,
        "final_train_loss": None,
        "final_val_loss": None,
        "diverged_at_step": None,
        "env": environment(torch.device("cpu"), world.world_size),
    }
    if world.is_main:
        write_json_atomic(run_dir / "result.json", result)
    return result


def _heartbeat(run_dir: Path, world: World, step: int | None, **extra: str) -> None:
    """Rank 0's heartbeat.json, rank r's heartbeat-rank<r>.json: every process's liveness, at the same steps."""
    name = "heartbeat.json" if world.is_main else f"heartbeat-rank{world.rank}.json"
    write_json_atomic(run_dir / name, {"pid": os.getpid(), "host": socket.gethostname(), "step": step,
                                       "time": time.time(), **extra})


def _checked(cfg: DictConfig, processes: int, *, scan_tokens: bool) -> tuple[Batches, torch.device]:
    """What a run is checked for before anything is written: its data, its device, the split of its batch over
    `processes` x train.grad_accum micro-batches. An HptError naming the problem."""
    batches, device = make_batches(cfg, scan_tokens=scan_tokens), pick_device(cfg)
    check_processes(cfg.train, processes)
    return batches, device


def _cached(cfg: DictConfig, run_dir: Path) -> dict[str, Any] | None:
    """A finished folder's result (never trained again); an HptError when the folder holds another run."""
    frozen, done = run_dir / "config.yaml", run_dir / "result.json"
    if frozen.exists() and run_id(load_yaml(frozen)) != run_id(cfg):
        raise HptError(f"{run_dir} holds a different run's config.yaml: choose another --run-dir")
    return json.loads(done.read_text()) if done.exists() else None


def train(cfg: DictConfig, run_dir: Path, *, progress: bool = True, sweep: str | None = None,
          raise_bad_input: bool = True) -> dict[str, Any]:
    """Train `cfg` into `run_dir` and return the result record (also written to result.json).

    A finished folder is never trained again: its result is returned as it is. Run on every process of a
    distributed run (the environment says which: dist.World), it trains this rank's share.
    """
    run_dir = Path(run_dir)
    rid = run_id(cfg)
    if (cached := _cached(cfg, run_dir)) is not None:
        return cached
    # HPT_LOG_TO, never the config: `hpt train` stops on a bad tracker before writing, a job warns and trains.
    tracked = Trackers.from_env(strict=raise_bad_input)
    world = SINGLE
    try:
        # Bad input (missing data, no GPU, an uneven split) is found before anything is written for `hpt train`.
        world = World.from_env()
        batches, device = _checked(cfg, world.world_size, scan_tokens=raise_bad_input)
    except HptError as err:
        if raise_bad_input:
            raise
        return _failed(run_dir, cfg, err, sweep, world)
    if world.is_main and not (frozen := run_dir / "config.yaml").exists():
        write_atomic(frozen, to_yaml(cfg))
    result = None
    try:
        with process_group(world, device, cfg.train.dist_timeout_s) as device:
            try:
                result = _train(cfg, run_dir, rid, batches, device, world, tracked, progress=progress, sweep=sweep)
            except Exception as err:  # a crash in training is a result, with its traceback
                if disk_full(err):  # but a full disk is not the run's fault: no result, the run resumes later
                    raise
                # Recorded while this rank's group is up: a peer whose collective its exit breaks finds it.
                result = _failed(run_dir, cfg, err, sweep, world)
    finally:
        tracked.close(result["status"] if result else None)  # None: the attempt was cut (preempted, killed)
    return result


def train_local(cfg: DictConfig, run_dir: Path, nproc: int, *, progress: bool = True) -> dict[str, Any]:
    """`hpt train --nproc N`: check `cfg` as `train` does, write its config.yaml, and train it as `nproc` processes
    on this machine (dist.launch). The result rank 0 wrote; when they ended without one (killed), a failed
    record that is not written, so that the same command resumes from the last checkpoint."""
    run_dir = Path(run_dir)
    if (cached := _cached(cfg, run_dir)) is not None:
        return cached
    Trackers.from_env(strict=True)  # a bad HPT_LOG_TO stops here; rank 0 opens the trackers
    check_nproc(nproc, pick_device(cfg))
    _checked(cfg, nproc, scan_tokens=True)
    if not (frozen := run_dir / "config.yaml").exists():
        write_atomic(frozen, to_yaml(cfg))
    code = launch(nproc, ["-m", "hptransfer.train.loop", str(run_dir), *(["--progress"] if progress else [])])
    if (result := read_json(run_dir / "result.json")) is not None:
        return result
    return {"run_id": run_id(cfg), "status": "failed",
            "error": f"the {nproc} training processes ended with exit code {code} and no result (their output is "
                     f"above): the same command resumes from the last checkpoint"}


def _train(cfg: DictConfig, run_dir: Path, rid: str, batches: Batches, device: torch.device, world: World,
           tracked: Trackers, *, progress: bool, sweep: str | None) -> dict[str, Any]:
    t_start = time.time()
    eff, effective = apply_rules(cfg)
    s = setup(eff, device, world=world)
    model = s.model
    total = steps_of(cfg.train)
    state = _load_checkpoint(run_dir, s)  # resume after requeue: same model, optimizer, and step
    step0, losses, initial, vals = state.step, state.losses, state.initial, state.vals
    metrics = run_dir / "metrics.jsonl"
    if world.is_main:
        # The loss curve on disk holds exactly the steps before step0 (a killed attempt may have logged more).
        write_atomic(metrics, _metric_lines(0, losses, vals))
        tracked.start(run_dir, cfg, rid, sweep, step0)
    _heartbeat(run_dir, world, step0)  # a rank's report of a killed attempt's error is gone
    eval_every, new_vals = cfg.train.eval_every, []
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
    pending: list[torch.Tensor] = []  # losses still on the device: read back only at log steps
    status, diverged_at = "completed", None
    t_train = time.time()
    bar = _progress(progress and world.is_main)
    step, last_ckpt = step0, step0
    with bar or nullcontext():
        task = bar.add_task("train", total=total, completed=step0, loss=float("nan"), tps=0.0) if bar else None
        for step in range(step0, total):
            set_lr(s.opt, factor := lr_factor(step, total, eff))
            pending.append(train_step(s, *batches.train_batch(step, s.device, s.rows)))
            last = step == total - 1
            if eval_every and (step + 1) % eval_every == 0 and not last:  # the last step's is the final evaluation
                new_vals.append((step + 1, _finite_or_none(evaluate(s, batches, cfg.train.eval_batches))))
            if (step + 1) % cfg.train.log_every and not last:
                continue
            new = global_mean(torch.stack(pending).double(), world).tolist()  # every rank: the same global losses
            first = step + 1 - len(new)
            pending.clear()
            losses.extend(new)
            initial = new[0] if initial is None else initial
            bad = [i for i, v in enumerate(new) if not math.isfinite(v) or v > cfg.train.diverge_factor * initial]
            if bad:  # a diverged run's evaluations stop before its diverged step
                new_vals = [(at, v) for at, v in new_vals if at < first + bad[0]]
            vals.extend(new_vals)
            elapsed = time.time() - t_train
            tps = (step + 1 - step0) * tokens_per_step / max(elapsed, 1e-9)
            if world.is_main:
                append_lines(metrics, _metric_lines(first, new, new_vals))  # on a fresh line, whole lines or none
                if tracked:
                    tracked.log([*((first + i, {"train/loss": v}) for i, v in enumerate(new)),
                                 (step, {"train/lr": eff.optim.lr * factor, "train/tokens_per_s": tps}),
                                 *((at, {"val/loss": v}) for at, v in new_vals)])
            new_vals = []
            _heartbeat(run_dir, world, step + 1)
            if bar:
                bar.update(task, completed=step + 1, loss=new[-1], tps=tps)
            if bad:
                status, diverged_at = "diverged", first + bad[0]
                break
            every = cfg.train.checkpoint_every
            if every and step + 1 - last_ckpt >= every and not last:  # only at log steps: losses are complete
                _save_checkpoint(run_dir, s, LoopState(step + 1, losses, initial, clipped_steps(s) or 0, vals))
                last_ckpt = step + 1
    steps_done = step + 1
    train_s = time.time() - t_train
    clipped = clipped_steps(s)
    val = evaluate(s, batches, cfg.train.val_batches) if status == "completed" else None
    window = losses[: len(losses) if diverged_at is None else diverged_at][-cfg.train.final_window :]
    n_params = sum(p.numel() for p in model.parameters())  # a DTensor counts its global size
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
        "env": environment(s.device, world.world_size),
    }
    if world.is_main:
        if val is not None:
            append_lines(metrics, json.dumps({"step": steps_done, "val_loss": result["final_val_loss"]}) + "\n")
            tracked.log([(steps_done, {"val/loss": result["final_val_loss"]})])
        write_json_atomic(run_dir / "result.json", result)
        (run_dir / "checkpoint.pt").unlink(missing_ok=True)
        shutil.rmtree(run_dir / SHARDED, ignore_errors=True)
    return broadcast(result, world)  # rank 0's, with its timings and host


def _save_checkpoint(run_dir: Path, s: Setup, state: LoopState) -> None:
    """One process: checkpoint.pt, written whole or not at all. Several: sharded, into checkpoint/.
    A requeue or Ctrl-C arriving meanwhile acts once the checkpoint is written (signals_deferred)."""
    if s.world.distributed:
        with signals_deferred():
            save_sharded(run_dir / SHARDED, state.step, s.model, s.opt, asdict(state), s.world)
        return
    path = run_dir / "checkpoint.pt"
    tmp = path.with_suffix(".tmp")
    try:  # through a Python file: a full disk then surfaces as the OSError behind torch's RuntimeError
        with signals_deferred(), open(tmp, "wb") as f:
            torch.save({"model": s.model.state_dict(), "opt": s.opt.state_dict(), **asdict(state)}, f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # no half checkpoint left behind
        raise
    shutil.rmtree(run_dir / SHARDED, ignore_errors=True)  # a sharded one this run resumed from is older now


def _load_checkpoint(run_dir: Path, s: Setup) -> LoopState:
    """The state to resume from, loaded into the model and optimizer: a sharded checkpoint (any number of
    processes), else checkpoint.pt (one process); a fresh start without either."""
    if (run_dir / SHARDED).is_dir() and (state := load_sharded(run_dir / SHARDED, s.model, s.opt, s.world)):
        loaded = LoopState(**state)
    elif (ckpt := run_dir / "checkpoint.pt").exists():
        if s.world.distributed:
            raise HptError(f"{ckpt} was written by one process: resume it with one, or remove it to train anew")
        state = torch.load(ckpt, map_location=s.device, weights_only=False)
        s.model.load_state_dict(state.pop("model"))
        s.opt.load_state_dict(state.pop("opt"))
        loaded = LoopState(**state)
    else:
        return LoopState()
    s.clipped.fill_(loaded.clipped)
    loaded.vals = [tuple(v) for v in loaded.vals]
    return loaded


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


if __name__ == "__main__":  # one of the processes of `hpt train --nproc N` (dist.launch): the parent checked the run
    die_with_launcher()
    ended = train_folder(Path(sys.argv[1]), progress="--progress" in sys.argv[2:], in_sweep=False)
    exit_process(1 if ended["status"] == "failed" else 0)
