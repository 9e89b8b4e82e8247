"""Tests: each one a small specification with the numbers written out. Run: python -m pytest -q"""
import copy
import json
import os
import random
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch

import bench
import evaluation
import model as model_module
import mrt
import tasks
import train
from model import GPT, GPTConfig, completion_logprobs, generate
from tasks import ANSWER, BACKTRACK, EOS, Countdown, decode, encode, parse_output, verify

TASK = Countdown(3, 10, 100)
PROBLEM = ((3, 7, 9), 20)  # 9*3=27, 27-7=20


# ----------------------------------------------------------------------------- tokenizer
def test_special_tokens_are_single_ids_and_text_round_trips():
    for name in tasks.SPECIALS:
        assert len(encode(name)) == 1
    text = TASK.prompt(PROBLEM) + "9-7=2\n2*3=6\n" + BACKTRACK + "0\n9*3=27\n27-7=20\n" + ANSWER + "9*3=27\n27-7=20\n" + EOS
    assert decode(encode(text)) == text
    assert len(encode("12+3=15\n")) == 8  # character level


def test_text_outside_the_alphabet_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot encode"):
        encode("3 + x")


# ----------------------------------------------------------------------------- task, solver, verifier
def test_solver_lists_exactly_the_solutions():
    sols = TASK.solutions(TASK.start(PROBLEM), 20)
    assert ["9*3=27", "27-7=20"] in sols
    assert all(tasks.is_correct(TASK, PROBLEM, s) for s in sols)
    assert TASK.solutions((2, 3), 7) == []
    assert TASK.solutions((2, 3), 6) == [["3*2=6"]]
    assert TASK.solutions((4, 8), 2) == [["8/4=2"]]


def test_can_reach_tells_whether_a_partial_state_is_still_solvable():
    assert TASK.can_reach((7, 27), 20) is True  # after 9*3=27: 27-7=20
    assert TASK.can_reach((3, 27), 20) is False  # 27+3, 27-3, 27*3, 27/3 all miss 20
    assert TASK.can_reach((2, 3), 6) and not TASK.can_reach((2, 3), 7)


def test_steps_follow_the_rules():
    assert TASK.apply((3, 7, 9), "9-7=2") == (2, 3)
    assert TASK.apply((3, 7, 9), "7-9=0") is None  # no negatives or zero
    assert TASK.apply((3, 7, 9), "9/2=4") is None  # 2 is not available (and not exact)
    assert TASK.apply((3, 7, 9), "9+9=18") is None  # one 9 only
    assert TASK.apply((3, 7, 9), "9*3=28") is None  # wrong arithmetic
    assert TASK.apply((3, 7, 9), "09+3=12") is None  # leading zero


def test_verifier_scores_answers():
    assert verify(TASK, PROBLEM, ANSWER + "9*3=27\n27-7=20\n" + EOS) == 1
    assert verify(TASK, PROBLEM, ANSWER + "3*9=27\n27-7=20\n" + EOS) == 1  # either order for * and +
    assert verify(TASK, PROBLEM, ANSWER + "9*3=27\n27-7=20\n") == 0  # no <|eos|>: truncated
    assert verify(TASK, PROBLEM, ANSWER + "9*3=27\n" + EOS) == 0  # numbers left over
    assert verify(TASK, PROBLEM, ANSWER + "9*3=27\n27-3=24\n" + EOS) == 0  # 3 used twice
    assert verify(TASK, PROBLEM, "9*3=27\n27-7=20\n") == 0  # thinking only, no answer
    assert verify(TASK, PROBLEM, ANSWER + "9*3=27\n27-7=20\n" + EOS + EOS) == 0


def test_parser_rebuilds_attempts_after_backtracking():
    text = "9-7=2\n2*3=6\n" + BACKTRACK + "1\n6*3=18\n" + BACKTRACK + "0\n9*3=27\n27-7=20\n" + ANSWER + "9*3=27\n27-7=20\n" + EOS
    parsed = parse_output(text)
    assert parsed.attempts == [["9-7=2", "2*3=6"], ["9-7=2", "6*3=18"], ["9*3=27", "27-7=20"]]
    assert parsed.backtracks == [1, 0]
    assert parsed.answer == ["9*3=27", "27-7=20"]
    assert parse_output(BACKTRACK + "x\n1+1=2").backtracks == [None]


def test_parser_and_verifier_never_raise_on_random_token_streams():
    rng = random.Random(0)
    for _ in range(2000):
        ids = [rng.randrange(tasks.VOCAB_SIZE) for _ in range(rng.randrange(40))]
        text = decode(ids)
        parse_output(text)
        assert verify(TASK, PROBLEM, text) in (0, 1)
    assert verify(TASK, PROBLEM, ANSWER + "9/0=1\n" + EOS) == 0  # a division by zero is a wrong step, not a crash


def test_random_play_is_legal_to_the_end():
    rng = random.Random(0)
    for _ in range(20):
        play = TASK.random_play(TASK.start(PROBLEM), rng)
        assert len(play) == 2 and tasks.valid_prefix(TASK, PROBLEM, play) == 2


def test_a_base_example_is_a_solution_learned_whole():
    (solution,) = tasks.base_examples(TASK, [PROBLEM], 1, 0.0, random.Random(0))
    only = tasks.steps_text(["9*3=27", "27-7=20"])  # PROBLEM's one solution, learned whole
    assert solution[1] == [(only + tasks.REACHED + ANSWER + only + EOS, True)]  # the environment's verdict: reached


def test_sft_targets_are_only_the_learned_pieces():
    X, Y = train.sft_tensors(TASK, [(PROBLEM, [("9-7=", True), ("2\n", False), (EOS, True)])], block_size=64)
    prompt = len(encode(TASK.prompt(PROBLEM)))
    assert decode(X[0, :prompt].tolist()) == TASK.prompt(PROBLEM)
    assert decode([y for y in Y[0].tolist() if y != -1]) == "9-7=" + EOS  # the result "2\n" carries no loss
    assert (Y[0, :prompt - 1] == -1).all()


def test_environment_writes_results_and_the_verdict_of_the_last_step():
    reply = lambda text: tasks.environment_reply(TASK, PROBLEM, text)
    assert reply("9-7=") == "2\n"  # a result, then the line ends
    assert reply("9-7=2\n2*3=") == "6\n" + tasks.MISSED  # the step that leaves one number: 6 is not 20
    assert reply("9*3=27\n27-7=") == "20\n" + tasks.REACHED
    assert reply("9*3=27\n27-7=20\n" + tasks.REACHED + ANSWER + "9*3=27\n27-7=") == "20\n"  # no verdict in the answer
    assert reply("9-7=2\n2*3=6\n" + tasks.MISSED + BACKTRACK + "1\n2*3=") == "6\n" + tasks.MISSED  # kept 9-7=2
    assert reply("7-9=") == "\n" and reply("9/2=") == "\n"  # not a positive integer: no result, a malformed step
    assert reply("8*3=24\n24-4=") == "20\n" + tasks.MISSED  # right number, illegal steps (no 8, no 4): missed
    assert tasks.environment(Countdown(3, 10, 100, calculator=False)) is None


def test_the_environment_follows_a_row_from_its_context_reading_each_id_once():
    row = tasks.environment(TASK).follow(encode(TASK.prompt(PROBLEM) + "9-7=2\n"))  # a context with a step in it
    sampled = encode("2*3=")
    assert decode(row.reply(sampled)) == "6\n" + tasks.MISSED  # the context's step counts: two steps, 6
    sampled += encode("6\n" + tasks.MISSED + BACKTRACK + "0\n9*3=")  # its reply, then a new attempt
    assert decode(row.reply(sampled)) == "27\n"
    sampled += encode("27\n27-7=")
    assert decode(row.reply(sampled)) == "20\n" + tasks.REACHED
    assert row.text == "9-7=2\n" + decode(sampled)  # each id read once
    problems = [PROBLEM, ((1, 4, 5), 20)]
    hook = model_module.EnvironmentHook(tasks.environment(TASK), [encode(TASK.prompt(p)) for p in problems], 3, 8,
                                        "cpu")
    assert [r.problem for r in hook.rows] == [p for p in problems for _ in range(3)]  # row i*3 + s: problem i


def test_environment_mask_marks_what_the_environment_wrote():
    text = "9-7=2\n2*3=6\n" + tasks.MISSED + BACKTRACK + "0\n9*3=27\n"
    mask = tasks.environment_mask(TASK, encode(text))
    assert "".join(decode([t]) for t, m in zip(encode(text), mask) if m) == "2\n6\n" + tasks.MISSED + "27\n"
    assert not any(tasks.environment_mask(Countdown(3, 10, 100, calculator=False), encode(text)))


def test_sft_puts_loss_on_the_environments_tokens_too():
    text = "9*3=27\n27-7=20\n" + tasks.REACHED + ANSWER + "9*3=27\n27-7=20\n" + EOS
    targets = lambda **kw: decode([y for y in train.sft_tensors(TASK, [(PROBLEM, [(text, True)])], 64, **kw)[1][0]
                                   .tolist() if y != -1])
    assert targets() == text  # the default: predicting the results and the verdict is learned too


@pytest.mark.parametrize("first_step", [False, True])  # contexts: the prompts, or prompts with a step already in them
def test_sampler_writes_the_environments_tokens_where_they_belong_and_never_samples_them(first_step):
    problems = tasks.make_split(TASK, 10, 8, seed=0)[1]
    before = {p: TASK.moves(TASK.start(p))[0] + "\n" if first_step else "" for p in problems}
    contexts = [encode(TASK.prompt(p) + before[p]) for p in problems]
    completions = mrt.complete(tiny_model(block_size=128), contexts, 60, torch.Generator().manual_seed(0), samples=8,
                               env=tasks.environment(TASK))
    replies = 0
    for p, c in zip([p for p in problems for _ in range(8)], completions):
        text = [decode([t]) for t in c]
        mask = tasks.environment_mask(TASK, c)
        for i, tok in enumerate(c):
            if tok == tasks.EQUALS_ID and not mask[i]:  # the model wrote `=`: the environment's reply follows
                reply = tasks.environment_reply(TASK, p, before[p] + "".join(text[:i + 1]))
                assert "".join(text[i + 1:i + 1 + len(encode(reply))]) == reply[:len("".join(text[i + 1:]))]
                replies += 1
            if tok in tasks.VERDICT_IDS:
                assert mask[i]  # verdicts only where the environment wrote them
    assert replies > 20


