"""``rxf sweep``: a fixed-budget hyper-parameter search per method with Optuna — the same
number of distinct configurations for every method, as Aghajanyan et al. (2021) compare
methods after equal searches.

One Optuna study per task and method (``<task>-<method>``), stored in SQLite by default
(any URL Optuna accepts, so several machines can share one study). The budget counts
distinct configurations: a configuration the sampler proposes again is told the value it
already has, marked ``duplicate_of`` and not counted; after a few such proposals in a row
an untried configuration is queued instead, and a space smaller than the budget ends the
search once every configuration is taken. Concurrent workers never train the same
configuration (see ``_holder``) and together fill exactly ``budget`` configurations. Trials
left running by a killed process on this host are marked failed by the next worker that
looks and their configuration is tried again (its run folder, named by the configuration
and the shared settings, resumes from its checkpoint). A study refuses a worker with
another space or other training settings: use another --output-dir (or --storage).

``best_configs.json`` (read by ``rxf compare --configs``) is rebuilt from the storage after
each study, so every worker writes the same file whatever it ran itself.
"""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import hashlib
import itertools
import json
import math
import os
import random
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from rxf.errors import DataError, OptionError
from rxf.experiments.compare import SPEC_OVERRIDES, configure
from rxf.experiments.report import main_value
from rxf.finetune import FinetuneSpec, run_finetune
from rxf.jsonio import write_json_atomic
from rxf.methods.options import MethodOptions, check_methods, method_option_names

LEARNING_RATES = [1e-5, 2e-5, 3e-5]
# The paper's search spaces (Section 5 and Appendix), as categorical choices.
DEFAULT_SPACES: dict[str, dict[str, list]] = {
    "std": {"learning_rate": LEARNING_RATES},
    "std++": {"learning_rate": LEARNING_RATES},
    "r3f": {"learning_rate": LEARNING_RATES, "r3f_lambda": [0.1, 0.5, 1.0, 5.0], "noise_type": ["normal", "uniform"]},
    "r4f": {"learning_rate": LEARNING_RATES, "r3f_lambda": [0.1, 0.5, 1.0, 5.0], "noise_type": ["normal", "uniform"]},
    "smart": {"learning_rate": LEARNING_RATES, "smart_lambda": [1.0, 3.0, 5.0]},
    "freelb": {"learning_rate": LEARNING_RATES, "freelb_step_size": [0.03, 0.05, 0.1], "freelb_steps": [2, 3]},
    # The regularisers that followed R3F, each with its paper's search (docs/methods.md).
    "rdrop": {"learning_rate": LEARNING_RATES, "rdrop_alpha": [0.1, 0.5, 1.0]},
    "neftune": {"learning_rate": LEARNING_RATES, "neftune_alpha": [5.0, 10.0, 15.0]},
    "noisytune": {"learning_rate": LEARNING_RATES, "noisytune_lambda": [0.1, 0.15, 0.2]},
    "hype": {"learning_rate": LEARNING_RATES, "hype_noise_type": ["normal", "uniform"]},
    "childtune": {"learning_rate": LEARNING_RATES, "childtune_reserve": [0.1, 0.2, 0.3]},
    "mixout": {"learning_rate": LEARNING_RATES, "mixout_p": [0.7, 0.8, 0.9]},
}
_PREFIXES = {"r3f": ("r3f_", "noise_"), "r4f": ("r3f_", "noise_", "r4f_"), "smart": ("smart_",), "freelb": ("freelb_",),
             **{name: (f"{name}_",) for name in ("rdrop", "neftune", "noisytune", "hype", "childtune", "mixout")}}

