"""The whole MRT pipeline in one script: base model -> backtracking warm-start -> RL (outcome vs MRT) -> evaluation.

    python train.py                 # the CPU default (3-number Countdown, within 20 min on 2 cores); see --help
    python train.py --smoke         # tiny sizes, the whole pipeline in seconds
    python train.py --preset full   # 1.5x the warm-start and 2x the RL steps (18-28 min on 2 cores)
    python train.py --preset deep   # chain at 4 numbers, episodes by state, where μ pays (40 min)
    python train.py --preset gpu    # 4 numbers, a larger model

Every stage saves a checkpoint in --out-dir; re-running the same command skips finished stages.
The defaults are the cpu preset's; the other presets change some of them, and explicit flags win.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import get_type_hints

import torch
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm

import evaluation
import mrt
import tasks
from model import GPT, GPTConfig, autocast


# ----------------------------------------------------------------------------- supervised stages
def sft_tensors(task, examples, block_size: int):
    """Inputs X and targets Y (N, T) from (problem, pieces) examples; Y is -1 (no loss) on the prompt, on pieces
    with learn=False and on the padding. The environment's tokens are learned too: predicting them teaches
    arithmetic, though the model never writes them."""
    rows = []
    for p, pieces in examples:
        parts = [(tasks.encode(task.prompt(p)), False)] + [(tasks.encode(text), learn) for text, learn in pieces]
        ids = [i for ids, _ in parts for i in ids]
        learn = [learn for ids, learn in parts for _ in ids]
        rows.append((ids, learn))
    T = max(len(ids) for ids, _ in rows) - 1
    if T > block_size:
        raise UserError(f"training sequences reach {T} tokens: raise --block-size above it")
    X = pad_sequence([torch.tensor(ids[:-1]) for ids, _ in rows], batch_first=True, padding_value=tasks.PAD_ID)
    Y = pad_sequence([torch.where(torch.tensor(learn[1:]), torch.tensor(ids[1:]), -1) for ids, learn in rows],
                     batch_first=True, padding_value=-1)
    return X, Y


def lr_at(step: int, steps: int, peak: float) -> float:
    """Linear warmup over the first 5% of steps, then cosine decay to 10% of the peak."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))


def make_optimizer(model: GPT, lr: float, weight_decay: float):
    """AdamW that decays matrices only (not biases, LayerNorms), as in nanoGPT."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95))


def optimizer_step(model, optimizer, loss) -> torch.Tensor:
    """Backpropagate, clip the gradient norm to 1, update; returns a device-side flag: were loss and gradient finite?"""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # the total norm, before clipping
    optimizer.step()
    return torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)


def check_finite(finite, stage):
    """Stop on a non-finite loss or gradient (`finite`: the flags of the steps since the last check, and-ed). Reading
    it waits for the device, so SFT reads it only where the host waits anyway, with the logged loss, and before each
    snapshot: the weights a NaN reached are never saved, the last checkpoint stays the good one."""
    if not finite:
        raise FloatingPointError(f"{stage}: non-finite loss or gradient; lower the learning rate. Finished stages' "
                                 f"checkpoints are intact.")


def train_sft(model, X, Y, steps, lr, cfg, device, gen, stage, log, checkpoint, evaluate=None):
    """Next-token cross-entropy on the targets, AdamW with warmup + cosine; a tqdm bar; optional periodic eval."""
    optimizer = make_optimizer(model, lr, weight_decay=0.1)
    start = checkpoint.resume(model, optimizer, [gen])
    bar = tqdm(range(start, steps), desc=stage, initial=start, total=steps, dynamic_ncols=True)
    finite = torch.ones((), dtype=torch.bool, device=device)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        idx = torch.randint(len(X), (cfg.batch_size,), generator=gen)
        width = int((Y[idx] != -1).any(0).nonzero().max()) + 1  # drop columns that are padding in every row
        x, y = X[idx, :width].to(device), Y[idx, :width].to(device)
        model.train()
        with autocast(device):
            _, loss = model(x, y)
        finite &= optimizer_step(model, optimizer, loss)
        logged = step % 25 == 0 or step == steps - 1  # .item() syncs: log every few steps only
        if logged or (step + 1) % checkpoint.every == 0:
            check_finite(finite, stage)
        if logged:
            log(stage=stage, step=step, loss=loss.item(), lr=optimizer.param_groups[0]["lr"])
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if evaluate and cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            with autocast(device):
                acc = evaluate(model)
            log(stage=stage, step=step, test_accuracy=acc)
            bar.write(f"{stage} step {step + 1}: greedy test accuracy {acc:.3f}")
        checkpoint.step_done(step + 1, model, optimizer, [gen])
    checkpoint.save(steps, model, optimizer, [gen])  # the finished stage
    return model


def accuracy(model, task, problems, max_new_tokens, generator=None, temperature=1.0, samples=1) -> float:
    """Share of `samples` completions per problem that the verifier accepts."""
    model.eval()
    _, completions = mrt.sample_completions(model, task, problems, max_new_tokens, generator, temperature, samples)
    return sum(tasks.verify(task, problems[i // samples], tasks.decode(c)) for i, c in enumerate(completions)) / \
        len(completions)


def stage_rngs(cfg: Config, stage: str) -> tuple[random.Random, torch.Generator]:
    """A stage's own random streams (its data's, its SFT batches'): a resumed run draws what a fresh one would."""
    seed = f"{cfg.seed}-{stage}"
    return random.Random(seed), torch.Generator().manual_seed(random.Random(seed).getrandbits(63))


