"""Profile a stage of train_gpt.py's training on one GPU (or each of several under torchrun).

    python profile_gpt.py --stage 3 [any train_gpt.py flags]

After train_gpt.py's own pre-flight and warm-up (each warm-up step's time split by compiler stage:
Dynamo, AOTAutograd, Inductor, Triton, the rest) it prints, and logs to logs/<run_id>.txt:
  - launch costs per stage: host and GPU time of a micro-batch (a CUDA graph replay, and the eager
    launches it replaces) and of an optimizer step;
  - an eight-GPU emulation: one rank's step of an 8-GPU run per stage, timed on this GPU, and the
    record schedule's training time it projects;
  - the stage's steps under torch.profiler: GPU time per step by kernel category, the largest kernels
    by name, and a Chrome trace in logs/.
It trains nothing that is kept. Importing train_gpt runs nothing, so this drives its pieces directly.
"""
import collections
import functools
import math
import os
import sys
import time

import numpy as np
import torch
from torch._dynamo.utils import compile_times, counters

import train_gpt as tg

WARM_STEPS, PROFILED_STEPS = 2, 4  # --stage N runs this many steps of stage N, then profiles these

# GPU kernels by category. NCCL's are NCCL, the others launched inside the optimizer's step are
# optimizer, and the first category with a pattern in the kernel's name takes the rest.
KERNEL_CATEGORIES = (
    ("attention", ("flash", "fmha")),
    ("linear+ReLU^2 kernel", ("linear_relu_square",)),
    ("cross-entropy kernels", ("softcap_ce",)),
    ("q/k norm+rotary kernels", ("qkv_heads",)),
    ("embedding gradients", ("embedding_grad", "radixsort", "sortkv")),  # the kernel and torch.sort's
    ("Inductor kernels", ("triton_",)),
    ("transposes", ("transpose",)),
    ("FP8 GEMMs", ("e4m3", "e5m2", "_qq", "_qr", "_rq")),  # cuBLAS's nvjet names: q e4m3, r e5m2
    ("bf16 GEMMs", ("gemm", "nvjet", "xmma", "cutlass", "splitk")),
    ("copies and fills", ("memcpy", "memset", "copy", "fill")),
    ("eager PyTorch kernels", ("at::native",)),
)
TOP_KERNELS, KERNEL_NAME_WIDTH = 12, 100  # the profile lists this many kernels, names cut to this width
RECORD_SCHEDULE = (1450, 40)  # the record's scheduled and extension steps, train_gpt.py's defaults
# 8xH100 training times to compare with: the record whose math train_gpt.py runs, and upstream's newest
RECORD_74_SECONDS, CURRENT_RECORD = 88.8, ("#89 (2026-07-17)", 73.8)
SLEEP_CYCLES = 400_000_000  # about 0.2 s of an H100's or H200's clock: far longer than launching a step


def compile_snapshot():
    """Cumulative compile timers of this process (seconds), cache counters, machine CPU seconds and the clock."""
    names, values = compile_times(repr="csv", aggregate=True)
    timers = dict(zip(names, map(float, values)))
    try:  # every process on the machine: the workers, the compile pools, other ranks
        with open("/proc/stat") as f:
            cpu = sum(map(int, f.readline().split()[1:4])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        cpu = float("nan")
    cache = {name: counters[group][name] for group, name in (("inductor", "fxgraph_cache_hit"),
                                                               ("inductor", "fxgraph_cache_miss"),
                                                               ("aot_autograd", "autograd_cache_hit"),
                                                               ("aot_autograd", "autograd_cache_bypass"))}
    return dict(timers, **cache, cpu=cpu, wall=time.perf_counter())


def describe_compile(before, after):
    """Where the time between two snapshots went: Dynamo tracing, AOTAutograd, Inductor's lowering and
    code generation, waiting for Triton's compile pool, and the rest (running, FA4's JIT, data)."""
    d = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in after}
    user_compiler = d.get("OutputGraph.call_user_compiler", 0.0) + d.get("compile_fx.<locals>.bw_compiler", 0.0)
    parts = {"dynamo": d.get("_compile.compile_inner", 0.0) - d.get("OutputGraph.call_user_compiler", 0.0),
             "aot": user_compiler - d.get("compile_fx_inner", 0.0),
             "inductor": d.get("compile_fx_inner", 0.0) - d.get("async_compile.wait", 0.0),
             "triton": d.get("async_compile.wait", 0.0)}
    parts = {name: max(0.0, seconds) for name, seconds in parts.items()}  # no -0.0 from rounding
    parts["other"] = d["wall"] - sum(parts.values())
    split = ", ".join(f"{name} {seconds:.1f}" for name, seconds in parts.items())
    return (f"{d['wall']:.1f}s ({split}; {d['cpu'] / d['wall']:.1f} CPUs busy; cache hits: "
            f"{d['fxgraph_cache_hit']:.0f} Inductor, {d['autograd_cache_hit']:.0f} AOT, "
            f"{d['fxgraph_cache_miss']:.0f} Inductor misses, {d['autograd_cache_bypass']:.0f} AOT bypasses)")


