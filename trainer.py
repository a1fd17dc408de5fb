"""
trainer.py: the training loop every method shares, loading a trained model back, and the judge of its samples.

  torchrun     one process per device (gloo on CPU, nccl on GPU); unchanged single-process
  the loop     AdamW, warmup + cosine, clipping, accumulation, EMA weights for eval and sampling,
               periodic eval, a log line and log.jsonl, torch.compile when asked
  a run        owns its out_dir (a lock; refuses to overwrite a checkpoint unless told), writes
               atomic checkpoints, resumes exactly (--resume) after checking the checkpoint fits
  inference    load_for_inference: checkpoint -> config, EMA model, tokenizer, meta, checkpoint;
               load_published: the same for the papers' weights (hub.py)
  the judge    --eval --gen: samples scored by an ar.py checkpoint (or a transformers LM)

Method files import this module; it imports common.py, corpus.py, hub.py and difflm_ops.py.
"""

import contextlib
import copy
import dataclasses
import errno
import glob
import json
import math
import os
import signal
import socket
import time

import torch
import torch.nn as nn

from common import (RESUMED, TextConfig, Transformer, autocast, config_from_checkpoint, die, get_device, load_checkpoint,
                    out_dir, per_command, save_checkpoint, token_nll, write_file)
import difflm_ops
import hub
from corpus import TOKENIZER_KEYS, Batches, data_path, get_tokenizer, prepare_data, prepared_by, tokenizer_name


def print_config(cfg):
    print("config: " + " ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(cfg).items()))


def init_distributed(device):
    """Under torchrun: the process group of one training run (train() ends it) -> (rank, world size)."""
    if "RANK" not in os.environ:
        return 0, 1
    torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


# ----------------------------------------------------------------------------------------------
# The training loop


def lr_at(cfg, it):
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.lr * (it + 1) / cfg.warmup_iters
    if it >= decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)


@torch.no_grad()
def ema_update(ema_model, model, decay, step):
    # warm-up ramp so early EMA weights are not dominated by the random init
    d = min(decay, (1 + step) / (10 + step))
    ema_p = list(ema_model.parameters())
    torch._foreach_lerp_(ema_p, [p.detach() for p in model.parameters()], 1.0 - d)


def fmt_time(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def log_json(path, record):
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)  # an --eval of published weights logs into a new out_dir
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        die(f"cannot write {path}: {e.strerror or e}; free disk space or choose another --out_dir")


def make_optimizer(model, cfg, device):
    """AdamW with weight decay on the matrices only (not on norms, biases, gates); fused on a GPU, and on
    a CPU over all tensors at once (foreach: the for-loop's numbers, bit for bit, in fewer passes)."""
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             **({"fused": True} if device.type == "cuda" else {"foreach": True}))


def truncate_log(path, last_iter):
    """Keep the log records of iterations up to last_iter, the ones a resumed checkpoint holds: the
    run logs the later ones again. A line cut short by a kill goes too."""
    if not os.path.isfile(path):
        return
    keep = []
    with open(path, errors="replace") as f:  # a damaged byte spoils its line only
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if not isinstance(rec, dict):
                continue
            it = rec.get("iter")
            if not isinstance(it, int) or it <= last_iter:  # an eval of published weights has no iteration: kept
                keep.append(line if line.endswith("\n") else line + "\n")
    write_file(path, keep, "free disk space or choose another --out_dir")


@contextlib.contextmanager
def own_out_dir(odir):
    """Hold odir/run.lock for the run, so a second run into the same folder stops at once with a
    line naming the first. The lock is the kernel's (flock): a killed run releases it by dying."""
    import fcntl  # POSIX; imported here so that the rest of the module loads anywhere
    path = os.path.join(odir, "run.lock")
    try:
        os.makedirs(odir, exist_ok=True)
        f = open(path, "a+")
    except OSError as e:
        die(f"cannot write to {odir}: {'it is a file, not a folder' if os.path.isfile(odir) else e.strerror or e}; "
            "choose another --out_dir")
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "a process that is starting"
            die(f"{odir} is in use by another run ({holder}); wait for it, stop it, or choose another --out_dir")
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
        f.flush()
        for tmp in glob.glob(os.path.join(odir, "ckpt.pt.*.tmp")):  # left by a killed run; no one else writes here
            with contextlib.suppress(OSError):
                os.remove(tmp)
        yield