# Proposals of taken configurations in a row after which an untried one is queued: TPE over
# a small categorical space keeps coming back to its favourites.
MAX_DUPLICATES = 3
# A worker signs its trial (host, pid) right after ``ask`` has written the params. A running
# trial still unsigned this long after it started lost its worker in between. Generous,
# because the claim below is only safe if a live worker signs within this time (SQLite
# alone may make a busy writer wait 5 s per statement).
ORPHAN_SECONDS = 30.0
POLL_SECONDS = 0.1
# Settings that do not change what a trial trains or measures, so they may differ between
# the workers of one study (and between a run and its resumption).
_NOT_DEFINING = {"output_dir", "overwrite", "progress", "report_to", "save_total_limit", "eval_batch_size",
                 "keep_checkpoints"}


def search_space(method: str, override: dict[str, list] | None = None) -> dict[str, list]:
    """The method's default space, with ``override`` entries that concern it: training
    settings concern every method, option names concern the methods they belong to."""
    space = dict(DEFAULT_SPACES[method])
    for name, choices in (override or {}).items():
        if name not in SPEC_OVERRIDES and name not in method_option_names():
            raise OptionError(f"--space: unknown parameter {name!r}")
        if not isinstance(choices, list) or not choices:
            raise OptionError(f"--space: {name} needs a non-empty list of choices")
        if name in SPEC_OVERRIDES or name.startswith(_PREFIXES.get(method, ())):
            space[name] = choices
    return space


def run_settings(spec: FinetuneSpec, options: MethodOptions) -> dict:
    """The settings shared by a study's trials that define what they train, as JSON.
    Fields at their default are left out, so that an option added to rxf later renames no
    run folder and does not set a resumed study apart."""
    settings = {}
    for obj in (spec, options):
        for field in dataclasses.fields(obj):
            value = getattr(obj, field.name)
            if field.name not in _NOT_DEFINING and value != field.default:
                settings[field.name] = value
    return json.loads(json.dumps(settings))  # as the storage gives it back (tuples as lists)


def _key(params: dict) -> str:
    return json.dumps(params, sort_keys=True)


def _config_dir(params: dict, settings: dict) -> str:
    """The run folder's name: the configuration and the shared settings, so that a sweep with
    other settings on the same --output-dir never reuses (or resumes) another's run."""
    return hashlib.sha256(_key({"params": params, "settings": settings}).encode()).hexdigest()[:12]


def _age(trial) -> float:
    # Naive local times written by the worker that started the trial: across machines this
    # assumes their clocks agree to well within ORPHAN_SECONDS.
    return (datetime.datetime.now() - trial.datetime_start).total_seconds()


def _alive_here(trial) -> bool:
    if trial.user_attrs.get("host") != socket.gethostname():
        return True  # another machine's worker: trust it
    try:
        os.kill(int(trial.user_attrs.get("pid", -1)), 0)
        return True
    except (OSError, ValueError):
        return False


def _signed(trial) -> bool:
    return "pid" in trial.user_attrs


def _fail_orphan(study, trial) -> None:
    """Fail a trial that was never signed: its worker died between ``ask`` and signing, so it
    never trained and there is nothing to retry."""
    from optuna.trial import TrialState

    study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)


def _recover_stale(study) -> None:
    """Fail trials whose worker died on this host, queueing their configuration again (the
    run folder resumes from its checkpoint), and trials left unsigned for too long."""
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not _signed(trial):
            if _age(trial) >= ORPHAN_SECONDS:
                _fail_orphan(study, trial)
            continue  # a younger one belongs to a worker about to sign it: _settled_trials waits
        if _alive_here(trial):
            continue
        study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
        if trial.params:
            print(f"rxf sweep: trial {trial.number}'s worker is gone; {trial.params} is queued again", flush=True)
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})


def _settled_trials(study, number: int) -> list:
    """The study's trials, once every running trial numbered below ``number`` is signed —
    that is, once its params are all in storage (orphans are failed after ORPHAN_SECONDS)."""
    from optuna.trial import TrialState

    while True:
        trials = study.get_trials(deepcopy=False)
        unsigned = [t for t in trials if t.number < number and t.state == TrialState.RUNNING and not _signed(t)]
        if not unsigned:
            return trials
        for trial in unsigned:
            if _age(trial) >= ORPHAN_SECONDS:
                _fail_orphan(study, trial)
        time.sleep(POLL_SECONDS)


