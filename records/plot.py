"""Draw sets of runs: validation loss against training time, and each step's time, one PNG.

    python records/plot.py BASELINE_DIR [DIR ...] [--out runs.png]

The folders are the ones records/stats.py takes (the .txt logs of one set of runs each); every run
is a line, in its set's colour. Left: the validation losses against the time on the clock. Right:
each step's time (the difference of train_time between two step lines), which shows the stages and
any step that stalled. Needs matplotlib (pip install matplotlib), which training does not.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import stats  # noqa: E402  (beside this script: the log readers)


def plot(sets, out):
    import matplotlib
    matplotlib.use("Agg")  # a file, no screen
    import matplotlib.pyplot as plt
    figure, (losses_axis, steps_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    for colour, (name, texts) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"] * len(sets), sets):
        for i, text in enumerate(texts):
            times, losses = stats.curves(text)
            label = name if i == 0 else None
            losses_axis.plot([times[step] / 1000 for step, _ in losses], [loss for _, loss in losses], "o-",
                             color=colour, label=label, markersize=3, alpha=0.8)
            steps = sorted(step for step in times if step > 0 and step - 1 in times)
            steps_axis.plot(steps, [times[step] - times[step - 1] for step in steps], color=colour, label=label,
                            linewidth=0.8, alpha=0.8)
    losses_axis.set(xlabel="train time (s)", ylabel="val loss", yscale="log", title="validation loss")
    steps_axis.set(xlabel="step", ylabel="ms", title="time per step")
    for axis in (losses_axis, steps_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=80)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="folders of run logs, a set each")
    parser.add_argument("--out", default="runs.png", help="the PNG to write (default runs.png)")
    args = parser.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("error: plot.py needs matplotlib, which training does not: pip install matplotlib", file=sys.stderr)
        return 1
    try:
        seen = {}  # read as stats.py reads them, with its checks: finished, distinct runs
        plot([(s["name"], s["texts"]) for s in (stats.read_set(d, seen) for d in args.dirs)], args.out)
    except stats.StatsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: cannot write {args.out} ({e.strerror})", file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
