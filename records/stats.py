"""Judge a speedrun record: time and loss statistics of sets of runs, against a baseline.

    python records/stats.py BASELINE_DIR [DIR ...] [--target 3.28]

Each DIR holds the .txt logs of one set of runs as train_gpt.py writes them, one run per log; the
first is the baseline. From each log the final validation line (`step:N/N val_loss:X
train_time:Tms ...`) is read. For each set one row: runs, steps, mean and sample standard
deviation of the training time (seconds) and of the final loss, their differences to the
baseline, and p, the one-sided one-sample t-test p-value that the true mean loss is below the
target (a record needs p < 0.01). Under it, each set's time difference to the baseline with its
95% confidence interval (Welch), and the one-sided p-value that the set is faster; then each set's
mean ms per step in each stage, from the logs' step lines (train_time at each step's end) and the
stages of the plan a log prints (a log without one, upstream's, has the record's 1490-step schedule).
"""
import argparse
import glob
import math
import os
import re
import stat
import statistics
import sys

FINAL_LINE = re.compile(r"step:(\d+)/(\d+) val_loss:(\S+) train_time:(\d+)ms")
FIRST_STEP_LINE = re.compile(r"^step:1/\d+ ", re.MULTILINE)  # once per run
STEP_LINE = re.compile(r"^step:(\d+)/\d+ (?:val_loss:(\S+) )?train_time:(\d+)ms", re.MULTILINE)
PLAN_STAGE_LINE = re.compile(r"^  (stage \d|extension): steps (\d+)-(\d+),", re.MULTILINE)
RECORD_STAGES = (("stage 1", 0, 483), ("stage 2", 483, 967), ("stage 3", 967, 1450), ("extension", 1450, 1490))


class StatsError(Exception):
    pass


def _beta_continued_fraction(a, b, x, max_terms=300, eps=1e-15):
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, max_terms + 1):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < eps:
            break
    return result


def regularized_incomplete_beta(a, b, x):
    """I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def student_t_cdf(t, df):
    """P(T <= t) for Student's t distribution with df degrees of freedom."""
    tail = 0.5 * regularized_incomplete_beta(df / 2, 0.5, df / (df + t * t))
    return tail if t < 0 else 1.0 - tail


def student_t_quantile(p, df):
    """t with P(T <= t) = p, by bisection on the CDF."""
    low, high = -1e6, 1e6
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if student_t_cdf(mid, df) < p else (low, mid)
    return (low + high) / 2


def welch(new, base):
    """(mean difference new - base, its 95% confidence interval, one-sided p that new is lower)."""
    diff = statistics.mean(new) - statistics.mean(base)
    var_new, var_base = statistics.variance(new) / len(new), statistics.variance(base) / len(base)
    se = math.sqrt(var_new + var_base)
    if se == 0:
        return diff, (diff, diff), 0.0 if diff < 0 else 1.0
    df = se ** 4 / (var_new ** 2 / (len(new) - 1) + var_base ** 2 / (len(base) - 1))
    half = student_t_quantile(0.975, df) * se
    return diff, (diff - half, diff + half), student_t_cdf(diff / se, df)


def p_below(values, target):
    """One-sided one-sample t-test p-value for H1: the true mean is below target."""
    n = len(values)
    std = statistics.stdev(values)
    if std == 0:
        return 0.0 if statistics.mean(values) < target else 1.0
    return student_t_cdf((statistics.mean(values) - target) / (std / math.sqrt(n)), n - 1)


def read_final(log_path, text):
    """(steps, val_loss, train_seconds) of the final validation line of a log's text."""
    finals = [m for m in FINAL_LINE.finditer(text) if m.group(1) == m.group(2)]
    runs = max(len(finals), len(FIRST_STEP_LINE.findall(text)))
    if runs > 1:
        raise StatsError(f"{log_path} holds {runs} runs (a reused --run_id appends to its log): keep one run per log")
    if not finals:
        raise StatsError(f"{log_path} has no final validation line (step:N/N val_loss:X train_time:Tms): "
                         "the run did not finish")
    steps, _, loss, time_ms = finals[0].groups()
    try:
        loss = float(loss)
    except ValueError:
        raise StatsError(f"{log_path}: the final val_loss {loss!r} is not a number") from None
    if not math.isfinite(loss):
        raise StatsError(f"{log_path}: the final val_loss is {loss}: the run diverged")
    if int(steps) == 0:
        raise StatsError(f"{log_path} is a 0-step run: it trained nothing")
    return int(steps), loss, int(time_ms) / 1000


def curves(text):
    """({steps done: train_time ms}, [(step, val loss)]) from a log's step and validation lines."""
    times, losses = {}, []
    for step, loss, time_ms in STEP_LINE.findall(text):
        times[int(step)] = int(time_ms)
        if loss:
            losses.append((int(step), float(loss)))
    return times, losses


def stage_ms(text, steps):
    """{stage: mean ms per step} from the step lines, over the stages of the log's plan."""
    stages = [(name, int(first), int(last) + 1) for name, first, last in PLAN_STAGE_LINE.findall(text)]
    stages = stages or (RECORD_STAGES if steps == RECORD_STAGES[-1][2] else [])
    times, _ = curves(text)
    return {name: (times[end] - times.get(first, 0)) / (end - first) for name, first, end in stages
            if end in times and (first in times or first == 0)}