def train_base(task, train, test, cfg: Config, device, log, checkpoint) -> GPT:
    """Stage 1: a fresh model learns solver solutions (see `tasks.base_examples`)."""
    rng, batches = stage_rngs(cfg, "base")
    torch.manual_seed(cfg.seed)
    model = new_model(cfg, device)
    print(f"model: {model.num_params() / 1e6:.2f}M parameters")
    examples = tasks.base_examples(task, train, cfg.solutions_per_problem, cfg.cut_prob, rng)
    X, Y = sft_tensors(task, examples, cfg.block_size)
    return train_sft(model, X, Y, cfg.base_steps, cfg.lr, cfg, device, batches, "base", log, checkpoint,
                     lambda m: accuracy(m, task, test, cfg.block_size, temperature=0))  # greedy


def train_warm(base, task, train, cfg: Config, device, log, checkpoint) -> GPT:
    """Stage 2: a copy of the base model learns backtracking traces built from its own first attempts."""
    (rng, batches), gen = stage_rngs(cfg, "warm"), torch.Generator(device).manual_seed(cfg.seed)
    base.eval()
    with autocast(device):
        problems = rng.sample(train, min(cfg.warm_problems, len(train))) * cfg.warm_traces  # each copy: a fresh draw
        traces = mrt.build_search_traces(base, task, problems, 2 * cfg.warm_rollouts, cfg.train_room, gen, rng) \
            if cfg.restart == "search" else mrt.build_traces(base, task, problems, cfg.warm_rollouts, cfg.train_room,
                                                             gen, rng)
    text = lambda t: task.prompt(t.problem) + "".join(piece for piece, _ in t.pieces(task))
    traces = [t for t in traces if len(tasks.encode(text(t))) <= cfg.block_size + 1]  # long misses can overflow
    backtracks = sum(t.keep is not None for t in traces)
    print(f"warm-start (seed {cfg.seed}): {len(traces)} traces, {backtracks} backtrack after a failed first attempt")
    log(stage="warm", seed=cfg.seed, traces=len(traces), backtrack_traces=backtracks)
    # Replay base examples too (one problem's worth per `solutions_per_problem` traces): keeps the skills and μ.
    replayed = rng.sample(train, min(len(train), max(1, len(traces) // cfg.solutions_per_problem)))
    replay = tasks.base_examples(task, replayed, cfg.solutions_per_problem, cfg.cut_prob, rng)
    X, Y = sft_tensors(task, [(t.problem, t.pieces(task)) for t in traces] + replay, cfg.block_size)
    return train_sft(copy.deepcopy(base), X, Y, cfg.warm_steps, cfg.warm_lr, cfg, device, batches, "warm-start", log,
                     checkpoint)


# ----------------------------------------------------------------------------- RL: outcome vs MRT
def rl_step(model, optimizer, task, problems, cfg, arm, gen, meta_gen, device) -> dict:
    """One on-policy REINFORCE step of `arm` (see `mrt.rollouts`); returns the numbers to log."""
    model.eval()
    with autocast(device):
        batch = mrt.rollouts(model, task, problems, cfg, arm, gen, meta_gen)
    model.train()
    with autocast(device):
        loss = mrt.rl_loss(model, task, batch)
    check_finite(optimizer_step(model, optimizer, loss), arm)  # RL waits for the device at every step anyway
    return {**batch.stats, "loss": loss.item()}


def train_rl(warm, task, train, test, cfg, arm, seed, device, log, checkpoint):
    """REINFORCE from (a copy of) the warm start. Both arms see the same problems in the same order (the data seed is
    shared). Every --curve-every steps, and after the last, the held-out accuracy is logged: the learning curve."""
    model = copy.deepcopy(warm)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.rl_lr, betas=(0.9, 0.95), weight_decay=0.0)
    data = random.Random(seed)
    gen, meta_gen = torch.Generator(device).manual_seed(seed), torch.Generator(device).manual_seed(seed + 10_007)
    start = checkpoint.resume(model, optimizer, [data, gen, meta_gen])
    bar = tqdm(range(start, cfg.rl_steps), desc=f"rl {arm} seed {seed}", initial=start, total=cfg.rl_steps,
               dynamic_ncols=True)

    def check(step):  # the held-out accuracy at the evaluation's room; each check draws the same random numbers
        with autocast(device):
            acc = accuracy(model, task, test, task.room(cfg.block_size, test),
                           torch.Generator(device).manual_seed(cfg.seed + 777), samples=cfg.curve_streams)
        log(stage="heldout", arm=arm, seed=seed, step=step, accuracy=acc)

    for step in bar:
        if cfg.curve_every and step % cfg.curve_every == 0:
            check(step)
        problems = [p for p in data.sample(train, cfg.rl_prompts) for _ in range(cfg.rl_group)]
        row = rl_step(model, optimizer, task, problems, cfg, arm, gen, meta_gen, device)
        log(stage=f"rl_{arm}", seed=seed, step=step, **row)
        bar.set_postfix(reward=f"{row['reward']:.2f}", episodes=f"{row['episodes']:.2f}")
        checkpoint.step_done(step + 1, model, optimizer, [data, gen, meta_gen])
    if cfg.curve_every:
        check(cfg.rl_steps)
    checkpoint.save(cfg.rl_steps, model, optimizer, [data, gen, meta_gen])  # the finished stage
    return model


# ----------------------------------------------------------------------------- the pipeline
def run(cfg: Config) -> dict:
    """The whole pipeline: each stage skipped if finished, resumed if interrupted; writes results.json."""
    check_config(cfg)
    device, task = pick_device(cfg.device), make_task(cfg)
    try:
        train, test = tasks.make_split(task, cfg.n_train, cfg.n_test, cfg.seed)
    except ValueError as e:
        raise UserError(str(e)) from None
    if cfg.rl_prompts > len(train):
        raise UserError(f"--rl-prompts ({cfg.rl_prompts}) must not exceed the {len(train)} training problems")
    log_path = os.path.join(cfg.out_dir, "log.jsonl")
    earlier = evaluation.stage_seconds(log_path)  # stages trained by earlier runs here (loaded now) keep their times
    log, timings = open_log(log_path), {}  # only now: a bad option creates nothing
    log(stage="start", time=time.strftime("%Y-%m-%d %H:%M:%S"), config=asdict(cfg))
    print(f"{task}: {len(train)} train / {len(test)} test problems")
    print(f"device {device}, out-dir {cfg.out_dir}")

    def stage(name, key, steps, train_stage, *args):
        """A finished stage's model, loaded; else train_stage(*args, checkpoint) trains it (resuming if interrupted)."""
        checkpoint = Checkpoint(os.path.join(cfg.out_dir, f"{name}.pt"), key, steps, cfg)
        if checkpoint.finished():
            print(f"{name}: finished earlier, loaded {checkpoint.path}")
            timings.update({name: earlier[name]} if name in earlier else {})
            return model_from(checkpoint.blob, device)
        start = time.time()
        model = train_stage(*args, checkpoint)
        timings[name] = time.time() - start
        log(stage=name, seconds=timings[name])
        return model

    base = stage("base", stage_config(cfg, "base"), cfg.base_steps, train_base, task, train, test, cfg, device, log)
    arms, seeds = cfg.arms.split(","), list(range(cfg.seed, cfg.seed + cfg.rl_seeds))
    warm_of = lambda seed: seed if cfg.warm_per_seed else cfg.seed  # RL seed -> the seed its warm start is drawn with
    warms = {s: stage("warm" if s == cfg.seed else f"warm_seed{s}", {**stage_config(cfg, "warm"), "warm_seed": s},
                      cfg.warm_steps, train_warm, base, task, train, replace(cfg, seed=s), device, log)
             for s in sorted(set(map(warm_of, seeds)))}  # s draws its traces and SFT batches (warm.pt: --seed)
    models = {"base": [base], "warm": list(warms.values()), **{arm: [] for arm in arms}}
    for seed in seeds:
        for arm in arms:
            key = {**stage_config(cfg, arm), "rl_seed": seed, "warm_seed": warm_of(seed)}
            models[arm].append(stage(f"rl_{arm}_seed{seed}", key, cfg.rl_steps, train_rl, warms[warm_of(seed)], task,
                                     train, test, cfg, arm, seed, device, log))

    start = time.time()
    evals = {name: [evaluation.evaluate(m, task, test, cfg, device)
                    for m in tqdm(group, desc=f"evaluate {name}", leave=False)] for name, group in models.items()}
    timings["evaluation"] = time.time() - start
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    print("seconds per stage: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())
          + (f"; peak GPU memory {peak:.1f} GiB" if peak is not None else ""))
    results = {"config": asdict(cfg), "machine": evaluation.machine(device), "device": str(device),
               "train_problems": len(train), "test_problems": len(test), "stage_seconds": timings,
               "peak_gpu_memory_gib": peak, "test_set": [task.prompt(p)[len(tasks.BOS):].strip() for p in test],
               "learning_curve": evaluation.learning_curves(log_path, arms, seeds),
               **evaluation.report(evals, cfg.seed)}
    evaluation.print_table(results, cfg)  # first: a failed write must not lose the evaluation
    write_atomically(os.path.join(cfg.out_dir, "results.json"),
                     lambda tmp: Path(tmp).write_text(json.dumps(results, indent=1)))
    try:
        evaluation.plot(results, cfg.out_dir)
    except OSError as e:
        raise write_error(os.path.join(cfg.out_dir, "results.png"), e) from None
    return results


def explain(cfg: Config, rollouts: int = 32):
    """Solve one problem with a trained model and show what "progress" means, episode by episode."""
    check_config(cfg)
    device, task = pick_device(cfg.device), make_task(cfg)
    path = os.path.join(cfg.out_dir, f"{cfg.explain}.pt")
    if not os.path.exists(path):
        raise UserError(f"--explain {cfg.explain}: no checkpoint {path} (run train.py with this --out-dir first)")
    blob = load_checkpoint(path, device)
    check_made_with(path, blob, cfg, TASK_FIELDS, "pass the options it was made with")
    model = model_from(blob, device).eval()
    try:
        problem = task.parse_problem(cfg.problem) if cfg.problem else \
            random.Random(cfg.seed).choice(tasks.make_split(task, cfg.n_train, cfg.n_test, cfg.seed)[1])
    except ValueError as e:
        raise UserError(f"--problem: {e}") from None
    gen = torch.Generator(device).manual_seed(cfg.seed)
    with autocast(device):
        prompts, completions = mrt.sample_completions(model, task, [problem], task.room(cfg.block_size, [problem]), gen)
        thinking, answer = mrt.split_completion(completions[0])
        episodes = mrt.split_episodes(thinking, cfg.episodes)
        values = mrt.episode_values(mrt.MetaProver(model, task, generator=gen), [problem], prompts, [episodes],
                                    rollouts, reads_state=cfg.episodes == "state")[0]
    print(f"problem x: {tasks.decode(prompts[0][1:]).strip()}   (model: {path}; J from {rollouts} rollouts of μ)")
    print(f"(episodes by {cfg.episodes}: see split_episodes)")
    print(f"{'':<6}{'J(μ | x) with no thinking':<46}J = {values[0]:.2f}")
    for j, (episode, bonus) in enumerate(zip(episodes, mrt.progress_bonus(values))):
        text = tasks.decode(episode).replace("\n", " ").strip()
        print(f"z_{j:<4}{text:<46}J = {values[j + 1]:.2f}   progress {bonus:+.2f}")
    reward = tasks.verify(task, problem, tasks.decode(completions[0]))
    print(f"answer: {tasks.decode(answer).replace(chr(10), ' ')}   reward r(x, z) = {reward}")


def fail(message: str, code: int = 2):
    """One line on stderr, no traceback, and the exit code."""
    print(message, file=sys.stderr)
    sys.exit(code)


def main(argv=None):
    """Command-line entry point: user errors become one line on stderr and exit code 2; Ctrl-C one line and 130."""
    cfg = parse_args(argv)
    try:
        explain(cfg) if cfg.explain else run(cfg)
    except (UserError, FloatingPointError) as e:
        fail(f"error: {e}")
    except KeyboardInterrupt:
        fail("interrupted" + ("" if cfg.explain else f": finished stages and the last snapshot are kept in "
                                                        f"{cfg.out_dir}; run the same command to resume"), 130)


# ------------------------------------------------------------- configuration, command line and checkpoints (plumbing)
def opt(default, help, low=None, choices=None):
    """A Config field: its default, its --help text and the smallest value (`low`) or the values it accepts."""
    return field(default=default, metadata={"help": help, "low": low, "choices": choices})


@dataclass
class Config:
    """Every option of the pipeline; each field is a command-line flag (--n-numbers for n_numbers)."""
    # task
    task: str = opt("countdown", "which task (see tasks.TASKS)", choices=list(tasks.TASKS))
    n_numbers: int = opt(3, "numbers per Countdown problem", 2)
    max_number: int = opt(10, "numbers are drawn from 1..max_number", 1)
    max_target: int = opt(100, "largest target", 1)
    n_train: int = opt(100_000, "training problems (capped by how many distinct problems exist)", 1)
    n_test: int = opt(300, "held-out test problems", 1)
    # model
    n_layer: int = opt(4, "transformer blocks", 1)
    n_head: int = opt(4, "attention heads", 1)
    n_embd: int = opt(96, "embedding width", 1)
    block_size: int = opt(128, "longest sequence (prompt + completion) in tokens", 1)
    # stage 1: base model
    base_steps: int = opt(800, "pretraining steps on solver solutions", 0)
    batch_size: int = opt(128, "sequences per SFT step", 1)
    lr: float = opt(3e-3, "peak learning rate of base pretraining (warmup + cosine)")
    solutions_per_problem: int = opt(4, "solver solutions written out per training problem", 1)
    cut_prob: float = opt(0.25, "share of base examples whose thinking is cut short before <|answer|> (teaches μ)", 0)
    model_only: bool = opt(False, "no environment: the model writes each step's result and gets no verdict")
    eval_every: int = opt(200, "steps between held-out evaluations while pretraining (0: never)", 0)
    # stage 2: backtracking warm-start
    warm_problems: int = opt(100_000, "training problems whose first attempts make warm-start traces (at most all)", 0)
    warm_traces: int = opt(2, "warm-start traces per problem, each from a fresh draw of first attempts", 1)
    warm_rollouts: int = opt(4, "Monte Carlo restarts per candidate backtrack step (search: 2x first attempts)", 1)
    warm_steps: int = opt(600, "warm-start SFT steps", 0)
    warm_lr: float = opt(3e-3, "peak learning rate of the warm-start SFT (warmup + cosine)")
    restart: str = opt("search", "warm-start traces: search (the base model's own distinct attempts up to one that "
                                 "reaches, misses learned too) or best (backtrack to the step whose Monte Carlo "
                                 "restarts succeed most, the paper's recipe)", choices=["search", "best"])
    # stage 3: RL
    arms: str = opt("outcome,mrt", "RL arms, comma-separated: outcome (0/1 reward), mrt (+ progress bonus, J from μ), "
                                   "mrt_verdict (J from the verdicts: no μ)")
    rl_steps: int = opt(100, "REINFORCE steps per arm", 0)
    rl_prompts: int = opt(16, "problems per RL step", 1)
    rl_group: int = opt(8, "samples per problem (the group of the baseline)", 1)
    rl_lr: float = opt(1e-4, "RL learning rate (constant)")
    alpha: float = opt(1.0, "weight α of the progress bonus in the MRT reward", 0)
    mc_rollouts: int = opt(4, "meta-prover rollouts per prefix when estimating J(μ | x, z_{0:j})", 1)
    episodes: str = opt("attempt", "where RL and the evaluation cut a stream into the episodes of the progress bonus: "
                                   "attempt (at each backtrack; μ reads the history) or state (after each backtrack "
                                   "line; μ reads the steps it kept)", choices=["attempt", "state"])
    train_room: int = opt(64, "room of a whole completion (thinking and answer) in warm-start sampling and RL", 1)
    rl_seeds: int = opt(1, "RL seeds (each runs every arm from one warm start, or its own: --warm-per-seed)", 1)
    warm_per_seed: bool = opt(False, "each RL seed starts from its own warm start, drawn with that seed (its traces, "
                                     "its SFT batches), so that the intervals cover the warm start's draw too")
    curve_every: int = opt(20, "RL steps between held-out accuracy checks, the learning curve (0: none)", 0)
    curve_streams: int = opt(4, "sampled streams per test problem at each learning-curve check", 1)
    # evaluation
    eval_streams: int = opt(12, "sampled streams per test problem (accuracy, pass@k, restarts, tokens)", 1)
    value_streams: int = opt(2, "of those, streams per problem that μ scores (J, regret, budget-forced accuracy)", 1)
    eval_rollouts: int = opt(2, "meta-prover rollouts per prefix at evaluation", 1)
    max_episodes: int = opt(5, "episodes K of the J and regret curves", 1)
    budget_step: int = opt(8, "spacing of the token-budget grid of budget-forced accuracy", 1)
    # run
    seed: int = opt(0, "seed of data, initialisation and sampling")
    device: str = opt("auto", "where to run (auto: cuda, else mps, else cpu)", choices=["auto", "cpu", "cuda", "mps"])
    out_dir: str = opt("out", "where checkpoints, logs and results go (presets but cpu: out/<preset>)")
    preset: str = opt("cpu", "cpu (default sizes), full (1.5x the warm-start and 2x the RL steps), deep (full on chain "
                             "at 4 numbers, the paper's warm-start, episodes by state), gpu (4 numbers, larger model) "
                             "or smoke (tiny, seconds)", choices=["cpu", "full", "deep", "gpu", "smoke"])
    smoke: bool = opt(False, "same as --preset smoke")
    fresh: bool = opt(False, "ignore existing checkpoints in --out-dir and run every stage again")
    snapshot_every: int = opt(50, "steps between a stage's checkpoints, from which an interrupted stage resumes", 1)
    explain: str = opt("", "only print one output stream episode by episode, with J and progress, from this stage's "
                           "checkpoint in --out-dir (base, warm, rl_outcome_seed0, rl_mrt_seed0, ...)")
    problem: str = opt("", "the problem for --explain, e.g. '3 7 9:20' (default: a random test problem)")


FULL = dict(warm_steps=900, rl_steps=200, curve_every=40, eval_streams=16)  # --preset full, and deep builds on it
PRESETS = {
    "cpu": {}, "full": dict(FULL, out_dir="out/full"),
    "deep": dict(FULL, task="chain", n_numbers=4, block_size=160, restart="best", warm_problems=2600, episodes="state",
                 arms="outcome,mrt,mrt_verdict", out_dir="out/deep"),
    "gpu": dict(n_numbers=4, n_layer=6, n_head=6, n_embd=384, block_size=192, base_steps=4000, batch_size=256,
                warm_problems=4096, warm_steps=900, rl_steps=200, rl_prompts=32, train_room=128, curve_every=40,
                n_test=1000, eval_streams=16, lr=1e-3, out_dir="out/gpu"),
    "smoke": dict(n_train=1000, n_layer=1, n_head=2, n_embd=32, n_test=32, base_steps=30, eval_every=15, batch_size=32,
                  warm_problems=32, warm_rollouts=2, warm_steps=10, rl_steps=2, rl_prompts=4, rl_group=4,
                  mc_rollouts=2, rl_seeds=1, arms="outcome,mrt,mrt_verdict", eval_streams=4, value_streams=2,
                  eval_rollouts=1, max_episodes=3, budget_step=16, snapshot_every=5, out_dir="out/smoke"),
}


def flag(name: str) -> str:
    """The command-line flag of a Config field: n_numbers -> --n-numbers."""
    return "--" + name.replace("_", "-")


def parse_args(argv=None) -> Config:
    """Config from the command line: defaults, then the preset, then the flags given explicitly."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = lambda message: fail(f"error: {message} (see --help)")  # one line, not argparse's usage block
    types = get_type_hints(Config)  # f.type is only the type's name, under `from __future__ import annotations`
    for f in fields(Config):
        if types[f.name] is bool:
            parser.add_argument(flag(f.name), action="store_true", help=f.metadata["help"])
        else:
            parser.add_argument(flag(f.name), type=types[f.name], default=None, metavar=types[f.name].__name__.upper(),
                                choices=f.metadata["choices"],
                                help=f.metadata["help"] + (f" (default: {f.default})" if f.default != "" else ""))
    args = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None and v is not False}
    preset = "smoke" if args.get("smoke") else args.get("preset", "cpu")
    return Config(**{**PRESETS[preset], **args, "preset": preset})


class UserError(Exception):
    """Bad input from the user: reported as one line naming the option or file, without a traceback."""


def check_config(cfg: Config):
    """Raise UserError naming the first option that is out of range."""
    for f in fields(cfg):
        low, value = f.metadata["low"], getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{flag(f.name)} must be a finite number, got {value}")
        if low is not None and value < low:
            raise UserError(f"{flag(f.name)} must be >= {low}, got {value}")
    arms = cfg.arms.split(",")
    rules = [  # (broken, what to say)
        *[(getattr(cfg, n) <= 0, f"{flag(n)} must be > 0, got {getattr(cfg, n)}") for n in ("lr", "warm_lr", "rl_lr")],
        (cfg.cut_prob > 1, f"--cut-prob must be in [0, 1], got {cfg.cut_prob}"),
        (cfg.value_streams > cfg.eval_streams, f"--value-streams ({cfg.value_streams}) must not exceed --eval-streams "
                                               f"({cfg.eval_streams})"),
        (cfg.n_embd % cfg.n_head, f"--n-embd ({cfg.n_embd}) must be a multiple of --n-head ({cfg.n_head})"),
        (not set(arms) <= set(mrt.ARMS), f"--arms must name some of {', '.join(mrt.ARMS)}, got {cfg.arms!r}"),
        (len(set(arms)) < len(arms), f"--arms names an arm twice: {cfg.arms!r}"),
        (cfg.problem and not cfg.explain, "--problem is the problem for --explain: pass --explain too"),
    ]
    for broken, message in rules:
        if broken:
            raise UserError(message)
    room = make_task(cfg).room(cfg.block_size)
    if cfg.train_room > room:
        lower = f"lower --train-room to {room} or " if room >= 1 else ""
        raise UserError(f"--train-room ({cfg.train_room}) must leave room in --block-size ({cfg.block_size}) for the "
                        f"prompt and the meta-prover's answer: {lower}raise --block-size to "
                        f"{cfg.block_size - room + cfg.train_room}")


def pick_device(name: str) -> torch.device:
    """--device auto picks cuda, then mps, then cpu; a named device must exist here."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    name = next(d for d, ok in available.items() if ok) if name == "auto" else name
    if not available[name]:
        raise UserError(f"--device {name}: no {name} device is available on this machine (try --device cpu)")
    return torch.device(name)


def write_error(path: str, error: Exception) -> UserError:
    """A failed write (a full disk, a read-only mount) as one line naming the file and its --out-dir."""
    reason = error.strerror if isinstance(error, OSError) and error.strerror else "is the disk full?"
    return UserError(f"{path}: the write failed ({reason}); make room in --out-dir {os.path.dirname(path) or '.'} or "
                     f"choose another")


def write_atomically(path: str, write):
    """write(<path>.tmp), then rename it to `path`: a crash mid-write leaves the previous file intact, never a
    truncated one, and a failed write leaves no .tmp behind. torch.save reports a full disk as a RuntimeError."""
    try:
        write(path + ".tmp")
        os.replace(path + ".tmp", path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        if isinstance(e, (OSError, RuntimeError)):
            raise write_error(path, e) from None
        raise


def open_log(path: str):
    """log(**row) appends a row to log.jsonl: training curves, stage timings, where each run starts. Creating it
    (and --out-dir) checks that --out-dir is writable, before any work is done."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        file = open(path, "a")
    except OSError as e:
        raise UserError(f"--out-dir {os.path.dirname(path)}: cannot write there ({e.strerror})") from None

    def log(**row):
        try:
            print(json.dumps(row), file=file, flush=True)
        except OSError as e:
            raise write_error(path, e) from None
    return log


def make_task(cfg: Config):
    """The task object the options describe."""
    return tasks.TASKS[cfg.task](cfg.n_numbers, cfg.max_number, cfg.max_target, calculator=not cfg.model_only)


def new_model(cfg: Config, device) -> GPT:
    """A freshly initialised GPT of the configured size."""
    return GPT(GPTConfig(cfg.block_size, tasks.VOCAB_SIZE, cfg.n_layer, cfg.n_head, cfg.n_embd)).to(device)


DEFAULTS = {f.name: f.default for f in fields(Config)}
STAGE_FIELDS = {  # the options each stage adds to those of the stages before it
    "base": ["task", "n_numbers", "max_number", "max_target", "n_train", "n_test", "n_layer", "n_head", "n_embd",
             "block_size", "seed", "base_steps", "batch_size", "lr", "solutions_per_problem", "cut_prob",
             "model_only"],
    "warm": ["warm_problems", "warm_traces", "warm_rollouts", "warm_steps", "warm_lr", "train_room", "restart"],
    "outcome": ["rl_steps", "rl_prompts", "rl_group", "rl_lr"],  # what every RL arm depends on
    "mrt": ["alpha", "mc_rollouts", "episodes"], "mrt_verdict": ["alpha", "episodes"],
}


def stage_config(cfg: Config, stage: str) -> dict:
    """The options a stage's result depends on: the warm-start builds on the base model, an RL arm on both and on
    the options every arm shares (listed under "outcome"), then on its own."""
    chain = {"base": ["base"], "warm": ["base", "warm"]}.get(stage, ["base", "warm", "outcome", stage])
    return {n: getattr(cfg, n) for s in dict.fromkeys(chain) for n in STAGE_FIELDS[s]}


def load_checkpoint(path: str, device) -> dict:
    """A checkpoint dict, its options under today's names, those it lacks filled in; a bad file is a UserError."""
    try:
        blob = torch.load(path, map_location=device, weights_only=True)
        assert isinstance(blob, dict) and {"model", "model_args", "stage_config", "step"} <= blob.keys()
    except Exception as e:
        raise UserError(f"{path}: not a readable mrt checkpoint ({type(e).__name__}); "
                        f"delete it or pass --fresh") from None
    renamed = {{"max_think": "train_room"}.get(k, k): v for k, v in blob["stage_config"].items()}
    # Older files: the defaults, but one trace, and RL from warm.pt (the warm start drawn with the run's --seed).
    blob["stage_config"] = {**DEFAULTS, "warm_traces": 1, "warm_seed": renamed.get("seed"), **renamed}
    return blob


def model_from(blob: dict, device) -> GPT:
    """The GPT stored in a checkpoint dict."""
    model = GPT(GPTConfig(**blob["model_args"])).to(device)
    model.load_state_dict(blob["model"])
    return model


TASK_FIELDS = ("task", "n_numbers", "max_number", "max_target", "model_only", "block_size")  # a model's task and room


def check_made_with(path: str, blob: dict, cfg: Config, names, what_to_do: str):
    """Refuse (UserError) a checkpoint dict made with other values of `names` than cfg's, naming them and the remedy."""
    made = {k: v for k, v in blob["stage_config"].items() if k in names and v != getattr(cfg, k)}
    if made:
        options = lambda values: " ".join(f"{flag(k)} {v}" for k, v in values.items())
        raise UserError(f"{path} was made with {options(made)}, not {options({k: getattr(cfg, k) for k in made})}: "
                        f"{what_to_do}")


class Checkpoint:
    """A stage's file <out-dir>/<stage>.pt, a plain dict as in nanoGPT: model, optimizer, random-number states, step,
    and the options the stage depends on. Written every --snapshot-every steps and at the end: an interrupted stage
    resumes where it stopped and then draws exactly what an uninterrupted run would have; a finished one is loaded."""

    def __init__(self, path: str, stage_cfg: dict, steps: int, cfg: Config):
        self.path, self.stage_cfg, self.steps, self.every = path, stage_cfg, steps, cfg.snapshot_every
        self.blob = None if cfg.fresh or not os.path.exists(path) else load_checkpoint(path, "cpu")
        saved = self.blob["stage_config"] if self.blob else stage_cfg  # load_checkpoint completes older files
        diff = sorted(k for k in stage_cfg if saved.get(k) != stage_cfg[k])
        if diff:
            raise UserError(f"{path} was made with different options ({', '.join(diff)}); delete it to run this "
                            f"stage again, choose another --out-dir, or pass --fresh to run every stage again")

    def finished(self) -> bool:
        """Whether the file holds the stage's last step."""
        return self.blob is not None and self.blob["step"] == self.steps

    def resume(self, model, optimizer, rngs) -> int:
        """Load the saved state into model, optimizer and generators; returns the step to continue from. Only on the
        device that made it: a CUDA generator's state fits no CPU one, and the warm-start's traces (drawn afresh from
        the seed at every start, not saved) are drawn alike on the same device only."""
        if self.blob is None:
            return 0
        here = model.wte.weight.device.type
        made_on = self.blob.get("device", here)  # files from before the device was recorded: taken as made here
        if made_on != here:
            raise UserError(f"{self.path}: a snapshot made on {made_on} resumes there only: pass --device {made_on}, "
                            f"or delete it to run this stage again from its start on {here}")
        model.load_state_dict(self.blob["model"])
        optimizer.load_state_dict(self.blob["optimizer"])
        for rng, state in zip(rngs, self.blob["rngs"]):
            rng.set_state(state) if isinstance(rng, torch.Generator) else rng.setstate(state)
        print(f"{self.path}: resuming at step {self.blob['step']}")
        return self.blob["step"]

    def step_done(self, step: int, model, optimizer, rngs):
        """After `step` steps: every `every` steps, a point to resume from (the last step is saved by `save`)."""
        if step % self.every == 0 and step < self.steps:
            self.save(step, model, optimizer, rngs)

    def save(self, step: int, model, optimizer, rngs):
        """Write the checkpoint atomically (see `write_atomically`)."""
        blob = {"model": model.state_dict(), "model_args": asdict(model.config), "stage_config": self.stage_cfg,
                "step": step, "optimizer": optimizer.state_dict(), "device": model.wte.weight.device.type,
                "rngs": [r.get_state() if isinstance(r, torch.Generator) else r.getstate() for r in rngs],
                "tokenizer": {"alphabet": tasks.ALPHABET, "specials": tasks.SPECIALS}}
        write_atomically(self.path, lambda tmp: torch.save(blob, tmp))


if __name__ == "__main__":
    main()
