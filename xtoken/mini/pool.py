"""The miniature's process pool: jobs over spawned 1-thread worker processes, in order or as a DAG (a job starts
once the jobs it reads from have finished), each job's console output sent to its own log file.

Worker processes are spawned and import each job function by its module path: job functions live at the top
level of their modules."""

from __future__ import annotations

import os
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

import torch


def _threads():
    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


@contextmanager
def _logged(path):
    """Send one job's console output (Trainer logs, the progress bars of lm-eval, datasets and
    transformers) to ``path``: a notebook then shows one progress bar per stage, and each model's
    log stays next to it (``train.log``). Exceptions still propagate."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f, redirect_stdout(f), redirect_stderr(f):
        yield


def _pool_map(fn, jobs, workers, desc=None):
    """[fn(job) for job in jobs] over ``workers`` spawned 1-thread processes (inline for one worker),
    in order, with one progress bar (``desc``) over the jobs."""
    return _pool_dag(fn, jobs, list(range(len(jobs))), [()] * len(jobs), workers, desc)


def _pool_dag(fn, jobs, keys, deps, workers, desc=None):
    """[fn(job) for job in jobs] over ``workers`` spawned 1-thread processes (inline for one worker), where
    job i starts only after the jobs whose keys are in ``deps[i]`` have finished (keys that name no job
    count as done); among the ready jobs the earliest in the list goes first. Worker processes live for
    the whole call, so per-process state (`_worker_state`) is reused by their later jobs."""
    from tqdm.auto import tqdm

    known = set(keys)
    deps = [set(d) & known for d in deps]
    results, started, done = [None] * len(jobs), set(), set()
    bar = tqdm(total=len(jobs), desc=desc, disable=desc is None or not jobs)

    def ready():
        return [i for i in range(len(jobs)) if i not in started and deps[i] <= done]

    try:
        if workers <= 1 or len(jobs) <= 1:
            while len(started) < len(jobs):
                todo = ready()
                if not todo:
                    raise ValueError("jobs with circular dependencies")
                i = todo[0]
                started.add(i)
                results[i] = fn(jobs[i])
                done.add(keys[i])
                bar.update()
            return results
        import multiprocessing as mp
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        with ProcessPoolExecutor(
            min(workers, len(jobs)), mp_context=mp.get_context("spawn"), initializer=_threads
        ) as pool:
            running = {}
            while len(done) < len(jobs):
                for i in ready()[: max(0, workers - len(running))]:
                    started.add(i)
                    running[pool.submit(fn, jobs[i])] = i
                if not running:
                    raise ValueError("jobs with circular dependencies")
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for f in finished:
                    i = running.pop(f)
                    results[i] = f.result()  # a failed job raises here, naming its error
                    done.add(keys[i])
                    bar.update()
        return results
    finally:
        bar.close()
