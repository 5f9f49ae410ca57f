"""``rxf sweep``: a fixed-budget hyper-parameter search per method with Optuna — the same
number of trials for every method, as Aghajanyan et al. (2021) compare methods after
equal searches.

One Optuna study per task and method (``<task>-<method>``), stored in SQLite by default
(any URL Optuna accepts, so several machines can share one study). The budget counts
finished trials plus trials other live workers are running, and each worker checks it
again after taking a trial number, so concurrent workers run exactly ``budget`` trials in
all. Trials left running by a killed process on this host are marked failed on restart
and their configuration is tried again (its run folder, named by the configuration,
resumes from its checkpoint). Finished trials are never repeated.

The best configuration of each method is written to ``best_configs.json``, which
``rxf compare --configs`` reads.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import socket
import time
from pathlib import Path

from rxf.errors import OptionError
from rxf.experiments.compare import SPEC_OVERRIDES, configure
from rxf.experiments.report import main_value
from rxf.finetune import FinetuneSpec, run_finetune, write_json_atomic
from rxf.methods.options import METHODS, MethodOptions, method_option_names

LEARNING_RATES = [1e-5, 2e-5, 3e-5]
# The paper's search spaces (Section 5 and Appendix), as categorical choices.
DEFAULT_SPACES: dict[str, dict[str, list]] = {
    "std": {"learning_rate": LEARNING_RATES},
    "std++": {"learning_rate": LEARNING_RATES},
    "r3f": {"learning_rate": LEARNING_RATES, "r3f_lambda": [0.1, 0.5, 1.0, 5.0], "noise_type": ["normal", "uniform"]},
    "r4f": {"learning_rate": LEARNING_RATES, "r3f_lambda": [0.1, 0.5, 1.0, 5.0], "noise_type": ["normal", "uniform"]},
    "smart": {"learning_rate": LEARNING_RATES, "smart_lambda": [1.0, 3.0, 5.0]},
    "freelb": {"learning_rate": LEARNING_RATES, "freelb_step_size": [0.03, 0.05, 0.1], "freelb_steps": [2, 3]},
}
_PREFIXES = {"r3f": ("r3f_", "noise_"), "r4f": ("r3f_", "noise_", "r4f_"), "smart": ("smart_",), "freelb": ("freelb_",)}


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


def _alive_here(trial) -> bool:
    if trial.user_attrs.get("host") != socket.gethostname():
        return True  # another machine's worker: trust it
    try:
        os.kill(int(trial.user_attrs.get("pid", -1)), 0)
        return True
    except (OSError, ValueError):
        return False


# A worker writes its host and pid into a trial milliseconds after taking it; a running
# trial still without them after this long lost its worker in between.
ORPHAN_SECONDS = 10.0


def _recover_stale(study) -> None:
    """Fail trials whose worker died — on this host, or before it could sign the trial —
    and queue their configuration again."""
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if "pid" not in trial.user_attrs:
            age = (datetime.datetime.now() - trial.datetime_start).total_seconds()
            if age < ORPHAN_SECONDS:
                time.sleep(ORPHAN_SECONDS - age)
            trial = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
            if trial.state != TrialState.RUNNING or "pid" in trial.user_attrs:
                continue  # a live worker signed it meanwhile
        elif _alive_here(trial):
            continue
        study.tell(trial.number, state=TrialState.FAIL)
        if trial.params:
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})


def _config_dir(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]


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


def sweep_method(
    out: Path, task: str, method: str, budget: int, base: FinetuneSpec, options: MethodOptions,
    storage: str, space: dict[str, list], seed: int = 0,
):
    """Run this worker's share of the method's ``budget`` trials; returns the study."""
    import optuna
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(f"{task}-{method}", storage, seed)
    _recover_stale(study)
    distributions = {name: CategoricalDistribution(choices) for name, choices in space.items()}
    counted = (TrialState.COMPLETE, TrialState.RUNNING)
    while len(study.get_trials(deepcopy=False, states=counted)) < budget:
        trial = study.ask(distributions)
        ahead = [t for t in study.get_trials(deepcopy=False, states=counted) if t.number < trial.number]
        if len(ahead) >= budget:  # another worker filled the budget meanwhile
            trial.set_user_attr("skipped", "budget already filled")
            study.tell(trial, state=TrialState.FAIL)
            break
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        params = dict(trial.params)
        run_dir = Path(out) / "trials" / task / method / _config_dir(params)
        trial.set_user_attr("run_dir", str(run_dir))
        spec, opts = configure(base, options, task, method, base.seed, run_dir, {task: {method: {"params": params}}})
        print(f"rxf sweep {task} {method} trial {trial.number}: {params}", flush=True)
        try:
            value = main_value(run_finetune(spec, opts))
        except BaseException:
            study.tell(trial, state=TrialState.FAIL)
            raise
        study.tell(trial, value)
    return study


def run_sweep(
    out: Path, tasks: list[str], methods: list[str], budget: int, base: FinetuneSpec, options: MethodOptions,
    storage: str | None = None, space_override: dict | None = None, seed: int = 0,
) -> dict:
    """Sweep every task and method with the same budget; write best_configs.json."""
    if budget < 1:
        raise OptionError(f"--budget must be >= 1, got {budget}")
    for method in methods:
        if method not in METHODS:
            raise OptionError(f"--methods: unknown method {method!r}; choose from {', '.join(METHODS)}")
    spaces = {method: search_space(method, space_override) for method in methods}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    storage = storage or f"sqlite:///{(out / 'sweep.db').resolve()}"
    best_path = out / "best_configs.json"
    best = json.loads(best_path.read_text()) if best_path.is_file() else {}
    for task in tasks:
        for method in methods:
            study = sweep_method(out, task, method, budget, base, options, storage, spaces[method], seed)
            complete = [t for t in study.trials if t.value is not None]
            if not complete:
                raise OptionError(f"sweep {task}/{method}: no trial finished (see the errors above)")
            top = max(complete, key=lambda t: t.value)
            best.setdefault(task, {})[method] = {
                "params": top.params, "value": top.value, "trial": top.number,
                "trials": len(complete), "space": spaces[method],
            }
            write_json_atomic(best_path, best)
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