def compile_timer():
    """warm_up's timer: a warm-up step's seconds split by compiler stage (describe_compile)."""
    before = compile_snapshot()
    return lambda: describe_compile(before, compile_snapshot())


def kernel_category(name, in_optimizer):
    lowered = name.lower()
    if "nccl" in lowered:
        return "NCCL"
    if in_optimizer:
        return "optimizer"
    return next((c for c, patterns in KERNEL_CATEGORIES if any(p in lowered for p in patterns)), "other")


def gpu_time_by(kernels, keys):
    """(GPU microseconds, launches) per key, from kernels (name, start, end) and each one's key."""
    totals, launches = collections.Counter(), collections.Counter()
    for key, (_, start, end) in zip(keys, kernels, strict=True):
        totals[key] += end - start
        launches[key] += 1
    return totals, launches


def profile_table(kernels, optimizer_ranges, span, steps):
    """Rows (category, ms/step, share of the span, kernels/step) from GPU kernels (name, start, end) in
    microseconds, optimizer_ranges (start, end) on the GPU timeline, and the profiled span; then the
    GPU's idle time (the span less the union of kernel intervals) and the whole step."""
    totals, counts = gpu_time_by(kernels, [kernel_category(name, any(a <= start < b for a, b in optimizer_ranges))
                                           for name, start, _ in kernels])
    busy, covered_to = 0.0, -math.inf
    for _, start, end in sorted(kernels, key=lambda k: k[1]):  # union of intervals (streams overlap)
        busy += max(0.0, end - max(start, covered_to))
        covered_to = max(covered_to, end)
    rows = [(c, totals[c] / steps / 1000, totals[c] / span, counts[c] / steps)
            for c in sorted(totals, key=totals.get, reverse=True)]
    rows.append(("idle (no kernel running)", (span - busy) / steps / 1000, (span - busy) / span, 0))
    rows.append(("step", span / steps / 1000, 1.0, len(kernels) / steps))
    return rows


def top_kernels(kernels, steps, n=TOP_KERNELS):
    """The n kernels of most GPU time by name, from (name, start, end) in microseconds: rows (name, ms
    per step, launches per step, microseconds per launch). The categories say what kind of work, this
    which kernel (an Inductor kernel's name lists the operations it fused)."""
    totals, launches = gpu_time_by(kernels, [name for name, _, _ in kernels])
    return [(name, total / steps / 1000, launches[name] / steps, total / launches[name])
            for name, total in totals.most_common(n)]


def projected_record_time(stage_ms):
    """One line: the eight-GPU emulation's ms per step (by stage index; the extension, if not measured,
    at the last stage's shapes) summed over the record's schedule, beside the records' times."""
    schedule = tg.Schedule(*RECORD_SCHEDULE)
    seconds = sum(stage_ms.get(schedule.stage_index(first), stage_ms[len(tg.STAGES) - 1]) * (end - first)
                  for _, first, end in schedule.stage_ranges()) / 1000
    name, record_seconds = CURRENT_RECORD
    return (f"projected 8xH100 training time over the record's {'+'.join(map(str, RECORD_SCHEDULE))} steps: "
            f"{seconds:.1f} s before communication (the 8xH100 records: #74, train_gpt.py's math, "
            f"{RECORD_74_SECONDS} s; upstream's newest, {name}, {record_seconds} s)")


def time_launch(enqueue, repeats=5):
    """(host ms, GPU ms) of enqueue(), medians. The host's time is taken while a sleep kernel holds the
    GPU, so that a full launch queue never throttles it; NaN if the GPU woke before the host was done.
    The GPU's is taken with CUDA events."""
    host, gpu = [], []
    for _ in range(repeats):
        torch.cuda.synchronize()
        torch.cuda._sleep(SLEEP_CYCLES)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        enqueue()
        seconds = time.perf_counter() - t0
        host.append(math.nan if start.query() else 1000 * seconds)
        end.record()
        end.synchronize()
        gpu.append(start.elapsed_time(end))
    return float(np.median(host)), float(np.median(gpu))


