"""A small GPT (nanoGPT-style, with rotary position embeddings) and batched sampling with a KV cache.

Rows of a batch have different lengths. Training pads on the right (plain causal attention; the pads come after every
real token, so they cannot change it). Sampling pads prompts on the *left* so that every row's next token sits in the
same column; each row then gets its own positions and a mask that hides its pads.
"""
import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence


def native_bf16(device) -> bool:
    """Whether the device computes in bf16 natively: a CUDA card of compute capability 8.0 or more (A100, RTX 30xx and
    later). T4 and V100 only emulate it, slowly, although torch.cuda.is_bf16_supported() may say yes."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def autocast(device):
    """The one precision rule: bf16 autocast where the card has it natively (tensor cores), fp32 everywhere else (CPU,
    MPS, older cards). fp16 would be faster on those cards but needs a loss scaler; a model this small does not."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if native_bf16(device) else contextlib.nullcontext()


def activation_dtype(model):
    """The dtype attention computes in: autocast's where it is on (bf16, see `autocast`), else the weights'."""
    return torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else model.wte.weight.dtype


MAX_CACHE_BYTES = 2 * 2 ** 30  # the KV cache of one sampling call stays below this (`mrt.complete` chunks above it)


def rows_that_fit(model, length: int) -> int:
    """How many rows of `length` tokens a KV cache of MAX_CACHE_BYTES holds (keys and values of every layer)."""
    per_row = 2 * model.config.n_layer * model.config.n_embd * length * activation_dtype(model).itemsize
    return max(1, MAX_CACHE_BYTES // per_row)


@dataclass
class GPTConfig:
    """The network's sizes (nanoGPT's fields; the tokenizer fixes vocab_size)."""
    block_size: int = 128  # longest sequence (prompt + completion) the model sees
    vocab_size: int = 23
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128


class KVCache:
    """Keys and values of every layer for the tokens seen so far: one (B, H, T_max, D) tensor per layer and kind (kept
    apart per layer, so that attention reads one contiguous block: on a CPU, reading the cache is most of its time)."""

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device, dtype):
        shape = (batch_size, config.n_head, max_len, config.n_embd // config.n_head)
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.length = 0  # tokens already stored

    def update(self, layer: int, k, v):
        """Store this step's keys/values for `layer` and return all of them so far."""
        end = self.length + k.size(2)
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def repeat_rows(self, n: int):
        """Each row becomes n consecutive copies (the samples of one prompt share its prefill)."""
        self.k, self.v = ([t.repeat_interleave(n, 0) for t in kv] for kv in (self.k, self.v))


def rotary(x, positions, base: float = 10000.0):
    """Rotary position embedding (RoPE, Su et al. 2021) of x (B, H, T, D) at positions (T,) or (B, T): each pair of
    channels turns by an angle proportional to the position, so that q·k depends only on how far apart two tokens
    are: a skill is not tied to where in the stream it was practised."""
    half = x.size(-1) // 2
    angles = positions.float()[..., None] * base ** (-torch.arange(half, device=x.device) / half)  # (.., T, D/2)
    if angles.dim() == 3:
        angles = angles[:, None]  # (B, 1, T, D/2): one row's positions for all heads
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention; reads and extends the KV cache when one is given."""
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.n_head, self.layer = config.n_head, layer
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x, positions, mask=None, cache=None):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
        q, k = rotary(q, positions), rotary(k, positions)
        if cache is not None:
            k, v = cache.update(self.layer, k.to(cache.k[0].dtype), v.to(cache.v[0].dtype))
        # mask=None means a plain causal batch; otherwise mask (B, 1, T, T_keys) says which keys each query sees.
        y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, is_causal=mask is None)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    """The feed-forward block: 4x wider, GELU."""
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    """A pre-LayerNorm transformer block: x + attention(LN(x)), then x + MLP(LN(x))."""
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(config.n_embd), CausalSelfAttention(config, layer)
        self.ln_2, self.mlp = nn.LayerNorm(config.n_embd), MLP(config)

    def forward(self, x, positions, mask=None, cache=None):
        x = x + self.attn(self.ln_1(x), positions, mask, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Token embeddings, n_layer blocks (rotary positions on q and k), a final LayerNorm and the tied output head."""
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied input/output embeddings
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by 1/sqrt(2 * n_layer)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        """Parameter count (the tied embedding counted once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None, positions=None, mask=None, cache=None):
        """Logits (B, T, V); with `targets` (-1 = ignore) also the mean cross-entropy."""
        if positions is None:
            positions = torch.arange(idx.size(1), device=idx.device)
        x = self.wte(idx)
        for block in self.blocks:
            x = block(x, positions, mask, cache)
        if cache is not None:
            cache.length += idx.size(1)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits
        return logits, F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)


def completion_logprobs(model: GPT, prompts: list, completions: list, exclude=()):
    """log p(y_t | x, y_<t) of every token of every completion, under grad: (B, T) with T the longest completion,
    rows padded with 0 on the right. One forward pass over the prompt + completion rows, padded on the right.

    `exclude`: ids the sampler never draws, left out of every row's distribution as `generate` does.
    """
    rows = [torch.as_tensor(p + c) for p, c in zip(prompts, completions)]
    idx = pad_sequence(rows, batch_first=True, padding_value=0).to(model.wte.weight.device)
    logits = model(idx[:, :-1]).float()  # position t scores token t+1
    banned = torch.tensor([v in exclude for v in range(logits.size(-1))]).to(idx.device)  # (V,): ids never drawn
    logprobs = torch.gather(F.log_softmax(logits.masked_fill(banned, float("-inf")), -1), 2,
                            idx[:, 1:, None]).squeeze(2)
    n = torch.tensor([len(c) for c in completions], device=idx.device)
    offsets = torch.arange(max(map(len, completions)), device=idx.device)
    starts = torch.tensor([len(p) - 1 for p in prompts], device=idx.device)  # scores the completion's first token
    at = (starts[:, None] + offsets).clamp(max=logprobs.size(1) - 1)
    return torch.gather(logprobs, 1, at).masked_fill(offsets >= n[:, None], 0.0)


@dataclass
class Generation:
    """What `generate` returns."""
    tokens: torch.Tensor  # (B, N) sampled ids, `pad_id` after the stop token
    logprobs: torch.Tensor  # (B, N) log-prob of each sampled id under the sampling distribution, 0 after the stop
    lengths: torch.Tensor  # (B,) tokens up to and including the stop token


def sample_next(logits, temperature: float, banned, generator):
    """Draw one token per row from (B, V) logits, never an id `banned` (V,) marks: the ids and their log-probs."""
    logits = logits.float().masked_fill(banned, float("-inf"))
    if temperature == 0:  # greedy: the log-prob is that of the model's own (temperature 1) distribution
        tok = logits.argmax(-1)
        return tok, torch.gather(F.log_softmax(logits, -1), 1, tok[:, None]).squeeze(1)
    logits = logits / temperature
    logp = F.log_softmax(logits, -1)
    tok = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)
    return tok, torch.gather(logp, 1, tok[:, None]).squeeze(1)


def padded_causal_mask(valid):
    """(B, 1, T, T) attention mask: causal, hiding pad keys (valid (B, T) is False at pads)."""
    T = valid.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=valid.device).tril()
    # A left pad has no real key before it; letting every token see itself keeps its softmax finite (no NaN).
    return (causal & valid[:, None, None, :]) | torch.eye(T, dtype=torch.bool, device=valid.device)


@torch.no_grad()
def generate(model: GPT, prompts: list, max_new_tokens: int, stop_id: int, pad_id: int, temperature=1.0,
             forbid=(), generator=None, use_cache=True, samples=1, env=None) -> Generation:
    """Sample `samples` completions of every prompt (lists of ids) at once, stopping each row at `stop_id`.

    Rows come prompt by prompt: the samples of prompt i are rows i*samples .. (i+1)*samples - 1.
    `pad_id` is never drawn (it only fills rows that have stopped), nor is any id in `forbid`.
    With the KV cache the prompts are run once (prefill) and then one token per step for the whole batch;
    `use_cache=False` recomputes the whole prefix every step (same results, only there to measure and test against).
    `env` (optional, e.g. `tasks.Environment`) writes into the rows through `EnvironmentHook`.
    """
    device, B = model.wte.weight.device, len(prompts)
    idx = pad_sequence([torch.as_tensor(p) for p in prompts], batch_first=True, padding_value=pad_id,
                       padding_side="left").to(device)  # padded on the host: one copy to the device
    L = idx.size(1)
    if L + max_new_tokens > model.config.block_size:
        raise ValueError(f"prompt ({L}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"block_size {model.config.block_size}")
    valid = torch.ones(B, L + max_new_tokens, dtype=torch.bool, device=device)  # which keys are real tokens
    valid[:, :L] = idx != pad_id
    positions = (valid[:, :L].cumsum(1) - 1).clamp(min=0)  # each row counts its own tokens from 0
    cache = KVCache(model.config, B, L + max_new_tokens, device, activation_dtype(model)) if use_cache else None
    logits = model(idx, positions=positions, mask=padded_causal_mask(valid[:, :L]), cache=cache)[:, -1]
    if samples > 1:  # each prompt was run once; its samples start from copies of its row
        logits, idx, valid, positions = (t.repeat_interleave(samples, 0) for t in (logits, idx, valid, positions))
        if use_cache:
            cache.repeat_rows(samples)
        B *= samples
    seq, pos = idx, positions
    tokens, logprobs = [], []
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    hook = EnvironmentHook(env, prompts, samples, max_new_tokens, device) if env is not None else None
    # The ids never drawn, as a mask on the device made once (a list of ids as an index is copied at every token).
    banned = torch.tensor([v in (*forbid, pad_id) for v in range(model.config.vocab_size)], device=device)
    for t in range(max_new_tokens):
        tok, lp = sample_next(logits, temperature, banned, generator)
        tok, lp = hook.write(t, tok, lp) if hook else (tok, lp)
        tok = tok.masked_fill(finished, pad_id)
        tokens.append(tok)
        logprobs.append(lp.masked_fill(finished, 0.0))
        finished = finished | (tok == stop_id)
        if t == max_new_tokens - 1 or (t % 8 == 7 and bool(finished.all())):  # check rarely: each check syncs a GPU
            break
        if hook:  # the one sync per sampled token: the environment reads the step's ids on the host
            hook.listen(t, tok)
        next_pos = pos[:, -1:] + 1
        if use_cache:  # one new query; it may see every real key so far
            logits = model(tok[:, None], positions=next_pos, mask=valid[:, None, None, :L + t + 1], cache=cache)[:, -1]
            pos = next_pos
        else:
            seq, pos = torch.cat([seq, tok[:, None]], 1), torch.cat([pos, next_pos], 1)
            logits = model(seq, positions=pos, mask=padded_causal_mask(valid[:, :seq.size(1)]))[:, -1]
    tokens, logprobs = torch.stack(tokens, 1), torch.stack(logprobs, 1)
    return Generation(tokens, logprobs, (tokens != pad_id).sum(1))


class EnvironmentHook:
    """`generate`'s hook for an environment. After a row samples `env.trigger`, the ids its reply holds (never the
    trigger) are written into that row at the next steps, in place of samples (log-prob 0). The rows' ids are mirrored
    on the host, one copy a step: the one sync. A step whose rows sampled the trigger copies the plan back once, while
    the device has nothing queued to wait for."""

    def __init__(self, env, prompts, samples, max_new_tokens, device):
        self.env, self.rows = env, [env.follow(p) for p in prompts for _ in range(samples)]
        self.ids = torch.empty(len(self.rows), max_new_tokens, dtype=torch.long)  # the mirror, on the host
        self.plan = torch.full_like(self.ids, -1)  # (B, N) the id to write at each step, -1: a sample; on the host
        self.planned = self.plan.to(device)  # and its copy on the device, read a column a step

    def write(self, t, tok, lp):
        """Each row's id planned for step t, if it has one, in place of its sample."""
        head = self.planned[:, t]
        return torch.where(head >= 0, head, tok), lp.masked_fill(head >= 0, 0.0)

    def listen(self, t, tok):
        """Mirror step t's ids; plan the reply of each row that sampled the trigger, in one copy to the device."""
        self.ids[:, t] = tok.cpu()
        rows = (self.ids[:, t] == self.env.trigger).nonzero().squeeze(1).tolist()
        if rows:
            replies = [self.rows[r].reply(ids) for r, ids in zip(rows, self.ids[rows, :t + 1].tolist())]
            for r, reply in zip(rows, replies):  # from step t + 1, as much as fits before the last step
                self.plan[r, t + 1:t + 1 + len(reply)] = torch.tensor(reply[:self.plan.size(1) - t - 1])
            end = t + 1 + max(map(len, replies))
            self.planned[:, t + 1:end].copy_(self.plan[:, t + 1:end])
