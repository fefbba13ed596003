"""Workers on this machine: ``--workers N`` (or ``--devices``) runs N copies of the search on one study.

Each worker is ``tlengine search`` with the same options on the same storage: Optuna's
storage hands out the trials, so nothing here schedules anything. On several machines,
the same command with one ``--storage`` does the same.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tlengine._errors import UserError

if TYPE_CHECKING:
    import optuna
    import rich.console

    from tlengine._setup import SearchSetup


class SearchInterrupted(Exception):
    """Ctrl-C (or SIGTERM) stopped the search after checkpointing; the message says how far it got.

    Attributes:
        signum: The signal that stopped it (``signal.SIGINT`` or ``signal.SIGTERM``).
    """

    def __init__(self, message: str, signum: int | None = None) -> None:
        import signal

        super().__init__(message)
        self.signum = signal.SIGINT if signum is None else signum

    @property
    def exit_code(self) -> int:
        """The command's exit status: 128 + the signal (130 for Ctrl-C, 143 for SIGTERM)."""
        return 128 + int(self.signum)


def run_workers(setup: SearchSetup, study: optuna.Study, remaining: int, console: rich.console.Console) -> None:
    """Run ``workers`` copies of this search as processes on this machine (one per ``--devices`` entry on CUDA),
    sharing the study through its storage; show their combined progress and wait for them.

    Each worker is ``tlengine search`` with the same options: Optuna's storage hands out
    the trials, so nothing here schedules anything.

    Raises:
        SearchInterrupted: Ctrl-C or SIGTERM (forwarded to every worker, which checkpoints its trial).
        UserError: A worker failed.
    """
    import os
    import signal
    import subprocess
    import sys
    import threading
    import time

    import optuna
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tlengine._options import worker_argv
    from tlengine._resume import catch_interrupts

    config, storage, study_name, workers, n_trials = setup.config, setup.storage, setup.study_name, setup.workers, setup.n_trials
    threads = max(1, (os.cpu_count() or 1) // workers)
    procs: list[subprocess.Popen] = []
    for i in range(workers):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        command = [sys.executable, "-m", "tlengine", *worker_argv(config, storage, study_name, i)]
        if config.devices:
            env["CUDA_VISIBLE_DEVICES"] = config.devices[i]
            command += ["--device", "cuda"]
        else:
            env["OMP_NUM_THREADS"] = str(threads)
        # A session of its own: one Ctrl-C reaches each worker once, forwarded from here.
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True))
    console.print(f"started {workers} workers on study [bold]{study_name}[/] ({storage})")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    done_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    with Progress(*columns, console=console, transient=False) as progress:
        def relay(proc: subprocess.Popen) -> None:
            for line in proc.stdout:
                progress.console.print(line.rstrip(), markup=False, highlight=False, soft_wrap=True)

        relays = [threading.Thread(target=relay, args=(p,), daemon=True) for p in procs]
        for thread in relays:
            thread.start()
        task = progress.add_task(f"trials ({workers} workers)", total=remaining)
        forward = lambda signum: [p.send_signal(signum) for p in procs if p.poll() is None]  # noqa: E731
        with catch_interrupts(forward) as stop:
            try:
                while any(p.poll() is None for p in procs):
                    finished = len(study.get_trials(deepcopy=False, states=done_states))
                    progress.update(task, completed=max(0, finished - (n_trials - remaining)))
                    time.sleep(1)
            except KeyboardInterrupt:
                for p in procs:
                    if p.poll() is None:
                        p.send_signal(signal.SIGINT)
                for p in procs:
                    p.wait()
                raise SearchInterrupted("workers stopped at once; their running trials resume from their last epochs", stop.signum) from None
            for thread in relays:
                thread.join()
    codes = [p.returncode for p in procs]
    if stop() or 130 in codes or 143 in codes:
        raise SearchInterrupted("each worker saved its trial's checkpoint", stop.signum or (signal.SIGTERM if 143 in codes else None))
    failed = [(i, code) for i, code in enumerate(codes) if code != 0]
    if failed:
        i, code = failed[0]
        raise UserError(f"--workers {workers}: worker {i} stopped with exit code {code} (its message is above); "
                        "finished trials are kept, run the same command again to resume")
