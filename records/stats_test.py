"""Tests of records/stats.py: the t distribution against tabulated values, the table, the errors."""
import math
import os
import re
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import stats  # noqa: E402


@pytest.mark.parametrize("t,df,upper_tail", [
    (2.353, 3, 0.05), (4.541, 3, 0.01), (6.314, 1, 0.05), (1.812, 10, 0.05), (2.764, 10, 0.01),
    (1.697, 30, 0.05), (3.365, 5, 0.01), (1.533, 4, 0.10), (2.132, 4, 0.05)])
def test_t_distribution_matches_tables(t, df, upper_tail):
    # the tables round t to 3 decimals: that moves p by well under 1%
    assert stats.student_t_cdf(-t, df) == pytest.approx(upper_tail, rel=5e-3)
    assert stats.student_t_cdf(t, df) == pytest.approx(1 - upper_tail, rel=5e-3)


@pytest.mark.parametrize("t", [-30.0, -3.0, -0.5, 0.0, 0.7, 12.0])
def test_t_distribution_closed_forms(t):
    assert stats.student_t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)  # Cauchy
    assert stats.student_t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    normal = 0.5 * (1 + math.erf(t / math.sqrt(2)))
    assert stats.student_t_cdf(t, 1e7) == pytest.approx(normal, abs=1e-6)


def write_logs(directory, runs, steps=1490):
    os.makedirs(directory, exist_ok=True)
    for i, (loss, seconds) in enumerate(runs):
        with open(os.path.join(directory, f"run{i}.txt"), "w") as f:
            f.write("import torch  # the script's source comes first\n")
            f.write(f"step:250/{steps} val_loss:4.1234 train_time:12345ms step_avg:49.38ms\n")
            f.write(f"step:{steps}/{steps} val_loss:{loss} train_time:{round(seconds * 1000)}ms step_avg:59.6ms\n")
            f.write("peak memory allocated: 30000 MiB reserved: 31000 MiB\n")


def test_target_option(tmp_path, capsys):
    write_logs(tmp_path / "a", [(3.30, 100.0), (3.31, 101.0), (3.32, 99.0)])
    assert stats.main([str(tmp_path / "a"), "--target", "3.35"]) == 0
    assert float(capsys.readouterr().out.splitlines()[1].split()[-1]) < 0.05


def test_missing_directory(tmp_path, capsys):
    assert stats.main([str(tmp_path / "nope")]) == 1
    assert "nope is not a directory" in capsys.readouterr().err


def test_set_with_one_run(tmp_path, capsys):
    write_logs(tmp_path / "single", [(3.27, 90.0)])
    assert stats.main([str(tmp_path / "single")]) == 1
    assert "single holds 1 run log(s)" in capsys.readouterr().err


def test_log_without_final_validation(tmp_path, capsys):
    write_logs(tmp_path / "s", [(3.27, 90.0), (3.28, 91.0)])
    with open(tmp_path / "s" / "run1.txt", "w") as f:
        f.write("step:250/1490 val_loss:4.1234 train_time:12345ms step_avg:49.38ms\nstep:251/1490 train_time:1ms\n")
    assert stats.main([str(tmp_path / "s")]) == 1
    err = capsys.readouterr().err
    assert "run1.txt has no final validation line" in err and "Traceback" not in err


@pytest.mark.parametrize("p,df,t", [(0.975, 6, 2.447), (0.975, 3, 3.182), (0.975, 10, 2.228), (0.95, 4, 2.132),
                                    (0.025, 6, -2.447)])
def test_t_quantiles_match_tables(p, df, t):
    assert stats.student_t_quantile(p, df) == pytest.approx(t, abs=1e-3)


def test_time_difference_interval(tmp_path, capsys):
    """Equal sizes and spreads make Welch's degrees of freedom 2n - 2 = 6: the interval is the
    difference of means +- t(0.975, 6) * sqrt(2 s^2 / n), s^2 = 5/3 here."""
    spread = [-1.5, -0.5, 0.5, 1.5]
    write_logs(tmp_path / "base", [(3.27, 100 + x) for x in spread])
    write_logs(tmp_path / "new", [(3.26, 97 + x) for x in spread])  # other logs than base's: one time is shared
    assert stats.main([str(tmp_path / "base"), str(tmp_path / "new")]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("new: time")][0]
    se = math.sqrt(2 * (5 / 3) / 4)
    half = 2.446912 * se
    assert line == (f"new: time -3.0000 s vs base, 95% interval [{-3 - half:+.4f}, {-3 + half:+.4f}], "
                    f"p(faster) = {stats.student_t_cdf(-3 / se, 6):.4f} (Welch)")