def test_rl_credits_only_the_tokens_the_policy_wrote(monkeypatch):
    seen, sample, loss = {}, mrt.sample_completions, mrt.reinforce_loss
    monkeypatch.setattr(mrt, "sample_completions", lambda *a, **k: seen.setdefault("sampled", sample(*a, **k)))
    monkeypatch.setattr(mrt, "reinforce_loss", lambda lp, adv, mask: seen.setdefault("mask", mask) is not None
                        and loss(lp, adv, mask))
    model, cfg = tiny_model(block_size=128), train.Config(rl_prompts=2, rl_group=4, train_room=40)
    problems = [p for p in tasks.make_split(TASK, 2, 1, seed=0)[0] for _ in range(4)]
    train.rl_step(model, torch.optim.AdamW(model.parameters()), TASK, problems, cfg, "mrt", torch.Generator(),
                  torch.Generator(), torch.device("cpu"))
    completions, mask = seen["sampled"][1], seen["mask"]
    assert any(any(tasks.environment_mask(TASK, c)) for c in completions)
    for c, row in zip(completions, mask.tolist()):
        assert row == [float(not env) for env in tasks.environment_mask(TASK, c)] + [0.0] * (len(row) - len(c))


def test_chain_task_combines_numbers_left_to_right():
    chain = tasks.Chain(3, 10, 100)
    problem = chain.parse_problem("3 7 9:30")  # order matters: 3*7=21, 21+9=30
    assert problem == ((3, 7, 9), 30) and chain.key(problem) != chain.key(((7, 3, 9), 30))
    assert chain.solutions(chain.start(problem), 30) == [["3*7=21", "21+9=30"]]
    assert chain.apply((3, 7, 9), "7*3=21") is None  # the running result comes first
    assert chain.apply((3, 7, 9), "3+9=12") is None  # the next number, not any number
    assert verify(chain, problem, ANSWER + "3*7=21\n21+9=30\n" + EOS) == 1
    train_set, test_set = tasks.make_split(chain, 300, 50, seed=0)
    assert not {chain.key(p) for p in train_set} & {chain.key(p) for p in test_set}


def test_split_is_disjoint_up_to_the_order_of_numbers_and_fixed_by_seed():
    train_a, test_a = tasks.make_split(TASK, 500, 100, seed=3)
    train_b, test_b = tasks.make_split(TASK, 500, 100, seed=3)
    assert (train_a, test_a) == (train_b, test_b)
    assert not {TASK.key(p) for p in train_a} & {TASK.key(p) for p in test_a}
    assert len({TASK.key(p) for p in train_a}) == len(train_a) == 500
    for p in train_a + test_a:
        assert TASK.solutions(TASK.start(p), p[1])  # generated solvable


# ----------------------------------------------------------------------------- model and KV cache
def tiny_model(seed=0, block_size=64):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=block_size, vocab_size=tasks.VOCAB_SIZE, n_layer=2, n_head=2, n_embd=32)).eval()


def test_kv_cache_gives_the_same_tokens_and_logprobs_as_recomputation():
    model = tiny_model()
    prompts = [encode(TASK.prompt(PROBLEM)), encode(TASK.prompt(((1, 2, 10), 30))), [tasks.BOS_ID]]
    kw = dict(max_new_tokens=30, stop_id=tasks.EOS_ID, pad_id=tasks.PAD_ID, temperature=0)
    cached, recomputed = generate(model, prompts, **kw), generate(model, prompts, use_cache=False, **kw)
    assert torch.equal(cached.tokens, recomputed.tokens)
    assert torch.allclose(cached.logprobs, recomputed.logprobs, atol=1e-5)


@pytest.mark.parametrize("use_cache", [True, False])
def test_several_samples_per_prompt_draw_what_repeated_prompts_would(use_cache):
    model = tiny_model()
    prompts = [encode(TASK.prompt(PROBLEM)), [tasks.BOS_ID], encode(TASK.prompt(((1, 2, 10), 30)) + "10+2=12\n")]
    kw = dict(max_new_tokens=20, stop_id=tasks.EOS_ID, pad_id=tasks.PAD_ID, use_cache=use_cache)
    shared = generate(model, prompts, samples=3, generator=torch.Generator().manual_seed(0), **kw)
    repeated = generate(model, [p for p in prompts for _ in range(3)], generator=torch.Generator().manual_seed(0), **kw)
    assert shared.tokens.shape[0] == 9 and torch.equal(shared.tokens, repeated.tokens)
    assert torch.allclose(shared.logprobs, repeated.logprobs, atol=1e-5)
    assert len(set(map(tuple, shared.tokens[:3].tolist()))) > 1  # the samples of one prompt differ


def test_sampling_beyond_the_cache_budget_runs_in_chunks_that_fit(monkeypatch):
    model, calls = tiny_model(), []
    contexts = [encode(TASK.prompt(p)) for p in tasks.make_split(TASK, 10, 1, seed=0)[0]]
    whole = mrt.complete(model, contexts, 20, temperature=0, samples=3, env=tasks.environment(TASK))
    per_row = 2 * 2 * 32 * (max(map(len, contexts)) + 20) * 4  # keys and values, 2 layers, width 32, fp32
    monkeypatch.setattr(model_module, "MAX_CACHE_BYTES", 7 * per_row)  # 7 rows: 2 contexts of 3 samples a call
    monkeypatch.setattr(mrt, "generate", lambda *a, **k: calls.append(len(a[1])) or generate(*a, **k))
    chunked = mrt.complete(model, contexts, 20, temperature=0, samples=3, env=tasks.environment(TASK))
    assert calls == [2, 2, 2, 2, 2] and chunked == whole  # greedy: the same tokens, whatever the grouping


def test_padding_does_not_change_a_row_and_logprobs_match_a_plain_forward():
    model = tiny_model()
    prompts = [encode(TASK.prompt(PROBLEM)), [tasks.BOS_ID], encode(TASK.prompt(((10, 10, 10), 100)) + "10*10=100\n")]
    kw = dict(max_new_tokens=20, stop_id=tasks.EOS_ID, pad_id=tasks.PAD_ID)
    together = generate(model, prompts, temperature=0, **kw)
    for i, p in enumerate(prompts):
        alone = generate(model, [p], temperature=0, **kw)
        n = alone.tokens.size(1)
        assert torch.equal(alone.tokens[0], together.tokens[i, :n])
        m = together.lengths[i]
        plain = completion_logprobs(model, [p], [together.tokens[i, :m].tolist()], exclude=(tasks.PAD_ID,))[0]
        assert torch.allclose(plain, together.logprobs[i, :m], atol=1e-5)  # what RL recomputes is what was sampled


def test_finished_rows_stop_growing_and_forbidden_tokens_never_appear():
    model = tiny_model()
    with torch.no_grad():  # make <|eos|> likely so that some rows finish early
        model.lm_head.weight[tasks.EOS_ID] += 0.3 * model.wte.weight.mean(0) / model.wte.weight.mean(0).norm() ** 2
    g = generate(model, [[tasks.BOS_ID]] * 64, 30, tasks.EOS_ID, tasks.PAD_ID, forbid=(tasks.BACKTRACK_ID,),
                 generator=torch.Generator().manual_seed(0))
    assert not (g.tokens == tasks.BACKTRACK_ID).any()
    for row, n in zip(g.tokens.tolist(), g.lengths.tolist()):
        if tasks.EOS_ID in row:
            stop = row.index(tasks.EOS_ID)
            assert stop + 1 == n and all(t == tasks.PAD_ID for t in row[stop + 1:])


# ----------------------------------------------------------------------------- MRT definitions, by hand
BT, NL = tasks.BACKTRACK_ID, tasks.NEWLINE_ID


def test_split_episodes_on_hand_written_streams():
    attempt, other = encode("9-7=2\n2*3=6\n"), encode("9*3=27\n27-7=20\n")
    assert mrt.split_episodes(attempt) == [attempt]
    # the backtrack line opens the episode of the attempt after it
    assert mrt.split_episodes(attempt + [BT] + encode("0\n") + other) == [attempt, [BT] + encode("0\n") + other]
    two = attempt + [BT] + encode("1\n") + encode("6*3=18\n") + [BT] + encode("0\n") + other
    assert len(mrt.split_episodes(two)) == 3
    assert mrt.split_episodes([BT, BT] + encode("1\n")) == [[BT], [BT] + encode("1\n")]  # malformed
    assert mrt.split_episodes(attempt + [BT] + encode("1")) == [attempt, [BT] + encode("1")]  # truncated
    assert mrt.split_episodes([]) == []
    for stream in (two, attempt + [BT]):
        assert [t for e in mrt.split_episodes(stream) for t in e] == stream


def test_split_episodes_by_state_cuts_after_each_backtrack_line():
    """By state: an episode ends just after each backtrack line, so it holds the backtrack that chose what to keep."""
    z0, z1, z2 = encode("9-7=2\n2*3=6\n" + tasks.MISSED), encode("2+3=5\n" + tasks.MISSED), encode("9*3=27\n")
    back1, back0 = encode(BACKTRACK + "1\n"), encode(BACKTRACK + "0\n")
    stream = z0 + back1 + z1 + back0 + z2
    assert mrt.split_episodes(stream, by="state") == [z0 + back1, z1 + back0, z2]
    assert mrt.split_episodes(stream) == [z0, back1 + z1, back0 + z2]  # by attempts
    truncated = z0 + encode(BACKTRACK + "1")
    assert mrt.split_episodes(truncated, by="state") == [truncated]
    mid_line = encode("9-" + BACKTRACK + "0\n9*3=27\n")  # a backtrack written mid-line ends its episode too
    assert mrt.split_episodes(mid_line, by="state") == [encode("9-" + BACKTRACK + "0\n"), encode("9*3=27\n")]


