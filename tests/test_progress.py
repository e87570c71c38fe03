"""Progress of long work: whole lines in a log, one line rewritten in place on a terminal, a time left."""
import io

import numpy as np

from analysis.fitting import FitConfig, fit_groups
from analysis.progress import Progress, duration
from analysis.synthetic import synthetic_group


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_one_whole_line_per_stage_with_the_time_left():
    log = io.StringIO()
    progress = Progress("shift", 4, log)
    progress.update(1, "inside a stage")  # not a stage: nothing in a log
    progress.done(1, "k=3 shared fit done")
    progress.done(2, "k=3 free fit done")
    progress.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 2
    assert lines[0].startswith("shift:  50% k=3 shared fit done, ") and "left" in lines[0]
    assert lines[1].startswith("shift: 100% k=3 free fit done, ") and "left" not in lines[1]


def test_a_terminal_gets_one_line_rewritten_then_ended():
    term = Terminal()
    progress = Progress("fit", 2, term)
    progress.done(1, "half")
    progress.done(1, "all")
    progress.close()
    out = term.getvalue()
    assert out.count("\r") == 2 and out.endswith("\n") and out.count("\n") == 1
    assert "[###############...............]" in out and "100% all" in out


def test_durations_read_as_a_person_would_write_them():
    assert [duration(s) for s in (3.21, 245, 3720)] == ["3.2s", "4m05s", "1h02m"]


def test_a_fit_logs_one_line_per_law():
    rng = np.random.default_rng(0)
    params = {"priors": [0.5, 0.5], "K": 0.5, "gamma": [0.8, 0.7], "beta": [0.3, 0.2]}
    groups = [synthetic_group("a", 3, "bayesian_sampling", params, np.arange(20.0), 2, 100, rng)[0],
              synthetic_group("b", 3, "bayesian_sampling", params, np.arange(30.0), 2, 100, rng)[0]]
    log = io.StringIO()
    fit_groups(groups, FitConfig(laws=("bayesian_sampling", "power"), starts=2), stream=log)
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and lines[-1].startswith("fit of 2 curve groups, 2 laws: 100% power done (")
    assert "of 2 tasks x 20 shots, " in lines[0] and "of 2 tasks x 30 shots)" in lines[0]  # both shapes, one loop