@contextlib.contextmanager
def interruptible(said):
    """Ctrl-C inside, or SIGTERM (a scheduler's preemption, `kill`), ends the process with one line, said(), not a
    traceback; said() None: with no line (a DDP rank other than 0, which lets rank 0 say why)."""
    term = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    except KeyboardInterrupt:
        line = said()
        if not line:
            raise SystemExit(1)
        die(line)
    finally:
        signal.signal(signal.SIGTERM, term)


RESUME_KEYS = ("model", "ema", "optimizer", "rng", "data_rng", "iter", "config", "meta")
RUN_KEYS = {"out_dir", "data_dir", "device", "compile", "max_iters", "lr_decay_iters", "eval_interval", "eval_iters",
            "log_interval", "resume", "overwrite", "num_samples", "show", "prefix", "suffix"}  # not part of a model


def fit_state(module, state, path, saved_cfg, cfg, what="model"):
    """module.load_state_dict(state), or one line naming the settings that differ from the checkpoint's."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as e:
        now = dataclasses.asdict(cfg)
        differ = [f"{k}={saved_cfg[k]!r} (here {now[k]!r})" for k in now
                  if k in saved_cfg and k not in RUN_KEYS | per_command(type(cfg)) and saved_cfg[k] != now[k]]  # not init_from
        hint = f"it was trained with {', '.join(differ[:4])}" if differ else "it was trained with other settings"
        die(f"{path} does not fit this {what} ({str(e).strip().splitlines()[0][:160]}); {hint}")


def resume_from(path, method, cfg, meta, model, ema_model, opt, batches, rank, world, device):
    """Load a run's state for --resume, checked as --sample checks it; -> (the next iteration, seconds trained so far)."""
    ckpt = RESUMED.pop(path, None) or load_checkpoint(path, method)
    if ckpt.get("method", method) != method:
        die(f"{path} was trained by {ckpt['method']}.py, not {method}.py; resume it with {ckpt['method']}.py")
    missing = [k for k in RESUME_KEYS if k not in ckpt]
    if missing:
        die(f"{path} lacks {', '.join(missing)}, so it cannot be resumed; sample from it, or start over with --overwrite")
    saved = ckpt["config"]  # its data, as the message below names it to resume with:
    own = f"--dataset={saved.get('dataset')}" + ("" if "data_dir" not in saved else f" --data_dir={saved['data_dir']}"
                                                 if saved["data_dir"] else " without --data_dir") + prepared_by(ckpt["meta"])
    # data: ddpm's points, a toy's name or an .npy file (by its contents where both know them: it may have moved)
    for k in TOKENIZER_KEYS + (("sha256",) if "sha256" in ckpt["meta"] and "sha256" in meta else ("data",)):
        if ckpt["meta"].get(k) != meta.get(k):
            was, now = ((ckpt["meta"].get("data"), meta.get("data")) if k in ("data", "sha256") else
                        (f"a {tokenizer_name(ckpt['meta'])}", f"a {tokenizer_name(meta)}"))
            other = {"chars": " with other symbols", "words": " with other symbols", "sha256": " with other contents"}
            die(f"{path} was trained on {was}, this run's data is {now}{other.get(k, '')}; resume with the run's own data ({own})")
    text = [m.get("files", {}).get("train.bin", {}).get("sha256") for m in (ckpt["meta"], meta)]  # token data
    if None not in text and text[0] != text[1]:  # the same tokenizer, other text: another corpus or prepare
        die(f"{path} was trained on other text than {data_path(cfg)} holds (its train.bin differs); resume with the "
            f"run's own data ({own})")
    fit_state(model, ckpt["model"], path, saved, cfg)
    # a run that kept no EMA (--ema=0) saved its initial weights there: an EMA turned on now starts from the model
    fit_state(ema_model, ckpt["ema"] if saved.get("ema", 0) > 0 else ckpt["model"], path, saved, cfg, "model's EMA")
    # the saved groups take this run's decay and betas and this device's AdamW (fused or foreach), not the saver's
    saved_groups, mine = ckpt["optimizer"]["param_groups"], ("weight_decay", "betas", "fused", "foreach")
    groups = [{**g, **{k: new[k] for k in mine}} for g, new in zip(saved_groups, opt.param_groups)]
    fit_state(opt, {**ckpt["optimizer"], "param_groups": groups + saved_groups[len(groups):]}, path, saved, cfg, "optimizer")
    n = len(ckpt["data_rng"])  # the processes that wrote it, each with its own streams
    if rank < n:  # a rank beyond them keeps the fresh streams seeded for it, not a copy of another's
        torch.set_rng_state(ckpt["rng"][rank])
        if device.type == "cuda" and ckpt.get("cuda_rng"):  # the GPU draws the training noise there
            torch.cuda.set_rng_state(ckpt["cuda_rng"][rank], device)
        batches.gen.set_state(ckpt["data_rng"][rank])
    if rank == 0 and world != n:  # a step's batch is every process's: the run goes on with another one
        was, now = (f"{k} x {c.get('batch_size')} x {c.get('grad_accum', 1)}" for k, c in ((n, saved), (world, vars(cfg))))
        print(f"{path} was trained by {n} process(es), this run has {world}: a step's batch is {now} (processes x "
              f"--batch_size x --grad_accum), was {was}" + (f"; ranks {n} and up draw fresh random streams" if world > n else ""))
    start = ckpt["iter"] + 1
    if start >= cfg.max_iters:  # iterations 0 .. max_iters - 1 are done: nothing is left to train
        die(f"{path} is at iteration {ckpt['iter']}: the --max_iters={cfg.max_iters} iterations are done; raise --max_iters to train on")
    return start, ckpt.get("time", 0.0)