def test_mu_reading_the_state_charges_a_backtrack_that_keeps_a_dead_step():
    """μ reading the state answers from the steps a backtrack kept, written as an unfinished attempt. Take a μ that
    solves from every state the target can still be reached from (J = 1 there, else 0): keeping 9*3=27 (alive) is
    worth J = 1 and keeping 9-7=2 (dead) J = 0, a bonus of −1. μ reading the history copies the miss: J = 0 in both."""
    prompt = encode(TASK.prompt(PROBLEM))
    keep_alive = encode("9*3=27\n27+7=34\n" + tasks.MISSED + BACKTRACK + "1\n27-7=20\n" + tasks.REACHED)
    keep_dead = encode("9-7=2\n2*3=6\n" + tasks.MISSED + BACKTRACK + "1\n2+3=5\n" + tasks.MISSED)
    seen = []

    def solving_meta_prover(problems, contexts, n):
        seen.extend(contexts)
        steps = [parse_output(decode(c[len(prompt):-1])).attempts[-1] for c in contexts]
        return [int(evaluation.is_alive(TASK, p, s)) for p, s in zip(problems, steps) for _ in range(n)]
    solving_meta_prover.task = TASK

    def values(stream, by):
        return mrt.episode_values(solving_meta_prover, [PROBLEM], [prompt], [mrt.split_episodes(stream, by)], 1,
                                  reads_state=by == "state")[0]
    assert values(keep_alive, "state") == [1, 1, 1] and values(keep_dead, "state") == [1, 0, 0]
    assert prompt + encode("9-7=2\n") + [tasks.ANSWER_ID] in seen  # the kept step, without the miss
    assert prompt + encode("9*3=27\n27-7=20\n" + tasks.REACHED) + [tasks.ANSWER_ID] in seen  # a whole attempt: verdict
    assert mrt.progress_bonus(values(keep_dead, "state")) == [-1, 0]
    assert values(keep_alive, "attempt") == [1, 0, 1] and values(keep_dead, "attempt") == [1, 0, 0]
    unfinished = mrt.state_context(TASK, PROBLEM, prompt, encode("9*3=27\n27-7="))
    assert unfinished == prompt + encode("9*3=27\n") + [tasks.ANSWER_ID]  # complete lines only


def test_J_after_a_backtrack_on_a_hand_built_stream():
    """z_0 misses, z_1 = backtrack line + a right attempt. μ is asked to answer after x, after z_0 and after z_{0:1},
    never right after a backtrack line; a μ that copies the last attempt gives J = 0, 0, 1: progress 0, then +1."""
    z0 = encode("9-7=2\n2*3=6\n" + tasks.MISSED)
    z1 = encode(BACKTRACK + "0\n9*3=27\n27-7=20\n" + tasks.REACHED)
    prompt = encode(TASK.prompt(PROBLEM))
    seen = []

    def copying_meta_prover(problems, contexts, n):
        seen.extend(contexts)
        return [verify(TASK, p, ANSWER + tasks.steps_text(parse_output(decode(c[len(prompt):-1])).attempts[-1]) + EOS)
                for p, c in zip(problems, contexts) for _ in range(n)]

    episodes = mrt.split_episodes(z0 + z1)
    values = mrt.episode_values(copying_meta_prover, [PROBLEM], [prompt], [episodes], 2)[0]
    assert episodes == [z0, z1] and values == [0.0, 0.0, 1.0] and mrt.progress_bonus(values) == [0.0, 1.0]
    assert all(c[-2] in (tasks.NEWLINE_ID, *tasks.VERDICT_IDS) and c[-1] == tasks.ANSWER_ID for c in seen)


def test_progress_bonus_is_difference_of_successive_J():
    # J(μ|x)=0.25, J(μ|x,z_0)=0.0, J(μ|x,z_{0:1})=0.5, J(μ|x,z_{0:2})=1.0
    assert mrt.progress_bonus([0.25, 0.0, 0.5, 1.0]) == [-0.25, 0.5, 0.5]


def test_cumulative_regret_sums_the_gap_to_the_comparator():
    # Δ_1 = 1-0 = 1, Δ_2 = 1 + (1-0.5) = 1.5, Δ_3 = 1.5 + 0 = 1.5; with J(π*) = 0.8: 0.8, 1.1, 0.9
    assert mrt.cumulative_regret([0.25, 0.0, 0.5, 1.0]) == [1.0, 1.5, 1.5]
    assert mrt.cumulative_regret([0.25, 0.0, 0.5, 1.0], j_star=0.8) == pytest.approx([0.8, 1.1, 0.9])


def test_each_episode_gets_exactly_its_own_bonus():
    # episodes of 3, 2 and 4 tokens, then 2 answer tokens; outcome advantage 0.5, α = 2
    adv = mrt.token_advantages(0.5, [3, 2, 4], [0.1, -0.25, 0.5], alpha=2.0, length=11)
    expected = [0.7] * 3 + [0.0] * 2 + [1.5] * 4 + [0.5] * 2
    assert adv.tolist() == pytest.approx(expected)


def test_mrt_reduces_to_the_backtracking_recipe():
    """Context z_0 from the old policy (no credit), the policy writes one episode after it: every generated token
    gets r + α (J(μ|x,z_{0:1}) − J(μ|x,z_0)), the outcome adjusted by the information gain of the backtrack."""
    values = [0.3, 0.1, 0.6]  # J(μ|x), J(μ|x,z_0), J(μ|x,z_{0:1})
    bonus = mrt.progress_bonus(values)
    r, alpha = 1.0, 0.5
    adv = mrt.token_advantages(r, [0, 6], bonus, alpha, length=6)  # z_0 is context: zero tokens to credit
    assert adv.tolist() == pytest.approx([r + alpha * (0.6 - 0.1)] * 6)


def test_group_advantage_subtracts_the_group_mean():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    assert mrt.group_advantages(rewards).tolist() == [[0.5, -0.5, -0.5, 0.5], [0.25, 0.25, 0.25, -0.75]]


def test_monte_carlo_estimate_of_J_matches_a_known_success_rate():
    rng = random.Random(0)
    calls = []

    def fake_meta_prover(problems, contexts, n):  # succeeds with probability 0.3 after context A, 0.8 after B
        calls.append((len(contexts), n))
        return [int(rng.random() < (0.3 if c[0] == 1 else 0.8)) for c in contexts for _ in range(n)]

    est = mrt.estimate_success(fake_meta_prover, ["p", "p", "q"], [[1], [1], [2]], n_rollouts=4000)
    assert est[0] == est[1] and est[0] == pytest.approx(0.3, abs=0.03) and est[2] == pytest.approx(0.8, abs=0.03)
    assert calls == [(2, 4000)]  # one batch; the repeated (problem, context) pair was estimated once


def test_forced_answers_are_scored_with_their_padding_ignored():
    good, bad = encode("9*3=27\n27-7=20\n" + EOS), encode("9*3=27\n27-3=24\n" + EOS)
    rows = [good + [tasks.PAD_ID] * 3, bad + [tasks.PAD_ID], good[:-1]]  # the last one never reached <|eos|>
    assert mrt.score_answers(TASK, [PROBLEM] * 3, rows) == [1, 0, 0]


def test_reinforce_gradient_raises_the_logprob_of_advantaged_tokens():
    logits = torch.zeros(1, 2, 3, requires_grad=True)
    logp = torch.log_softmax(logits, -1)[:, :, 0]  # log-prob of token 0 at two positions
    loss = mrt.reinforce_loss(logp, torch.tensor([[1.0, -1.0]]), torch.ones(1, 2))
    loss.backward()
    assert logits.grad[0, 0, 0] < 0 < logits.grad[0, 1, 0]  # gradient descent: up where A > 0, down where A < 0


def test_reinforce_loss_ignores_padding_even_where_its_logprob_is_minus_infinity():
    logprobs = torch.tensor([[-0.5, float("-inf")]], requires_grad=True)
    loss = mrt.reinforce_loss(logprobs, torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 0.0]]))
    loss.backward()
    assert loss.item() == 1.0 and logprobs.grad.tolist() == [[-2.0, 0.0]]


def test_budget_cut_keeps_complete_lines_only():
    thinking = encode("9-7=2\n2*3=6\n")
    assert mrt.budget_cut(thinking, 8) == encode("9-7=2\n")
    assert mrt.budget_cut(thinking, 5) == []
    assert mrt.budget_cut(thinking, 100) == thinking
    backtracked = thinking + encode(tasks.MISSED + BACKTRACK + "0\n9*3=27\n")
    assert mrt.budget_cut(backtracked, 16) == thinking + encode(tasks.MISSED)  # not right after the backtrack line
    assert mrt.budget_cut(backtracked, 23) == backtracked
    twice = thinking + encode(tasks.MISSED + BACKTRACK + "0\n" + BACKTRACK + "1\n")
    assert mrt.budget_cut(twice, 100) == thinking + encode(tasks.MISSED)  # after neither backtrack line


def test_warmstart_trace_backtracks_to_the_best_step_and_verifies():
    attempt = ["9-7=2", "3*2=6"]
    trace = mrt.make_trace(TASK, PROBLEM, attempt, {0: 0.5, 1: 0.0}, {}, random.Random(0))
    assert trace.keep == 0
    text = "".join(piece for piece, _ in trace.pieces(TASK))
    assert verify(TASK, PROBLEM, text) == 1
    assert trace.pieces(TASK)[0] == (tasks.steps_text(attempt) + tasks.MISSED, False)  # no loss on the wrong z_0
    assert BACKTRACK + "0\n" in text and text.count(tasks.REACHED) == 1  # the new attempt reaches the target
    parsed = parse_output(text)
    z0, z2 = parsed.attempts
    assert z0 == attempt and z0[:trace.keep] == z2[:trace.keep] and z0[trace.keep] != z2[trace.keep]