def read_log(path):
    """The text of a run log: a regular file (a pipe would block the read)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise StatsError(f"{path} is named like a run log but is a folder, pipe or device: move it away")
        with open(path, errors="replace") as f:
            return f.read()
    except OSError as e:
        raise StatsError(f"{path} cannot be read ({e.strerror})") from None


def read_set(directory, seen):
    """One set's statistics; seen: {log text: path} of every log read so far, in any set."""
    if not os.path.isdir(directory):
        raise StatsError(f"{directory} is not a directory")
    logs = sorted(glob.glob(os.path.join(directory, "*.txt")))
    if len(logs) < 2:
        raise StatsError(f"{directory} holds {len(logs)} run log(s) (*.txt); statistics need at least 2 runs")
    texts = {}
    for path in logs:
        text = read_log(path)
        twin = seen.setdefault(text, path)
        if twin != path:
            raise StatsError(f"{twin} and {path} are the same log: each run counts once, so remove the copy")
        texts[text] = path
    runs = [read_final(path, text) for text, path in texts.items()]
    stages = [stage_ms(text, run[0]) for text, run in zip(texts, runs)]
    lengths = sorted({(r[0], os.path.basename(path)) for r, path in zip(runs, logs)})
    if lengths[0][0] != lengths[-1][0]:
        raise StatsError(f"{directory} mixes runs of {lengths[0][0]} steps ({lengths[0][1]}) and {lengths[-1][0]} "
                         f"steps ({lengths[-1][1]}): a set holds runs of one schedule")
    return {
        "name": os.path.basename(os.path.normpath(directory)),
        "steps": runs[0][0],
        "losses": [r[1] for r in runs],
        "times": [r[2] for r in runs],
        "texts": list(texts),
        # each stage's ms/step, mean over the runs that have it
        "stage_ms": {name: statistics.mean(s[name] for s in stages if name in s)
                     for name in dict.fromkeys(name for s in stages for name in s)},
    }


def report(sets, target):
    base_time, base_loss = statistics.mean(sets[0]["times"]), statistics.mean(sets[0]["losses"])
    width = max(12, *(len(s["name"]) for s in sets))
    steps_width = max(7, *(len(str(s["steps"])) + 2 for s in sets))
    lines = [f"{'':<{width}}{'Runs':>6}{'Steps':>{steps_width}}{'Time μ':>10}{'Time σ':>9}{'Time +/-':>10}"
             f"{'Loss μ':>9}{'Loss σ':>9}{'Loss +/-':>10}{'p':>9}"]
    for s in sets:
        time_mean, loss_mean = statistics.mean(s["times"]), statistics.mean(s["losses"])
        lines.append(
            f"{s['name']:<{width}}{len(s['times']):>6}{s['steps']:>{steps_width}}"
            f"{time_mean:>10.4f}{statistics.stdev(s['times']):>9.4f}{time_mean - base_time:>10.4f}"
            f"{loss_mean:>9.4f}{statistics.stdev(s['losses']):>9.4f}{loss_mean - base_loss:>10.4f}"
            f"{p_below(s['losses'], target):>9.4f}")
    if len(sets) > 1:
        lines.append("")
    for s in sets[1:]:
        diff, (low, high), p_faster = welch(s["times"], sets[0]["times"])
        lines.append(f"{s['name']}: time {diff:+.4f} s vs {sets[0]['name']}, 95% interval [{low:+.4f}, {high:+.4f}], "
                     f"p(faster) = {p_faster:.4f} (Welch)")
    for s in sets:
        lines += ["", f"{s['name']}:",
                  f"  losses = [{', '.join(f'{x:.4f}' for x in s['losses'])}]",
                  f"  times  = [{', '.join(f'{x:.4f}' for x in s['times'])}]"]
    names = list(dict.fromkeys(name for s in sets for name in s["stage_ms"]))
    if names:
        lines += ["", f"{'ms/step':<{width}}" + "".join(f"{name:>11}" for name in names)]
        for s in sets:
            lines.append(f"{s['name']:<{width}}" + "".join(f"{s['stage_ms'][n]:>11.1f}" if n in s["stage_ms"]
                                                           else f"{'-':>11}" for n in names))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="folders of run logs; the first is the baseline")
    parser.add_argument("--target", type=float, default=3.28, help="validation loss to beat (default 3.28)")
    args = parser.parse_args(argv)
    try:
        if not math.isfinite(args.target):
            raise StatsError(f"--target must be a number, not {args.target}")
        folders = [os.path.realpath(d) for d in args.dirs]
        for i, folder in enumerate(folders):
            if folder in folders[:i]:
                raise StatsError(f"{args.dirs[folders.index(folder)]} and {args.dirs[i]} are the same folder: "
                                 "give each set once")
        seen = {}
        sets = [read_set(d, seen) for d in args.dirs]
        for s in sets[1:]:
            if s["steps"] != sets[0]["steps"]:
                raise StatsError(f"{s['name']} ran {s['steps']} steps and the baseline {sets[0]['name']} "
                                 f"{sets[0]['steps']}: compare runs of one schedule")
    except StatsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        print(report(sets, args.target), flush=True)
    except BrokenPipeError:  # `| head` closed the pipe: what it wanted was printed
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the flush at exit cannot fail
    return 0


if __name__ == "__main__":
    sys.exit(main())
