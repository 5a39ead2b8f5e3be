import functools
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


@pytest.fixture(scope="module")
def cached_loader():
    """``cached_loader(module, name, maxsize)``: ``module.name`` (a data loader an example calls on
    every run) memoized for the rest of the test file, then restored."""
    originals = []

    def cache(module, name: str, maxsize: int) -> None:
        original = getattr(module, name)
        originals.append((module, name, original))
        setattr(module, name, functools.lru_cache(maxsize=maxsize)(original))

    yield cache
    for module, name, original in reversed(originals):
        setattr(module, name, original)


@pytest.fixture
def ctrl_c_then_resume(monkeypatch, capsys, picture_titles, ctrl_c_must_be_handled):
    """``ctrl_c_then_resume(run, folder, argv, model, at)`` -> ``(whole, resumed)``: an example's
    in-process ``run(out, *argv)`` uninterrupted in ``folder/"whole"``, then in ``folder/"split"``
    with Ctrl-C (SIGINT) at the second call of ``model.score`` (its second validation), which
    must write the checkpoint of iteration ``at`` and exit with code 130 before any results,
    then resumed there (``--resume``) to the end. Checked here: the resumed run continues from
    ``at``, says so in its pictures' titles and ends with the uninterrupted run's parameters."""
    def interrupt_then_resume(run, folder, argv, model, at):
        whole = run(folder / "whole", *argv)
        calls, score = [], model.score

        def score_and_interrupt(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                signal.raise_signal(signal.SIGINT)
            return score(*args, **kwargs)

        with monkeypatch.context() as patch, pytest.raises(SystemExit) as exit:
            patch.setattr(model, "score", score_and_interrupt)
            run(folder / "split", *argv)
        assert exit.value.code == 130 and f"checkpoint at iteration {at} written" in capsys.readouterr().err
        assert not (folder / "split" / "results.json").exists()

        titles = picture_titles()
        resumed = run(folder / "split", *argv, "--resume")
        assert resumed["resumed_from"] == at and not whole["resumed"]
        assert "resumed" in titles[0]
        a, b = (torch.load(folder / name / "checkpoint.pt", weights_only=True) for name in ("whole", "split"))
        for name, value in a["model"].items():
            if torch.is_tensor(value):
                torch.testing.assert_close(b["model"][name], value, atol=1e-6, rtol=0, msg=name)
        return whole, resumed

    return interrupt_then_resume


@pytest.fixture
def sigint_then_resume(interrupt_after_first_checkpoint):
    """``sigint_then_resume(argv, out, resume, iters)`` -> the resumed run's results: Ctrl-C
    (SIGINT) to the script ``argv`` (writing to ``out``) once it wrote its first checkpoint; it
    must exit with code 130, no traceback, printing the command that resumes it; then
    ``resume()``, the same run resumed in-process to ``iters`` iterations, from where it stopped."""
    def interrupt_then_resume(argv, out, resume, iters):
        proc = interrupt_after_first_checkpoint(argv)
        assert proc.returncode == 130, proc.stderr
        assert "Traceback" not in proc.stderr and proc.stderr.rstrip().endswith("--resume")
        stopped_at = torch.load(out / "checkpoint.pt", weights_only=True)["iteration"]
        assert 1 <= stopped_at < iters
        resumed = resume()
        assert resumed["resumed_from"] == stopped_at
        return resumed

    return interrupt_then_resume


@pytest.fixture
def check_log_prob_gradient():
    """``check_log_prob_gradient(density, params, value)``: the directional derivative of
    ``density.log_prob(value).sum()`` along a random direction in the space of ``params``,
    autograd's against central differences (step 1e-5); float64 is needed for the tolerance."""
    def check(density, params, value, h=1e-5):
        params = list(params)
        direction = [torch.randn_like(p) for p in params]
        density.log_prob(value.clone()).sum().backward()
        analytic = sum((p.grad * u).sum() for p, u in zip(params, direction)).item()
        values = []
        with torch.no_grad():
            for step in (h, -h):
                for p, u in zip(params, direction):
                    p.add_(step * u)
                values.append(density.log_prob(value.clone()).sum().item())
                for p, u in zip(params, direction):
                    p.sub_(step * u)
        numeric = (values[0] - values[1]) / (2 * h)
        assert abs(analytic) > 1e-3
        assert abs(analytic - numeric) < 1e-5 * max(1.0, abs(numeric))

    return check
