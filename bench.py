"""How fast is each part, measured against this machine's own matmul peak. Prints a table, writes bench.json.

    python bench.py                 # CPU or CUDA, whichever train.py would pick; the cpu preset's sizes and run (out)
    python bench.py --preset gpu    # the gpu preset's sizes; the warm start and stage timings of its run (out/gpu)
"""
import argparse
import contextlib
import copy
import dataclasses
import json
import os
import random
import time

import torch

import evaluation
import mrt
import model
import tasks
import train
from model import autocast, generate, native_bf16


def timed(fn, repeat: int, device) -> float:
    """Best wall time of `repeat` calls after one warm-up call (best-of: the least disturbed run)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    fn()
    best = float("inf")
    for _ in range(repeat):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_peak(device) -> float:
    """FLOP/s of a large square matmul in the precision training uses (`model.autocast`): bf16 or fp32."""
    n = 8192 if device.type == "cuda" else 2048
    dtype = torch.bfloat16 if native_bf16(device) else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / timed(lambda: a @ b, 5, device)


def bench_training(cfg, device, peak) -> dict:
    """tokens/s and model FLOP utilisation (6·N·tokens/s ÷ peak) of one SFT step at the preset's sizes, on real data."""
    task = train.make_task(cfg)
    problems = tasks.make_split(task, 512, 1, cfg.seed)[0]
    examples = tasks.base_examples(task, problems, cfg.solutions_per_problem, cfg.cut_prob, random.Random(0))
    X, Y = train.sft_tensors(task, examples, cfg.block_size)
    model = train.new_model(cfg, device)
    optimizer = train.make_optimizer(model, 1e-4, 0.1)
    x, y = X[:cfg.batch_size].to(device), Y[:cfg.batch_size].to(device)

    def step():
        with autocast(device):
            _, loss = model(x, y)
        train.optimizer_step(model, optimizer, loss)
    seconds, tokens = timed(step, 10, device), x.numel()
    n_params = sum(p.numel() for p in model.blocks.parameters())  # the matmul weights (embeddings are lookups)
    return {"params": model.num_params(), "batch": list(x.shape), "step_s": seconds, "tokens_per_s": tokens / seconds,
            "mfu": 6 * n_params * tokens / seconds / peak}


def bench_sampling(cfg, device, model, batch=128, new_tokens=48) -> dict:
    """Batched greedy generation with the KV cache vs recomputing the whole prefix every step. Their outputs are
    compared in fp32: in bf16, logits that (nearly) tie may round differently in the two ways and read as a bug."""
    task = train.make_task(cfg)
    prompts = [tasks.encode(task.prompt(p)) for p in tasks.make_split(task, batch, 1, cfg.seed)[0]]

    def run(use_cache, fp32=False):
        with contextlib.nullcontext() if fp32 else autocast(device):
            return generate(model, prompts, new_tokens, stop_id=-1, pad_id=tasks.PAD_ID, temperature=0,
                            use_cache=use_cache).tokens
    cached, recomputed = timed(lambda: run(True), 3, device), timed(lambda: run(False), 2, device)
    tokens = batch * new_tokens
    return {"batch": batch, "new_tokens": new_tokens, "kv_cache_tokens_per_s": tokens / cached,
            "recompute_tokens_per_s": tokens / recomputed, "speedup": recomputed / cached,
            "identical_outputs": bool(torch.equal(run(True, fp32=True), run(False, fp32=True)))}


def bench_environment(cfg, device, model, problems=128) -> dict:
    """Sampling policy streams (temperature 1, KV cache) with the environment writing results and verdicts vs the
    same model writing everything itself: what the forced-token path costs."""
    seconds = {}
    for calculator in (True, False):
        task = dataclasses.replace(train.make_task(cfg), calculator=calculator)
        batch = tasks.make_split(task, problems, 1, cfg.seed)[0]
        gen = lambda: torch.Generator(device).manual_seed(0)
        sample = lambda: mrt.sample_completions(model, task, batch, cfg.train_room, gen())
        with autocast(device):
            seconds[calculator] = timed(sample, 3, device)
            if calculator:
                share = environment_share(sample, device)
    return {"rows": problems, "with_env_s": seconds[True], "model_only_s": seconds[False],
            "ratio": seconds[True] / seconds[False], "environment_share": share}


def environment_share(sample, device) -> float:
    """Share of a sampling call's wall time spent in the environment's host-side Python (`EnvironmentHook.listen`), the
    GPU's queue drained before each step."""
    spent, real = [], model.EnvironmentHook.listen
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None

    def timed_step(*args):
        sync()  # the work queued before the step is not the environment's
        start = time.perf_counter()
        out = real(*args)
        spent.append(time.perf_counter() - start)
        return out
    model.EnvironmentHook.listen, start = timed_step, time.perf_counter()
    try:
        sample()
        sync()
        return sum(spent) / (time.perf_counter() - start)
    finally:
        model.EnvironmentHook.listen = real