def _holds(trial) -> str | None:
    """The configuration (as a key) ``trial`` has taken, or None: a running or complete trial
    takes its params, a queued one the params it was queued with; a duplicate takes none."""
    from optuna.trial import TrialState

    if "duplicate_of" in trial.user_attrs:
        return None
    if trial.state in (TrialState.RUNNING, TrialState.COMPLETE):
        return _key(trial.params)
    if trial.state == TrialState.WAITING:
        return _key(trial.system_attrs.get("fixed_params", {}))
    return None


def _holder(trials: list, trial):
    """The earlier trial that has taken ``trial``'s configuration, or None when ``trial`` may
    train it.

    ``trials`` must come from ``_settled_trials(study, trial.number)`` read after ``trial``
    was signed. Why two workers can then never train one configuration: suppose trials A
    and B (A's number the smaller) both train params p. Numbers are assigned in creation
    order, under a lock on the study row, so A existed when B read ``trials``. A trains,
    so A is no duplicate and its params are p; when B read, A was either queued (created
    with its fixed params p in one transaction), running (signed, so its params were all
    written), complete — B would have seen p held and not trained — or failed, which means
    A had ended without a result before B started. The rule needs no lock of its own, so
    it holds across machines sharing the storage; it assumes a live worker signs within
    ORPHAN_SECONDS, after which its trial may be failed as an orphan.
    """
    key = _key(trial.params)
    earlier = [t for t in trials if t.number < trial.number and _holds(t) == key]
    return min(earlier, key=lambda t: t.number, default=None)


def _taken(trials: list, below: int | None = None, queued: bool = True) -> set[str]:
    """The distinct configurations taken by trials (numbered below ``below``)."""
    from optuna.trial import TrialState

    return {key for t in trials
            if (below is None or t.number < below) and (queued or t.state != TrialState.WAITING)
            and (key := _holds(t)) is not None}


def _untried(space: dict[str, list], taken: set[str]) -> list[dict]:
    """The configurations of the (small, categorical) space that no trial has taken."""
    names = list(space)
    grid = (dict(zip(names, values)) for values in itertools.product(*space.values()))
    return [params for params in grid if _key(params) not in taken]


def open_study(name: str, storage: str, seed: int = 0, attempts: int = 5):
    """Create the study, or load it where another worker already has. Workers started
    together on a new database race to create its schema, which Optuna's RDB storage does
    not guard: the loser gets an IntegrityError (or SQLite's "database is locked"). Once
    the winner is done the schema exists, so a retry after a short wait just loads."""
    import optuna
    import sqlalchemy.exc

    for attempt in range(attempts):
        try:
            return optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True,
                                       sampler=optuna.samplers.TPESampler(seed=seed))
        except sqlalchemy.exc.SQLAlchemyError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 * (attempt + 1))


def _check_settings(study, storage: str, settings: dict) -> None:
    """Record the study's space and shared settings, or refuse a worker whose differ: its
    trials would not be comparable, nor its configurations the same as the study's."""
    stored = study.user_attrs.get("settings")
    if stored is None:
        study.set_user_attr("settings", settings)
    elif stored != settings:
        differing = sorted(name for name in stored.keys() | settings.keys() if stored.get(name) != settings.get(name))
        raise OptionError(
            f"study {study.study_name} in {storage} was started with other settings ({', '.join(differing)}); "
            "sweep with these in another --output-dir (or --storage)")