def train(cfg, method, model, loss_fn, evaluate, meta, batches=None, dynamic=None):
    """The shared loop.

    model    the method's nn.Module (backbone + head); raw, unwrapped
    loss_fn  loss_fn(model, x0) -> scalar loss for a batch x0 of batches.get (B, L) ids by default, under autocast.
             model may be wrapped (DDP, torch.compile): read attributes off the raw one. Its noise comes from
             torch's generators, whose states a checkpoint keeps, so that --resume continues exactly
    evaluate evaluate(model, batches) -> {name: number} on the validation split (the raw EMA model, a fixed seed)
    batches  default: random token windows (Batches); a method with other data passes an object
             with .get(split, batch_size, gen=None) and a torch.Generator .gen
    dynamic  --compile with dynamic shapes (True: batches vary in length; None: torch's default)
    Returns the EMA model (the model itself under --ema=0).

    A run owns its out_dir: it holds the folder's lock while it runs, and it starts over an
    earlier run's checkpoint only with --overwrite (--resume continues it).
    """
    device = get_device(cfg)
    rank, world = init_distributed(device)
    odir = out_dir(cfg, method)
    ckpt_path = os.path.join(odir, "ckpt.pt")
    if cfg.resume and cfg.overwrite:
        die("--resume continues the run in out_dir and --overwrite starts it over; pass one of them")
    with own_out_dir(odir) if rank == 0 else contextlib.nullcontext():
        if not cfg.resume and os.path.isfile(ckpt_path) and not cfg.overwrite:  # the first new checkpoint replaces it
            die(f"{odir} holds a checkpoint of an earlier run; continue it with --resume, start over with "
                f"--overwrite, or choose another --out_dir")
        started = time.time()

        def said():  # checkpoints are written whole or not at all; rank 0 says so, once (torchrun ends the others too)
            if rank:
                return None
            if os.path.isfile(ckpt_path) and (cfg.resume or os.path.getmtime(ckpt_path) >= started):
                return f"interrupted; {ckpt_path} holds the last eval's state: continue with --resume"
            return "interrupted before the first eval wrote a checkpoint" + (
                f"; {ckpt_path} and its log are still the earlier run's" if os.path.isfile(ckpt_path) else "")
        with interruptible(said):
            return _train_loop(cfg, method, model, loss_fn, evaluate, meta, batches, device, rank, world, dynamic)


