"""Meta Reinforcement Fine-Tuning (Qu et al., 2025), at toy scale. Read top to bottom.

Notation (the paper's):  x a problem,  z = [z_0, z_1, ..., z_{k-1}] the thinking stream cut into episodes,
μ the meta-prover (the same model, forced to stop thinking and answer),  J(μ | x, z_{0:j}) its success rate after
episodes 0..j,  J(π*) a comparator's success rate,  r(x, z) the 0/1 outcome reward,
α the weight of the progress bonus.
"""
from dataclasses import dataclass

import torch

import tasks
from model import generate


# ----------------------------------------------------------------------------- episodes
def split_episodes(thinking: list[int]) -> list[list[int]]:
    """Cut a thinking stream z into episodes [z_0, z_1, ...] just before each <|backtrack|>.

    z_0 is the first attempt; each later episode is a backtrack line (<|backtrack|> and the step it returns to) and
    the attempt that follows it. Cutting before the backtrack, not after it, leaves no boundary at which μ would
    have to answer right after a backtrack line, which it never learned to do. Concatenating the episodes gives back
    the stream exactly; empty episodes are dropped.
    """
    episodes = [[]]
    for tok in thinking:
        if tok == tasks.BACKTRACK_ID:
            episodes.append([])
        episodes[-1].append(tok)
    return [e for e in episodes if e]


def split_completion(completion: list[int]):
    """(thinking, answer) token lists: the answer starts at <|answer|>; trailing pads are dropped."""
    completion = [t for t in completion if t != tasks.PAD_ID]
    cut = completion.index(tasks.ANSWER_ID) if tasks.ANSWER_ID in completion else len(completion)
    return completion[:cut], completion[cut:]