def _claim(study, trial, budget: int, name: str) -> str:
    """Sign ``trial`` and decide what it is: "train" (its configuration is this worker's to
    train), "duplicate" (taken by an earlier trial), "skipped" (the budget is full) or "lost"
    (failed as an orphan before it was signed); all but "train" are told here."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    try:
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
    except UpdateFinishedTrialError:
        return "lost"
    trials = _settled_trials(study, trial.number)
    holder = _holder(trials, trial)
    if holder is not None:
        trial.set_user_attr("duplicate_of", holder.number)
        print(f"rxf sweep {name} trial {trial.number}: {trial.params} is taken by trial {holder.number}, "
              "not counted", flush=True)
        if holder.state == TrialState.COMPLETE:
            study.tell(trial, holder.value)  # what the sampler proposed is known
        else:
            study.tell(trial, state=TrialState.FAIL)
        return "duplicate"
    # Queued trials count: each will run under its own (smaller) number, so a later trial
    # leaves its place in the budget to it.
    if len(_taken(trials, below=trial.number)) >= budget:
        trial.set_user_attr("skipped", "budget already filled")
        study.tell(trial, state=TrialState.FAIL)
        return "skipped"
    return "train"


def sweep_method(
    out: Path, task: str, method: str, budget: int, base: FinetuneSpec, options: MethodOptions,
    storage: str, space: dict[str, list], seed: int = 0,
):
    """Run this worker's share of the method's ``budget`` configurations; returns the study."""
    import optuna
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = f"{task} {method}"
    settings = run_settings(*configure(base, options, task, method, base.seed, Path(out), {}))
    study = open_study(f"{task}-{method}", storage, seed)
    _check_settings(study, storage, json.loads(json.dumps({"space": space, **settings})))
    distributions = {p: CategoricalDistribution(choices) for p, choices in space.items()}
    size = math.prod(len(choices) for choices in space.values())
    in_a_row = 0  # proposals of taken configurations
    while True:
        _recover_stale(study)  # else a dead worker's trial would hold its configuration (and budget)
        taken = _taken(study.get_trials(deepcopy=False), queued=False)
        if len(taken) >= budget:
            break
        if len(taken) >= size:
            print(f"rxf sweep {name}: all {size} configurations of the space are taken, "
                  f"below the budget of {budget}", flush=True)
            break
        if in_a_row >= MAX_DUPLICATES:
            untried = _untried(space, _taken(study.get_trials(deepcopy=False)))
            if untried:
                params = random.Random(f"{seed}:{len(taken)}").choice(untried)
                print(f"rxf sweep {name}: {in_a_row} proposals in a row were taken; queueing {params}", flush=True)
                study.enqueue_trial(params, user_attrs={"queued_by": "rxf sweep: untried"})
            in_a_row = 0
        trial = study.ask(distributions)  # pops a queued trial first
        try:
            decision = _claim(study, trial, budget, name)
            in_a_row = in_a_row + 1 if decision == "duplicate" else 0
            if decision != "train":
                continue
            params = dict(trial.params)
            run_dir = Path(out) / "trials" / task / method / _config_dir(params, settings)
            trial.set_user_attr("run_dir", str(run_dir))
            chosen = {task: {method: {"params": params}}}
            spec, opts = configure(base, options, task, method, base.seed, run_dir, chosen)
            print(f"rxf sweep {name} trial {trial.number}: {params}", flush=True)
            value = main_value(run_finetune(spec, opts))
        except BaseException:
            # Ctrl-C or an error: no trial is left running (an unsigned one would hold up
            # every worker for ORPHAN_SECONDS).
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            raise
        study.tell(trial, value)
    return study


def distinct_trials(study) -> list:
    """The study's complete trials that trained, one per configuration (the first), by number."""
    from optuna.trial import TrialState

    seen, distinct = set(), []
    for trial in sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number):
        key = _holds(trial)
        if key is not None and key not in seen:  # studies of older versions hold repeats
            seen.add(key)
            distinct.append(trial)
    return distinct


def _study_names(storage: str) -> set[str]:
    import optuna

    return set(optuna.study.get_all_study_names(storage))


