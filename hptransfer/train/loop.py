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
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

import hptransfer
from hptransfer.config.derived import FLOPS_FORMULA, fusion_key, steps_of, train_flops
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
    with _exit_on_full_disk():
        return train(cfg, run_dir, progress=progress, sweep=sweep, raise_bad_input=False)


@contextmanager
def _exit_on_full_disk() -> Iterator[None]:
    """A full disk is no result: the job exits DISK_FULL_EXIT, to be resumed later."""
    try:
        yield
    except Exception as err:
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


def _checked(cfg: DictConfig, processes: int, *, scan_tokens: bool, loaded: dict[str, Batches] | None = None
             ) -> tuple[Batches, torch.device]:
    """What a run is checked for before anything is written: its data, its device, the split of its batch over
    `processes` x train.grad_accum micro-batches. An HptError naming the problem. `loaded`: the batches of data
    sets already loaded (a fused job's runs share one load), by data config and batch shape."""
    if loaded is None:
        batches = make_batches(cfg, scan_tokens=scan_tokens)
    else:
        key = repr((OmegaConf.to_container(cfg.data), cfg.train.batch_size, cfg.train.seq_len))
        if key in loaded:
            batches = replace(loaded[key], seed=cfg.train.seed)
        else:
            batches = loaded[key] = make_batches(cfg, scan_tokens=scan_tokens)
    device = pick_device(cfg)
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


@dataclass
class Member:
    """One run of a training loop, alone or in a fused group: its configs, folder, batches, trackers, model and
    optimizer (`s`), and where it is."""

    cfg: DictConfig
    eff: DictConfig  # the config training uses (after the batch and duration rules)
    effective: dict[str, Any]  # result.json's record of those rules
    run_dir: Path
    rid: str
    sweep: str | None
    batches: Batches
    tracked: Trackers
    s: Setup
    state: LoopState = field(default_factory=LoopState)
    step0: int = 0  # the step it resumed from
    last_ckpt: int = 0
    pending: list[torch.Tensor] = field(default_factory=list)  # losses still on the device: read at log steps
    new_vals: list[tuple[int, float | None]] = field(default_factory=list)
    status: str = "completed"
    diverged_at: int | None = None
    steps_done: int = 0
    stopped: bool = False  # diverged: trains no further
    t_start: float = field(default_factory=time.time)

    def live(self, step: int) -> bool:
        return not self.stopped and step >= self.step0


Stepper = Callable[[int, list[bool]], list[torch.Tensor]]  # (step, live per member) -> each member's loss
Evaluator = Callable[[int], list[float]]  # n batches -> each member's validation loss


def _member(cfg: DictConfig, run_dir: Path, rid: str, batches: Batches, tracked: Trackers, sweep: str | None,
            eff: DictConfig, effective: dict[str, Any], s: Setup) -> Member:
    """A run ready for the loop: resumed from its checkpoint, its curve on disk cut to that step, trackers open."""
    m = Member(cfg, eff, effective, run_dir, rid, sweep, batches, tracked, s, t_start=time.time())
    m.state = _load_checkpoint(run_dir, s)  # resume after requeue: same model, optimizer, and step
    m.step0 = m.last_ckpt = m.state.step
    world = s.world
    if world.is_main:
        # The loss curve on disk holds exactly the steps before step0 (a killed attempt may have logged more).
        write_atomic(run_dir / "metrics.jsonl", _metric_lines(0, m.state.losses, m.state.vals))
        tracked.start(run_dir, cfg, rid, sweep, m.step0)
    _heartbeat(run_dir, world, m.step0)  # a rank's report of a killed attempt's error is gone
    return m


def train_group(run_dirs: list[Path], *, sweep: str | None) -> list[dict[str, Any]]:
    """A fused job: train the frozen configs of these run folders of `sweep` as one batched model
    (train/fused.py), each into its folder exactly as `train_folder` would; returns their results, in order.
    Never raises for a bad run.

    A finished run is not trained again; a run whose config or data is bad gets its failed result alone;
    the rest train in groups of one fusion key (a run alone in its group trains unfused). A crash in a
    group's training is every member's failed result; a full disk stops the job (DISK_FULL_EXIT), to resume later.
    """
    results: dict[Path, dict[str, Any]] = {}
    ready: dict[str | None, list[tuple[Path, DictConfig, Batches, torch.device]]] = {}
    loaded: dict[str, Batches] = {}
    for run_dir in map(Path, run_dirs):
        try:
            cfg = load_yaml(run_dir / "config.yaml")
            if (cached := _cached(cfg, run_dir)) is not None:
                results[run_dir] = cached
                continue
            batches, device = _checked(cfg, 1, scan_tokens=False, loaded=loaded)
        except HptError as err:
            results[run_dir] = _failed(run_dir, None, err, sweep, SINGLE)
            continue
        # train.device is in the key: a group's copies share a device
        ready.setdefault(fusion_key(OmegaConf.to_container(cfg)), []).append((run_dir, cfg, batches, device))
    with _exit_on_full_disk():
        for group in ready.values():
            if len(group) == 1:
                run_dir, cfg, _, _ = group[0]
                results[run_dir] = train(cfg, run_dir, progress=False, sweep=sweep, raise_bad_input=False)
            else:
                results.update(_train_fused(group, sweep))
    return [results[Path(d)] for d in run_dirs]


