"""Meta Reinforcement Fine-Tuning (Qu et al., 2025), at toy scale. Read top to bottom.

Notation (the paper's):  x a problem,  z = [z_0, z_1, ..., z_{k-1}] the thinking stream cut into episodes,
μ the meta-prover (the same model, forced to stop thinking and answer),  c_j = (x, z_{0:j}) the context after
episodes 0..j,  J(μ | x, z_{0:j}) = J(μ | c_j) μ's success rate from it,  J(π*) a comparator's success rate,
r(x, z) the 0/1 outcome reward,  α the weight of the progress bonus. With --episodes state, μ reads a summary of c_j,
not c_j itself: the steps the stream stands on (`state_context`), a departure from the paper's J(μ | c_j).
Reading order: episodes, sampling, μ and J, progress and regret, advantages and loss, an RL step, warm-start traces.
"""
import itertools
from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

import tasks
from model import completion_logprobs, generate, rows_that_fit


# ----------------------------------------------------------------------------- episodes
def split_episodes(thinking: list[int], by: str = "attempt") -> list[list[int]]:
    """Cut a thinking stream z into episodes [z_0, z_1, ...]; they concatenate to the stream (empty ones dropped).

    By "attempt": just before each <|backtrack|>, so z_0 is the first attempt and each later one a backtrack line
    (<|backtrack|> and the count of steps it keeps) and the attempt after it. μ, reading the history, then never has
    to answer right after a backtrack line, which it never learned to do.
    By "state": just after each backtrack line, where the stream stands on the steps it kept. μ then reads that state
    (`state_context`), so a backtrack that keeps a dead step is charged and one that keeps a good step is paid.
    """
    episodes, in_backtrack_line = [[]], False
    for tok in thinking:
        if tok == tasks.BACKTRACK_ID and by == "attempt":
            episodes.append([])  # the backtrack line opens the next episode
        episodes[-1].append(tok)
        if tok == tasks.NEWLINE_ID and in_backtrack_line and by == "state":
            episodes.append([])  # the backtrack line closes this episode
        in_backtrack_line = tok == tasks.BACKTRACK_ID or (in_backtrack_line and tok != tasks.NEWLINE_ID)
    return [e for e in episodes if e]


def split_completion(completion: list[int]):
    """(thinking, answer) token lists: the answer starts at <|answer|>; trailing pads are dropped."""
    completion = [t for t in completion if t != tasks.PAD_ID]
    cut = completion.index(tasks.ANSWER_ID) if tasks.ANSWER_ID in completion else len(completion)
    return completion[:cut], completion[cut:]


LINE_ENDS = (tasks.NEWLINE_ID, *tasks.VERDICT_IDS)  # a line ends with a newline, or with the environment's verdict


def budget_cut(thinking: list[int], budget: int) -> list[int]:
    """The first `budget` thinking tokens, less an unfinished last line, and less a backtrack line at the end: μ
    answers from complete lines, and never right after a backtrack line (see `split_episodes`)."""
    cut = thinking[:budget]
    while True:
        while cut and cut[-1] not in LINE_ENDS:
            cut.pop()
        last_line = max((i + 1 for i, t in enumerate(cut[:-1]) if t in LINE_ENDS), default=0)
        if cut[last_line:last_line + 1] != [tasks.BACKTRACK_ID]:
            return cut
        cut = cut[:last_line]  # and look again: backtrack lines may follow one another