def write_log(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


FINAL = "step:{0}/{0} val_loss:{1} train_time:90000ms step_avg:60.40ms\n"


@pytest.mark.parametrize("second_log,message", [
    (FINAL.format(160, "3.2700"), r"s mixes runs of 160 steps \(run1.txt\) and 1490 steps \(run0.txt\): a set holds "
                                  "runs of one schedule"),
    (FINAL.format(1490, "3.2700"), r"run0.txt and .*run1.txt are the same log: each run counts once"),
    ("step:1/1490 train_time:60ms\n" + FINAL.format(1490, "3.2800") + "step:1/1490 train_time:61ms\n"
     + FINAL.format(1490, "3.2790"), r"run1.txt holds 2 runs \(a reused --run_id appends to its log\)"),
    ("step:1/1490 train_time:60ms\nstep:1/1490 train_time:61ms\n" + FINAL.format(1490, "3.2790"),
     r"run1.txt holds 2 runs"),
    (FINAL.format(0, "10.8"), "run1.txt is a 0-step run: it trained nothing"),
    (FINAL.format(1490, "."), r"run1.txt: the final val_loss '\.' is not a number"),
    (FINAL.format(1490, "nan"), "run1.txt: the final val_loss is nan: the run diverged"),
])
def test_bad_sets_are_one_clear_line(tmp_path, capsys, second_log, message):
    write_log(str(tmp_path / "s" / "run0.txt"), FINAL.format(1490, "3.2700"))
    write_log(str(tmp_path / "s" / "run1.txt"), second_log)
    assert stats.main([str(tmp_path / "s")]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and re.search(message, err), err


def test_a_log_copied_into_another_set_is_one_clear_line(tmp_path, capsys):
    write_logs(tmp_path / "a", [(3.2764, 89.803), (3.2799, 89.711)])
    os.makedirs(tmp_path / "b")
    for name in ("run0.txt", "run1.txt"):  # byte copies, under other names
        (tmp_path / "b" / f"copy_{name}").write_bytes((tmp_path / "a" / name).read_bytes())
    assert stats.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    assert capsys.readouterr().err == (f"error: {tmp_path / 'a' / 'run0.txt'} and {tmp_path / 'b' / 'copy_run0.txt'} "
                                       "are the same log: each run counts once, so remove the copy\n")


def test_a_closed_pipe_ends_quietly(tmp_path):
    import subprocess
    write_logs(tmp_path / "a", [(3.2764, 89.803), (3.2799, 89.711)])
    command = f"{sys.executable} {os.path.join(os.path.dirname(__file__), 'stats.py')} {tmp_path / 'a'} | head -1"
    out = subprocess.run(["bash", "-c", f"set -o pipefail; {command}"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stderr == "" and out.stdout.split() == ["Runs", "Steps", "Time", "μ", "Time",
                                                                                 "σ", "Time", "+/-", "Loss", "μ",
                                                                                 "Loss", "σ", "Loss", "+/-", "p"]


def test_long_step_counts_keep_the_columns(tmp_path, capsys):
    write_logs(tmp_path / "long", [(3.27, 90.0), (3.28, 91.0)], steps=123456789)
    assert stats.main([str(tmp_path / "long")]) == 0
    header, row = capsys.readouterr().out.splitlines()[:2]
    assert row.split()[:3] == ["long", "2", "123456789"] and len(header) == len(row)


@pytest.mark.parametrize("args,message", [
    (["a", "b"], r"^error: b ran 160 steps and the baseline a 1490: compare runs of one schedule$"),
    (["a", "./a/../a/"], r"^error: a and ./a/../a/ are the same folder: give each set once$"),
    (["a", "--target", "nan"], r"^error: --target must be a number, not nan$"),
])
def test_sets_that_cannot_be_compared(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    write_logs("a", [(3.27, 90.0), (3.28, 91.0)])
    write_logs("b", [(3.27, 9.0), (3.28, 9.1)], steps=160)
    assert stats.main(args) == 1
    assert re.match(message, capsys.readouterr().err)


@pytest.mark.parametrize("make,message", [
    (lambda p: os.mkdir(p), "is named like a run log but is a folder, pipe or device: move it away"),
    (lambda p: os.mkfifo(p), "is named like a run log but is a folder, pipe or device: move it away"),
    (lambda p: os.symlink("nowhere.txt", p), r"cannot be read \(No such file or directory\)"),
])
def test_things_named_like_logs_are_one_line(tmp_path, capsys, make, message):
    write_logs(tmp_path / "s", [(3.27, 90.0), (3.28, 91.0)])
    make(tmp_path / "s" / "b.txt")
    assert stats.main([str(tmp_path / "s")]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and re.search(f"b.txt {message}", err), err


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file: no permission error to provoke")
def test_an_unreadable_log_is_one_line(tmp_path, capsys):
    write_logs(tmp_path / "s", [(3.27, 90.0), (3.28, 91.0)])
    os.chmod(tmp_path / "s" / "run1.txt", 0)
    assert stats.main([str(tmp_path / "s")]) == 1
    assert re.search(r"run1.txt cannot be read \(Permission denied\)", capsys.readouterr().err)


def test_stage_times_from_the_step_lines_and_the_plan(tmp_path, capsys):
    """Per-stage ms/step: the train_time at each stage's end minus at its start, over its steps."""
    for run, scale in enumerate((1.0, 1.5)):
        ends = {step: round(scale * (200 * min(step, 5) + 400 * max(0, step - 5))) for step in range(11)}
        with open(tmp_path / f"run{run}.txt", "w") as f:
            f.write("plan: 10 steps\n  stage 1: steps 0-4, 131,072 tokens/step\n"
                    "  stage 2: steps 5-9, 262,144 tokens/step\n")
            f.writelines(f"step:{step}/10 train_time:{ends[step]}ms step_avg:1ms\n" for step in range(1, 11))
            f.write(f"step:10/10 val_loss:3.{run} train_time:{ends[10]}ms step_avg:1ms\n")
    assert stats.main([str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].split() == [tmp_path.name, "250.0", "500.0"]  # means of the runs


def test_plot_draws_the_example_submission(tmp_path):
    """The example's two sets into one PNG (matplotlib: requirements-test.txt)."""
    pytest.importorskip("matplotlib")
    import plot
    example = os.path.join(os.path.dirname(os.path.abspath(__file__)), "track_1_short",
                           "2026-12-01_FlashAttention4_synthetic")
    out = tmp_path / "runs.png"
    assert plot.main([os.path.join(example, "baseline"), os.path.join(example, "fa4"), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_plot_without_matplotlib_says_how_to_get_it(tmp_path):
    import subprocess
    code = ("import sys; sys.modules['matplotlib'] = None; sys.path.insert(0, sys.argv[1]); import plot; "
            "sys.exit(plot.main(sys.argv[2:]))")
    out = subprocess.run([sys.executable, "-c", code, os.path.dirname(os.path.abspath(__file__)), str(tmp_path)],
                         capture_output=True, text=True)
    assert out.returncode == 1 and out.stderr == ("error: plot.py needs matplotlib, which training does not: "
                                                  "pip install matplotlib\n")


def readme_blocks():
    """The outputs quoted in records/README.md: each fenced block without its command line."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")) as f:
        return [block.split("\n", 1)[1] for block in re.findall(r"```\n(\$ .*?)```", f.read(), re.DOTALL)]


# Upstream's 2026-02-16_FlattenForward logs (file name, train_time in ms at steps 483, 967, 1450 and
# 1490, final val loss, its train_time): the lines stats.py reads from them.
FLATTEN_FORWARD = {
    "baseline": [
        ("2026-02-16_19-37-58_time-409_secs_baseline_7df73f", 15885, 44646, 86154, 89615, 3.2799, 89711),
        ("2026-02-16_19-44-49_time-202_secs_baseline_20ca5d", 15922, 44715, 86250, 89706, 3.2764, 89803),
        ("2026-02-16_19-48-12_time-201_secs_baseline_11222e", 15910, 44709, 86274, 89739, 3.2773, 89835),
        ("2026-02-16_19-51-34_time-201_secs_baseline_9d6c00", 15924, 44729, 86290, 89752, 3.2793, 89849)],
    "pr233": [
        ("2026-02-16_21-30-05_time-362_secs_F-inject-post-attn_9f12a3", 15661, 44030, 85277, 88710, 3.2789, 88809),
        ("2026-02-16_21-36-08_time-201_secs_F-inject-post-attn_d395c2", 15651, 44049, 85287, 88720, 3.2783, 88821),
        ("2026-02-16_21-55-13_time-200_secs_F-inject-post-attn_769769", 15636, 44013, 85267, 88705, 3.2795, 88806),
        ("2026-02-16_21-58-35_time-199_secs_F-inject-post-attn_3a1077", 15667, 44096, 85365, 88799, 3.2786, 88900)],
}


def test_readme_examples_are_what_stats_prints(tmp_path, capsys, monkeypatch):
    example, flatten_forward = readme_blocks()
    monkeypatch.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), "track_1_short",
                                   "2026-12-01_FlashAttention4_synthetic"))
    assert stats.main(["baseline", "fa4"]) == 0 and capsys.readouterr().out == example
    for name, runs in FLATTEN_FORWARD.items():
        os.makedirs(tmp_path / name)
        for log, *ends, loss, final in runs:
            lines = [f"step:{step}/1490 train_time:{ms}ms" for step, ms in zip((483, 967, 1450, 1490), ends)]
            lines.append(f"step:1490/1490 val_loss:{loss} train_time:{final}ms")
            write_log(tmp_path / name / f"{log}.txt", "\n".join(lines) + "\n")
    monkeypatch.chdir(tmp_path)
    assert stats.main(["baseline", "pr233"]) == 0 and capsys.readouterr().out == flatten_forward


def test_example_submission_stats_txt_is_what_stats_prints(capsys, monkeypatch):
    """The worked example's stats.txt (quoted in its README) is the table its logs give today."""
    example = os.path.join(os.path.dirname(os.path.abspath(__file__)), "track_1_short",
                           "2026-12-01_FlashAttention4_synthetic")
    monkeypatch.chdir(example)
    assert stats.main(["baseline", "fa4"]) == 0
    with open("stats.txt") as f:
        assert capsys.readouterr().out == f.read()