def _train_loop(cfg, method, model, loss_fn, evaluate, meta, batches, device, rank, world, dynamic):
    master = rank == 0
    odir = out_dir(cfg, method)
    ckpt_path = os.path.join(odir, "ckpt.pt")
    log_path = os.path.join(odir, "log.jsonl")
    if master:  # resolved: the folders and the device the run uses, not '' and 'auto'
        print_config(dataclasses.replace(cfg, out_dir=odir, device=str(device),
                                         **({"data_dir": data_path(cfg)} if hasattr(cfg, "data_dir") else {})))

    torch.manual_seed(cfg.seed + rank)
    model.to(device)
    ema_model = copy.deepcopy(model).requires_grad_(False)
    ema_model.eval()
    opt = make_optimizer(model, cfg, device)
    if batches is None:
        batches = Batches(cfg, meta, seed=cfg.seed + 1000 * rank)
    else:
        batches.gen.manual_seed(cfg.seed + 1000 * rank)
    start, spent = 0, 0.0  # spent: seconds the run trained before this process (its log's "time" goes on from there)
    if cfg.resume:
        start, spent = resume_from(ckpt_path, method, cfg, meta, model, ema_model, opt, batches, rank, world, device)
        if master:
            print(f"resuming from {ckpt_path} at iteration {start}")
    # an --overwrite run holds its records until its first checkpoint replaces the earlier run's, log and all
    held = [] if master and not cfg.resume and os.path.isfile(ckpt_path) else None
    if master and held is None:
        truncate_log(log_path, start - 1)  # each iteration is logged once, however often the run was resumed

    def log(record):
        if held is not None:
            held.append(record)
        else:
            log_json(log_path, record)
    n_params = sum(p.numel() for p in model.parameters())
    if master:
        print(f"{method}: {n_params / 1e6:.2f}M parameters, {device}, {world} process(es)")

    train_model = model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        difflm_ops.prepare(device)  # the fused ops decided before the trace, which then holds them
        train_model = torch.compile(train_model, dynamic=dynamic)
    ctx = autocast(device)
    # sequences count tokens; ddpm.py's points (no block_size) count samples
    per_example, unit = (cfg.block_size, "tok") if isinstance(cfg, TextConfig) else (1, "samples")
    tokens_per_iter = cfg.batch_size * per_example * cfg.grad_accum * world

    def gather_states(state):
        # every rank's RNG state, so a resumed DDP run continues each stream exactly
        if world == 1:
            return [state]
        out = [None] * world
        torch.distributed.all_gather_object(out, state)
        return out

    def checkpoint(it, val):
        nonlocal held
        rngs, data_rngs = gather_states(torch.get_rng_state()), gather_states(batches.gen.get_state())
        cuda_rngs = gather_states(torch.cuda.get_rng_state(device)) if device.type == "cuda" else None
        if master:
            save_checkpoint(ckpt_path, {
                "model": model.state_dict(), "ema": ema_model.state_dict(), "optimizer": opt.state_dict(),
                "rng": rngs, "data_rng": data_rngs, "cuda_rng": cuda_rngs, "iter": it, "time": spent + time.time() - t0,
                "config": dataclasses.asdict(cfg), "meta": meta, "method": method, "val": val})
            if held is not None:
                truncate_log(log_path, -1)
                for record in held:
                    log_json(log_path, record)
                held = None

    def run_eval():
        # a fixed seed: every eval sees the same batches and noise, and training RNG is untouched
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), ctx:
            torch.manual_seed(cfg.seed + 12345)
            stats = evaluate(ema_model if cfg.ema > 0 else model, batches)
        return {k: float(v) for k, v in stats.items()}  # numbers to log as JSON: a 0-d tensor counts as one

    last_good = start - 1 if start > 0 else None

    def diverged(what):
        where = f"the last good checkpoint {ckpt_path} (iteration {last_good}) is kept" if last_good is not None \
            else "this run wrote no checkpoint"
        die(f"{what}; {where}; lower --lr or raise --warmup_iters")

    t0 = time.time()
    t_last, tok_since = t0, 0
    it = start
    for it in range(start, cfg.max_iters):
        lr = lr_at(cfg, it)
        for g in opt.param_groups:
            g["lr"] = lr
        model.train()
        loss_sum = 0.0
        for micro in range(cfg.grad_accum):
            x0 = batches.get("train", cfg.batch_size).to(device, non_blocking=True)
            sync = micro == cfg.grad_accum - 1 or world == 1
            with (contextlib.nullcontext() if sync else train_model.no_sync()), ctx:
                loss = loss_fn(train_model, x0) / cfg.grad_accum
            loss.backward()
            loss_sum += loss.detach()
        if world > 1:  # the loss of the whole step's batch, as one process would log it (and stop on it, every rank)
            torch.distributed.all_reduce(loss_sum)
            loss_sum /= world
        loss_val = float(loss_sum)
        if not math.isfinite(loss_val):
            diverged(f"loss became {loss_val} at iteration {it}")
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cfg.ema > 0:
            ema_update(ema_model, model, cfg.ema, it)
        tok_since += tokens_per_iter
        if it == start:
            t_first = time.time()  # the ETA leaves out the first iteration's one-off costs (a kernel build, warm-up)

        last = it == cfg.max_iters - 1
        if master and (it % cfg.log_interval == 0 or last):
            now = time.time()
            tps = tok_since / max(now - t_last, 1e-9)
            eta = fmt_time((now - t_first) / (it - start) * (cfg.max_iters - it - 1)) if it > start else "-"
            print(f"iter {it:5d}/{cfg.max_iters} | loss {loss_val:.4f} | lr {lr:.2e} | {tps / 1e3:.1f}k {unit}/s | eta {eta}", flush=True)
            log({"iter": it, "loss": loss_val, "lr": lr, f"{unit}_per_s": tps, "time": spent + now - t0})
            t_last, tok_since = now, 0
        if (it + 1) % cfg.eval_interval == 0 or last:
            val = run_eval()
            if master:
                print(f"eval  {it:5d} | " + " | ".join(f"{k} {v:.4f}" for k, v in val.items()), flush=True)
                log({"iter": it, "eval": val, "time": spent + time.time() - t0})
            bad = [k for k, v in val.items() if not math.isfinite(v)]
            if bad:  # diverged weights are not saved over the last good ones
                diverged(f"{bad[0]} became {val[bad[0]]} in the eval at iteration {it}")
            checkpoint(it, val)
            last_good = it
            t_last, tok_since = time.time(), 0
    if master:  # on a GPU with its peak memory: what a --batch_size needs there
        peak = f"; peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if device.type == "cuda" else ""
        print(f"done: {cfg.max_iters - start} iterations in {fmt_time(time.time() - t0)}; checkpoint {ckpt_path}{peak}")
    if world > 1:
        torch.distributed.barrier()
    if torch.distributed.is_available() and torch.distributed.is_initialized():  # NCCL warns at exit of one left open
        torch.distributed.destroy_process_group()
    return ema_model if cfg.ema > 0 else model  # the weights evaluations saw