def prepare_stage(trainer, first, optimizer):
    """Rotary and the optimizer's tied embedding as training has them at a stage's first step (the
    untie itself is not timed)."""
    trainer.set_rotary(first)
    optimizer.tied = first < trainer.schedule.split_step


def time_optimizer_step(trainer, first, optimizer):
    """time_launch of one optimizer step, the mean of an Adam and a non-Adam step of the stage."""
    host, gpu = time_launch(lambda: [trainer.optimizer_step(step, optimizer) for step in (first, first + 1)])
    return host / 2, gpu / 2


def log_launch_costs(trainer, log):
    """Per stage: host and GPU time of one micro-batch (a graph replay, and the eager launches it
    replaces), and of an optimizer step (the mean of an Adam and a non-Adam step)."""
    log("launch costs per stage, ms (host: launching it while a sleep kernel holds the GPU; GPU: CUDA events; "
        "median of 5):")
    log(f"{'stage':<11}{'micro-batch host, graph':>25}{'host, eager':>13}{'GPU':>9}{'optimizer host':>16}{'GPU':>9}")
    for name, first, _ in trainer.schedule.stage_ranges():
        prepare_stage(trainer, first, trainer.optimizer)
        batch = trainer.first_micro_batch(first)
        graph = time_launch(lambda: trainer.accumulate_gradients(first, [batch])) if trainer.graphs else None
        replay = f"{graph[0]:.2f}" if graph else "-"
        eager = time_launch(lambda: trainer.accumulate_gradients(first, [batch], use_graphs=False))
        optimizer = time_optimizer_step(trainer, first, trainer.optimizer)
        log(f"{name:<11}{replay:>25}{eager[0]:>13.2f}{eager[1]:>9.2f}{optimizer[0]:>16.2f}{optimizer[1]:>9.2f}")


def emulate_step(trainer, optimizer, steps, warm_steps):
    """(ms per step on the clock, the micro-batch's GPU ms) of steps, one micro-batch each and the
    optimizer, after warm_steps untimed."""
    batch = trainer.first_micro_batch(steps[0])
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in steps[warm_steps:]]
    for step in steps[:warm_steps]:  # compiles the optimizer's graphs for the 1/8 shapes
        trainer.accumulate_gradients(step, [batch])
        trainer.optimizer_step(step, optimizer)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for step, (start, end_of_micro_batch) in zip(steps[warm_steps:], events):
        start.record()
        trainer.accumulate_gradients(step, [batch])
        end_of_micro_batch.record()
        trainer.optimizer_step(step, optimizer)
    torch.cuda.synchronize()
    ms = 1000 * (time.perf_counter() - t0) / len(events)
    return ms, sum(a.elapsed_time(b) for a, b in events) / len(events)


def emulate_eight_gpus(trainer, log, warm_steps=2, timed_steps=10):
    """What one rank of an 8-GPU run spends per step, on this GPU: one micro-batch per step, the
    optimizer on a 1/8 shard (rank 0's), no communication. Its budget: the micro-batch's GPU time in
    the same steps (CUDA events around it; the GPU's clock drops under load, so a time taken apart
    would be too low), the optimizer step's GPU time taken apart (free of launch gaps) and 1 ms. A
    step stays within it only if the host keeps ahead of the GPU."""
    optimizer = trainer.new_optimizer(0, 8, communicate=False)
    stage_ms = {}
    log(f"EIGHT-GPU EMULATION on this one GPU (one rank's work: one micro-batch per step, the optimizer on a "
        f"1/8 shard, no communication), ms; mean of {timed_steps} steps, timed as training is:")
    log(f"{'stage':<11}{'ms/step':>9}{'budget':>9}{'micro-batch GPU':>17}{'optimizer host':>16}{'GPU':>9}")
    for name, first, end in trainer.schedule.stage_ranges():
        prepare_stage(trainer, first, optimizer)
        steps = [first + i % (end - first) for i in range(warm_steps + timed_steps)]
        ms, micro = emulate_step(trainer, optimizer, steps, warm_steps)
        opt_host, opt_gpu = time_optimizer_step(trainer, first, optimizer)
        log(f"{name:<11}{ms:>9.2f}{micro + opt_gpu + 1:>9.2f}{micro:>17.2f}{opt_host:>16.2f}{opt_gpu:>9.2f}")
        stage_ms[trainer.schedule.stage_index(first)] = ms
    log(projected_record_time(stage_ms))


def trace_path(run_id, rank):
    return os.path.join("logs", f"{run_id}_rank{rank}_trace.json")