def _train_fused(group: list[tuple[Path, DictConfig, Batches, torch.device]], sweep: str | None
                 ) -> dict[Path, dict[str, Any]]:
    """Train one fused group (configs of one fusion key, checked) into its members' folders."""
    from hptransfer.train.fused import fuse, fused_evaluate, fused_step  # here: what only a fused job needs

    device = group[0][3]
    tracked = [Trackers.from_env(strict=False) for _ in group]
    members: list[Member] = []
    results: dict[Path, dict[str, Any]] = {}
    try:
        rules = [apply_rules(cfg) for _, cfg, _, _ in group]
        g = fuse([eff for eff, _ in rules], device)
        members = [_member(cfg, run_dir, run_id(cfg), batches, tr, sweep, eff, effective, s)
                   for (run_dir, cfg, batches, _), (eff, effective), tr, s in zip(group, rules, tracked, g.setups,
                                                                                  strict=True)]

        def step_fn(step: int, live: list[bool]) -> list[torch.Tensor]:
            xy = [m.batches.train_batch(step, device) for m in members]
            return list(fused_step(g, torch.stack([x for x, _ in xy]), torch.stack([y for _, y in xy]), live))

        val_batches = members[0].batches  # the validation batches are every run's
        train_s = _loop(members, step_fn, lambda n: fused_evaluate(g, val_batches, n), SINGLE, progress=False)
        vals = fused_evaluate(g, val_batches, group[0][1].train.val_batches)
        for m, val in zip(members, vals, strict=True):
            results[m.run_dir] = _finish(m, val if m.status == "completed" else None, train_s, SINGLE,
                                         fused=len(members))
    except Exception as err:  # a crash in training is a result, with its traceback: every member's
        if disk_full(err):  # but a full disk is not the runs' fault: no result, they resume later
            raise
        for run_dir, cfg, _, _ in group:
            if run_dir not in results:
                results[run_dir] = _failed(run_dir, cfg, err, sweep, SINGLE)
    finally:
        for tr, (run_dir, _, _, _) in zip(tracked, group, strict=True):
            tr.close(results[run_dir]["status"] if run_dir in results else None)
    return results


def _train(cfg: DictConfig, run_dir: Path, rid: str, batches: Batches, device: torch.device, world: World,
           tracked: Trackers, *, progress: bool, sweep: str | None) -> dict[str, Any]:
    eff, effective = apply_rules(cfg)
    m = _member(cfg, run_dir, rid, batches, tracked, sweep, eff, effective, setup(eff, device, world=world))
    s = m.s

    def step_fn(step: int, live: list[bool]) -> list[torch.Tensor]:
        return [train_step(s, *batches.train_batch(step, s.device, s.rows))]

    train_s = _loop([m], step_fn, lambda n: [evaluate(s, batches, n)], world, progress=progress and world.is_main)
    val = evaluate(s, batches, cfg.train.val_batches) if m.status == "completed" else None
    return broadcast(_finish(m, val, train_s, world), world)  # rank 0's, with its timings and host


def _loop(members: list[Member], step_fn: Stepper, eval_fn: Evaluator, world: World, *, progress: bool) -> float:
    """Train the members (one run, or a fused group's: the same steps, batch and logging) to the end, each
    stopping alone where it diverges; returns the seconds the loop took. Losses are read back, checked for
    divergence, logged and checkpointed at log steps only."""
    t = members[0].cfg.train
    total = steps_of(t)
    t_train = time.time()
    bar = _progress(progress and len(members) == 1)
    step = start = min(m.step0 for m in members)
    with bar or nullcontext():
        task = bar.add_task("train", total=total, completed=start, loss=float("nan"), tps=0.0) if bar else None
        for step in range(start, total):
            live = [m.live(step) for m in members]
            for m, on in zip(members, live, strict=True):
                if on:
                    set_lr(m.s.opt, lr_factor(step, total, m.eff))
            for m, on, loss in zip(members, live, step_fn(step, live), strict=True):
                if on:
                    m.pending.append(loss)
            last = step == total - 1
            if t.eval_every and (step + 1) % t.eval_every == 0 and not last:  # the last step's: the final evaluation
                for m, on, v in zip(members, live, eval_fn(t.eval_batches), strict=True):
                    if on:
                        m.new_vals.append((step + 1, _finite_or_none(v)))
            if (step + 1) % t.log_every and not last:
                continue
            for m, on in zip(members, live, strict=True):
                if on:
                    _log_step(m, step, world, time.time() - t_train, last, bar, task)
            if all(m.stopped for m in members):
                break
    for m in members:
        m.steps_done = m.steps_done or step + 1
    return time.time() - t_train