def check_memory(cfg):
    """Refuse a training config whose activations alone would not fit the device (a lower bound:
    about a dozen (batch, block, n_embd) fp32 tensors per layer are kept for the backward pass)."""
    device = get_device(cfg)
    need = 4 * 12 * cfg.batch_size * cfg.block_size * cfg.n_embd * cfg.n_layer
    if device.type == "cuda":
        have = torch.cuda.get_device_properties(device).total_memory
    else:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        die(f"--batch_size={cfg.batch_size} x --block_size={cfg.block_size} x --n_embd={cfg.n_embd} x --n_layer={cfg.n_layer} "
            f"needs at least {need / 2**30:.0f} GiB for training, more than the {have / 2**30:.0f} GiB of {device}; "
            "lower --batch_size (raise --grad_accum) or --block_size")


def model_to_train(cfg, method, config_cls, overrides, build_model, check_config):
    """--train's model -> (cfg, model, meta, overrides). With --init_from, the published weights and
    architecture on this run's data (hub.py), and overrides without init_from, so that a --sample
    after it reads the fine-tuned checkpoint; otherwise (or resumed, the run's checkpoint holding the weights
    and settings) a fresh model on the prepared data."""
    spent = {k: v for k, v in overrides.items() if k != "init_from"}
    if getattr(cfg, "init_from", "") and not cfg.resume:  # a Config without hub.PublishedConfig has none
        cfg, model, meta = hub.load_model(cfg.init_from, method, config_cls, overrides, build_model, prepare_data)
        check_config(cfg)
        check_memory(cfg)
        return cfg, model, meta, spent
    check_memory(cfg)
    meta = prepare_data(cfg)
    return cfg, build_model(cfg, meta), meta, spent