def profile_stage(trainer, log, stage, warm_steps=WARM_STEPS, profiled_steps=PROFILED_STEPS):
    """Stage's first steps, the last profiled_steps under torch.profiler: GPU time per step by
    category, the largest kernels, and a Chrome trace in logs/."""
    from torch.profiler import ProfilerActivity, profile
    first = trainer.schedule.starts[stage - 1]
    prepare_stage(trainer, first, trainer.optimizer)
    loader = trainer.loader(first)
    batches = [next(loader) for _ in range(trainer.run.grad_accum)]
    profiled_first = first + warm_steps
    warm, profiled = range(first, profiled_first), range(profiled_first, profiled_first + profiled_steps)

    def run(steps):  # as train_gpt's timed loop: the next batches are built while the GPU computes
        nonlocal batches
        for step in steps:
            trainer.train_step(step, batches)
            batches = trainer.micro_batches(loader, step + 1)
        torch.cuda.synchronize()
    run(warm)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run(profiled)
    loader.close()
    gpu = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels = [(e.name, e.time_range.start, e.time_range.end) for e in gpu if not e.is_user_annotation]
    optimizer = [(e.time_range.start, e.time_range.end) for e in gpu if e.is_user_annotation and e.name == "optimizer"]
    span = max(k[2] for k in kernels) - min(k[1] for k in kernels)
    log(f"profile of {trainer.schedule.stage(first).name}, steps {profiled[0]}-{profiled[-1]}, "
        f"rank {trainer.run.rank}: GPU time per step")
    log(f"{'category':<28}{'ms/step':>9}{'share':>8}{'kernels':>9}")
    for category, ms, share, count in profile_table(kernels, optimizer, span, profiled_steps):
        log(f"{category:<28}{ms:>9.1f}{100 * share:>7.1f}%{count:>9.0f}")
    log(f"{'ms/step':>9}{'launches':>9}{'us each':>9}  largest kernels")
    for name, ms, count, us in top_kernels(kernels, profiled_steps):
        log(f"{ms:>9.1f}{count:>9.0f}{us:>9.1f}  {name[:KERNEL_NAME_WIDTH]}")
    trace = trace_path(trainer.run.hp.run_id, trainer.run.rank)
    prof.export_chrome_trace(trace)
    log(f"Chrome trace: {trace} (open in https://ui.perfetto.dev)")


def stage_draws(stage, schedule):
    """The profile's draws of training batches, from the first shard (as train_gpt.other_draws gives
    them): the stage's steps and the prefetch after the last. A stage too short for them is refused."""
    first, end = schedule.starts[stage - 1], schedule.starts[stage]
    if end - first < WARM_STEPS + PROFILED_STEPS:
        raise tg.UsageError(f"--stage {stage} runs {WARM_STEPS + PROFILED_STEPS} steps of stage {stage}, which has "
                            f"{end - first} here: raise --num_scheduled_iterations")
    return [(f" of the profile of stage {stage}",
             [schedule.stage(first + i) for i in range(WARM_STEPS + PROFILED_STEPS + 1)])]


def parse_args(argv):
    """(stage, train_gpt.py's arguments): --stage is this tool's, every other flag train_gpt.py's."""
    parser = tg.ArgumentParser(prog="profile_gpt.py", allow_abbrev=False, description=__doc__.split("\n")[0],
                               epilog="Every other flag is train_gpt.py's (python train_gpt.py --help).")
    parser.add_argument("--stage", type=int, required=True, choices=range(1, len(tg.STAGES) + 1),
                        help="the stage to profile")
    repeated = tg.repeated_flag(argv)
    if repeated:
        raise tg.UsageError(f"--{repeated} is given twice: give each flag once")
    known, rest = parser.parse_known_args(argv)
    return known.stage, rest


def main(argv=None):
    launch_time = time.perf_counter()
    stage, rest = parse_args(sys.argv[1:] if argv is None else argv)
    hp, check = tg.parse_args(rest)
    if hp.save_checkpoint:
        raise tg.UsageError("--save_checkpoint saves the model at the end of training, and profile_gpt.py does not "
                            "train: drop it")
    prepared = tg.prepare(hp, check, functools.partial(stage_draws, stage),
                          lambda run_id, world_size: [trace_path(run_id, rank) for rank in range(world_size)])
    if prepared is None:
        return
    run, plan = prepared
    with tg.session(run, plan) as log:
        trainer = tg.Trainer(run)
        tg.warm_up(trainer, log, launch_time, timer=compile_timer)
        log_launch_costs(trainer, log)
        emulate_eight_gpus(trainer, log)
        profile_stage(trainer, log, stage)


if __name__ == "__main__":
    tg.command_line(main)