# ----------------------------------------------------------------------------- sampling (the policy and μ alike)
def complete(model, contexts: list[list[int]], max_new_tokens: int, generator=None, temperature=1.0, samples=1,
             forbid=(), env=None, max_rows=None):
    """`samples` sampled continuations of every context (consecutive per context), without pads; at most
    `max_new_tokens` each, fewer where the longest context leaves less room in the model's block.
    `env`: the task's environment (`tasks.environment`), which writes its tokens into the continuations.

    All rows are sampled at once where their KV cache fits `MAX_CACHE_BYTES` (model.py) and they are at most
    `max_rows`, else in groups of contexts that are. The grouping changes the random numbers a row draws: μ and the
    evaluation sample at most `MetaProver.max_rows` a call, as every reported number was measured."""
    longest = max(map(len, contexts))
    if longest >= model.config.block_size:
        raise ValueError(f"a context of {longest} tokens leaves no room to generate")
    n_new = min(max_new_tokens, model.config.block_size - longest)
    fit = rows_that_fit(model, longest + n_new)
    per_call = max(1, min(fit, max_rows or fit) // samples)  # contexts per generate() call
    rows = []
    for i in range(0, len(contexts), per_call):
        gen = generate(model, contexts[i:i + per_call], n_new, tasks.EOS_ID, tasks.PAD_ID, temperature,
                       forbid=(*forbid, *tasks.NEVER_SAMPLED), generator=generator, samples=samples, env=env)
        rows += [[t for t in row if t != tasks.PAD_ID] for row in gen.tokens.tolist()]
    return rows


def sample_completions(model, task, problems, max_new_tokens: int, generator=None, temperature=1.0, samples=1,
                       max_rows=None):
    """Prompts (token lists) and `samples` sampled completions per problem."""
    prompts = [tasks.encode(task.prompt(p)) for p in problems]
    return prompts, complete(model, prompts, max_new_tokens, generator, temperature, samples,
                             env=tasks.environment(task), max_rows=max_rows)


# ----------------------------------------------------------------------------- the meta-prover μ and J
def forced_answer_context(prompt: list[int], thinking: list[int]) -> list[int]:
    """The input of μ after the thinking z_{0:j-1}: x, the thinking trimmed as under a token budget (`budget_cut`),
    then <|answer|> (the model must answer now)."""
    return prompt + budget_cut(thinking, len(thinking)) + [tasks.ANSWER_ID]


def state_context(task, problem, prompt: list[int], thinking: list[int]) -> list[int]:
    """The input of μ when it reads the state, not the history: x, the steps the stream stands on after `thinking`
    (its last attempt's complete lines, the steps its backtrack kept included) written as one attempt, then
    <|answer|>. After a miss and <|backtrack|>k that is the k steps kept, so J says whether they are worth keeping."""
    whole_lines = thinking[:max((i + 1 for i, t in enumerate(thinking) if t in LINE_ENDS), default=0)]
    steps = tasks.parse_output(tasks.decode(whole_lines)).attempts[-1]
    return prompt + tasks.encode(tasks.attempt_text(task, problem, steps)) + [tasks.ANSWER_ID]


@dataclass
class MetaProver:
    """μ: continue a context that ends in <|answer|> with <|backtrack|> forbidden, and verify the answer (0/1).

    Called with problems, contexts and a number of rollouts n: the 0/1 rewards of n answers per context, in order.
    An answer may be as long as the task's longest correct one (`task.answer_tokens()`).
    """
    model: torch.nn.Module
    task: object
    temperature: float = 1.0
    generator: torch.Generator | None = None
    max_rows: int = 1024  # rows per generate() call (see `complete`)
    FORBIDS = (tasks.BACKTRACK_ID,)  # μ must answer now: it may not think on (not a field: no annotation)

    def __call__(self, problems: list, contexts: list[list[int]], n_rollouts: int = 1) -> list[int]:
        answers = complete(self.model, contexts, self.task.answer_tokens(), self.generator, self.temperature,
                           n_rollouts, forbid=self.FORBIDS, env=tasks.environment(self.task), max_rows=self.max_rows)
        return score_answers(self.task, [p for p in problems for _ in range(n_rollouts)], answers)


def score_answers(task, problems, answers: list[list[int]]) -> list[int]:
    """0/1 reward of each forced answer (token rows that follow <|answer|>; pads after <|eos|> are ignored)."""
    return [tasks.verify(task, p, tasks.ANSWER + tasks.decode(t for t in row if t != tasks.PAD_ID))
            for p, row in zip(problems, answers)]


def estimate_success(meta_prover, problems: list, contexts: list[list[int]], n_rollouts: int) -> list[float]:
    """Monte Carlo J(μ | x, z_{0:j}) ≈ (1/n) Σ_i r(x, μ-rollout_i) for every (problem, context) pair, in one call to
    μ (the n rollouts of a context share its prefill in the KV cache)."""
    unique = {(p, tuple(c)): (p, c) for p, c in zip(problems, contexts)}  # each identical pair once
    pairs = sorted(unique.values(), key=lambda pair: len(pair[1]))  # shortest first: a batch pads to its longest
    rewards = meta_prover([p for p, _ in pairs], [c for _, c in pairs], n_rollouts)  # n per pair, in order
    J_estimates = {}  # (x, c as a tuple) -> J(μ | x, c)
    for i, (p, c) in enumerate(pairs):
        J_estimates[(p, tuple(c))] = sum(rewards[i * n_rollouts:(i + 1) * n_rollouts]) / n_rollouts
    return [J_estimates[(p, tuple(c))] for p, c in zip(problems, contexts)]


def episode_values(meta_prover, problems, prompts, episode_lists, n_rollouts, max_episodes=None,
                   reads_state=False) -> list[list[float]]:
    """[J(μ | x), J(μ | x, z_0), J(μ | x, z_{0:1}), ...] for each stream, up to `max_episodes` episodes; μ reads the
    whole history (`forced_answer_context`) or, with `reads_state`, the state it leaves (`state_context`).

    Past the end of a stream its value stays at the full stream's value (the model stopped thinking).
    """
    def context(problem, prompt, episodes):  # μ's input after `episodes`
        thinking = [t for e in episodes for t in e]
        return state_context(meta_prover.task, problem, prompt, thinking) if reads_state else \
            forced_answer_context(prompt, thinking)

    n_episodes = [max_episodes or len(episodes) for episodes in episode_lists]  # k per stream (all of them if None)
    forced_problems = [p for p, k in zip(problems, n_episodes) for _ in range(k + 1)]
    forced_contexts = [context(p, prompt, episodes[:j])  # μ's input after j episodes
                       for p, prompt, episodes, k in zip(problems, prompts, episode_lists, n_episodes)
                       for j in range(k + 1)]
    J_estimates = iter(estimate_success(meta_prover, forced_problems, forced_contexts, n_rollouts))
    return [[next(J_estimates) for _ in range(k + 1)] for k in n_episodes]  # k + 1 per stream, in turn


def verdict_values(episodes: list[list[int]]) -> list[float]:
    """The ablation of μ: [0, 1[z_0 reached], 1[z_{0:1} reached], ...], J read off the environment's verdicts
    (1 from the first episode that ends in <|reached|> on) instead of estimated by μ's rollouts."""
    return [0.0] + [float(any(tasks.REACHED_ID in e for e in episodes[:j + 1])) for j in range(len(episodes))]


# ----------------------------------------------------------------------------- progress and regret
def progress_bonus(J_values: list[float]) -> list[float]:
    """r_prg(z_j; c_{j-1}) = J(μ | x, z_{0:j}) − J(μ | x, z_{0:j-1}) for j = 0..k-1.

    `J_values` = [J(μ | x), J(μ | x, z_0), ..., J(μ | x, z_{0:k-1})] (k+1 numbers) -> k bonuses.
    """
    return [after - before for before, after in zip(J_values[:-1], J_values[1:])]


def cumulative_regret(J_values: list[float], j_star: float = 1.0) -> list[float]:
    """Δ_k(x; π) = Σ_{j=0}^{k-1} ( J(π*) − J(μ | x, z_{0:j}) ) for k = 1..K.

    `J_values` as in `progress_bonus`; J_values[0] = J(μ | x) has no episode and so is not part of the sum.
    Default J(π*) = 1: every problem here is solvable, so an oracle comparator always succeeds.
    """
    return list(itertools.accumulate(j_star - J for J in J_values[1:]))


# ----------------------------------------------------------------------------- advantages and the REINFORCE loss
def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """A_i = r_i − mean(r over the G samples of the same prompt); rewards (P, G).

    A group-mean baseline with no std division (as Dr. GRPO argues: dividing by the std up-weights prompts that are
    almost always or almost never solved), so the outcome advantage and the progress bonus share one 0/1 scale.
    """
    return rewards - rewards.mean(dim=1, keepdim=True)


def token_advantages(outcome_advantage: float, episode_lengths: list[int], bonuses: list[float], alpha: float,
                     length: int) -> torch.Tensor:
    """Per-token credit of one completion of `length` tokens (episodes first, then the answer).

    Every token gets the outcome advantage; a token of episode j also gets α · r_prg(z_j) — its *own* episode's
    bonus, not the sum of later ones (that sum telescopes to J_final − J_{j-1}: outcome RL with a baseline).
    """
    adv = torch.full((length,), float(outcome_advantage))
    start = 0
    for n, bonus in zip(episode_lengths, bonuses):
        adv[start:start + n] += alpha * bonus
        start += n
    return adv


def reinforce_loss(logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """−(1/|tokens|) Σ_t A_t log π(y_t | ·) over the generated tokens (mask (B, T)); on-policy, no KL term."""
    # where(), not a product with the mask: a padding position may hold log 0 = -inf, and -inf * 0 is NaN
    return -torch.where(mask.bool(), logprobs * advantages, 0.0).sum() / mask.sum().clamp(min=1)


# ----------------------------------------------------------------------------- one RL step of each arm
ARMS = {  # arm -> where the per-episode J of its progress bonus comes from (None: no bonus)
    "outcome": None,  # the 0/1 outcome reward only
    "mrt": "mu",  # + α · progress, J(μ | x, z_{0:j}) from μ's Monte Carlo rollouts (the paper's definition)
    "mrt_verdict": "verdict",  # + α · progress, J from the environment's verdicts alone (`verdict_values`)
}


@dataclass
class Batch:
    """What one REINFORCE step trains on: the rows contexts[i] + completions[i], the policy's tokens credited per
    token with credit[i]; `stats` are the numbers to log."""
    contexts: list[list[int]]
    completions: list[list[int]]
    credit: list[torch.Tensor]
    stats: dict


def rollouts(model, task, problems, cfg, arm: str, gen, meta_gen) -> Batch:
    """The rollouts of one RL step and their credit (`token_advantages`): cfg.rl_group whole streams per problem
    (`problems` holds each problem rl_group times in a row), each at most cfg.train_room tokens, cut into episodes by
    --episodes. The policy samples with `gen` and μ with `meta_gen`: μ's draws never shift the policy's."""
    prompts, completions = sample_completions(model, task, problems, cfg.train_room, gen)
    rewards = torch.tensor([float(tasks.verify(task, p, tasks.decode(c))) for p, c in zip(problems, completions)])
    advantages = group_advantages(rewards.view(-1, cfg.rl_group)).flatten()
    thinking = [split_completion(c)[0] for c in completions]
    episodes = [split_episodes(t, cfg.episodes) for t in thinking]
    if ARMS[arm] == "mu":
        J_values = episode_values(MetaProver(model, task, generator=meta_gen), problems, prompts, episodes,
                                  cfg.mc_rollouts, reads_state=cfg.episodes == "state")
    elif ARMS[arm] == "verdict":
        J_values = [verdict_values(e) for e in episodes]
    else:  # outcome RL: no J, every bonus is 0
        J_values = [[0.0] * (len(e) + 1) for e in episodes]
    bonuses = [progress_bonus(v) for v in J_values]
    credit = [token_advantages(a, [len(e) for e in eps], b, cfg.alpha, len(c))
              for a, eps, b, c in zip(advantages, episodes, bonuses, completions)]
    all_bonuses = [b for bs in bonuses for b in bs]
    stats = {"reward": rewards.mean().item(), "tokens": sum(map(len, thinking)) / len(thinking),
             "episodes": sum(map(len, episodes)) / len(episodes),
             "progress": sum(all_bonuses) / len(all_bonuses) if ARMS[arm] and all_bonuses else None}
    return Batch(prompts, completions, credit, stats)


def rl_loss(model, task, batch: Batch) -> torch.Tensor:
    """The REINFORCE loss of a batch, under grad. Only the tokens the policy wrote are credited: the environment's
    are never sampled."""
    device = model.wte.weight.device
    written = pad_sequence([torch.tensor([not e for e in tasks.environment_mask(task, c)], dtype=torch.float)
                            for c in batch.completions], batch_first=True)  # (B, T): 1 where the policy wrote
    logprobs = completion_logprobs(model, batch.contexts, batch.completions, tasks.NEVER_SAMPLED)
    return reinforce_loss(logprobs, pad_sequence(batch.credit, batch_first=True).to(device), written.to(device))


# ----------------------------------------------------------------------------- the warm-start traces (built before RL)
def build_traces(model, task, problems, n_rollouts: int, max_new_tokens: int, generator, rng) -> list[tasks.Trace]:
    """The paper's warm-start recipe: sample z_0 from the base model; for a failed one, estimate by Monte Carlo the
    success rate of restarting from each of its steps, and write the trace that backtracks to the best one."""
    prompts, firsts = sample_completions(model, task, problems, max_new_tokens, generator)
    traces = []
    failed = {}  # problem index -> its failed z_0
    for i, (p, comp) in enumerate(zip(problems, firsts)):
        attempt = task.checked(tasks.parse_output(tasks.decode(comp)).attempts[0])
        if tasks.is_correct(task, p, attempt):
            traces.append(tasks.Trace(p, attempt))
        else:
            failed[i] = attempt

    def kept_text(i, k):  # the text of failed z_0's first k steps, which a restart from k keeps
        return tasks.steps_text(failed[i][:k])

    jobs = [(i, k) for i in failed for k in restart_steps(task, problems[i], failed[i])]  # (problem, step k)
    continuations = []  # n_rollouts restarts of each job, in order
    if jobs:
        continuations = complete(model, [prompts[i] + tasks.encode(kept_text(i, k)) for i, k in jobs], max_new_tokens,
                                 generator, samples=n_rollouts, env=tasks.environment(task))
    rates = {}  # i -> k -> Monte Carlo success rate of restarting from step k
    solving = {}  # i -> k -> the restarts from k that solved (their steps)
    misses = {}  # i -> k -> the whole restarts from k that missed
    for (i, k), cont in zip([job for job in jobs for _ in range(n_rollouts)], continuations):
        text = kept_text(i, k) + tasks.decode(cont)
        ok = tasks.verify(task, problems[i], text)
        rates.setdefault(i, {}).setdefault(k, 0.0)
        rates[i][k] += ok / n_rollouts
        attempt = task.checked(tasks.parse_output(text).attempts[0])
        solved = tasks.is_correct(task, problems[i], attempt)
        if ok and solved:
            solving.setdefault(i, {}).setdefault(k, []).append(attempt)
        elif not solved and len(attempt) == task.n_numbers - 1:  # a whole attempt that missed: a failing retry
            misses.setdefault(i, {}).setdefault(k, []).append(attempt)
    for i in sorted(rates):
        traces.append(make_trace(task, problems[i], failed[i], rates[i], solving.get(i, {}), rng, misses.get(i, {})))
    return traces


def restart_steps(task, problem, attempt) -> list[int]:
    """Steps k worth backtracking to: z_0's first k steps are legal and a solution goes on with a *different* step k."""
    last = min(tasks.valid_prefix(task, problem, attempt), len(attempt) - 1) if attempt else 0
    return [k for k in range(last + 1) if other_solutions(task, problem, attempt, k)]


def other_solutions(task, problem, attempt, k) -> list[list[str]]:
    """Solutions that keep z_0's first k steps and then leave it (their step k differs from z_0's)."""
    state = tasks.run_steps(task, problem, attempt[:k])
    return [s for s in task.solutions(state, problem[1]) if s and (k >= len(attempt) or s[0] != attempt[k])]


def make_trace(task, problem, attempt, rates: dict, rollouts: dict, rng, misses=None) -> tasks.Trace:
    """Backtrack to the step with the highest restart success rate (ties: keep more), then attempt anew. `rates[k]`
    is the Monte Carlo success rate of restarting after z_0's first k steps; `rollouts[k]` lists the step lists of
    the base model's successful restarts, `misses[k]` those of its whole restarts that missed. The solving attempt is
    one of the successful restarts that leaves z_0 at step k, or else a solver's solution that does; where a restart
    from k missed, half the traces first retry with it and backtrack again (what to do after a second miss)."""
    keep = max(rates, key=lambda k: (rates[k], k))
    good = [s[keep:] for s in rollouts.get(keep, []) if keep >= len(attempt) or s[keep] != attempt[keep]]
    new_steps = good[0] if good else rng.choice(other_solutions(task, problem, attempt, keep))[keep:]
    missed = (misses or {}).get(keep, [])  # the restarts from `keep` that missed
    retries = tuple(missed[:1]) if missed and rng.random() < 0.5 else ()  # half the traces retry one of them first
    return tasks.Trace(problem, attempt, keep, new_steps, retries)


def build_search_traces(model, task, problems, n_samples: int, max_new_tokens: int, generator, rng,
                        max_misses: int = 4) -> list[tasks.Trace]:
    """Traces of a search that never repeats: the base model's own first attempts at a problem (n_samples drawn, each
    as the environment checked it), in the order it drew them, repeats and attempts with an illegal step left out, up
    to the first that reaches; after `max_misses` misses, or none reaching, a solver's solution that none of them is
    (z_0 itself if none was legal). Every attempt after z_0 is learned, misses too: to draw the next attempt as the
    base model would, among the new."""
    _, firsts = sample_completions(model, task, problems, max_new_tokens, generator, samples=n_samples)
    traces = []
    for i, problem in enumerate(problems):
        tried = set()  # the answers already tried
        misses = []
        solved = None
        for comp in firsts[i * n_samples:(i + 1) * n_samples]:
            attempt = task.checked(tasks.parse_output(tasks.decode(comp)).attempts[0])
            key = tasks.answer_key(task, attempt)
            if key in tried or len(attempt) != task.n_numbers - 1 or tasks.run_steps(task, problem, attempt) is None:
                continue
            tried.add(key)
            if tasks.is_correct(task, problem, attempt):
                solved = attempt
                break
            misses.append(attempt)
            if len(misses) == max_misses:
                break
        if solved is None:
            solutions = task.solutions(task.start(problem), problem[1])
            solved = rng.choice([s for s in solutions if tasks.answer_key(task, s) not in tried])
        if misses:
            traces.append(tasks.Trace(problem, misses[0], 0, solved, tuple(misses[1:]), learn_retries=True))
        else:
            traces.append(tasks.Trace(problem, solved))
    return traces
