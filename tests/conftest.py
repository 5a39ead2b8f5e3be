import os
import signal
import subprocess
import threading

import pyro
import pytest
import torch

# Small problems: one thread per test process beats oversubscribing the machine's cores.
torch.set_num_threads(1)
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True)
def _seed_and_restore():
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


@pytest.fixture
def float64():
    """Run the test in float64 (restored afterwards by the autouse fixture)."""
    torch.set_default_dtype(torch.float64)
    yield


@pytest.fixture
def ctrl_c_must_be_handled():
    """A Ctrl-C that the code under test does not catch fails the test (instead of ending pytest)."""
    def unhandled(signum, frame):
        raise AssertionError("Ctrl-C reached code that does not handle it")

    previous = signal.signal(signal.SIGINT, unhandled)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture
def picture_titles(monkeypatch):
    """``picture_titles()`` starts recording the titles (``suptitle``) of the pictures drawn
    from then on, in the list it returns."""
    def record() -> list:
        import matplotlib.figure

        titles, suptitle = [], matplotlib.figure.Figure.suptitle
        monkeypatch.setattr(matplotlib.figure.Figure, "suptitle",
                            lambda fig, text, **kw: titles.append(text) or suptitle(fig, text, **kw))
        return titles

    return record


@pytest.fixture
def interrupt_after_first_checkpoint():
    """``interrupt_after_first_checkpoint(argv)``: see :func:`_interrupt_after_first_checkpoint`."""
    return _interrupt_after_first_checkpoint


def _interrupt_after_first_checkpoint(argv) -> subprocess.CompletedProcess:
    """Run a script (``argv``, with --no-progress), send it Ctrl-C (SIGINT) as soon as it says it
    wrote a checkpoint, and return how it ended. Event-driven: it waits on the script's output,
    never on a clock (a timer only kills a script that hangs)."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    guard = threading.Timer(300, proc.kill)
    guard.start()
    try:
        seen = []
        for line in proc.stderr:  # ends when the script exits
            seen.append(line)
            if line.startswith("checkpoint:"):
                proc.send_signal(signal.SIGINT)
                break
        _, err = proc.communicate()
    finally:
        guard.cancel()
        proc.kill()
    return subprocess.CompletedProcess(argv, proc.returncode, "", "".join(seen) + err)