def test_a_trace_with_a_failed_retry_learns_both_backtracks_and_neither_failure():
    trace = tasks.Trace(PROBLEM, ["9-7=2", "3*2=6"], keep=0, new_steps=["9*3=27", "27-7=20"],
                        retries=(["9+7=16", "16+3=19"],))
    back = BACKTRACK + "0\n"
    assert trace.pieces(TASK) == [("9-7=2\n3*2=6\n" + tasks.MISSED, False), (back, True),
                                  ("9+7=16\n16+3=19\n" + tasks.MISSED, False),
                                  (back + "9*3=27\n27-7=20\n" + tasks.REACHED + ANSWER + "9*3=27\n27-7=20\n" + EOS, True)]


def test_no_backtrack_target_where_the_kept_steps_already_solve_it():
    attempt = ["9*3=27", "27-7=20", "20+1=21"]  # solved after two steps, then a stray line
    # 9*3=27, 27-7=20 is the only solution, and keeping both steps leaves nothing to redo: nowhere to go back to
    assert TASK.solutions(TASK.start(PROBLEM), 20) == [attempt[:2]]
    assert mrt.restart_steps(TASK, PROBLEM, attempt) == []


def test_warmstart_builder_reads_a_first_attempt_as_the_environment_checked_it(monkeypatch):
    problems = tasks.make_split(TASK, 20, 1, seed=0)[0]
    solution = lambda p: TASK.solutions(TASK.start(p), p[1])[0]
    # a base model that reaches the target, then writes on after the verdict: its z_0 reached all the same
    monkeypatch.setattr(mrt, "sample_completions", lambda model, task, problems, *rest: (
        [encode(task.prompt(p)) for p in problems],
        [encode(tasks.attempt_text(task, p, solution(p)) + "1+1=2\n") for p in problems]))
    monkeypatch.setattr(mrt, "complete", lambda model, contexts, *rest, samples=1, **kw: [[]] * len(contexts) * samples)
    traces = mrt.build_traces(None, TASK, problems, 2, 40, None, random.Random(0))
    assert [(t.first_attempt, t.keep) for t in traces] == [(solution(p), None) for p in problems]


def test_warmstart_builder_with_a_model_makes_valid_traces():
    problems = tasks.make_split(TASK, 20, 1, seed=0)[0]
    traces = mrt.build_traces(tiny_model(block_size=128), TASK, problems, 2, 40, torch.Generator().manual_seed(0),
                              random.Random(0))
    assert traces
    for t in traces:
        text = "".join(piece for piece, _ in t.pieces(TASK))
        assert verify(TASK, t.problem, text) == 1
        if t.keep is not None:
            attempts = parse_output(text).attempts
            z0, last = attempts[0], attempts[-1]
            assert len(attempts) == 2 + len(t.retries)
            assert text.count(tasks.MISSED) == sum(len(a) == 2 for a in attempts[:-1])  # whole attempts get a verdict
            assert z0[:t.keep] == last[:t.keep] and (t.keep >= len(z0) or z0[t.keep] != last[t.keep])
    assert any(t.retries for t in traces)  # some traces miss twice before they solve it


def test_search_traces_try_only_new_legal_attempts_and_learn_every_attempt_after_the_first(monkeypatch):
    problems, rng = tasks.make_split(TASK, 30, 1, seed=0)[0], random.Random(0)
    def random_first_attempts(model, task, problems, max_new_tokens, generator, samples):  # a base model at random
        plays = [(p, task.random_play(task.start(p), rng)) for p in problems for _ in range(samples)]
        wrong = lambda steps: steps[:-1] + [steps[-1] + rng.choice(["", "", "1"])]  # some last results wrong
        # and, as a base model may, it writes on after the environment's verdict: only the checked lines count
        return None, [encode(tasks.attempt_text(task, p, wrong(s)) + tasks.steps_text(s[:1])) for p, s in plays]
    monkeypatch.setattr(mrt, "sample_completions", random_first_attempts)
    traces = mrt.build_search_traces(None, TASK, problems, 8, 40, None, random.Random(0))
    assert [t.problem for t in traces] == problems and any(len(t.retries) >= 2 for t in traces)
    assert any(t.keep is None for t in traces)  # and some first attempts reach
    for t in traces:
        pieces = t.pieces(TASK)
        text = "".join(piece for piece, _ in pieces)
        attempts = parse_output(text).attempts
        assert verify(TASK, t.problem, text) == 1 and len(attempts) <= 5  # at most 4 misses, then one that reaches
        assert all(tasks.run_steps(TASK, t.problem, a) for a in attempts)  # every attempt legal to its end
        keys = [tasks.answer_key(TASK, a) for a in attempts]
        assert len(set(keys)) == len(keys)  # never the same attempt twice
        assert all(learn for _, learn in pieces[1:]) and pieces[0][1] == (t.keep is None)  # all but a missed z_0


def test_the_warm_start_builds_two_traces_per_problem_each_from_its_own_draws(monkeypatch, tmp_path):
    problems, rng, built = tasks.make_split(TASK, 30, 1, seed=0)[0], random.Random(0), []
    monkeypatch.setattr(mrt, "sample_completions", lambda model, task, problems, *rest, samples: (None, [
        encode(tasks.attempt_text(task, p, task.random_play(task.start(p), rng))) for p in problems for _ in
        range(samples)]))
    search = mrt.build_search_traces
    def keep_what_it_builds(*args):
        built.extend(search(*args))
        return built
    monkeypatch.setattr(mrt, "build_search_traces", keep_what_it_builds)
    cfg = train.Config(warm_traces=2, warm_steps=0)
    train.train_warm(tiny_model(), TASK, problems, cfg, torch.device("cpu"), lambda **row: None,
                     train.Checkpoint(str(tmp_path / "warm.pt"), {}, 0, cfg))
    assert sorted(t.problem for t in built) == sorted(problems * 2)
    first = lambda copy: [t.first_attempt for t in built[copy * len(problems):(copy + 1) * len(problems)]]
    assert first(0) != first(1)  # the second trace of a problem is drawn afresh, not a copy of the first


# ----------------------------------------------------------------------------- evaluation
def test_pass_at_k_on_hand_worked_cases():
    assert evaluation.pass_at_k(4, 1, 1) == 0.25  # k = 1: c / n
    assert evaluation.pass_at_k(4, 1, 2) == 0.5  # 1 − C(3,2)/C(4,2) = 1 − 3/6
    assert evaluation.pass_at_k(16, 2, 8) == pytest.approx(1 - 3003 / 12870)  # 1 − C(14,8)/C(16,8)
    assert evaluation.pass_at_k(4, 0, 4) == 0 and evaluation.pass_at_k(4, 3, 2) == 1  # 2 of 4 must include a right one


def test_bootstrap_interval_on_hand_worked_cases():
    # One seed, two problems scored 0 and 1: a replicate's mean is 0, 1/2 or 1 with probability 1/4, 1/2, 1/4.
    b = evaluation.bootstrap(np.array([[0.0, 1.0]]), seed=0, n_boot=4000)
    assert b["mean"] == 0.5 and b["low"] == 0.0 and b["high"] == 1.0
    # The same with the spread between seeds instead (two seeds, one problem): the seeds are redrawn too.
    b = evaluation.bootstrap(np.array([[0.0], [1.0]]), seed=0, n_boot=4000)
    assert b["low"] == 0.0 and b["high"] == 1.0
    # No spread, no interval; every per-problem difference positive: the interval excludes 0.
    assert evaluation.bootstrap(np.full((3, 5), 0.25))["low"] == pytest.approx(0.25)
    d = evaluation.bootstrap(np.array([[0.1, 0.2, 0.3, 0.1], [0.2, 0.1, 0.1, 0.3]]))
    assert 0.1 <= d["low"] < d["mean"] < d["high"] <= 0.3
    # Trailing dimensions (e.g. budgets) each get their own interval from the same draws.
    assert len(evaluation.bootstrap(np.zeros((2, 4, 3)))["high"]) == 3


def test_answer_key_counts_equal_computations_as_one_attempt():
    keys = [tasks.answer_key(TASK, a) for a in (["9*3=27", "27-7=20"], ["3*9=27", "27-7=20"], ["9-7=2", "2*3=6"])]
    assert keys[0] == keys[1] != keys[2]
    assert tasks.answer_key(tasks.Chain(), ["3*9=27"]) != tasks.answer_key(tasks.Chain(), ["9*3=27"])  # order matters


def test_meta_prover_draws_do_not_change_the_policys_streams():
    cfg = train.Config(n_layer=1, n_head=2, n_embd=32, eval_streams=4, value_streams=2, max_episodes=2, budget_step=32)
    problems = tasks.make_split(TASK, 10, 6, seed=0)[1]
    model = tiny_model(block_size=128)
    one, three = (evaluation.evaluate(model, TASK, problems, train.Config(**{**vars(cfg), "eval_rollouts": n}),
                                      torch.device("cpu"))
                  for n in (1, 3))
    for key in ("successes", "first_right", "thinking_tokens", "episodes", "later_attempts"):
        assert one[key] == three[key]  # 1 or 3 rollouts of μ per prefix: the policy's streams are the same
    assert len(one["J"]) == len(one["budget_accuracy"]) == len(problems) and len(one["J"][0]) == 3


def test_answer_tokens_fit_every_correct_answer():
    for task in (Countdown(3, 10, 100), Countdown(4, 10, 100), tasks.Chain(4, 10, 100)):
        rng = random.Random(0)
        for _ in range(30):
            p = task.random_problem(rng)
            longest = max(len(encode(tasks.steps_text(s) + EOS)) for s in task.solutions(task.start(p), p[1]))
            assert longest <= task.answer_tokens()
            assert len(encode(task.prompt(p))) <= task.prompt_tokens()


# ----------------------------------------------------------------------------- RL updates that the tests can see
def coin_reward(task, problem, completion: str) -> int:
    """A stand-in verifier for RL tests: a fixed coin flip per text (crc32 parity). An untrained model is almost
    never right, so with the real verifier every reward and every bonus would be 0 and no RL update could be seen."""
    return zlib.crc32(completion.encode()) % 2


@pytest.fixture
def coin_rewards(monkeypatch):
    monkeypatch.setattr(tasks, "verify", coin_reward)


