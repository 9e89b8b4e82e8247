"""Evaluation and reporting: many sampled streams per test problem, paired bootstrap intervals, the table, the figure.

Every reported number is a mean over test problems (and RL seeds) of a per-problem quantity, such as the share of a
problem's m streams that are right. `results.json` keeps those per-problem values for every model and seed, so any
comparison can be recomputed without sampling again (`measures` and `bootstrap` below do it from the saved lists)."""
import json
import math
import os
import platform

import numpy as np
import torch

import mrt
import tasks
from model import autocast

PASS_K = (1, 2, 4, 8)  # pass@k for these k (those up to --eval-streams)
LATER = 4  # the anatomy of later attempts tells z_1, z_2, z_3 apart and pools z_4 and after
RATES = ["backtrack_after_wrong_first", "backtrack_after_right_first", "wrong_first_ending_on_target"]
COMPARED = ["accuracy", "first_attempt_accuracy", "thinking_tokens", "regret", "budget_accuracy"]


# ----------------------------------------------------------------------------- scoring one model
def evaluate(model, task, problems, cfg, device) -> dict:
    """Sample m = --eval-streams streams per test problem and score them; μ runs on the first --value-streams of each
    problem's streams (the J curve and budget-forced accuracy cost μ rollouts per prefix and per budget), cut into
    episodes as RL cuts them (--episodes), μ reading what it reads there: J and the bonus are those MRT trained on.

    The policy draws from one generator and μ from another, both seeded the same for every model: every model's
    streams come from the same random numbers, and μ's draws never shift them. Returns per-problem lists (index p
    follows `problems`), the mean over a problem's streams unless said otherwise.
    """
    model.eval()
    gen = torch.Generator(device).manual_seed(cfg.seed + 12345)
    meta = mrt.MetaProver(model, task, generator=torch.Generator(device).manual_seed(cfg.seed + 54321))
    m, v, P = cfg.eval_streams, cfg.value_streams, len(problems)
    longest = task.room(cfg.block_size, problems)
    budgets = sorted({*range(0, longest, cfg.budget_step), longest})  # the room itself last
    with autocast(device):
        prompts, completions = mrt.sample_completions(model, task, problems, longest, gen, samples=m,
                                                      max_rows=meta.max_rows)  # as many rows a call as μ
        rows = [(p, i) for p in range(P) for i in range(v)]  # the streams μ runs on
        v_problems = [problems[p] for p, _ in rows]
        v_prompts = [prompts[p] for p, _ in rows]
        v_completions = [completions[p * m + i] for p, i in rows]
        episodes = [mrt.split_episodes(mrt.split_completion(c)[0], cfg.episodes) for c in v_completions]
        values = mrt.episode_values(meta, v_problems, v_prompts, episodes, cfg.eval_rollouts, cfg.max_episodes,
                                    reads_state=cfg.episodes == "state")
        forced = budget_accuracy(meta, task, v_problems, v_prompts, v_completions, budgets, cfg.eval_rollouts)
        states = state_values(meta, task, v_problems, v_prompts, v_completions, cfg.eval_rollouts)
    parsed = [score_stream(task, problems[i // m], c) for i, c in enumerate(completions)]
    column = lambda key: np.array([s[key] for s in parsed], dtype=float).reshape(P, m)
    right, first_right, backtracked = column("right"), column("first_right"), column("backtracked")
    bonus_rows = [episode_bonuses(task, p, eps, J, cfg.episodes) for p, eps, J in zip(v_problems, episodes, values)]
    per_value_stream = lambda rows: np.array(rows).reshape(P, v, -1).mean(1).tolist()
    pooled = lambda flags, among: [int((flags * among).sum()), int(among.sum())]  # [count, out of]
    return {
        "streams": m, "value_streams": v, "budgets": budgets,
        "successes": right.sum(1).astype(int).tolist(),  # right streams of m: accuracy and pass@k
        "first_right": first_right.sum(1).astype(int).tolist(),  # streams whose first attempt z_0 solves it
        "thinking_tokens": column("tokens").mean(1).tolist(),
        "first_attempt_tokens": column("first_tokens").mean(1).tolist(),  # what a restart costs
        "later_attempts": later_attempt_counts(parsed, m).tolist(),  # the search after z_0: see `attempt_anatomy`
        "unanswered": (1 - column("answered")).sum(1).astype(int).tolist(),  # streams that never reach <|answer|>
        "episodes": column("episodes").mean(1).tolist(),
        "J": per_value_stream(values),  # J[p][j] = J(μ | x, z_{0:j-1}); J[p][0] = J(μ | x)
        "budget_accuracy": per_value_stream(forced),  # [p][b]: μ forced to answer after budgets[b] thinking tokens
        # Does the model backtrack when it should? Counts pooled over all streams, split by whether z_0 was right.
        "backtrack_after_wrong_first": pooled(backtracked, 1 - first_right),
        "backtrack_after_right_first": pooled(backtracked, first_right),
        # A wrong z_0 whose last line still ends on the target *looks* solved: the model cannot see that it failed.
        "wrong_first_ending_on_target": pooled(column("ends_on_target"), 1 - first_right),
        "episode_bonuses": [[row for i in range(v) for row in bonus_rows[p * v + i]] for p in range(P)],
        "step_states": [[row for i in range(v) for row in states[p * v + i]] for p in range(P)],  # [alive, J]
        "backtracks": np.array([s["backtracks"] for s in parsed]).reshape(P, m, 6).sum(1).tolist(),  # backtrack_counts
    }


def budget_accuracy(meta_prover, task, problems, prompts, completions, budgets, n_rollouts=1) -> list[list[float]]:
    """Success of each stream when its thinking is stopped after B tokens and μ must answer, for each B in `budgets`
    (a row per stream, a column per budget).

    A stream that finished thinking within B keeps its own 0/1 answer (a budget-agnostic model needs no forcing);
    otherwise it scores μ's Monte Carlo success rate from the cut stream. All forced contexts go to μ in one call.
    """
    out, slots, ctx_p, ctx_c = [], [], [], []
    for i, (p, prompt, comp) in enumerate(zip(problems, prompts, completions)):
        thinking, answer = mrt.split_completion(comp)
        out.append([float(tasks.verify(task, p, tasks.decode(comp)))] * len(budgets))
        for b, budget in enumerate(budgets):
            if not answer or len(thinking) > budget:
                slots.append((i, b))
                ctx_p.append(p)
                ctx_c.append(mrt.forced_answer_context(prompt, thinking[:budget]))
    for (i, b), value in zip(slots, mrt.estimate_success(meta_prover, ctx_p, ctx_c, n_rollouts)):
        out[i][b] = value
    return out


def episode_bonuses(task, problem, episodes, J, by: str = "attempt") -> list:
    """[j, r_prg(z_j), its verdict (1 reached, 0 missed, -1 none: unfinished), 1[z_j repeats an earlier attempt], what
    its backtrack line kept (`episode_kept`: by attempt the one opening z_j, by state the one closing it)] for the
    episodes, cut `by` as in `split_episodes`, that J covers: what μ's progress bonus says beyond the verdict."""
    parsed = tasks.parse_output(tasks.decode(t for e in episodes for t in e))
    # By state, a stream that ends in a backtrack line has one attempt more than episodes: the one that line opens.
    aligned = len(parsed.attempts) - len(episodes) in ((0, 1) if by == "state" else (0,))
    keys = [tasks.answer_key(task, task.checked(a)) for a in parsed.attempts] if aligned else [None] * len(episodes)
    kept = [episode_kept(task, problem, parsed, j, e, by) if aligned else NONE_KEPT for j, e in enumerate(episodes)]
    verdict = lambda e: 1 if tasks.REACHED_ID in e else 0 if tasks.MISSED_ID in e else -1
    return [[j, bonus, verdict(episodes[j]), int(keys[j] is not None and keys[j] in keys[:j]), kept[j]]
            for j, bonus in zip(range(len(episodes)), mrt.progress_bonus(J))]


# What a backtrack line keeps of the attempt before it. The solver judges a state alive (the target can still be
# reached from it) or dead: a measurement only, never shown to the model.
NONE_KEPT, NO_STEP, ALIVE, DEAD = -1, 0, 1, 2  # NONE_KEPT: no backtrack line, or a malformed one


def is_alive(task, problem, steps) -> bool:
    """Whether the target can still be reached after `steps` from the start (False after an illegal step)."""
    state = tasks.run_steps(task, problem, steps)
    return state is not None and task.can_reach(state, problem[1])


def kept_state(task, problem, parsed: tasks.Parsed, j: int) -> int:
    """What the backtrack line opening attempt j keeps of attempt j−1: NO_STEP, ALIVE, DEAD, NONE_KEPT (none, or
    a malformed one)."""
    keep = parsed.backtracks[j - 1] if j else None
    if keep is None:
        return NONE_KEPT
    kept = parsed.attempts[j - 1][:keep]
    if not kept:
        return NO_STEP
    return ALIVE if is_alive(task, problem, kept) else DEAD


def episode_kept(task, problem, parsed: tasks.Parsed, j: int, episode: list[int], by: str) -> int:
    """What episode j's backtrack line keeps (`kept_state`): by attempt the line that opens it, by state the one that
    closes it (NONE_KEPT for a last episode that ends without a whole backtrack line)."""
    has_line = by == "attempt" or (episode[-1] == tasks.NEWLINE_ID and tasks.BACKTRACK_ID in episode)
    return kept_state(task, problem, parsed, j + (by == "state")) if has_line else NONE_KEPT


def backtrack_counts(task, problem, parsed: tasks.Parsed) -> list[int]:
    """[backtracks, those that keep a step, those whose kept state is ALIVE, steps kept, those after an attempt whose
    first step is alive, those of them that keep a step] of one stream, counting well-formed backtrack lines only."""
    well_formed = [j for j in range(1, len(parsed.attempts)) if parsed.backtracks[j - 1] is not None]
    kinds = [kept_state(task, problem, parsed, j) for j in well_formed]
    keeps = [kind != NO_STEP for kind in kinds]
    steps_kept = [len(parsed.attempts[j - 1][:parsed.backtracks[j - 1]]) for j in well_formed]
    first_alive = [bool(a) and is_alive(task, problem, a[:1]) for a in (parsed.attempts[j - 1] for j in well_formed)]
    return [len(well_formed), sum(keeps), kinds.count(ALIVE), sum(steps_kept), sum(first_alive),
            sum(k and a for k, a in zip(keeps, first_alive))]


def step_ends(task, problem, thinking: list[int]) -> list[tuple[int, bool]]:
    """(end, alive) for each step line inside an attempt (one that leaves two numbers or more, so no verdict follows
    it: μ must judge the state itself): `end` counts the stream's tokens through the line's newline; `alive`,
    whether the target can still be reached from the state after it (the attempt's steps so far, kept ones included)."""
    out = []
    for end, token in enumerate(thinking, 1):
        if token != tasks.NEWLINE_ID:
            continue
        text = tasks.decode(thinking[:end])
        line = text[:-1].rpartition("\n")[2]
        steps = tasks.parse_output(text).attempts[-1]
        if line and tasks.BACKTRACK not in line and len(steps) < task.n_numbers - 1:
            out.append((end, is_alive(task, problem, steps)))
    return out


def state_values(meta_prover, task, problems, prompts, completions, n_rollouts=1) -> list[list]:
    """[1[alive], J(μ | x, thinking through the step)] after each step line inside an attempt of each stream (see
    `step_ends`): can μ, forced to answer there, tell a state from which the target is reachable from a dead one,
    with no verdict to read? One call to μ."""
    owners = []  # (stream, 1[alive]) of each context
    contexts = []
    for i, (problem, prompt, completion) in enumerate(zip(problems, prompts, completions)):
        thinking = mrt.split_completion(completion)[0]
        for end, alive in step_ends(task, problem, thinking):
            owners.append((i, int(alive)))
            contexts.append(prompt + thinking[:end] + [tasks.ANSWER_ID])
    J = mrt.estimate_success(meta_prover, [problems[i] for i, _ in owners], contexts, n_rollouts) if contexts else []
    out = [[] for _ in problems]
    for (i, alive), value in zip(owners, J):
        out[i].append([alive, value])
    return out


def bonus_measures(evals: list[dict], seed: int = 0) -> dict:
    """Pooled over streams and seeds: the mean bonus of each kind of episode, with a 95% bootstrap interval that redraws
    test problems (a problem's episodes go together: they are not independent)."""
    rows = np.array([[p, *r] for e in evals for p, rs in enumerate(e["episode_bonuses"]) for r in rs]).reshape(-1, 6)
    problem, j, bonus, verdict, repeat, kept = rows.T
    reached, missed, later = verdict == 1, verdict == 0, j > 0
    kinds = {"missed z_0": ~later & missed, "reached z_0": ~later & reached, "later reached": later & reached,
             "later missed, new": later & missed & (repeat == 0), "unfinished": verdict == -1,
             "later missed, repeat": later & missed & (repeat == 1), "keeps no step": kept == NO_STEP,
             "keeps an alive state": kept == ALIVE, "keeps a dead state": kept == DEAD}
    mean = lambda p, x: {"n": len(x), **pooled_mean(p, x, len(evals[0]["episode_bonuses"]), seed)}
    return {k: mean(problem[w], bonus[w]) for k, w in kinds.items()}


def pooled_mean(problem: np.ndarray, x: np.ndarray, n_problems: int, seed: int = 0) -> dict:
    """The mean of items x, item i belonging to test problem problem[i], pooled over problems (`ratio_interval`)."""
    sums = np.bincount(problem.astype(int), x, minlength=n_problems)
    counts = np.bincount(problem.astype(int), minlength=n_problems)
    return ratio_interval(sums, counts, seed)


def ratio_interval(sums: np.ndarray, counts: np.ndarray, seed: int = 0, n_boot: int = 2000) -> dict:
    """Σ sums / Σ counts over problems (a mean pooled over a varying number of items per problem), with a 95%
    percentile bootstrap interval that redraws the problems; None where there are no items."""
    if not counts.sum():
        return {"mean": None, "low": None, "high": None}
    weights = np.random.default_rng(seed).multinomial(len(sums), np.full(len(sums), 1 / len(sums)), size=n_boot)
    replicates = (weights @ sums)[weights @ counts > 0] / (weights @ counts)[weights @ counts > 0]
    low, high = np.percentile(replicates, [2.5, 97.5])
    return {"mean": float(sums.sum() / counts.sum()), "low": float(low), "high": float(high)}


def score_stream(task, problem, completion) -> dict:
    """What one sampled stream did: right or not, its first attempt and the tokens up to its verdict (what a restart
    costs), its length, whether it answered, and each later attempt the environment checked (n−1 whole lines; a line
    the room cut short is not one): [its index j, right, 1[z_j repeats an earlier attempt of the stream]]."""
    thinking = mrt.split_completion(completion)[0]
    text = tasks.decode(completion)
    episodes = mrt.split_episodes(thinking)
    whole_lines = mrt.budget_cut(thinking, len(thinking))
    attempts = [task.checked(a) for a in tasks.parse_output(tasks.decode(whole_lines)).attempts]
    last_step = tasks.parse_step(attempts[0][-1]) if attempts[0] else None
    keys = [tasks.answer_key(task, a) for a in attempts]
    z_0 = episodes[0] if episodes else []
    to_verdict = next((i + 1 for i, t in enumerate(z_0) if t in tasks.VERDICT_IDS), len(z_0))  # what a restart costs
    return {"right": tasks.verify(task, problem, text), "first_right": tasks.is_correct(task, problem, attempts[0]),
            "tokens": len(thinking), "episodes": len(episodes), "first_tokens": to_verdict,
            "later": [(j, tasks.is_correct(task, problem, a), keys[j] in keys[:j])
                      for j, a in enumerate(attempts) if j and len(a) == task.n_numbers - 1],
            "answered": tasks.parse_output(text).answer is not None, "backtracked": tasks.BACKTRACK_ID in thinking,
            "backtracks": backtrack_counts(task, problem, tasks.parse_output(tasks.decode(thinking))),
            "ends_on_target": last_step is not None and last_step[3] == problem[1]}


def later_attempt_counts(scored: list[dict], m: int) -> np.ndarray:
    """(P, 3, LATER): of each problem's later attempts (its m scored streams in a row), [how many, how many right,
    how many repeats] by index, z_1, z_2, ..., the last column pooling z_LATER and after."""
    counts = np.zeros((len(scored) // m, 3, LATER), dtype=int)
    for i, s in enumerate(scored):
        for j, right, repeat in s["later"]:
            counts[i // m, :, min(j, LATER) - 1] += (1, right, repeat)
    return counts


def restart_accuracy(first_right: int, m: int, first_tokens: float, budgets: list) -> list[float]:
    """Restarts checked by the environment, the parallel comparator at equal thinking tokens: at each budget B, pass@k
    of a problem's m first attempts z_0 (`first_right` reached), k = ⌊B / their mean tokens⌋ (at most m), at the room
    using the tokens a stream keeps for its answer. No answer after them: `measures` adds budget-forcing's answer."""
    return [pass_at_k(m, first_right, min(m, int(B // max(first_tokens, 1)))) for B in budgets]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are right (Chen et al., 2021): 1 − C(n−c, k) / C(n, k), the chance
    that k of the n samples, drawn without replacement, include a right one."""
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


# ----------------------------------------------------------------------------- statistics over problems and seeds
def measures(evals: list[dict]) -> dict:
    """Per-(seed, problem) arrays (S, P, ...) of every reported measure, from one model's evaluations (one per seed)."""
    get = lambda key: np.array([e[key] for e in evals], dtype=float)
    m = evals[0]["streams"]
    J, forced = get("J"), get("budget_accuracy")
    restarts = np.array([[restart_accuracy(int(c), m, t, e["budgets"]) for c, t in
                          zip(e["first_right"], e["first_attempt_tokens"])] for e in evals])
    return {
        "accuracy": get("successes") / m, "first_attempt_accuracy": get("first_right") / m,
        "thinking_tokens": get("thinking_tokens"), "episodes": get("episodes"),
        **{f"pass@{k}": np.vectorize(lambda c: pass_at_k(m, int(c), k))(get("successes")) for k in PASS_K if k <= m},
        "J": J, "regret": np.apply_along_axis(mrt.cumulative_regret, -1, J),  # [..., k-1]: Δ_k, J(π*) = 1
        "budget_accuracy": forced,
        "restarts": restarts,  # [..., b]
        # Budget-forced accuracy ends in μ's unchecked answer: its restarts get one where none reached, μ's at B = 0.
        "restarts_then_answer": 1 - (1 - restarts) * (1 - forced[..., :1]),  # budgets[0] = 0: ≈ J(μ | x)
    }


def bootstrap(x: np.ndarray, seed: int = 0, n_boot: int = 2000) -> dict:
    """The mean of x (S seeds, P problems, ...) over seeds and problems, with a 95% percentile bootstrap interval.

    Each of the n_boot replicates redraws the P problems with replacement and, inside it, the S seeds with
    replacement; the same draw weighs every seed and every problem alike, so a difference of two arms (x = a − b,
    seed s of one against seed s of the other) stays paired. The same `seed` gives the same draws for every measure.
    """
    S, P = x.shape[:2]
    rng = np.random.default_rng(seed)
    seed_weights = rng.multinomial(S, np.full(S, 1 / S), size=n_boot)  # (n_boot, S): times each seed is drawn
    problem_weights = rng.multinomial(P, np.full(P, 1 / P), size=n_boot)  # (n_boot, P)
    replicates = np.einsum("bs,sp...,bp->b...", seed_weights, x, problem_weights) / (S * P)
    low, high = np.percentile(replicates, [2.5, 97.5], axis=0)
    return {"mean": x.mean((0, 1)).tolist(), "low": low.tolist(), "high": high.tolist()}


def report(evals: dict, seed: int) -> dict:
    """What results.json says about the models, from their evaluations ({model: [one per seed]}), which it keeps:
    each model's measures with their intervals, the paired differences a − b of the RL arms with each other, with
    the base model and with the warm start (seed s of one arm against seed s of another: the same data order), the
    pooled backtrack rates, what the progress bonus carries, and the thinking tokens to reach a target accuracy."""
    per_model = {name: measures(e) for name, e in evals.items()}
    summary = {name: {k: bootstrap(x, seed) for k, x in ms.items()} for name, ms in per_model.items()}
    arms = [name for name in evals if name not in ("base", "warm")]
    base = per_model["base"]  # its restarts (1, P, budgets) are every model's comparator
    versus_restarts = {name: {"accuracy": bootstrap(ms["accuracy"] - base["restarts"][..., -1], seed),  # at the room
                              "budget_accuracy": bootstrap(ms["budget_accuracy"] - base["restarts_then_answer"], seed)}
                       for name, ms in per_model.items()}
    pairs = [(a, b) for i, b in enumerate(arms) for a in arms[i + 1:]] + [(a, ref) for ref in ("base", "warm")
                                                                          for a in arms]  # "warm": what RL adds
    paired = {f"{a} - {b}": {k: bootstrap(per_model[a][k] - per_model[b][k], seed) for k in COMPARED} for a, b in pairs}
    for a, b in pairs:  # with few seeds the interval understates the seed-to-seed spread: show each seed's gap
        gaps = (per_model[a]["accuracy"] - per_model[b]["accuracy"]).mean(1)
        paired[f"{a} - {b}"]["accuracy_per_seed"] = gaps.tolist()
    # Budget-forced tokens to reach the base model's whole-budget accuracy (a target set by no RL arm) and outcome RL's.
    budgets = evals["base"][0]["budgets"]
    reach = lambda target: {"target": target, **{name: tokens_to_reach(budgets, s["budget_accuracy"]["mean"], target)
                                                 for name, s in summary.items()}}
    return {"budgets": budgets, "summary": summary, "paired": paired, "versus_base_restarts": versus_restarts,
            "backtrack_rates": {name: {k: pooled_rate(e, k) for k in RATES} for name, e in evals.items()},
            "later_attempts": {name: attempt_anatomy(e, evals["base"][0]) for name, e in evals.items()},
            "progress_bonus": {name: bonus_measures(e, seed) for name, e in evals.items()},
            "backtracks": {name: backtrack_measures(e, seed) for name, e in evals.items()},
            "step_states": {name: step_state_measures(e, seed) for name, e in evals.items()},
            "tokens_to_reach_base_accuracy": reach(summary["base"]["budget_accuracy"]["mean"][-1]),
            "tokens_to_reach_outcome_accuracy": reach(summary["outcome"]["budget_accuracy"]["mean"][-1])
            if "outcome" in summary else {"target": None}, "per_problem": evals}


def attempt_anatomy(evals: list[dict], base: dict) -> dict:
    """What the search does after its first attempt, pooled over streams and seeds: later attempts per stream; how
    often a later attempt the environment checked reaches, overall and by its index j (z_1, z_2, z_3, z_4 and after),
    against the base model's first-attempt success on the same problems (each problem weighted by its later
    attempts); the share of later attempts that repeat an earlier one of their stream; streams that never answer."""
    attempts, right, repeats = np.sum([e["later_attempts"] for e in evals], axis=0).transpose(1, 0, 2)  # (P, LATER)
    base_first = np.array(base["first_right"]) / base["streams"]  # (P,)
    streams = len(evals) * evals[0]["streams"] * len(base_first)
    share = lambda count, total: float(count / total) if total else None
    return {"per_stream": float(attempts.sum() / streams), "success": share(right.sum(), attempts.sum()),
            "base_first_attempt": share(base_first @ attempts.sum(1), attempts.sum()),
            "by_index": [{"n": int(attempts[:, j].sum()), "success": share(right[:, j].sum(), attempts[:, j].sum()),
                          "base_first_attempt": share(base_first @ attempts[:, j], attempts[:, j].sum())}
                         for j in range(LATER)],
            "repeats": share(repeats.sum(), attempts.sum()),
            "never_answer": float(np.sum([e["unanswered"] for e in evals]) / streams)}


def backtrack_measures(evals: list[dict], seed: int = 0) -> dict:
    """Pooled over all streams and seeds: backtracks per stream, the share that keep a step (of all; after an alive /
    a dead first step: does the model keep where it pays?), the steps kept, the share of kept states alive."""
    counts = np.sum([e["backtracks"] for e in evals], axis=0).T  # (6, P): backtrack_counts's, per problem
    backtracks, keeping, alive, steps, first_alive, keeping_first_alive = counts
    streams = len(evals) * evals[0]["streams"] * len(backtracks)
    return {"per_stream": float(backtracks.sum() / streams), "keep_a_step": ratio_interval(keeping, backtracks, seed),
            "keep_if_first_step_alive": ratio_interval(keeping_first_alive, first_alive, seed),
            "keep_if_first_step_dead": ratio_interval(keeping - keeping_first_alive, backtracks - first_alive, seed),
            "steps_kept": ratio_interval(steps, backtracks, seed), "kept_alive": ratio_interval(alive, keeping, seed)}


def step_state_measures(evals: list[dict], seed: int = 0) -> dict:
    """Pooled over the value streams' states inside an attempt: the share that are alive, and J(μ) after an alive
    and after a dead one (does μ see progress inside an attempt?); intervals redraw test problems."""
    rows = np.array([[p, *r] for e in evals for p, rs in enumerate(e["step_states"]) for r in rs]).reshape(-1, 3)
    problem, alive, J = rows.T
    P = len(evals[0]["step_states"])
    return {"alive": pooled_mean(problem, alive, P, seed),
            "J after an alive state": pooled_mean(problem[alive == 1], J[alive == 1], P, seed),
            "J after a dead state": pooled_mean(problem[alive == 0], J[alive == 0], P, seed)}


def pooled_rate(evals: list[dict], key: str) -> float:
    """A share pooled over all streams of all seeds, from [count, out of] pairs."""
    count, total = np.sum([e[key] for e in evals], axis=0)
    return count / max(1, total)


def tokens_to_reach(budgets: list, accuracy: list, target: float):
    """The smallest thinking budget at which the accuracy reaches `target` (None if it never does)."""
    return next((b for b, a in zip(budgets, accuracy) if a >= target - 1e-9), None)


def learning_curves(log_path: str, arms: list, seeds: list) -> dict:
    """{arm: {"steps": [...], "accuracy": [held-out accuracy at each step, mean over seeds]}} from log.jsonl (a
    later run in the same out-dir overwrites an earlier one's checks); steps that not every seed has are left out."""
    found = {}
    for r in map(json.loads, open(log_path)):
        if r.get("stage") == "heldout":
            if r["step"] == 0:  # a stage trained afresh: forget the checks of an earlier run of it
                found = {k: v for k, v in found.items() if k[:2] != (r["arm"], r["seed"])}
            found[r["arm"], r["seed"], r["step"]] = r["accuracy"]
    steps = {arm: sorted({s for a, _, s in found if a == arm and all((a, seed, s) in found for seed in seeds)})
             for arm in arms}
    return {arm: {"steps": steps[arm], "accuracy": [float(np.mean([found[arm, seed, s] for seed in seeds]))
                                                    for s in steps[arm]]} for arm in arms}


def stage_seconds(log_path: str) -> dict:
    """Wall time of each stage trained in this out-dir, read from its log.jsonl (the latest entry per stage)."""
    return {r["stage"]: r["seconds"] for r in map(json.loads, open(log_path)) if "seconds" in r} \
        if os.path.exists(log_path) else {}


def machine(device: torch.device) -> str:
    """What the numbers were measured on, the device that ran them: they depend on it (another CPU draws other random
    numbers). A run with --device cpu names the CPU even where a GPU is present."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, PyTorch {torch.__version__}"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores, PyTorch {torch.__version__}"


# ----------------------------------------------------------------------------- reporting
def cell(s: dict, i=None, digits=3, star=True, interval=True) -> str:
    """`mean [low, high]`, or the signed mean alone (interval=False); with star, a * where the interval excludes 0."""
    mean, low, high = (s[k] if i is None else s[k][i] for k in ("mean", "low", "high"))
    text = f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]" if interval else f"{mean:+.{digits}f}"
    return text + ("*" if star and (low > 0 or high < 0) else " ")


def show(x, form=".3f") -> str:
    return "n/a" if x is None else format(x, form)


def print_table(results: dict, cfg):
    """The headline numbers on one screen, at most 120 columns; results.json holds every measure."""
    print_models(results, cfg)
    print_paired(results, cfg)
    print_versus_restarts(results)
    print_search(results)
    print_progress(results)
    for arm, curve in results.get("learning_curve", {}).items():
        print(f"held-out accuracy during RL, {arm}: " + " ".join(f"{a:.3f}" for a in curve["accuracy"])
              + f" (steps {', '.join(map(str, curve['steps']))})")
    for key, whose in (("base", "the base model's"), ("outcome", "outcome RL's")):
        reach = results[f"tokens_to_reach_{key}_accuracy"]
        if reach["target"] is not None:  # outcome RL's is None where the outcome arm did not run
            print(f"budget-forced tokens to reach {whose} accuracy with the whole budget ({reach['target']:.3f}):\n  "
                  + ", ".join(f"{k} {v}" for k, v in reach.items() if k != "target"))
    print(f"every measure, per problem and seed: {os.path.join(cfg.out_dir, 'results.json')}")


def print_models(results: dict, cfg):
    """Each model: accuracy, first attempt, thinking tokens, episodes, and the restarts of its own first attempts."""
    print(f"\n{'model':<13}{'accuracy':<24}{'first attempt':>14}{'tokens':>8}{'episodes':>10}{'restarts':>10}")
    for name, s in results["summary"].items():
        print(f"{name:<13}{cell(s['accuracy'], star=False):<24}{s['first_attempt_accuracy']['mean']:>14.3f}"
              f"{s['thinking_tokens']['mean']:>8.1f}{s['episodes']['mean']:>10.2f}{s['restarts']['mean'][-1]:>10.3f}")
    seeds = f"{cfg.rl_seeds} RL seed(s)" + (", a warm start each" if cfg.warm_per_seed else "")
    print(f"({results['test_problems']} test problems × {cfg.eval_streams} streams, {seeds}; [95% bootstrap interval "
          f"over problems and seeds];\n restarts: the model's own first attempts, as many as fit in the room, each "
          f"checked by the environment)")


def print_paired(results: dict, cfg):
    """The paired differences a − b (seed s against seed s, problem by problem): * where the interval excludes 0."""
    K = cfg.max_episodes
    print(f"\n{'paired difference':<22}{'accuracy':<25}{'first attempt':<25}{'thinking tokens':<19}"
          f"{f'regret Δ_{K}':<22}" + ("seeds > 0" if cfg.rl_seeds > 1 else ""))
    for pair, d in results["paired"].items():
        gaps = d["accuracy_per_seed"]
        by_seed = f"{sum(g > 0 for g in gaps)}/{len(gaps)}" if len(gaps) > 1 else ""
        print(f"{pair:<22}{cell(d['accuracy']):<25}{cell(d['first_attempt_accuracy']):<25}"
              f"{cell(d['thinking_tokens'], digits=1):<19}{cell(d['regret'], K - 1, 2):<22}{by_seed}")


def print_versus_restarts(results: dict):
    """Each model against the base model's restarts: at the room, and budget-forced at B thinking tokens."""
    budgets = results["budgets"]
    inner = list(range(1, len(budgets) - 1))  # the budgets between 0 and the room: four of them, evenly spaced
    step = max(1, len(inner) // 4)
    shown = inner[step - 1::step][:4]
    print("\neach model − the base model's restarts: at the room, and budget-forced − restarts that then answer")
    print(f"{'':<13}{'at the room':<25}" + "".join(f"{f'B = {budgets[i]}':<10}" for i in shown))
    for name, v in results["versus_base_restarts"].items():
        print(f"{name:<13}{cell(v['accuracy']):<25}"
              + "".join(f"{cell(v['budget_accuracy'], i, interval=False):<10}" for i in shown))


def print_search(results: dict):
    """What the search does after z_0, and what μ's progress bonus pays a missed later attempt."""
    print("\nlater attempts (z_1 on): per stream, how often one reaches, the base model's z_0 on the same problems;")
    print("repeats of an earlier attempt; streams with no answer; μ's mean progress bonus of a missed new / repeat")
    print(f"{'':<13}{'per stream':>11}{'reach':>8}{'base z_0':>10}{'repeats':>9}{'no answer':>11}{'new miss':>11}"
          f"{'repeat':>9}")
    for name, a in results["later_attempts"].items():
        b = results["progress_bonus"][name]
        print(f"{name:<13}{a['per_stream']:>11.2f}{show(a['success']):>8}{show(a['base_first_attempt']):>10}"
              f"{show(a['repeats'], '.1%'):>9}{a['never_answer']:>11.1%}"
              f"{show(b['later missed, new']['mean'], '+.3f'):>11}{show(b['later missed, repeat']['mean'], '+.3f'):>9}")


def print_progress(results: dict):
    """What a backtrack keeps, and whether μ's J and bonus tell an alive state (target still reachable) from a dead."""
    print("\nbacktracks: per stream; share that keep a step: of all, after an alive / a dead first step; kept alive;")
    print("inside an attempt: share of states alive, J(μ) after an alive / a dead one; μ's mean bonus of an episode")
    print("whose backtrack keeps 0 steps / an alive / a dead state (alive: the solver can reach the target from it)")
    print(f"{'':<13}{'per stream':>11}{'keep':>7}{'1st alive':>10}{'1st dead':>9}{'alive':>7}{'inside: alive':>15}"
          f"{'J alive':>9}{'J dead':>8}{'keeps 0':>10}{'alive':>8}{'dead':>8}")
    for name, b in results["backtracks"].items():
        s = results["step_states"][name]
        bonus = results["progress_bonus"][name]
        print(f"{name:<13}{b['per_stream']:>11.2f}{show(b['keep_a_step']['mean'], '.0%'):>7}"
              f"{show(b['keep_if_first_step_alive']['mean'], '.0%'):>10}"
              f"{show(b['keep_if_first_step_dead']['mean'], '.0%'):>9}"
              f"{show(b['kept_alive']['mean'], '.0%'):>7}{show(s['alive']['mean'], '.0%'):>15}"
              f"{show(s['J after an alive state']['mean']):>9}{show(s['J after a dead state']['mean']):>8}"
              + "".join(f"{show(bonus[k]['mean'], '+.3f'):>{w}}" for k, w in
                        (("keeps no step", 10), ("keeps an alive state", 8), ("keeps a dead state", 8))))


def plot(results: dict, out_dir: str):
    """accuracy vs thinking tokens, cumulative regret vs episodes, RL reward curves -> PNG (if matplotlib is here)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 6))
    for name, s in results["summary"].items():
        line, = ax1.plot(results["budgets"], s["budget_accuracy"]["mean"], label=f"{name} (μ forced at B)")
        ax1.fill_between(results["budgets"], s["budget_accuracy"]["low"], s["budget_accuracy"]["high"],
                         color=line.get_color(), alpha=0.15)
        k = np.arange(1, len(s["regret"]["mean"]) + 1)
        ax2.plot(k, s["regret"]["mean"], label=name, color=line.get_color())
        ax2.fill_between(k, s["regret"]["low"], s["regret"]["high"], color=line.get_color(), alpha=0.15)
    base = results["summary"]["base"]
    ax1.plot(results["budgets"], base["restarts_then_answer"]["mean"], "k:", marker="x",
             label="base, restarts checked by the environment (then μ answers)")
    ax1.axvline(results["config"]["train_room"], color="gray", ls=":", lw=1, label="RL room (--train-room)")
    ax1.set(xlabel="thinking tokens", ylabel="accuracy", title="accuracy vs thinking tokens (95% intervals)")
    ax2.set(xlabel="episodes k", ylabel="cumulative regret Δ_k  (J(π*) = 1)", title="cumulative regret",
            xticks=np.arange(1, len(base["regret"]["mean"]) + 1))
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"))]
    for arm in results["config"]["arms"].split(","):
        by_step = {r["step"]: r["reward"] for r in rows  # later runs in the same out-dir overwrite earlier ones
                   if r.get("stage") == f"rl_{arm}" and r.get("seed") == results["config"]["seed"] and "reward" in r}
        curve = [by_step[k] for k in sorted(by_step)]
        smooth = [sum(curve[max(0, i - 9):i + 1]) / len(curve[max(0, i - 9):i + 1]) for i in range(len(curve))]
        line, = ax3.plot(smooth, label=f"{arm}: train reward (first seed, moving mean of 10)")
        curve = results.get("learning_curve", {}).get(arm)
        if curve and curve["steps"]:
            ax3.plot(curve["steps"], curve["accuracy"], "o--", color=line.get_color(),
                     label=f"{arm}: held-out accuracy (mean over seeds)")
    ax3.set(xlabel="RL step", ylabel="accuracy / reward", title="RL: training reward and held-out accuracy")
    for ax in (ax1, ax2, ax3):
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14))  # below the plot: no curve hidden
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "results.png"), dpi=110)
    plt.close(fig)
