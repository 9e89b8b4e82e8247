"""The world the model lives in: a character-level tokenizer, the search tasks, the environment that calculates and
checks, and their training text (solver solutions, backtracking traces).

One model output (everything after the prompt) has a single text format, shared by every stage; `[...]` marks what
the environment writes (the model writes the rest):

    <|bos|>3 7 9:20\n                   prompt x: the numbers, then the target
    9-7=[2\n]2*3=[6\n][<|missed|>]        attempt z_0: one step `a op b=c` per line; the environment writes each
                                         result c, and after the line that leaves one number, its verdict
    <|backtrack|>0\n9*3=[27\n]...        episode z_1: keep the first 0 steps of the last attempt, then a new attempt
    <|answer|>9*3=[27\n]27-7=[20\n]<|eos|>  the final, clean solution (all steps from the start)

Everything before <|answer|> is the *thinking* stream; the verifier only scores the answer. At this size the model
cannot check its own arithmetic, so the environment does it, as unit tests do for a code model; its tokens are never
sampled and never credited in RL. With `calculator=False` (train.py --model-only) the model writes everything.
"""
import functools
import itertools
import random
import re
from dataclasses import dataclass

import tiktoken

# ----------------------------------------------------------------------------- tokenizer
ALPHABET = "0123456789+-*/=: \n"
SPECIALS = ["<|bos|>", "<|eos|>", "<|backtrack|>", "<|answer|>", "<|pad|>", "<|reached|>", "<|missed|>"]
BOS, EOS, BACKTRACK, ANSWER, PAD, REACHED, MISSED = SPECIALS
_SPECIAL_RE = re.compile("|".join(re.escape(s) for s in SPECIALS))

# One token per character of ALPHABET (`[\s\S]` splits text into single characters, newline included, so BPE never
# merges anything), plus one id per special token.
TOKENIZER = tiktoken.Encoding(name="mrt-char", pat_str=r"[\s\S]",
                              mergeable_ranks={ch.encode(): i for i, ch in enumerate(ALPHABET)},
                              special_tokens={s: len(ALPHABET) + i for i, s in enumerate(SPECIALS)})
BOS_ID, EOS_ID, BACKTRACK_ID, ANSWER_ID, PAD_ID, REACHED_ID, MISSED_ID = map(TOKENIZER.encode_single_token, SPECIALS)
NEWLINE_ID, EQUALS_ID = TOKENIZER.encode_single_token("\n"), TOKENIZER.encode_single_token("=")
VERDICT_IDS = (REACHED_ID, MISSED_ID)  # only the environment writes these
NEVER_SAMPLED = (PAD_ID, *VERDICT_IDS)  # ids the sampler never draws: pads only fill stopped rows
VOCAB_SIZE = TOKENIZER.n_vocab


def encode(text: str) -> list[int]:
    """Text -> token ids; raises ValueError on a character outside the alphabet (tiktoken would panic)."""
    bad = set(_SPECIAL_RE.sub("", text)) - set(ALPHABET)
    if bad:
        raise ValueError(f"cannot encode {sorted(bad)!r}: the alphabet is {ALPHABET!r} plus {SPECIALS}")
    return TOKENIZER.encode(text, allowed_special="all")


def decode(ids) -> str:
    """Token ids -> text (special tokens written out by name)."""
    return TOKENIZER.decode([int(i) for i in ids])


# ----------------------------------------------------------------------------- the Countdown task
STEP_RE = re.compile(r"^(\d+)([-+*/])(\d+)=(\d+)$")


def parse_step(line: str):
    """'9-7=2' -> (9, '-', 7, 2), or None if the line is not a well-formed step."""
    m = STEP_RE.match(line)
    if not m or any(len(g) > 1 and g[0] == "0" for g in m.group(1, 3, 4)):  # no leading zeros
        return None
    return int(m[1]), m[2], int(m[3]), int(m[4])