def load_warm(cfg, device):
    """The warm-start model of a train.py run in --out-dir (realistic lengths), else an untrained one. A model of
    another size or task than the preset's is refused."""
    path = os.path.join(cfg.out_dir, "warm.pt")
    if not os.path.exists(path):
        return train.new_model(cfg, device), "untrained (run train.py first for realistic lengths)"
    blob = train.load_checkpoint(path, device)
    train.check_made_with(path, blob, cfg, (*train.TASK_FIELDS, "n_layer", "n_head", "n_embd"),
                          f"pass the --preset it was made with, or the --out-dir of a --preset {cfg.preset} run")
    return train.model_from(blob, device), path


def bench_rl(cfg, device, model, source) -> dict:
    """Wall time of one RL step of every arm, from the same model and batch."""
    task = train.make_task(cfg)
    problems = [p for p in tasks.make_split(task, cfg.rl_prompts, 1, cfg.seed)[0] for _ in range(cfg.rl_group)]
    seconds = {}
    for arm in mrt.ARMS:
        policy = copy.deepcopy(model)
        optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)
        gen, meta_gen = torch.Generator(device).manual_seed(0), torch.Generator(device).manual_seed(1)
        step = lambda: train.rl_step(policy, optimizer, task, problems, cfg, arm, gen, meta_gen, device)
        seconds[arm] = timed(step, 3, device)
    return {"model": source, "step_s": seconds, "ratio_to_outcome": {a: s / seconds["outcome"] for a, s in
                                                                      seconds.items()}}


def main(argv=None):
    """Run every benchmark, print the table, write bench.json. A bad device or checkpoint is one line on stderr."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    parser.add_argument("--preset", default="cpu", choices=list(train.PRESETS),
                        help="model sizes, task and --out-dir of this train.py preset (default: cpu)")
    parser.add_argument("--out-dir", help="the train.py run to read (default: the preset's --out-dir)")
    args = parser.parse_args(argv)
    out_dir = ["--out-dir", args.out_dir] if args.out_dir else []
    cfg = train.parse_args(["--preset", args.preset, "--device", args.device, *out_dir])
    try:
        device = train.pick_device(cfg.device)
        model, source = load_warm(cfg, device)  # first: a refused checkpoint stops the bench before any timing
    except train.UserError as e:
        train.fail(f"error: {e}")
    torch.manual_seed(0)
    peak = matmul_peak(device)
    results = {"device": str(device), "machine": evaluation.machine(device), "threads": torch.get_num_threads(),
               "preset": args.preset, "matmul_peak_gflops": peak / 1e9,
               "training": bench_training(cfg, device, peak), "sampling": bench_sampling(cfg, device, model.eval()),
               "environment": bench_environment(cfg, device, model), "rl_step": bench_rl(cfg, device, model, source),
               "pipeline_s": evaluation.stage_seconds(os.path.join(cfg.out_dir, "log.jsonl"))}
    with open("bench.json", "w") as f:
        json.dump(results, f, indent=1)
    t, s, e, r = results["training"], results["sampling"], results["environment"], results["rl_step"]
    print(f"machine: {results['machine']} ({device}, {results['threads']} threads)")
    print(f"{'matmul peak':<34}{peak / 1e9:>10.1f} GFLOP/s")
    print(f"{'training step':<34}{t['tokens_per_s']:>10.0f} tok/s   MFU {100 * t['mfu']:.0f}% of peak "
          f"(batch {t['batch']}, {t['params'] / 1e6:.2f}M params)")
    print(f"{'sampling, KV cache':<34}{s['kv_cache_tokens_per_s']:>10.0f} tok/s")
    print(f"{'sampling, recompute prefix':<34}{s['recompute_tokens_per_s']:>10.0f} tok/s   speed-up "
          f"{s['speedup']:.1f}x, identical outputs (fp32): {s['identical_outputs']}")
    print(f"{'sampling with / without environment':<34}{e['with_env_s']:>10.2f} s / {e['model_only_s']:.2f} s   "
          f"ratio {e['ratio']:.2f}x ({e['rows']} streams)")
    print(f"{'  of it in the environment (host)':<34}{100 * e['environment_share']:>10.0f} %")
    for arm, secs in r["step_s"].items():
        print(f"{'RL step, ' + arm:<34}{secs:>10.2f} s   {r['ratio_to_outcome'][arm]:.2f}x outcome's")
    for stage, secs in results["pipeline_s"].items():
        print(f"{'pipeline: ' + stage:<34}{secs:>10.1f} s")


if __name__ == "__main__":
    main()