def load_published(config_cls, overrides, method, build_model):
    """--sample/--eval with --init_from: the published weights (hub.py) -> the same tuple as
    load_for_inference, with no iteration to report."""
    cfg, model, meta = hub.load_model(overrides["init_from"], method, config_cls, overrides, build_model)
    check_files(cfg, meta, method)
    torch.manual_seed(cfg.seed)
    return cfg, model.to(get_device(cfg)).eval(), get_tokenizer(meta), meta, {"iter": None}


def load_for_inference(config_cls, overrides, method, build_model):
    """Checkpoint -> (cfg, EMA model in eval mode on the device, tokenizer, meta, the checkpoint); the command line
    may not change the model's shape or the Config's FIXED keys."""
    where = out_dir(config_cls(**overrides), method)
    ckpt = load_checkpoint(os.path.join(where, "ckpt.pt"), method)
    if ckpt.get("method", method) != method:
        die(f"{where}/ckpt.pt was trained by {ckpt['method']}.py, not {method}.py")
    missing = [k for k in ("model", "config", "meta") + (("ema",) if ckpt.get("config", {}).get("ema", 0) > 0 else ())
               if k not in ckpt]
    if missing:
        die(f"{where}/ckpt.pt lacks {', '.join(missing)}; it is not a complete {method}.py checkpoint: retrain with "
            f"`python {method}.py --train --overwrite --out_dir={where}`")
    # logs go beside the checkpoint that was read, wherever it was trained
    cfg = dataclasses.replace(config_from_checkpoint(config_cls, ckpt, overrides), out_dir=where)
    meta = ckpt["meta"]
    model = build_model(cfg, meta)
    ema = cfg.ema > 0 and ckpt["config"].get("ema", 0) > 0  # a run trained with --ema=0 has no EMA weights
    fit_state(model, ckpt["ema"] if ema else ckpt["model"], f"{where}/ckpt.pt", ckpt["config"], cfg)
    device = get_device(cfg)
    check_files(cfg, meta, method)
    torch.manual_seed(cfg.seed)
    return cfg, model.to(device).eval(), get_tokenizer(meta), meta, ckpt


def read_judge(judge, meta=None):
    """A --judge read before the work it scores: an ar.py checkpoint (its vocabulary against meta), or a
    transformers model's tokenizer; one line where it does not load."""
    if judge.endswith(".pt"):
        load_judge(judge, meta)
    else:
        hub.hf_judge_tokenizer(judge)