OPERATIONS = {  # a op b, or None where the result would not be a positive integer
    "+": lambda a, b: a + b, "-": lambda a, b: a - b if a > b else None,
    "*": lambda a, b: a * b, "/": lambda a, b: a // b if b and a % b == 0 else None}


def calculate(a: int, op: str, b: int):
    """a op b if the result is a positive integer (no negatives, no zero, exact division only), else None."""
    return OPERATIONS[op](a, b) if op in OPERATIONS else None


@dataclass(frozen=True)
class NumberTask:
    """What the tasks share: a problem is (numbers, target); each step `a op b=c` combines two numbers into one until
    one is left, which must equal the target. A subclass says which numbers a step may combine (`moves`, `apply`) and
    whether their order matters (`arrange`). Parsing, verification, the traces and the pipeline use only this interface.
    """
    n_numbers: int = 3
    max_number: int = 10
    max_target: int = 100
    calculator: bool = True  # the environment writes results and verdicts (False: the model writes everything)

    def arrange(self, numbers) -> tuple:
        """The numbers as a state: sorted where their order does not matter."""
        raise NotImplementedError

    def apply(self, state: tuple, line: str):
        """The state after the step written on `line`, or None if the step is malformed, wrong or not allowed."""
        raise NotImplementedError

    def moves(self, state: tuple) -> list[str]:
        """Every legal step from `state`, in the canonical form the solver writes."""
        raise NotImplementedError

    def checked(self, attempt: list[str]) -> list[str]:
        """An attempt as the environment checks it once it has n−1 lines (one number left): those, not any after."""
        return attempt[:self.n_numbers - 1]

    def answer_tokens(self) -> int:
        """Tokens of the longest correct answer, <|eos|> included: n-1 lines `a op b=c`. A number made from s of the
        given numbers is below (max_number + 1)^s (for x < A, y < B: x + y and x·y are below A·B), an operand uses at
        most n-1 of them, and the last result is the target."""
        largest = max((self.max_number + 1) ** (self.n_numbers - 1) - 1, self.max_target)
        return (self.n_numbers - 1) * (3 * len(str(largest)) + 3) + 1

    def prompt_tokens(self) -> int:
        """Tokens of the longest prompt: <|bos|>, the numbers and their separators, the target, the newline."""
        return 2 + self.n_numbers * (len(str(self.max_number)) + 1) + len(str(self.max_target))

    def room(self, block_size: int, problems=None) -> int:
        """The room of a completion (thinking and answer): what a block leaves after the longest prompt of `problems`
        (of any problem if None), <|answer|> and μ's longest answer, so that μ can answer after any cut of it."""
        prompt = max(len(encode(self.prompt(p))) for p in problems) if problems else self.prompt_tokens()
        return block_size - prompt - 1 - self.answer_tokens()

    def prompt(self, problem) -> str:
        """The model's input x: `<|bos|>numbers:target` and a newline."""
        numbers, target = problem
        return f"{BOS}{' '.join(map(str, numbers))}:{target}\n"

    def parse_problem(self, text: str):
        """'3 7 9:20' -> ((3, 7, 9), 20); raises ValueError naming what is wrong."""
        numbers, _, target = text.partition(":")
        try:
            numbers, target = [int(n) for n in numbers.split()], int(target)
        except ValueError:
            raise ValueError(f"expected numbers and a target like '3 7 9:20', got {text!r}") from None
        if len(numbers) != self.n_numbers or not all(1 <= n <= self.max_number for n in numbers) \
                or not 1 <= target <= self.max_target:  # the steps are only defined on positive numbers
            raise ValueError(f"{text!r}: this task has {self.n_numbers} numbers in 1..{self.max_number} and a target "
                             f"in 1..{self.max_target} (--n-numbers, --max-number, --max-target)")
        if not self.can_reach(self.arrange(numbers), target):
            raise ValueError(f"{text!r} is not a solvable {self.name} problem")
        return self.arrange(numbers), target

    def start(self, problem) -> tuple:
        """The state before any step."""
        return self.arrange(problem[0])

    # The solver's caches are bounded (least recently used entries go): with 4 numbers they would grow past 10^6.
    @functools.lru_cache(maxsize=2 ** 18)
    def successors(self, state: tuple) -> tuple:
        """((step, state after it), ...) for every legal step from `state`, in `moves` order (memoised)."""
        return tuple((m, self.apply(state, m)) for m in self.moves(state))

    def solutions(self, state: tuple, target: int) -> list[list[str]]:
        """All step sequences from `state` that end with exactly `target` left (exact DFS)."""
        if len(state) == 1:
            return [[]] if state[0] == target else []
        return [[m] + rest for m, after in self.successors(state) if self.can_reach(after, target)
                for rest in self.solutions(after, target)]

    @functools.lru_cache(maxsize=2 ** 20)
    def can_reach(self, state: tuple, target: int) -> bool:
        """Whether some sequence of steps from `state` ends with exactly `target` (memoised DFS)."""
        if len(state) == 1:
            return state[0] == target
        return any(self.can_reach(after, target) for _, after in self.successors(state))

    def key(self, problem) -> tuple:
        """Identity of a problem (to dedupe and to split): up to the order of the numbers where it does not matter."""
        return self.arrange(problem[0]), problem[1]

    def random_problem(self, rng: random.Random):
        """A solvable problem: draw numbers, play random legal steps, and take the result as the target."""
        while True:
            numbers = self.arrange(rng.randint(1, self.max_number) for _ in range(self.n_numbers))
            target = parse_step(self.random_play(numbers, rng)[-1])[3]
            if target <= self.max_target:
                return numbers, target

    def random_play(self, state: tuple, rng: random.Random) -> list[str]:
        """Random legal steps from `state` until one number is left."""
        steps = []
        while len(state) > 1:
            step, state = rng.choice(self.successors(state))
            steps.append(step)
        return steps


@dataclass(frozen=True)
class Countdown(NumberTask):
    """Combine any two of the remaining numbers per step with + - * /. A state is the sorted remaining numbers."""
    name = "countdown"

    def arrange(self, numbers) -> tuple:
        return tuple(sorted(numbers))

    def apply(self, state: tuple, line: str):
        step = parse_step(line)
        if step is None or calculate(*step[:3]) != step[3]:
            return None
        a, _, b, c = step
        rest = list(state)
        for x in (a, b):
            if x not in rest:
                return None
            rest.remove(x)
        return tuple(sorted(rest + [c]))

    def moves(self, state: tuple) -> list[str]:
        """Larger number first, each pair of positions once."""
        return sorted({f"{a}{op}{b}={c}" for b, a in itertools.combinations(state, 2)  # b <= a: the state is sorted
                       for op in OPERATIONS if (c := calculate(a, op, b)) is not None})


@dataclass(frozen=True)
class Chain(NumberTask):
    """Left to right: combine the running result with the next number, in the order given (3 7 9:30 -> 3*7=21,
    21+9=30). A state is (running result, numbers still to come). An early wrong operator is only found out later."""
    name = "chain"

    def arrange(self, numbers) -> tuple:
        return tuple(numbers)

    def apply(self, state: tuple, line: str):
        step = parse_step(line)  # the running result and the next number, combined
        if step is None or (step[0], step[2]) != state[:2] or calculate(*step[:3]) != step[3]:
            return None
        return (step[3],) + state[2:]

    def moves(self, state: tuple) -> list[str]:
        a, b = state[0], state[1]
        return [f"{a}{op}{b}={c}" for op in OPERATIONS if (c := calculate(a, op, b)) is not None]


TASKS = {"countdown": Countdown, "chain": Chain}


def make_split(task, n_train: int, n_test: int, seed: int):
    """Disjoint train/test problem lists (by `task.key`), fixed by `seed`."""
    rng = random.Random(seed)
    seen, problems, misses = set(), [], 0
    # The problem space is finite (3 numbers up to 10 give ~2,900): stop once new problems stop turning up.
    while len(problems) < n_train + n_test and misses < 5000:
        p = task.random_problem(rng)
        misses = misses + 1 if (key := task.key(p)) in seen else 0
        if not misses:
            seen.add(key)
            problems.append(p)
    if len(problems) <= n_test:
        raise ValueError(f"only {len(problems)} distinct problems exist for {task}; lower --n-test")
    return problems[n_test:], problems[:n_test]


# ----------------------------------------------------------------------------- parsing and verification
@dataclass
class Parsed:
    """A model output taken apart. `attempts[i]` is the full step list of attempt i (kept prefix included)."""
    attempts: list
    backtracks: list  # the step count each <|backtrack|> keeps (None where malformed)
    answer: list | None  # the answer's lines, or None if there is no complete answer


def parse_output(text: str) -> Parsed:
    """Take apart any completion (text after the prompt); never raises, however malformed or truncated."""
    thinking, has_answer, answer = text.replace(REACHED, "").replace(MISSED, "").partition(ANSWER)
    chunks = thinking.split(BACKTRACK)
    attempts, backtracks = [_lines(chunks[0])], []
    for chunk in chunks[1:]:
        head, _, body = chunk.partition("\n")
        keep = int(head) if head.isdigit() and len(head) < 4 else None
        backtracks.append(keep)
        kept = attempts[-1][:keep] if keep is not None else []
        attempts.append(kept + _lines(body))
    complete = has_answer and answer.endswith(EOS) and answer.count(EOS) == 1
    return Parsed(attempts, backtracks, _lines(answer[: -len(EOS)]) if complete else None)


def _lines(text: str) -> list[str]:
    return [line for line in text.split("\n") if line]


def run_steps(task, problem, lines):
    """The state after playing `lines` from the start, or None at the first invalid step."""
    state = task.start(problem)
    for line in lines:
        if (state := task.apply(state, line)) is None:
            return None
    return state


def valid_prefix(task, problem, lines) -> int:
    """How many leading steps of `lines` are legal moves."""
    state, k = task.start(problem), 0
    while k < len(lines) and (state := task.apply(state, lines[k])) is not None:
        k += 1
    return k


def is_correct(task, problem, lines) -> bool:
    """Every step legal and correct, each number used as available, and the last number equals the target."""
    return run_steps(task, problem, lines) == (problem[1],)


def verify(task, problem, completion: str) -> int:
    """The 0/1 outcome reward r(x, z): 1 iff the completion has a complete answer that solves the problem."""
    parsed = parse_output(completion)
    return int(parsed.answer is not None and is_correct(task, problem, parsed.answer))


def answer_key(task, lines) -> tuple:
    """An attempt as a computation, to tell repeats: its steps with the operands of + and * in `task.arrange`
    order, so that `9*3=27` and `3*9=27` count as one attempt where the order of the numbers does not matter."""
    def step_key(line):
        step = parse_step(line)
        if step is None or step[1] not in "+*":
            return step or line
        a, op, b, c = step
        return op, task.arrange((a, b)), c
    return tuple(map(step_key, lines))


def steps_text(steps) -> str:
    """Steps written one per line: the text of an answer, or of an attempt without its verdict."""
    return "".join(step + "\n" for step in steps)


def attempt_text(task, problem, steps, kept: int = 0) -> str:
    """The text of an attempt's steps after the `kept` steps it continues from, with the environment's verdict after
    the line that leaves one number (n−1 steps in all)."""
    verdict = (REACHED if is_correct(task, problem, steps) else MISSED) if len(steps) == task.n_numbers - 1 else ""
    return steps_text(steps[kept:]) + (verdict if task.calculator else "")


# ----------------------------------------------------------------------------- the environment
OPERATION_RE = re.compile(r"(?:^|\n|>)([1-9]\d*)([-+*/])([1-9]\d*)=$")  # `a op b=` at the end of a completion


def environment_reply(task, problem, completion: str) -> str:
    """What the environment writes after the model's `a op b=` at the end of `completion` (the text so far): the
    result (nothing where it is not a positive integer: the step is then malformed) and a newline; in the thinking,
    after the line that leaves one number, also the verdict <|reached|> or <|missed|> (is the attempt a solution?)."""
    m = OPERATION_RE.search(completion)
    result = calculate(int(m[1]), m[2], int(m[3])) if m else None
    reply = ("" if result is None else str(result)) + "\n"
    if ANSWER not in completion:
        attempt = parse_output(completion + reply).attempts[-1]
        if len(attempt) == task.n_numbers - 1:
            reply += REACHED if is_correct(task, problem, attempt) else MISSED
    return reply


def environment_mask(task, completion: list[int]) -> list[bool]:
    """Which tokens of a completion the environment wrote: after each `=` up to the newline, and the verdicts. (The
    environment never writes `=`, so this follows from the tokens alone.) All False without the calculator."""
    mask, in_reply = [], False
    for tok in completion:
        mask.append(task.calculator and (in_reply or tok in VERDICT_IDS))
        in_reply = (in_reply and tok != NEWLINE_ID) or (not in_reply and tok == EQUALS_ID)
    return mask


@dataclass(frozen=True)
class Environment:
    """The environment as the sampler calls it (`model.EnvironmentHook`): it follows each row and answers its `=`."""
    task: NumberTask
    trigger = EQUALS_ID

    def follow(self, context: list[int]) -> "FollowedRow":
        """A row that starts from `context`: the prompt, and maybe the start of a completion."""
        prompt, _, completion = decode(context).partition("\n")
        return FollowedRow(self.task, self.task.parse_problem(prompt.removeprefix(BOS)), completion)


@dataclass
class FollowedRow:
    """One row as the environment sees it on the host: its problem, and its completion's text as far as it has read."""
    task: NumberTask
    problem: tuple
    text: str
    read: int = 0  # how many of the sampled ids `text` holds

    def reply(self, ids: list[int]) -> list[int]:
        """The reply to the `=` that ends `ids`, the ids sampled so far (replies included): only the ids it has not
        read are decoded, not the whole row again."""
        self.text, self.read = self.text + decode(ids[self.read:]), len(ids)
        # The environment writes digits, newlines and verdicts only: `encode`'s alphabet check is not needed here.
        return TOKENIZER.encode(environment_reply(self.task, self.problem, self.text), allowed_special="all")


def environment(task):
    """The environment of a task, or None where the model writes everything."""
    return Environment(task) if task.calculator else None


# ----------------------------------------------------------------------------- training text and backtracking traces
def base_examples(task, problems, solutions_per_problem: int, cut_prob: float, rng: random.Random) -> list:
    """(problem, pieces) examples, pieces being (text, learn) pairs; the loss is on learn=True text only. Per problem:
    `solutions_per_problem` solver solutions, one attempt then the answer, of which `cut_prob` cut the thinking short
    before <|answer|> (this teaches μ to answer from partial thinking)."""
    out = []
    for p in problems:
        solutions = task.solutions(task.start(p), p[1])
        for steps in rng.sample(solutions, min(solutions_per_problem, len(solutions))):
            if rng.random() < cut_prob:
                cut = attempt_text(task, p, steps[:rng.randrange(len(steps))]) + ANSWER
                out.append((p, [(cut, False), (steps_text(steps) + EOS, True)]))
            else:
                out.append((p, [(attempt_text(task, p, steps) + ANSWER + steps_text(steps) + EOS, True)]))
    return out


@dataclass
class Trace:
    """One warm-start example: a first attempt z_0 and, if it failed, where to backtrack, the failed retries if any
    (each backtracked from in the same way), and the new attempt that solves the problem."""
    problem: tuple
    first_attempt: list  # z_0's steps
    keep: int | None = None  # steps of z_0 each backtrack keeps (None: z_0 was right, no backtrack)
    new_steps: list | None = None  # the solving attempt's steps (after the kept prefix)
    retries: tuple = ()  # failed retries' steps (kept prefix included), in order
    learn_retries: bool = False  # learn the failed retries too (a search to imitate), not only the backtracks

    def pieces(self, task) -> list[tuple[str, bool]]:
        """The SFT example as (text, learn) pieces: the loss skips z_0 and, unless `learn_retries`, the retries (not
        to be imitated) but learns every backtrack. A backtrack line opens the episode of the attempt after it."""
        first = attempt_text(task, self.problem, self.first_attempt)
        if self.keep is None:
            return [(first + ANSWER + steps_text(self.first_attempt) + EOS, True)]
        back, steps = f"{BACKTRACK}{self.keep}\n", self.first_attempt[:self.keep] + self.new_steps
        retries = [(piece, learn) for retry in self.retries for piece, learn in
                   ((back, True), (attempt_text(task, self.problem, retry, self.keep), self.learn_retries))]
        solve = back + attempt_text(task, self.problem, steps, self.keep) + ANSWER + steps_text(steps) + EOS
        return [(first, False), *retries, (solve, True)]