def rl_batch(arm, alpha=1.0, model=None, seed=0, episodes="attempt"):
    """One RL step's rollouts of a tiny model on 2 problems x 4 samples, from fixed generators."""
    model = model or tiny_model(block_size=128)
    cfg = train.Config(rl_prompts=2, rl_group=4, train_room=40, alpha=alpha, mc_rollouts=2, episodes=episodes)
    problems = [p for p in tasks.make_split(TASK, 2, 1, seed=0)[0] for _ in range(4)]
    gens = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    return model, cfg, problems, mrt.rollouts(model, TASK, problems, cfg, arm, *gens)


def surrogate(model, batch) -> float:
    """Σ_t A_t log π(y_t) over the tokens the policy wrote: what a REINFORCE step must raise."""
    with torch.no_grad():
        lp = completion_logprobs(model, batch.contexts, batch.completions, (tasks.PAD_ID, *tasks.VERDICT_IDS))
    written = [torch.tensor([not e for e in tasks.environment_mask(TASK, y)]) for y in batch.completions]
    return sum(float(torch.where(w, lp[i, :len(a)] * a, 0.0).sum())  # a verdict's log-prob is -inf: never drawn
               for i, (w, a) in enumerate(zip(written, batch.credit)))


@pytest.mark.parametrize("arm", list(mrt.ARMS))
def test_one_rl_step_moves_the_weights_up_its_objective(arm, coin_rewards, monkeypatch):
    model, cfg, problems, _ = rl_batch(arm)
    seen, real = {}, mrt.rollouts
    monkeypatch.setattr(mrt, "rollouts", lambda *a: seen.setdefault("batch", real(*a)))
    before = copy.deepcopy(model)
    train.rl_step(model, torch.optim.Adam(model.parameters(), lr=1e-4), TASK, problems, cfg, arm,
                  torch.Generator().manual_seed(0), torch.Generator().manual_seed(1), torch.device("cpu"))
    batch = seen["batch"]
    assert any(float(a.abs().sum()) > 0 for a in batch.credit)  # the coin gives mixed rewards: a real update
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before.parameters()))
    assert surrogate(model, batch) > surrogate(before, batch)  # ascended, not descended


def test_mrt_credit_is_outcome_credit_plus_alpha_times_the_bonus(coin_rewards):
    outcome = rl_batch("outcome")[3]
    half, full, none = (rl_batch("mrt", alpha)[3] for alpha in (0.5, 1.0, 0.0))
    assert full.completions == outcome.completions  # μ's draws do not shift the policy's
    gaps = [(f - o, h - o) for f, h, o in zip(full.credit, half.credit, outcome.credit)]
    assert any(float(f.abs().max()) > 0 for f, _ in gaps)  # some episode's progress bonus is not 0
    assert all(torch.allclose(f, 2 * h) for f, h in gaps)  # the bonus enters as α · r_prg
    assert all(torch.equal(n, o) for n, o in zip(none.credit, outcome.credit))  # α = 0: outcome RL exactly


def test_verdict_bonus_is_read_off_the_environments_verdicts():
    miss, hit = [encode("1+2=3\n"), tasks.MISSED_ID], [encode("3*4=12\n"), tasks.REACHED_ID]
    flat = lambda *tokens: [t for x in tokens for t in (x if isinstance(x, list) else [x])]
    episodes = [flat(*miss), flat(tasks.BACKTRACK_ID, *miss), flat(tasks.BACKTRACK_ID, *hit)]
    assert mrt.verdict_values(episodes) == [0.0, 0.0, 0.0, 1.0]
    assert mrt.progress_bonus(mrt.verdict_values(episodes)) == [0.0, 0.0, 1.0]


# ----------------------------------------------------------------------------- the pipeline
SMOKE = ["--smoke", "--device", "cpu"]  # every run of the pipeline here names the CPU (`pipeline_runs_name_the_cpu`)