def check_files(cfg, meta, method):
    """The files a command reads or writes besides the checkpoint, before any sampling or evaluation work, so
    that a missing or mismatched one stops the run at once: --eval --gen's judge and --samples_in (generative_eval
    reads them again), --sample's --samples_out and ddpm's --png (their folders made here, as writing them would)."""
    for flag in (f for f in ("samples_out", "png") if getattr(cfg, f, "")):
        folder = os.path.dirname(os.path.abspath(getattr(cfg, flag)))
        try:
            os.makedirs(folder, exist_ok=True)
            if not os.access(folder, os.W_OK):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        except OSError as e:  # a file on the way (Not a directory, File exists), a read-only place
            die(f"--{flag}={getattr(cfg, flag)} cannot be written: {folder} ({e.strerror or e}); choose another --{flag}")
    if os.path.isdir(getattr(cfg, "samples_out", "")):
        die(f"--samples_out={cfg.samples_out} is a folder; name a file, e.g. --samples_out={os.path.join(cfg.samples_out, 'samples.jsonl')}")
    if os.path.isfile(getattr(cfg, "samples_out", "")) and not hub.replaceable_samples(cfg.samples_out):
        die(f"--samples_out={cfg.samples_out} is a file that holds no samples; name a new file (it is never written over)")
    if getattr(cfg, "gen", False):
        if method == "diffuser" and meta.get("seq2seq"):  # its E2E models realise given MRs (an E2E mdlm's do not)
            die("--gen is for unconditional models; an E2E model is scored by BLEU (drop --gen)")
        read_judge(cfg.judge, meta)
        if getattr(cfg, "samples_in", ""):
            texts, _ = hub.read_samples(cfg.samples_in)
            if cfg.judge.endswith(".pt"):  # an ar.py judge scores them in the model's tokens: samples of another model's
                tok = get_tokenizer(meta)
                for t in texts:
                    tok.encode(t, f"--samples_in={cfg.samples_in}")


# ----------------------------------------------------------------------------------------------
# Generative evaluation: samples scored by the autoregressive baseline (ar.py) as a fixed judge


def load_judge(path, meta=None, device=None, flag="--judge"):
    """An ar.py checkpoint -> (judge model in eval mode, its meta): ar.py's layout (causal backbone over V + 1 ids,
    [BOS] = V, V-way head) rebuilt without importing ar.py. With meta: dies unless trained on the same tokenizer.
    flag: the option that named the file (diffuser.py's drafts come from --ar_ckpt), for the errors."""
    if not os.path.isfile(path):
        die(f"no ar.py checkpoint at {flag}={path}; train the autoregressive baseline on the same data first "
            f"(`python ar.py --train --dataset=...`) or pass {flag}=PATH")
    ckpt = load_checkpoint(path, "ar")
    if ckpt.get("method") != "ar":
        die(f"{flag}={path} was trained by {ckpt.get('method')}.py; it must be an ar.py checkpoint")
    jm, c = ckpt["meta"], ckpt["config"]
    if meta is not None and any(meta.get(k) != jm.get(k) for k in ("tokenizer", "vocab_size", "chars", "words")):
        die(f"{flag}={path} was trained on another tokenizer/vocabulary ({jm.get('tokenizer')}, {jm.get('vocab_size')} ids) "
            f"than this model ({meta.get('tokenizer')}, {meta.get('vocab_size')}); train ar.py on the same dataset")
    V = jm["vocab_size"]
    judge = nn.ModuleDict({"backbone": Transformer(V + 1, c["n_layer"], c["n_head"], c["n_embd"], c["block_size"], causal=True),
                           "head": nn.Linear(c["n_embd"], V, bias=False)})
    judge.load_state_dict(ckpt["ema"] if c.get("ema", 0) > 0 else ckpt["model"])
    return judge.to(device or "cpu").eval(), jm


@torch.no_grad()
def judge_nll(judge, samples, batch_size=32):
    """Mean -log p_judge per token (nats) of samples (N, T); each block_size chunk is scored from [BOS], like its val windows."""
    V, L, device = judge["head"].out_features, judge["backbone"].block_size, judge["head"].weight.device
    total, count = 0.0, 0
    for s in range(0, samples.shape[1], L):
        chunk = samples[:, s:s + L].long()
        if int(chunk.max()) >= V or int(chunk.min()) < 0:
            die(f"samples hold ids outside the judge's vocabulary of {V} (e.g. a [MASK] left unrevealed)")
        for b in range(0, chunk.shape[0], batch_size):
            x = chunk[b:b + batch_size].to(device)
            inp = torch.cat([torch.full_like(x[:, :1], V), x[:, :-1]], 1)  # [BOS] shifted in
            with autocast(device):
                logits = judge["head"](judge["backbone"](inp))  # (b, <= L, V)
            total += float(token_nll(logits.flatten(0, 1), x.flatten()).sum())  # as ar.py's own loss
            count += x.numel()
    return total / count