def _log_step(m: Member, step: int, world: World, elapsed: float, last: bool, bar: Any, task: Any) -> None:
    """A log step of one member: its losses since the last one read back (every rank: the same global losses),
    checked for divergence, appended to metrics.jsonl and the trackers; its heartbeat and checkpoint."""
    t, st = m.cfg.train, m.state
    new = global_mean(torch.stack(m.pending).double(), world).tolist()
    first = step + 1 - len(new)
    m.pending.clear()
    st.losses.extend(new)
    st.initial = new[0] if st.initial is None else st.initial
    bad = [i for i, v in enumerate(new) if not math.isfinite(v) or v > t.diverge_factor * st.initial]
    if bad:  # a diverged run's evaluations stop before its diverged step
        m.new_vals = [(at, v) for at, v in m.new_vals if at < first + bad[0]]
    st.vals.extend(m.new_vals)
    tps = (step + 1 - m.step0) * t.batch_size * t.seq_len / max(elapsed, 1e-9)
    if world.is_main:
        append_lines(m.run_dir / "metrics.jsonl", _metric_lines(first, new, m.new_vals))  # whole lines or none
        if m.tracked:
            factor = lr_factor(step, steps_of(t), m.eff)
            m.tracked.log([*((first + i, {"train/loss": v}) for i, v in enumerate(new)),
                           (step, {"train/lr": m.eff.optim.lr * factor, "train/tokens_per_s": tps}),
                           *((at, {"val/loss": v}) for at, v in m.new_vals)])
    m.new_vals = []
    _heartbeat(m.run_dir, world, step + 1)
    if bar:
        bar.update(task, completed=step + 1, loss=new[-1], tps=tps)
    if bad:
        m.status, m.diverged_at, m.stopped, m.steps_done = "diverged", first + bad[0], True, step + 1
        return
    every = t.checkpoint_every
    if every and step + 1 - m.last_ckpt >= every and not last:  # only at log steps: losses are complete
        st.step, st.clipped = step + 1, clipped_steps(m.s) or 0
        _save_checkpoint(m.run_dir, m.s, st)
        m.last_ckpt = step + 1


def _finish(m: Member, val: float | None, train_s: float, world: World, **env: Any) -> dict[str, Any]:
    """The member's result record, written to result.json with the final evaluation (rank 0); its checkpoint
    is removed."""
    cfg, s, st = m.cfg, m.s, m.state
    window = st.losses[: len(st.losses) if m.diverged_at is None else m.diverged_at][-cfg.train.final_window :]
    model = s.model
    n_params = sum(p.numel() for p in model.parameters())  # a DTensor counts its global size
    n_emb = sum(p.numel() for n, p in model.named_parameters() if s.specs[n].cls == "E")
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
    tokens = m.steps_done * tokens_per_step
    clipped = clipped_steps(s)
    d = model.dims
    result = {
        "run_id": m.rid,
        "sweep": m.sweep,
        "status": m.status,
        "final_train_loss": _finite_or_none(sum(window) / len(window)) if window else None,
        "final_val_loss": _finite_or_none(val),
        "steps": m.steps_done,
        "tokens": tokens,
        "batch_size": cfg.train.batch_size,
        "seq_len": cfg.train.seq_len,
        "n_params": n_params,
        "n_params_non_embedding": n_params - n_emb,
        "flops": train_flops(n_params - n_emb, d.n_layers, d.width, cfg.train.seq_len, tokens),
        "flops_formula": FLOPS_FORMULA,
        "wall_s": time.time() - m.t_start,
        "tokens_per_s": (m.steps_done - m.step0) * tokens_per_step / max(train_s, 1e-9),
        "diverged_at_step": m.diverged_at,
        "clip_fraction": None if clipped is None else clipped / m.steps_done,
        "initial_loss": _finite_or_none(st.initial),
        "effective": m.effective,
        "env": {**environment(s.device, world.world_size), **env},
    }
    if world.is_main:
        if val is not None:
            append_lines(m.run_dir / "metrics.jsonl",
                         json.dumps({"step": m.steps_done, "val_loss": result["final_val_loss"]}) + "\n")
            m.tracked.log([(m.steps_done, {"val/loss": result["final_val_loss"]})])
        write_json_atomic(m.run_dir / "result.json", result)
        (m.run_dir / "checkpoint.pt").unlink(missing_ok=True)
        shutil.rmtree(m.run_dir / SHARDED, ignore_errors=True)
    return result


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
            torch.save({"model": _owned(s.model.state_dict()), "opt": s.opt.state_dict(), **asdict(state)}, f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # no half checkpoint left behind
        raise
    shutil.rmtree(run_dir / SHARDED, ignore_errors=True)  # a sharded one this run resumed from is older now


def _owned(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor with a storage of its own: torch.save writes a view's whole storage (a fused copy's weights
    are views of the group's stack: a checkpoint would hold every copy's)."""
    return {k: v.clone() if v.untyped_storage().nbytes() > v.numel() * v.element_size() else v
            for k, v in tensors.items()}


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
