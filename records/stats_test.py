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


def test_table_of_the_record(tmp_path, capsys):
    """The record's own runs: 88.83 s, loss 3.2788, p = 0.0097 against 89.80 s, p = 0.0601."""
    write_logs(tmp_path / "Baseline", [(3.2764, 89.803), (3.2799, 89.711), (3.2773, 89.835), (3.2793, 89.849)])
    write_logs(tmp_path / "ThisPR", [(3.2783, 88.821), (3.2789, 88.809), (3.2795, 88.806), (3.2786, 88.900)])
    assert stats.main([str(tmp_path / "Baseline"), str(tmp_path / "ThisPR")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["Baseline", "4", "1490", "89.7995", "0.0621", "0.0000", "3.2782", "0.0016",
                                "0.0000", "0.0601"]
    assert lines[2].split() == ["ThisPR", "4", "1490", "88.8340", "0.0445", "-0.9655", "3.2788", "0.0005",
                                "0.0006", "0.0097"]
    assert "ThisPR: time -0.9655 s vs Baseline, 95% interval [-1.0613, -0.8697], p(faster) = 0.0000 (Welch)" in lines
    assert "  losses = [3.2783, 3.2789, 3.2795, 3.2786]" in lines
    assert "  times  = [88.8210, 88.8090, 88.8060, 88.9000]" in lines


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
    write_logs(tmp_path / "new", [(3.27, 97 + x) for x in spread])
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


def test_example_submission_stats_txt_is_what_stats_prints(capsys, monkeypatch):
    """The worked example's stats.txt (quoted in its README) is the table its logs give today."""
    example = os.path.join(os.path.dirname(os.path.abspath(__file__)), "track_1_short",
                           "2026-12-01_FlashAttention4_synthetic")
    monkeypatch.chdir(example)
    assert stats.main(["baseline", "fa4"]) == 0
    with open("stats.txt") as f:
        assert capsys.readouterr().out == f.read()
