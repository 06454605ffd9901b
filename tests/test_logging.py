"""One way for a stage to talk while it runs (stages/lib/progress.py): the ``distillery`` logger,
plain lines on stdout, info from rank 0 only; progress bars closed before an error line."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap
from pathlib import Path

from stages.lib import errors, progress
from stages.lib.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


def test_log_lines_are_plain_lines_on_the_current_stdout(capsys) -> None:
    progress.log.info("select: wrote 3 sequences")
    progress.log.warning("careful")
    assert capsys.readouterr().out == "select: wrote 3 sequences\ncareful\n"


def test_other_ranks_keep_warnings_only(monkeypatch, capsys) -> None:
    monkeypatch.setenv("RANK", "1")
    progress.log.info("once per job")
    progress.log.warning("from every rank")
    assert capsys.readouterr().out == "from every rank\n"


def test_rank_zero_filter_under_torchrun(tmp_path: Path) -> None:
    """Two real ranks (gloo): the info line appears once, each rank's warning appears."""
    script = tmp_path / "ranks.py"
    script.write_text(
        textwrap.dedent(
            """
            import torch.distributed as dist
            from stages.lib.progress import log
            dist.init_process_group("gloo")
            log.info("info line")
            log.warning(f"warning from rank {dist.get_rank()}")
            dist.barrier()
            dist.destroy_process_group()
            """
        )
    )
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script)],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines.count("info line") == 1
    assert sorted(x for x in lines if x.startswith("warning")) == [
        "warning from rank 0",
        "warning from rank 1",
    ]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_an_error_line_closes_the_live_bars(monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "stdout", _Terminal())
    bar = progress.Progress(10, "score", unit="tokens")
    assert bar.bar is not None and bar.bar in progress._LIVE
    try:
        errors.report_and_exit(UserError("bad value", "score.topk", "use 8"))
    except SystemExit as e:
        assert e.code == 2
    assert not progress._LIVE and bar.bar.disable  # tqdm marks a closed bar disabled
    err = capsys.readouterr().err  # the bar, cleared, then the error line on a line of its own
    assert err.split("\r")[-1] == "error: bad value (score.topk). Fix: use 8\n"


def test_progress_on_a_log_says_how_far_it_got(capsys) -> None:
    bar = progress.Progress(4, "rollout", unit="prompts", every=0.0)
    bar.update(2)
    bar.update(2)
    bar.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[rollout] 2/4 prompts (50%)")
    assert lines[-1].startswith("[rollout] 4/4 prompts (100%)")
    quiet = progress.Progress(4, "train x", unit="steps", every=None, initial=1)
    quiet.update(3)
    assert quiet.done == 4 and capsys.readouterr().out == ""