# ----------------------------------------------------------------------------- the meta-prover μ
def forced_answer_context(prompt: list[int], episodes: list[list[int]], j: int) -> list[int]:
    """The input of μ after j episodes: x, z_{0:j-1}, then <|answer|> (the model must answer now)."""
    return prompt + [t for e in episodes[:j] for t in e] + [tasks.ANSWER_ID]


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
    chunk: int = 1024  # rows per generate() call: bounds the KV cache's memory

    def __call__(self, problems: list, contexts: list[list[int]], n_rollouts: int = 1) -> list[int]:
        return self.answers(problems, contexts, n_rollouts)[1]

    def answers(self, problems: list, contexts: list[list[int]], n_rollouts: int = 1):
        """The n sampled answers of every context (token rows after <|answer|>, in order) and their 0/1 rewards."""
        answers, per_call = [], max(1, self.chunk // n_rollouts)
        for i in range(0, len(contexts), per_call):
            answers += complete(self.model, contexts[i:i + per_call], self.task.answer_tokens(), self.generator,
                                self.temperature, n_rollouts, forbid=(tasks.BACKTRACK_ID,),
                                env=tasks.environment(self.task))
        return answers, score_answers(self.task, [p for p in problems for _ in range(n_rollouts)], answers)


def score_answers(task, problems, answers: list[list[int]]) -> list[int]:
    """0/1 reward of each forced answer (token rows that follow <|answer|>; pads after <|eos|> are ignored)."""
    return [tasks.verify(task, p, tasks.ANSWER + tasks.decode(t for t in row if t != tasks.PAD_ID))
            for p, row in zip(problems, answers)]


def estimate_success(meta_prover, problems: list, contexts: list[list[int]], n_rollouts: int) -> list[float]:
    """Monte Carlo J(μ | x, z_{0:j}) ≈ (1/n) Σ_i r(x, μ-rollout_i) for every (problem, context) pair.

    Identical pairs are estimated once, and all rollouts of all contexts go to μ as one batch (the n rollouts of one
    context share its prefill in the KV cache), shortest contexts first.
    """
    unique = {}
    for p, c in zip(problems, contexts):
        unique.setdefault((p, tuple(c)), (p, c))
    unique = dict(sorted(unique.items(), key=lambda kv: len(kv[1][1])))  # by length: a batch pads to its longest
    pairs = list(unique.values())
    rewards = meta_prover([p for p, _ in pairs], [c for _, c in pairs], n_rollouts)
    value = {k: sum(rewards[i * n_rollouts:(i + 1) * n_rollouts]) / n_rollouts for i, k in enumerate(unique)}
    return [value[(p, tuple(c))] for p, c in zip(problems, contexts)]


def episode_values(meta_prover, problems, prompts, episode_lists, n_rollouts, max_episodes=None) -> list[list[float]]:
    """[J(μ | x), J(μ | x, z_0), J(μ | x, z_{0:1}), ...] for each stream, up to `max_episodes` episodes.

    Past the end of a stream its value stays at the full stream's value (the model stopped thinking).
    """
    lengths = [len(eps) if max_episodes is None else max_episodes for eps in episode_lists]  # k per stream
    flat_p = [p for p, k in zip(problems, lengths) for _ in range(k + 1)]
    flat_c = [forced_answer_context(prompt, eps, min(j, len(eps)))
              for prompt, eps, k in zip(prompts, episode_lists, lengths) for j in range(k + 1)]
    flat = iter(estimate_success(meta_prover, flat_p, flat_c, n_rollouts))
    return [[next(flat) for _ in range(k + 1)] for k in lengths]


# ----------------------------------------------------------------------------- progress and regret
def progress_bonus(values: list[float]) -> list[float]:
    """r_prg(z_j; c_{j-1}) = J(μ | x, z_{0:j}) − J(μ | x, z_{0:j-1}) for j = 0..k-1.

    `values` = [J(μ | x), J(μ | x, z_0), ..., J(μ | x, z_{0:k-1})] (k+1 numbers) -> k bonuses.
    """
    return [after - before for before, after in zip(values[:-1], values[1:])]


def cumulative_regret(values: list[float], j_star: float = 1.0) -> list[float]:
    """Δ_k(x; π) = Σ_{j=0}^{k-1} ( J(π*) − J(μ | x, z_{0:j}) ) for k = 1..K.

    `values` as in `progress_bonus`; values[0] = J(μ | x) has no episode and so is not part of the sum.
    Default J(π*) = 1: every problem here is solvable, so an oracle comparator always succeeds.
    """
    regret, total = [], 0.0
    for v in values[1:]:
        total += j_star - v
        regret.append(total)
    return regret


# ----------------------------------------------------------------------------- rewards and the REINFORCE loss
def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """A_i = r_i − mean(r over the G samples of the same prompt); rewards (P, G).

    A group-mean baseline with no std division (as Dr. GRPO argues: dividing by the std up-weights prompts that are
    almost always or almost never solved), so the outcome advantage and the progress bonus share one 0/1 scale.
    """
    return rewards - rewards.mean(dim=1, keepdim=True)


def prefix_advantages(rewards: torch.Tensor, n_answer_now: int, alpha: float) -> torch.Tensor:
    """A_i = r_i − b with b = (1 − α) · r̄ + α · Ĵ(μ | x, c), for the G rollouts from one context c (the paper's
    RL form of MRT); rewards (P, G), in each row first the `n_answer_now` rollouts of μ (answer now), then the rest.

    r̄ is the group mean (outcome RL's baseline) and Ĵ(μ | x, c) the answer-now rollouts' mean, a Monte Carlo
    J(μ | x, c). With α = 1 this is the released code's A = r − r_termination: a rollout that thinks on is credited
    with its progress over stopping at c, r − J(μ | x, c). With α = 0, or no answer-now rollouts, it is outcome RL
    on the prefixed contexts. (With a 0/1 final reward the answer-now success only moves the baseline: what this
    form changes is where the contexts come from, prefixes of the previous policy π', and that μ's answers train too.)
    """
    baseline = rewards.mean(dim=1, keepdim=True)
    if n_answer_now:
        baseline = (1 - alpha) * baseline + alpha * rewards[:, :n_answer_now].mean(1, keepdim=True)
    return rewards - baseline


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


# ----------------------------------------------------------------------------- sampling and budget forcing
def complete(model, contexts: list[list[int]], max_new_tokens: int, generator=None, temperature=1.0, samples=1,
             forbid=(), env=None):
    """`samples` sampled continuations of every context, all at once (consecutive per context), without pads;
    at most `max_new_tokens` each, fewer where the longest context leaves less room in the model's block.
    `env`: the task's environment (`tasks.environment`), which writes its tokens into the continuations."""
    room = model.config.block_size - max(map(len, contexts))
    if room < 1:
        raise ValueError(f"a context of {max(map(len, contexts))} tokens leaves no room to generate")
    gen = generate(model, contexts, min(max_new_tokens, room), tasks.EOS_ID, tasks.PAD_ID, temperature,
                   forbid=(*forbid, *tasks.VERDICT_IDS), generator=generator, samples=samples, env=env)
    return [[t for t in row if t != tasks.PAD_ID] for row in gen.tokens.tolist()]


def sample_completions(model, task, problems, max_new_tokens: int, generator=None, temperature=1.0, samples=1):
    """Prompts (token lists) and `samples` sampled completions per problem."""
    prompts = [tasks.encode(task.prompt(p)) for p in problems]
    return prompts, complete(model, prompts, max_new_tokens, generator, temperature, samples,
                             env=tasks.environment(task))


def budget_cut(thinking: list[int], budget: int) -> list[int]:
    """The first `budget` thinking tokens, less an unfinished last line, and less a backtrack line at the end: μ
    answers from complete lines, and never right after a backtrack line (see `split_episodes`)."""
    ends = (tasks.NEWLINE_ID, *tasks.VERDICT_IDS)
    cut = thinking[:budget]
    while cut and cut[-1] not in ends:
        cut.pop()
    last_line = max((i + 1 for i, t in enumerate(cut[:-1]) if t in ends), default=0)
    return cut[:last_line] if cut[last_line:last_line + 1] == [tasks.BACKTRACK_ID] else cut


def budget_accuracy(meta_prover, task, problems, prompts, completions, budgets, n_rollouts=1) -> list[list[float]]:
    """Success of each stream when its thinking is stopped after B tokens and μ must answer, for each B in `budgets`
    (a row per stream, a column per budget).

    A stream that finished thinking within B keeps its own 0/1 answer (a budget-agnostic model needs no forcing);
    otherwise it scores μ's Monte Carlo success rate from the cut stream. All forced contexts go to μ as one batch.
    """
    out, slots, ctx_p, ctx_c = [], [], [], []
    for i, (p, prompt, comp) in enumerate(zip(problems, prompts, completions)):
        thinking, answer = split_completion(comp)
        out.append([float(tasks.verify(task, p, tasks.decode(comp)))] * len(budgets))
        for b, budget in enumerate(budgets):
            if not answer or len(thinking) > budget:
                slots.append((i, b))
                ctx_p.append(p)
                ctx_c.append(prompt + budget_cut(thinking, budget) + [tasks.ANSWER_ID])
    for (i, b), value in zip(slots, estimate_success(meta_prover, ctx_p, ctx_c, n_rollouts)):
        out[i][b] = value
    return out


# ----------------------------------------------------------------------------- the backtracking warm-start
def build_traces(model, task, problems, n_rollouts: int, max_new_tokens: int, generator, rng,
                 restart="best") -> list[tasks.Trace]:
    """The paper's warm-start recipe: sample z_0 from the base model; for a failed one, estimate by Monte Carlo the
    success rate of restarting from each of its steps, and write the trace that backtracks to the best one
    (restart="scratch": to step 0, where a solution can leave z_0 there)."""
    prompts, firsts = sample_completions(model, task, problems, max_new_tokens, generator)
    traces, failed = [], {}
    for i, (p, comp) in enumerate(zip(problems, firsts)):
        attempt = tasks.parse_output(tasks.decode(comp)).attempts[0]
        if tasks.is_correct(task, p, attempt):
            traces.append(tasks.Trace(p, attempt))
        else:
            failed[i] = attempt
    def where_to_restart(i):  # the steps k worth trying; "scratch" keeps only k = 0 where it is one of them
        steps = tasks.restart_steps(task, problems[i], failed[i])
        return [0] if restart == "scratch" and 0 in steps else steps
    jobs = [(i, k) for i in failed for k in where_to_restart(i)]
    kept_text = lambda i, k: tasks.steps_text(failed[i][:k])
    conts = complete(model, [prompts[i] + tasks.encode(kept_text(i, k)) for i, k in jobs], max_new_tokens,
                     generator, samples=n_rollouts, env=tasks.environment(task)) if jobs else []
    rates, rollouts, misses = {}, {}, {}
    for (i, k), cont in zip([job for job in jobs for _ in range(n_rollouts)], conts):
        text = kept_text(i, k) + tasks.decode(cont)
        ok = tasks.verify(task, problems[i], text)
        rates.setdefault(i, {}).setdefault(k, 0.0)
        rates[i][k] += ok / n_rollouts
        attempt = tasks.parse_output(text).attempts[0]
        solved = tasks.is_correct(task, problems[i], attempt)
        if ok and solved:
            rollouts.setdefault(i, {}).setdefault(k, []).append(attempt)
        elif not solved and len(attempt) == task.n_numbers - 1:  # a whole attempt that missed: a failing retry
            misses.setdefault(i, {}).setdefault(k, []).append(attempt)
    for i in sorted(rates):
        traces.append(tasks.make_trace(task, problems[i], failed[i], rates[i], rollouts.get(i, {}), rng,
                                       misses.get(i, {})))
    return traces