def nats_figures(key, nats):
    """A per-token NLL or bound -> {key: nats, "val_bits", "val_ppl"}; a diverged run's perplexity is inf."""
    return {key: nats, "val_bits": nats / math.log(2), "val_ppl": math.exp(nats) if nats < 709 else math.inf}


def unigram_entropy(samples):
    """Entropy (nats) of the token frequencies over all samples (N, T): low values expose collapse."""
    counts = torch.bincount(samples.flatten().long().cpu()).double()
    p = counts[counts > 0] / counts.sum()
    return float((p * -p.log()).sum())  # one token alone: 0, not -0


def judge_texts(judge_path, texts, tok, meta, device):
    """Score texts -> (nats/token, ids scored): an ar.py judge encodes them with the samples' tokenizer, a transformers LM its own."""
    if judge_path.endswith(".pt"):
        judge, _ = load_judge(judge_path, meta, device)
        ids = [torch.tensor(tok.encode(t), dtype=torch.long) for t in texts]
        if not any(len(x) for x in ids):  # it reported NLL 0, perplexity 1
            die("no sample holds a token for the judge to score; draw longer samples")
        return sum(judge_nll(judge, x[None]) * len(x) for x in ids if len(x)) / sum(len(x) for x in ids), ids
    return hub.hf_judge_texts(judge_path, texts, device)


def judge_samples(judge_path, samples, meta, tok, device):
    """Score samples (N, T) -> (nats/token, the ids scored): an ar.py judge reads their own ids, any other their text."""
    if judge_path.endswith(".pt"):
        return judge_nll(load_judge(judge_path, meta, device)[0], samples), [samples.flatten()]
    return judge_texts(judge_path, [tok.decode(s) for s in samples.tolist()], tok, meta, device)


def generative_eval(judge_path, sample_fn, num_samples, meta, tok, what="", samples_in="", device=None):
    """Draw num_samples sequences with sample_fn(n) -> (n, T) (or read --samples_in, judged on device), time and score them
    with the judge -> {"gen_nll" (nats/token), "gen_ppl", "gen_entropy" (nats), "gen_judge", "sec_per_sample" (drawn) or
    "gen_samples_in" (read)}; one line."""
    if samples_in:
        texts, settings = hub.read_samples(samples_in)
        samples, sec, n, device = None, None, len(texts), device or ("cuda" if torch.cuda.is_available() else "cpu")
        what = f"from {samples_in}" + (f", {settings.get('method')} {settings.get('sampler')}, {settings.get('steps')} steps" if settings else "")
    else:
        t0, samples = time.time(), sample_fn(num_samples)
        if samples.is_cuda:  # a sampler that never reads back leaves its last steps queued: they count too
            torch.cuda.synchronize(samples.device)
        sec, n, device = (time.time() - t0) / num_samples, num_samples, samples.device
    nll, ids = judge_texts(judge_path, texts, tok, meta, device) if samples is None else judge_samples(judge_path, samples, meta, tok, device)
    stats = {"gen_nll": nll, "gen_ppl": math.exp(nll) if nll < 709 else math.inf, "gen_entropy": unigram_entropy(torch.cat(ids)), "gen_judge": judge_path,
             **({"sec_per_sample": sec} if sec is not None else {"gen_samples_in": samples_in})}
    print(f"gen: NLL {nll:.4f} nats/token under the judge {judge_path} (perplexity {stats['gen_ppl']:.3f}) | "
          f"unigram entropy {stats['gen_entropy']:.4f} nats{'' if sec is None else f' | {sec:.3f} s/sample'} "
          f"({n} samples{'' if samples is None else f' of {samples.shape[1]} tokens' if len(samples) == n else f', {samples.numel()} tokens packed'}"
          f"{', ' + what if what else ''})")
    return stats