def best_configs_from_storage(storage: str, pairs: list[tuple[str, str]]) -> dict:
    """{task: {method: entry}} for each (task, method) whose study ``<task>-<method>`` is in
    ``storage`` with a complete trial: the best distinct configuration, its value and trial
    number, the number of distinct configurations that finished, and the space."""
    import optuna

    names = _study_names(storage)
    best: dict = {}
    for task, method in pairs:
        if f"{task}-{method}" not in names:
            continue
        study = optuna.load_study(study_name=f"{task}-{method}", storage=storage)
        trials = distinct_trials(study)
        if trials:
            top = max(trials, key=lambda t: t.value)  # the earliest of equals
            best.setdefault(task, {})[method] = {
                "params": top.params, "value": top.value, "trial": top.number, "trials": len(trials),
                "space": study.user_attrs.get("settings", {}).get("space"),
            }
    return best


@contextmanager
def _locked(path: Path):
    """Hold an exclusive lock beside ``path`` (workers of one folder write it in turn)."""
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def write_best_configs(path: Path, storage: str, pairs: list[tuple[str, str]]) -> dict:
    """Rebuild ``path`` from the storage for ``pairs`` and for the entries already in it; an
    entry whose study is not in this storage (another --storage's) is kept as it was."""
    with _locked(path):  # inside: the last writer read the storage last
        try:
            old = json.loads(path.read_text()) if path.is_file() else {}
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); remove it to rebuild it") from None
        pairs = list(dict.fromkeys([*pairs, *((t, m) for t, methods in old.items() for m in methods)]))
        best = best_configs_from_storage(storage, pairs)
        names = _study_names(storage)
        for task, methods in old.items():
            for method, entry in methods.items():
                if f"{task}-{method}" not in names:
                    best.setdefault(task, {})[method] = entry
        write_json_atomic(path, best)
    return best


def run_sweep(
    out: Path, tasks: list[str], methods: list[str], budget: int, base: FinetuneSpec, options: MethodOptions,
    storage: str | None = None, space_override: dict | None = None, seed: int = 0, jobs: int = 1,
) -> dict:
    """Sweep every task and method with the same budget; write best_configs.json. With
    ``jobs`` > 1, that many workers share each study (``rxf.experiments.parallel``)."""
    if jobs < 1:
        raise OptionError(f"--jobs must be >= 1, got {jobs}")
    if jobs > 1:
        from rxf.experiments.parallel import run_jobs

        base = dataclasses.replace(base, progress=False)
        storage = storage or f"sqlite:///{(Path(out) / 'sweep.db').resolve()}"
        Path(out).mkdir(parents=True, exist_ok=True)
        # Different sampler seeds: workers proposing the same sequence would mostly collide.
        calls = [(out, tasks, methods, budget, base, options, storage, space_override, seed + worker)
                 for worker in range(jobs)]
        run_jobs(run_sweep, calls, jobs)
        # Rebuilt once every worker has ended: each one wrote the file from what it saw.
        return write_best_configs(Path(out) / "best_configs.json", storage, [(t, m) for t in tasks for m in methods])
    if budget < 1:
        raise OptionError(f"--budget must be >= 1, got {budget}")
    check_methods(methods)
    spaces = {method: search_space(method, space_override) for method in methods}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    storage = storage or f"sqlite:///{(out / 'sweep.db').resolve()}"
    best: dict = {}
    for task in tasks:
        for method in methods:
            sweep_method(out, task, method, budget, base, options, storage, spaces[method], seed)
            best = write_best_configs(out / "best_configs.json", storage, [(t, m) for t in tasks for m in methods])
            if method not in best.get(task, {}):
                raise OptionError(f"sweep {task}/{method}: no trial finished (see the errors above)")
    return best


def parse_space(text: str | None) -> dict | None:
    if not text:
        return None
    try:
        space = json.loads(Path(text).read_text() if Path(text).is_file() else text)
    except json.JSONDecodeError as exc:
        raise OptionError(f"--space: not valid JSON ({exc.msg})") from None
    if not isinstance(space, dict):
        raise OptionError("--space: expected a JSON object {parameter: [choices]}")
    return space