@pytest.fixture(scope="module", autouse=True)
def pipeline_runs_name_the_cpu():
    """Every pipeline run in this file passes --device cpu: with --device auto, a machine with a GPU would run it there,
    close to the CPU's numbers but not bit-equal to them, and the exact comparisons here would fail."""
    pick = train.pick_device

    def cpu_named(name):
        assert name != "auto", "a pipeline run in the tests leaves --device on auto: pass SMOKE (--device cpu)"
        return pick(name)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "pick_device", cpu_named)
        yield


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The smoke pipeline, rewarded by the coin (`coin_reward`) so that its RL stages move; the tests that run it
    again to compare numbers use the coin too."""
    out = tmp_path_factory.mktemp("smoke")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tasks, "verify", coin_reward)
        train.main([*SMOKE, "--out-dir", str(out)])
    return out, json.loads((out / "results.json").read_text())


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def numbers(results):
    return {k: results[k] for k in ("summary", "paired", "per_problem")}


def test_smoke_run_writes_results(smoke_run):
    out, results = smoke_run
    cfg, n_test = results["config"], results["test_problems"]
    assert set(results["summary"]) == set(results["per_problem"]) == {"base", "warm", "outcome", "mrt", "mrt_verdict"}
    for name, s in results["summary"].items():
        assert 0 <= s["accuracy"]["low"] <= s["accuracy"]["mean"] <= s["accuracy"]["high"] <= 1
        assert len(s["regret"]["mean"]) == cfg["max_episodes"] and len(s["J"]["mean"]) == cfg["max_episodes"] + 1
        for e in results["per_problem"][name]:  # per-problem success counts, out of --eval-streams
            assert len(e["successes"]) == n_test and all(0 <= c <= cfg["eval_streams"] for c in e["successes"])
    assert {"mrt - outcome", "mrt_verdict - outcome", "mrt_verdict - mrt", "mrt - base"} <= set(results["paired"])
    assert len(results["test_set"]) == n_test and results["machine"]
    assert (out / "log.jsonl").exists() and (out / "base.pt").exists()
    accuracy = results["summary"]["outcome"]["accuracy"]
    assert 0 < accuracy["low"] < accuracy["high"] < 1  # the coin: about half the streams are "right"
    warm, outcome, mrt_ = (weights(out / f"{name}.pt") for name in ("warm", "rl_outcome_seed0", "rl_mrt_seed0"))
    assert any(not torch.equal(warm[k], outcome[k]) for k in warm)  # RL moved the weights
    assert any(not torch.equal(outcome[k], mrt_[k]) for k in warm)  # and MRT's bonus moved them elsewhere
    curve = results["learning_curve"]["outcome"]
    assert curve["steps"] == [0, cfg["rl_steps"]] and all(0 <= a <= 1 for a in curve["accuracy"])


def test_same_seed_same_numbers(smoke_run, coin_rewards, tmp_path):
    train.main([*SMOKE, "--out-dir", str(tmp_path)])
    assert numbers(json.loads((tmp_path / "results.json").read_text())) == numbers(smoke_run[1])


def test_interrupted_run_resumes_from_finished_stages(smoke_run, coin_rewards, tmp_path, capsys):
    out, results = smoke_run
    for name in ("base.pt", "warm.pt", "log.jsonl"):  # as if the run had been stopped during the RL stage
        (tmp_path / name).write_bytes((out / name).read_bytes())
    train.main([*SMOKE, "--out-dir", str(tmp_path)])
    assert "base: finished earlier" in capsys.readouterr().out
    resumed = json.loads((tmp_path / "results.json").read_text())
    assert numbers(resumed) == numbers(results)
    assert resumed["stage_seconds"]["base"] == results["stage_seconds"]["base"]  # trained by the first run
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["config"]["out_dir"] for r in rows if r["stage"] == "start"] == [str(out), str(tmp_path)]


def test_a_stage_interrupted_midway_resumes_from_its_last_checkpoint(smoke_run, coin_rewards, tmp_path, monkeypatch,
                                                                     capsys):
    calls, real = [], train.optimizer_step

    def interrupt_at_step_12(*args):  # optimizer_step runs once per training step
        calls.append(args)
        if len(calls) == 12:
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(train, "optimizer_step", interrupt_at_step_12)
    with pytest.raises(SystemExit) as exit_info:
        train.main([*SMOKE, "--out-dir", str(tmp_path)])
    assert exit_info.value.code == 130 and "run the same command to resume" in capsys.readouterr().err
    assert torch.load(tmp_path / "base.pt", weights_only=True)["step"] == 10  # the last resume point (every 5 steps)
    monkeypatch.setattr(train, "optimizer_step", real)
    train.main([*SMOKE, "--out-dir", str(tmp_path)])
    assert "resuming at step 10" in capsys.readouterr().out
    assert numbers(json.loads((tmp_path / "results.json").read_text())) == numbers(smoke_run[1])


def test_an_rl_stage_interrupted_midway_resumes_to_the_same_weights(smoke_run, coin_rewards, tmp_path, monkeypatch):
    flags = [*SMOKE, "--rl-steps", "4", "--snapshot-every", "2", "--arms", "outcome,mrt"]
    calls, real = [], train.optimizer_step

    def interrupt_at_rl_step_3(*args):  # base and warm are loaded: every call is an RL step
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)
    for run in ("whole", "interrupted"):
        for name in ("base.pt", "warm.pt"):
            (tmp_path / run).mkdir(exist_ok=True)
            (tmp_path / run / name).write_bytes((smoke_run[0] / name).read_bytes())
    train.main(flags + ["--out-dir", str(tmp_path / "whole")])
    monkeypatch.setattr(train, "optimizer_step", interrupt_at_rl_step_3)
    with pytest.raises(SystemExit, match="130"):
        train.main(flags + ["--out-dir", str(tmp_path / "interrupted")])
    assert torch.load(tmp_path / "interrupted" / "rl_outcome_seed0.pt", weights_only=True)["step"] == 2
    monkeypatch.setattr(train, "optimizer_step", real)
    train.main(flags + ["--out-dir", str(tmp_path / "interrupted")])
    for arm in ("outcome", "mrt"):
        whole, resumed = (weights(tmp_path / run / f"rl_{arm}_seed0.pt") for run in ("whole", "interrupted"))
        assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert any(not torch.equal(whole[k], weights(tmp_path / "whole" / "warm.pt")[k]) for k in whole)


def test_with_a_warm_start_per_seed_each_rl_seed_starts_from_its_own(smoke_run, tmp_path, capsys):
    (tmp_path / "base.pt").write_bytes((smoke_run[0] / "base.pt").read_bytes())
    flags = [*SMOKE, "--out-dir", str(tmp_path), "--rl-seeds", "2", "--arms", "outcome", "--rl-steps", "0"]
    train.main(flags + ["--warm-per-seed"])
    warm0, warm1, rl0, rl1 = (weights(tmp_path / f"{name}.pt") for name in
                              ("warm", "warm_seed1", "rl_outcome_seed0", "rl_outcome_seed1"))
    assert any(not torch.equal(warm0[k], warm1[k]) for k in warm0)  # a second draw
    assert all(torch.equal(rl0[k], warm0[k]) and torch.equal(rl1[k], warm1[k]) for k in warm0)  # 0 RL steps: a copy
    assert len(json.loads((tmp_path / "results.json").read_text())["per_problem"]["warm"]) == 2  # paired by seed
    with pytest.raises(SystemExit):  # without the flag, RL seed 1 starts from warm.pt: its file is refused
        train.main(flags)
    assert "rl_outcome_seed1.pt" in capsys.readouterr().err


def test_second_task_trains_end_to_end(tmp_path):
    train.main([*SMOKE, "--task", "chain", "--out-dir", str(tmp_path)])
    test_set = json.loads((tmp_path / "results.json").read_text())["test_set"]
    problems = [tasks.Chain(3, 10, 100).parse_problem(p) for p in test_set]  # each solvable left to right, or raises
    assert any(list(given) != sorted(given) for given, _ in problems)  # a Countdown prompt lists its numbers sorted


def test_the_gpu_presets_task_trains_end_to_end_at_smoke_size(tmp_path):  # 4 numbers, block 192, every arm
    train.main([*SMOKE, "--n-numbers", "4", "--block-size", "192", "--arms", ",".join(mrt.ARMS),
                "--out-dir", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["summary"]) == set(results["per_problem"]) == {"base", "warm", *mrt.ARMS}
    assert results["config"]["n_numbers"] == 4 and results["train_problems"] == train.PRESETS["smoke"]["n_train"]


def test_each_preset_writes_to_its_own_out_dir_and_bench_reads_the_presets_checked(smoke_run, tmp_path, monkeypatch,
                                                                                    capsys):
    out_dirs = [train.parse_args(["--preset", preset]).out_dir for preset in train.PRESETS]
    assert len(set(out_dirs)) == len(out_dirs)  # --preset gpu after the CPU default finds none of its files
    (tmp_path / "warm.pt").write_bytes((smoke_run[0] / "warm.pt").read_bytes())  # a smoke model: 3 numbers, 1 layer
    for preset in ("gpu", "smoke"):
        monkeypatch.setitem(train.PRESETS[preset], "out_dir", str(tmp_path))
    monkeypatch.chdir(tmp_path)  # where bench.json would go
    with pytest.raises(SystemExit):  # refused before anything is timed
        bench.main(["--preset", "gpu", "--device", "cpu"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path}/warm.pt was made with --n-numbers 3 " in err and "--preset" in err
    cfg = train.parse_args(["--preset", "smoke"])
    assert bench.load_warm(cfg, torch.device("cpu"))[1] == str(tmp_path / "warm.pt")  # its own preset's: taken


def test_rl_by_state_has_mu_read_the_kept_state_and_by_attempt_the_history(coin_rewards, monkeypatch):
    calls, cuts = [], []
    real_context, real_split = mrt.state_context, mrt.split_episodes
    monkeypatch.setattr(mrt, "state_context", lambda *a: calls.append(a) or real_context(*a))
    monkeypatch.setattr(mrt, "split_episodes", lambda thinking, by="attempt": cuts.append(by) or real_split(thinking, by))
    rl_batch("mrt", episodes="attempt")
    assert calls == [] and set(cuts) == {"attempt"}
    cuts.clear()
    rl_batch("mrt", episodes="state")
    assert len(calls) >= 8 and set(cuts) == {"state"}  # at least J(μ | x) of each of the 8 streams


def test_mrt_with_alpha_zero_is_exactly_outcome_rl(smoke_run, coin_rewards, tmp_path):
    for name in ("base.pt", "warm.pt"):
        (tmp_path / name).write_bytes((smoke_run[0] / name).read_bytes())
    train.main([*SMOKE, "--out-dir", str(tmp_path), "--alpha", "0", "--rl-steps", "4"])
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["per_problem"]["mrt"] == results["per_problem"]["outcome"]
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    curve = lambda arm: [(r["step"], r["reward"], r["tokens"], r["episodes"], r["loss"]) for r in rows
                         if r.get("stage") == f"rl_{arm}"]
    assert len(curve("mrt")) == 4 and curve("mrt") == curve("outcome")  # the same samples, step by step


def test_checkpoint_from_other_options_is_refused(smoke_run, tmp_path, capsys):
    (tmp_path / "base.pt").write_bytes((smoke_run[0] / "base.pt").read_bytes())
    with pytest.raises(SystemExit):
        train.main([*SMOKE, "--out-dir", str(tmp_path), "--base-steps", "31"])
    err = capsys.readouterr().err
    assert "base_steps" in err and "--fresh" in err


def test_a_half_finished_stage_from_other_options_is_refused_too(tmp_path):
    cfg, model = train.Config(), tiny_model()
    optimizer = train.make_optimizer(model, 1e-3, 0.1)
    train.Checkpoint(str(tmp_path / "base.pt"), {"lr": 1e-3}, 30, cfg).save(10, model, optimizer, [random.Random(0)])
    assert not train.Checkpoint(str(tmp_path / "base.pt"), {"lr": 1e-3}, 30, cfg).finished()  # step 10 of 30
    with pytest.raises(train.UserError, match="lr"):
        train.Checkpoint(str(tmp_path / "base.pt"), {"lr": 3e-3}, 30, cfg)


def test_the_warm_start_depends_on_train_room():  # its traces are sampled train_room tokens long
    cfg = train.Config()
    assert train.stage_config(cfg, "warm") != train.stage_config(train.Config(train_room=32), "warm")


def test_truncated_checkpoint_is_a_clear_error(smoke_run, tmp_path, capsys):
    (tmp_path / "base.pt").write_bytes((smoke_run[0] / "base.pt").read_bytes()[:1000])
    with pytest.raises(SystemExit):
        train.main([*SMOKE, "--out-dir", str(tmp_path)])
    assert "base.pt: not a readable mrt checkpoint" in capsys.readouterr().err


def test_foreign_checkpoint_is_a_clear_error(tmp_path, capsys):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "base.pt")  # a torch file, but not one of ours
    with pytest.raises(SystemExit):
        train.main([*SMOKE, "--out-dir", str(tmp_path)])
    assert "base.pt: not a readable mrt checkpoint" in capsys.readouterr().err


def test_a_snapshot_resumes_only_on_the_kind_of_device_that_made_it(smoke_run, tmp_path, capsys):
    for name in ("base.pt", "warm.pt"):
        (tmp_path / name).write_bytes((smoke_run[0] / name).read_bytes())
    snapshot = torch.load(smoke_run[0] / "rl_outcome_seed0.pt", weights_only=True)
    assert snapshot["device"] == "cpu"
    # As if snapshotted at step 1 on a GPU: a CUDA generator's state is 16 bytes (seed, offset), a CPU one's 5056.
    cuda_state = torch.zeros(16, dtype=torch.uint8)
    snapshot.update(step=1, device="cuda", rngs=[snapshot["rngs"][0], cuda_state, cuda_state])
    torch.save(snapshot, tmp_path / "rl_outcome_seed0.pt")
    with pytest.raises(SystemExit):
        train.main([*SMOKE, "--out-dir", str(tmp_path), "--arms", "outcome"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rl_outcome_seed0.pt: a snapshot made on cuda" in err and "--device cuda" in err


def test_explain_prints_each_episode_with_its_progress(smoke_run, capsys):
    train.main([*SMOKE, "--out-dir", str(smoke_run[0]), "--explain", "warm", "--problem", "3 7 9:20"])
    out = capsys.readouterr().out
    assert "J(μ | x)" in out and "z_0" in out and "reward r(x, z)" in out


@pytest.mark.parametrize("flags, message", [
    (["--rl-steps", "-1"], "--rl-steps"), (["--alpha", "-0.5"], "--alpha"), (["--device", "tpu"], "--device"),
    (["--train-room", "500"], "--train-room"), (["--preset", "huge"], "--preset"), (["--n-head", "5"], "--n-head"),
    (["--explain", "nothing"], "--explain"), (["--explain", "base", "--problem", "1 2 3:1000"], "--problem"),
    (["--n-test", "5000"], "--n-test"), (["--value-streams", "8"], "--value-streams"),
    (["--rl-prompts", "5000"], "--rl-prompts"), (["--arms", "outcome,ppo"], "--arms"),
    (["--restart", "middle"], "--restart"),
    (["--lr", "nan"], "--lr must be a finite number"), (["--alpha", "inf"], "--alpha must be a finite number"),
    (["--warm-lr", "0"], "--warm-lr must be > 0"), (["--arms", "outcome,outcome"], "--arms names an arm twice"),
    (["--block-size", "20"], "raise --block-size to 104"), (["--lr", "abc"], "--lr: invalid float value"),
    (["--problem", "3 7 9:20"], "pass --explain too"), (["--explain", "warm", "--task", "chain"], "--task countdown"),
    *[(["--explain", "warm", "--problem", p], "1..10") for p in ("0 5 5:0", "-1 2 3:4", "12 11 1:23", "1 2:3")],
])
def test_bad_options_exit_with_one_clear_line(flags, message, smoke_run, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main([*SMOKE, "--out-dir", str(smoke_run[0])] + flags)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_bad_options_from_the_command_line_print_one_line_and_no_traceback(smoke_run):
    for flags in (["--lr", "abc"], ["--lr", "nan"], ["--problem", "3 7 9:20"],
                  ["--explain", "warm", "--problem", "0 5 5:0"]):
        done = subprocess.run([sys.executable, "train.py", *SMOKE, "--out-dir", str(smoke_run[0])] + flags,
                              capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(train.__file__)))
        assert done.returncode == 2 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, flags


def test_a_bad_option_creates_nothing(tmp_path, capsys):
    for flags in (["--n-test", "5000"], ["--rl-prompts", "5000"]):  # found out only once the problems are drawn
        with pytest.raises(SystemExit):
            train.main([*SMOKE, "--out-dir", str(tmp_path / "new")] + flags)
        assert flags[0] in capsys.readouterr().err and not (tmp_path / "new").exists()


@pytest.mark.parametrize("error", [RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos"),
                                   OSError(28, "No space left on device")])  # what torch.save raises on a full disk
def test_a_failed_checkpoint_write_names_the_file_and_leaves_no_tmp(error, tmp_path, monkeypatch):
    def full_disk(blob, path):
        open(path, "wb").write(b"the first bytes")
        raise error
    monkeypatch.setattr(torch, "save", full_disk)
    model = tiny_model()
    checkpoint = train.Checkpoint(str(tmp_path / "base.pt"), {}, 30, train.Config())
    with pytest.raises(train.UserError, match=f"base.pt: the write failed .*--out-dir {tmp_path}"):
        checkpoint.save(10, model, train.make_optimizer(model, 1e-3, 0.1), [])
    assert list(tmp_path.iterdir()) == []


def test_a_failed_results_write_prints_the_table_first_and_leaves_no_tmp(smoke_run, tmp_path, monkeypatch, capsys):
    for path in smoke_run[0].glob("*.pt"):  # every stage finished: only the evaluation runs
        (tmp_path / path.name).write_bytes(path.read_bytes())
    real = os.replace

    def full_disk(source, target):
        if str(target).endswith("results.json"):
            raise OSError(28, "No space left on device")
        real(source, target)
    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(SystemExit):
        train.main([*SMOKE, "--out-dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert "paired difference" in out and not list(tmp_path.glob("*.tmp")) and not (tmp_path / "results.json").exists()
    assert err.endswith(f"error: {tmp_path}/results.json: the write failed (No space left on device); make room in "
                        f"--out-dir {tmp_path} or choose another\n")


MISS = "1+2=3\n3*3=9\n" + tasks.MISSED  # (1, 2, 3) -> 9, not the target 6
SEARCH = MISS + BACKTRACK + "0\n" + MISS + BACKTRACK + "0\n2*3=6\n6*1=6\n" + tasks.REACHED  # miss, repeat, reach


def test_episode_bonuses_mark_reached_and_repeated_attempts():
    rows = evaluation.episode_bonuses(TASK, ((1, 2, 3), 6), mrt.split_episodes(encode(SEARCH)), [0.25, 0.0, 0.0, 1.0])
    assert rows == [[0, -0.25, 0, 0, -1], [1, 0.0, 0, 1, 0], [2, 1.0, 1, 0, 0]]  # [j, r_prg, verdict, repeat, kept]
    unfinished = evaluation.episode_bonuses(TASK, ((1, 2, 3), 6), [encode("1+2=3\n")], [0.5, 0.25])
    assert unfinished[0][2] == -1  # no verdict: unfinished
    # Two problems: the second's later missed new attempts earn +0.5 and +0.1, the first's none.
    new_miss = lambda bonus: [1, bonus, 0, 0, 0]
    measures = evaluation.bonus_measures([{"episode_bonuses": [rows, [new_miss(0.5), new_miss(0.1)]]}])
    assert measures["later missed, repeat"] == {"n": 1, "mean": 0.0, "low": 0.0, "high": 0.0}
    assert measures["reached z_0"] == {"n": 0, "mean": None, "low": None, "high": None}
    new = measures["later missed, new"]  # a replicate without problem 1 has no such episode: it is left out
    assert new["n"] == 2 and new["mean"] == pytest.approx(0.3) and new["low"] == new["high"] == pytest.approx(0.3)


def test_a_pooled_mean_over_problems_gets_an_interval_that_redraws_problems():
    # Problem 0: two items summing to 1; problem 1: one item of 0. A replicate draws both (1/3), problem 0
    # twice (1/2) or problem 1 twice (0).
    r = evaluation.ratio_interval(np.array([1.0, 0.0]), np.array([2.0, 1.0]), n_boot=4000)
    assert r["mean"] == pytest.approx(1 / 3) and r["low"] == 0.0 and r["high"] == 0.5


def test_restarts_are_pass_at_k_of_the_first_attempts_that_fit_the_budget():
    # 2 of 4 first attempts reached, 10 tokens each: B = 9 fits none, 25 fits two, 100 all four (at most m).
    assert evaluation.restart_accuracy(2, 4, 10.0, [0, 9, 10, 25, 100]) == pytest.approx([0, 0, 0.5, 5 / 6, 1])


def test_budget_forced_restarts_answer_as_mu_does_where_none_reached():
    # Problem 0: 2 of 4 first attempts reached, 10 tokens each; its accuracy at B = 0 (μ answering with no thinking)
    # is 0.5. Problem 1: none reached, 20 tokens each, 0.25 at B = 0. J differs from that on purpose: unused here.
    one = {"streams": 4, "budgets": [0, 10, 20], "first_right": [2, 0], "first_attempt_tokens": [10.0, 20.0],
           "successes": [2, 0], "budget_accuracy": [[0.5, 0.6, 0.7], [0.25, 0.3, 0.4]], "J": [[0.9, 0.9], [0.9, 0.9]],
           "thinking_tokens": [10.0, 20.0], "episodes": [1.0, 1.0]}
    got = evaluation.measures([one])
    assert np.allclose(got["restarts"][0], [[0, 0.5, 5 / 6], [0, 0, 0]])  # pass@0, pass@1, pass@2 of 2 in 4
    # where none of the k restarts reached (1 − pass@k), the answer at B = 0: 1 − (1 − pass@k)(1 − accuracy at B = 0)
    assert np.allclose(got["restarts_then_answer"][0], [[0.5, 0.75, 1 - (1 / 6) * 0.5], [0.25, 0.25, 0.25]])


def test_the_anatomy_of_a_search_counts_later_attempts_repeats_and_streams_without_answer():
    problem = ((1, 2, 3), 6)
    scored = evaluation.score_stream(TASK, problem, encode(SEARCH + ANSWER + "2*3=6\n6*1=6\n" + EOS))
    assert scored["later"] == [(1, False, True), (2, True, False)] and scored["answered"] and scored["right"]
    assert scored["first_tokens"] == len(encode(MISS)) and not scored["first_right"]
    unfinished = evaluation.score_stream(TASK, problem, encode(MISS + BACKTRACK + "0\n2*3=6\n"))
    assert unfinished["later"] == [] and not unfinished["answered"]  # an attempt cut short is not checked
    assert evaluation.score_stream(TASK, problem, encode(MISS + BACKTRACK + "0\n2*3=6\n6*1=6"))["later"] == []
    # A line written on after a verdict is no part of the attempt the environment checked, nor of what a restart costs.
    on, reach = "3+3=6\n", "2*3=6\n6*1=6\n" + tasks.REACHED
    written_on = evaluation.score_stream(TASK, problem, encode(MISS + on + BACKTRACK + "0\n" + reach + on))
    assert written_on["later"] == [(1, True, False)] and written_on["first_tokens"] == len(encode(MISS))
    assert evaluation.score_stream(TASK, problem, encode(reach + on))["first_right"]
    # Binned by index: a problem's streams in a row, z_5 pooled with z_4 and after.
    counts = evaluation.later_attempt_counts([scored, unfinished, {"later": [(5, True, False)]}, {"later": []}], m=2)
    assert counts.tolist() == [[[1, 1, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0]], [[0, 0, 0, 1], [0, 0, 0, 1], [0, 0, 0, 0]]]
    # Two problems, 2 streams each, of which 1 never answers; the base model's first attempts reached on 1 of 4
    # streams of problem 0 and on 3 of 4 of problem 1: its rate weighted by later attempts (2 and 1) is 5/12.
    anatomy = evaluation.attempt_anatomy([{"later_attempts": counts.tolist(), "unanswered": [1, 0], "streams": 2}],
                                         {"first_right": [1, 3], "streams": 4})
    assert anatomy["per_stream"] == 0.75 and anatomy["success"] == pytest.approx(2 / 3)
    assert anatomy["repeats"] == pytest.approx(1 / 3) and anatomy["never_answer"] == 0.25
    assert anatomy["base_first_attempt"] == pytest.approx((2 * 0.25 + 1 * 0.75) / 3)
    assert [x["success"] for x in anatomy["by_index"]] == [0.0, 1.0, None, 1.0]
    assert anatomy["by_index"][3]["base_first_attempt"] == 0.75


def test_tokens_to_reach_is_the_first_budget_at_the_target():
    assert evaluation.tokens_to_reach([0, 8, 16, 24], [0.1, 0.3, 0.2, 0.5], 0.3) == 8
    assert evaluation.tokens_to_reach([0, 8], [0.1, 0.2], 0.3) is None


def test_a_read_only_out_dir_is_a_clear_error_before_any_work(tmp_path, monkeypatch, capsys):
    tmp_path.chmod(0o500)
    if os.access(tmp_path, os.W_OK):  # root writes anyway: refuse writes there the way a read-only directory does
        def read_only(path, *args, **kwargs):
            raise PermissionError(13, "Permission denied", path)
        monkeypatch.setattr(train, "open", read_only, raising=False)
    with pytest.raises(SystemExit):
        train.main([*SMOKE, "--out-dir", str(tmp_path)])
    assert f"--out-dir {tmp_path}: cannot write there (Permission denied)" in capsys.readouterr().err
    tmp_path.chmod(0o700)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_out_dir_and_missing_device_are_clear_errors(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit):
        train.main([*SMOKE, "--out-dir", str(tmp_path / "file" / "sub")])
    assert "--out-dir" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            train.main([*SMOKE, "--out-dir", str(tmp_path), "--device", "cuda"])
        assert "--device cuda" in capsys.readouterr().err


def test_non_finite_loss_stops_training():
    model = tiny_model()
    optimizer, x = train.make_optimizer(model, 1e-3, 0.1), torch.tensor([[tasks.BOS_ID, 3, 4]])
    train.check_finite(train.optimizer_step(model, optimizer, model(x, x)[1]), "base")  # a finite step passes
    with pytest.raises(FloatingPointError, match="non-finite"):
        train.check_finite(train.optimizer_step(model, optimizer, model(x, x)[1] * float("nan")), "base")


def test_the_room_is_what_the_block_leaves_after_the_prompt_and_mus_answer():
    task = tasks.Countdown(3, 10, 100)  # longest prompt "<|bos|>10 10 10:100\n": 14 tokens; longest answer 25
    assert (task.prompt_tokens(), task.answer_tokens()) == (14, 25)
    assert task.room(128) == 128 - 14 - 1 - 25  # prompt, completion, <|answer|>, answer
    assert task.room(128, [((3, 7, 9), 20)]) == 128 - len(encode("<|bos|>3 7 9:20\n")) - 1 - 25


def test_a_checkpoint_from_before_an_option_was_renamed_or_added_is_checked_as_what_made_it(tmp_path):
    path, cfg = str(tmp_path / "warm.pt"), train.Config(train_room=32, warm_traces=1)
    saved = {k: v for k, v in train.stage_config(cfg, "warm").items() if k not in ("train_room", "warm_traces")}
    torch.save({"model": {}, "model_args": {}, "stage_config": saved | {"max_think": 32}, "step": cfg.warm_steps}, path)
    assert train.Checkpoint(path, train.stage_config(cfg, "warm"), cfg.warm_steps, cfg).finished()  # its old name
    for default, option in ((train.Config(warm_traces=1), "train_room"), (train.Config(train_room=32), "warm_traces")):
        with pytest.raises(train.UserError, match=option):  # not silently reused at the default room or traces
            train.Checkpoint(path, train.stage_config(default, "warm"), cfg.warm_steps, default)
    rl, key = str(tmp_path / "rl_outcome_seed1.pt"), train.stage_config(cfg, "outcome") | {"rl_seed": 1}
    torch.save({"model": {}, "model_args": {}, "stage_config": key, "step": cfg.rl_steps}, rl)  # before --warm-per-seed
    assert train.Checkpoint(rl, key | {"warm_seed": cfg.seed}, cfg.rl_steps, cfg).finished()  # RL from warm.pt
    with pytest.raises(train.UserError, match="warm_seed"):  # not from RL seed 1's own warm start
        train.Checkpoint(rl, key | {"warm_seed": 1}, cfg.rl_steps, cfg)


def test_machine_names_the_device_that_ran_not_a_gpu_beside_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU 80GB")
    assert "Fake GPU" not in evaluation.machine(torch.device("cpu"))
    assert evaluation.machine(torch.device("cuda")).startswith("Fake GPU 80GB, PyTorch ")


# (1, 2, 3) -> 6. `3-1=2` leaves (2, 2), from which 6 cannot be reached: dead. `1+2=3` leaves (3, 3): alive.
KEEPS_DEAD = "3-1=2\n2*2=4\n" + tasks.MISSED + BACKTRACK + "1\n2+2=4\n" + tasks.MISSED + BACKTRACK + "0\n"
KEEPS_ALIVE = MISS + BACKTRACK + "1\n3+3=6\n" + tasks.REACHED


def test_backtracks_count_the_steps_they_keep_and_whether_the_kept_state_is_alive():
    problem = ((1, 2, 3), 6)
    dead = evaluation.backtrack_counts(TASK, problem, parse_output(KEEPS_DEAD))
    alive = evaluation.backtrack_counts(TASK, problem, parse_output(KEEPS_ALIVE))
    # [backtracks, keeping a step, kept alive, steps kept, after an alive first step, of those keeping a step]
    assert dead == [2, 1, 0, 1, 0, 0] and alive == [1, 1, 1, 1, 1, 1]
    kinds = [evaluation.kept_state(TASK, problem, parse_output(KEEPS_DEAD), j) for j in range(3)]
    assert kinds == [evaluation.NONE_KEPT, evaluation.DEAD, evaluation.NO_STEP]
    measures = evaluation.backtrack_measures([{"streams": 2, "backtracks": [[3, 2, 1, 2, 2, 1]]}])
    assert measures["per_stream"] == 1.5 and measures["keep_a_step"]["mean"] == pytest.approx(2 / 3)
    assert measures["kept_alive"]["mean"] == 0.5 and measures["steps_kept"]["mean"] == pytest.approx(2 / 3)
    # Two of the three came after an alive first step, one of those keeps a step; the one after a dead one keeps one.
    assert measures["keep_if_first_step_alive"]["mean"] == 0.5 and measures["keep_if_first_step_dead"]["mean"] == 1.0


def test_by_state_an_episode_is_judged_by_what_its_closing_backtrack_line_keeps():
    problem, J = ((1, 2, 3), 6), [0.25, 0.5, 1.0]
    by_state = evaluation.episode_bonuses(TASK, problem, mrt.split_episodes(encode(KEEPS_ALIVE), "state"), J, "state")
    by_attempt = evaluation.episode_bonuses(TASK, problem, mrt.split_episodes(encode(KEEPS_ALIVE)), J)
    # By state z_0 ends with `<|backtrack|>1`, which keeps the alive "1+2=3"; by attempt that line opens z_1.
    assert by_state == [[0, 0.25, 0, 0, evaluation.ALIVE], [1, 0.5, 1, 0, evaluation.NONE_KEPT]]
    assert [row[4] for row in by_attempt] == [evaluation.NONE_KEPT, evaluation.ALIVE]
    measures = evaluation.bonus_measures([{"episode_bonuses": [by_state]}])
    assert measures["keeps an alive state"]["n"] == 1 and measures["keeps an alive state"]["mean"] == 0.25
    # A stream that ends in a backtrack line: by state its last episode is judged by that line too.
    ends_in_a_line = mrt.split_episodes(encode(KEEPS_DEAD), "state")
    assert [row[4] for row in evaluation.episode_bonuses(TASK, problem, ends_in_a_line, J, "state")] == \
        [evaluation.DEAD, evaluation.NO_STEP]
    cut_in_a_line = mrt.split_episodes(encode(KEEPS_DEAD)[:-1], "state")  # the room cut `<|backtrack|>0` short
    assert [row[4] for row in evaluation.episode_bonuses(TASK, problem, cut_in_a_line, J, "state")] == \
        [evaluation.DEAD, evaluation.NONE_KEPT]


def test_the_evaluation_cuts_episodes_and_has_mu_read_them_as_rl_does(monkeypatch):
    seen = []
    cut, values = mrt.split_episodes, mrt.episode_values
    monkeypatch.setattr(mrt, "split_episodes", lambda thinking, by="attempt": seen.append(by) or cut(thinking, by))
    monkeypatch.setattr(mrt, "episode_values", lambda *a, reads_state=False, **k: seen.append(reads_state)
                        or values(*a, reads_state=reads_state, **k))
    judged = evaluation.episode_bonuses
    monkeypatch.setattr(evaluation, "episode_bonuses", lambda *a: seen.append(a[-1]) or judged(*a))
    problems = tasks.make_split(TASK, 10, 2, seed=0)[1]
    for episodes, reads_state in (("state", True), ("attempt", False)):
        seen.clear()
        cfg = train.Config(eval_streams=2, value_streams=1, max_episodes=2, budget_step=64, episodes=episodes)
        evaluation.evaluate(tiny_model(block_size=128), TASK, problems, cfg, torch.device("cpu"))
        assert seen[:3] == [episodes, episodes, reads_state]  # the two value streams' cut, then what μ reads
        assert seen[-2:] == [episodes, episodes]  # how their episodes are judged


def test_J_after_each_step_inside_an_attempt_pairs_the_state_the_solver_judges_with_what_mu_answers_there():
    problem, thinking = ((1, 2, 3), 6), encode(KEEPS_DEAD + "1+2=3\n")
    # Inside an attempt (no verdict after the line): "3-1=2\n" ends at token 6, dead; "1+2=3\n" after `<|backtrack|>0`
    # at 32, alive. The lines that end an attempt ("2*2=4", and "2+2=4" after the kept step) are left out.
    assert evaluation.step_ends(TASK, problem, thinking) == [(6, False), (32, True)]
    seen = []

    def mu(problems, contexts, n_rollouts):  # right unless the context holds a miss; records what it is shown
        seen.extend(contexts)
        return [int(tasks.MISSED_ID not in c) for c in contexts for _ in range(n_rollouts)]
    prompt = encode(TASK.prompt(problem))
    states = evaluation.state_values(mu, TASK, [problem], [prompt], [thinking], n_rollouts=2)
    assert states == [[[0, 1.0], [1, 0.0]]]  # [alive, J]
    assert sorted(seen) == sorted(prompt + thinking[:n] + [tasks.ANSWER_ID] for n in (6, 32))
    measures = evaluation.step_state_measures([{"step_states": [states[0] + [[1, 0.5]]]}])
    assert measures["alive"]["mean"] == pytest.approx(2 / 3) and measures["J after an alive state"]["mean"] == 0.25
    assert measures["J after a dead state"]["mean"] == 1.0

def test_the_bonus_is_pooled_by_what_a_later_episode_kept():
    first = [[0, -0.3, 0, 0, evaluation.NONE_KEPT], [1, 0.4, 0, 0, evaluation.ALIVE], [2, -0.2, 0, 0, evaluation.DEAD]]
    second = [[0, 0.0, 0, 0, evaluation.NONE_KEPT], [1, 0.1, 0, 0, evaluation.ALIVE], [2, 0.5, 1, 0, evaluation.NO_STEP]]
    rows = first + second  # two streams of one problem
    measures = evaluation.bonus_measures([{"episode_bonuses": [rows]}])
    assert measures["keeps an alive state"]["mean"] == pytest.approx(0.25) and measures["keeps an alive state"]["n"] == 2
    assert measures["keeps a dead state"]["mean"] == pytest.approx(-0.2) and measures["keeps no step"]["n"] == 1
