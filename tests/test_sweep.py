"""rxf sweep: the budget counts distinct configurations, concurrent workers never train the
same one, and best_configs.json is what the study storage says."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial
from test_experiments import TINY_RUN, glue_like  # noqa: F401  (fixture)

from rxf.cli import main
from rxf.experiments import sweep

LR3 = [1e-3, 3e-4, 1e-4]
ROOT = Path(__file__).resolve().parents[1]


def sweep_args(tiny_checkpoint, glue_like, out, methods="std,r3f", budget=3, space=None):  # noqa: F811
    space = space or {"learning_rate": LR3, "r3f_lambda": [0.1, 1.0]}
    return ["sweep", "--tasks", "sst2", "--methods", methods, "--budget", str(budget), "--model", str(tiny_checkpoint),
            "--data-dir", str(glue_like), "--output-dir", str(out), "--space", json.dumps(space), *TINY_RUN]


def load(storage, name="sst2-std"):
    return optuna.load_study(study_name=name, storage=storage)


def counted(study) -> list:
    """The trials that trained a configuration (complete, not duplicates)."""
    return [t for t in study.get_trials(states=(TrialState.COMPLETE,)) if "duplicate_of" not in t.user_attrs]


@pytest.fixture
def trainings(monkeypatch):
    """The run folders the sweep really trained in (run_finetune with no results.json yet)."""
    runs, real = [], sweep.run_finetune

    def recording(spec, opts):
        if not (Path(spec.output_dir) / "results.json").is_file():
            runs.append(Path(spec.output_dir))
        return real(spec, opts)

    monkeypatch.setattr(sweep, "run_finetune", recording)
    return runs


class Stubborn(optuna.samplers.BaseSampler):
    """Always proposes each parameter's first choice, as TPE tends to over a small space."""

    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        return {}

    def sample_independent(self, study, trial, param_name, param_distribution):
        return param_distribution.choices[0]


def test_a_space_smaller_than_the_budget_runs_each_configuration_once(tiny_checkpoint, glue_like,  # noqa: F811
                                                                      tmp_path, trainings, capsys):
    out = tmp_path / "sweep"
    args = sweep_args(tiny_checkpoint, glue_like, out, "std", 3, {"learning_rate": [1e-3, 3e-4]})
    assert main(args) == 0
    assert "all 2 configurations of the space are taken, below the budget of 3" in capsys.readouterr().out
    assert len(trainings) == len(set(trainings)) == 2
    study = load(f"sqlite:///{out / 'sweep.db'}")
    assert sorted(t.params["learning_rate"] for t in counted(study)) == [3e-4, 1e-3]
    assert json.loads((out / "best_configs.json").read_text())["sst2"]["std"]["trials"] == 2

    assert main(args) == 0 and len(trainings) == 2  # rerun: nothing left to train
    assert main([*args, "--epochs", "2"]) == 2  # other settings would mix incomparable trials
    assert "was started with other settings (epochs)" in capsys.readouterr().err
    assert len(trainings) == 2


def test_proposals_of_taken_configurations_are_not_counted(tiny_checkpoint, glue_like, tmp_path,  # noqa: F811
                                                           trainings, monkeypatch):
    monkeypatch.setattr(optuna.samplers, "TPESampler", lambda seed=None: Stubborn())
    out = tmp_path / "sweep"
    assert main(sweep_args(tiny_checkpoint, glue_like, out, "std", 3, {"learning_rate": LR3})) == 0
    assert len(trainings) == len(set(trainings)) == 3
    study = load(f"sqlite:///{out / 'sweep.db'}")
    assert sorted(t.params["learning_rate"] for t in counted(study)) == sorted(LR3)
    duplicates = [t for t in study.trials if "duplicate_of" in t.user_attrs]
    assert duplicates and all(t.params["learning_rate"] == LR3[0] for t in duplicates)
    first = counted(study)[0]  # the stubborn proposal, known after its first run
    assert all(t.value == first.value for t in duplicates if t.state == TrialState.COMPLETE)
    assert json.loads((out / "best_configs.json").read_text())["sst2"]["std"]["trials"] == 3


def test_a_worker_never_trains_a_configuration_another_is_training(tiny_checkpoint, glue_like, tmp_path,  # noqa: F811
                                                                   monkeypatch):
    """While worker A trains its first configuration, worker B (same study, here nested in
    A's training) gets the same proposal: B must leave it to A and train the others."""
    monkeypatch.setattr(optuna.samplers, "TPESampler", lambda seed=None: Stubborn())
    out = tmp_path / "sweep"
    args = sweep_args(tiny_checkpoint, glue_like, out, "std", 3, {"learning_rate": LR3})
    real, trained, during_a = sweep.run_finetune, [], []

    def worker_b_starts_during_the_first_training(spec, opts):
        trained.append(spec.learning_rate)
        if len(trained) == 1:
            assert main(args) == 0  # worker B, while A's trial is running
            during_a.extend(trained[1:])
        return real(spec, opts)

    monkeypatch.setattr(sweep, "run_finetune", worker_b_starts_during_the_first_training)
    assert main(args) == 0
    assert trained[0] == LR3[0] and sorted(during_a) == sorted(LR3[1:])
    assert sorted(trained) == sorted(LR3)
    assert len(counted(load(f"sqlite:///{out / 'sweep.db'}"))) == 3


def hand_made_study(tmp_path):
    return optuna.create_study(study_name="sst2-std", storage=f"sqlite:///{tmp_path / 'hand.db'}",
                               direction="maximize")


SPACE = {"learning_rate": CategoricalDistribution(LR3)}


def running(study, lr, **user_attrs):
    study.add_trial(create_trial(state=TrialState.RUNNING, params={"learning_rate": lr}, distributions=SPACE,
                                 user_attrs=user_attrs))
    return study.trials[-1]


def test_the_claim_goes_to_the_earliest_trial_holding_the_configuration(tmp_path):
    study = hand_made_study(tmp_path)
    study.add_trial(create_trial(state=TrialState.FAIL, params={"learning_rate": LR3[0]}, distributions=SPACE))
    study.enqueue_trial({"learning_rate": LR3[0]})  # trial 1, queued: runs later under its number
    study.add_trial(create_trial(params={"learning_rate": LR3[0]}, distributions=SPACE, value=0.5,
                                 user_attrs={"duplicate_of": 9}))
    late = running(study, LR3[0], pid=1)  # trial 3
    other = running(study, LR3[1], pid=1)  # trial 4
    trials = study.get_trials()
    assert sweep._holder(trials, late).number == 1  # neither the failed trial nor the duplicate
    assert sweep._holder(trials, other) is None
    # A queued trial keeps its place in the budget: trial 3 counts it.
    assert sweep._taken(trials, below=late.number) == {sweep._key({"learning_rate": LR3[0]})}
    queued = study.ask({"learning_rate": SPACE["learning_rate"]})  # pops trial 1
    assert queued.number == 1 and queued.params == {"learning_rate": LR3[0]}
    assert sweep._holder(study.get_trials(), queued) is None  # it trains; trial 3 must not


def test_the_claim_waits_until_earlier_trials_are_signed(tmp_path, monkeypatch):
    """An earlier running trial without its signature may not have all its params in storage
    yet: the claim waits for it, and fails it once it is an orphan."""
    study = hand_made_study(tmp_path)
    unsigned = running(study, LR3[0])
    sleeps = []

    def sign_meanwhile(seconds):
        sleeps.append(seconds)
        study._storage.set_trial_user_attr(unsigned._trial_id, "pid", os.getpid())

    monkeypatch.setattr(sweep.time, "sleep", sign_meanwhile)
    trials = sweep._settled_trials(study, unsigned.number + 1)
    assert len(sleeps) == 1 and trials[0].user_attrs["pid"] == os.getpid()
    assert sweep._settled_trials(study, unsigned.number) and len(sleeps) == 1  # later trials are not waited for

    orphan = running(study, LR3[1])
    monkeypatch.setattr(sweep, "ORPHAN_SECONDS", 0.0)
    sweep._settled_trials(study, orphan.number + 1)
    assert study.trials[orphan.number].state == TrialState.FAIL


def test_best_configs_are_rebuilt_from_the_storage(tiny_checkpoint, glue_like, tmp_path):  # noqa: F811
    """Another worker added std trials to the storage after this folder's file was written:
    a sweep of r3f rewrites std's entry from the storage, and keeps an entry whose study is
    in no storage it knows."""
    out = tmp_path / "sweep"
    out.mkdir()
    storage = f"sqlite:///{out / 'sweep.db'}"
    std = optuna.create_study(study_name="sst2-std", storage=storage, direction="maximize")
    for lr, value, attrs in ((1e-3, 0.6, {}), (3e-4, 0.7, {}), (3e-4, 0.7, {"duplicate_of": 1}), (1e-3, 0.6, {})):
        std.add_trial(create_trial(params={"learning_rate": lr}, distributions=SPACE, value=value, user_attrs=attrs))
    stale = {"sst2": {"std": {"params": {"learning_rate": 1e-4}, "value": 0.1, "trial": 0, "trials": 1}},
             "rte": {"std": {"params": {"learning_rate": 1e-4}, "value": 0.2, "trial": 0, "trials": 1}}}
    (out / "best_configs.json").write_text(json.dumps(stale))

    assert main(sweep_args(tiny_checkpoint, glue_like, out, "r3f", 1)) == 0
    best = json.loads((out / "best_configs.json").read_text())
    assert best["sst2"]["std"] == {"params": {"learning_rate": 3e-4}, "value": 0.7, "trial": 1, "trials": 2,
                                   "space": None}  # the repeated 1e-3 (an older version's) counts once
    assert best["rte"] == stale["rte"]
    assert best == {**sweep.best_configs_from_storage(storage, [("sst2", "std"), ("sst2", "r3f")]), "rte": stale["rte"]}
    assert best["sst2"]["r3f"]["trials"] == 1 and best["sst2"]["r3f"]["space"]["r3f_lambda"] == [0.1, 1.0]


def test_two_workers_train_distinct_configurations_and_agree_on_the_best(tiny_checkpoint, glue_like,  # noqa: F811
                                                                         tmp_path):
    out = tmp_path / "sweep"
    out.mkdir()
    storage = f"sqlite:///{out / 'shared.db'}"
    space = {"learning_rate": [1e-3, 5e-4, 3e-4, 1e-4, 5e-5], "r3f_lambda": [0.1, 0.5, 1.0, 5.0]}
    args = [sys.executable, "-m", "rxf.cli", *sweep_args(tiny_checkpoint, glue_like, out, "r3f", 4, space),
            "--storage", storage]
    workers = [subprocess.Popen([*args, "--output-dir", str(out / f"w{i}"), "--sampler-seed", str(i)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}) for i in range(2)]
    for worker in workers:
        _, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, err[-2000:]
    study = load(storage, "sst2-r3f")
    trained = counted(study)
    assert len(trained) == 4 and len({json.dumps(t.params, sort_keys=True) for t in trained}) == 4
    assert not study.get_trials(states=(TrialState.RUNNING,))
    folders = [p.parent.name for i in range(2) for p in (out / f"w{i}").glob("trials/sst2/r3f/*/results.json")]
    assert len(folders) == len(set(folders)) == 4  # no configuration trained by both workers
    for trial in trained:
        config = json.loads((Path(trial.user_attrs["run_dir"]) / "results.json").read_text())["config"]
        assert config["learning_rate"] == trial.params["learning_rate"]
        assert config["r3f_lambda"] == trial.params["r3f_lambda"]
    last = max((out / f"w{i}" / "best_configs.json" for i in range(2)), key=lambda p: p.stat().st_mtime_ns)
    assert json.loads(last.read_text()) == sweep.best_configs_from_storage(storage, [("sst2", "r3f")])
    assert json.loads(last.read_text())["sst2"]["r3f"]["trials"] == 4


def test_sweep_runs_the_budget_per_method_and_resumes(tiny_checkpoint, glue_like, tmp_path):  # noqa: F811
    out = tmp_path / "sweep"
    args = [sys.executable, "-m", "rxf.cli", *sweep_args(tiny_checkpoint, glue_like, out)]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300

    def second_trial_started():  # killed while it trains: a signed trial with a dead worker
        return list(out.glob("trials/sst2/std/*/results.json")) and len(list(out.glob("trials/sst2/std/*"))) > 1

    while not second_trial_started() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, "the sweep ended before it could be interrupted"
    process.send_signal(signal.SIGKILL)
    process.wait()
    first = list(out.glob("trials/sst2/std/*/results.json"))
    assert first
    first_mtime = first[0].stat().st_mtime_ns

    assert main(sweep_args(tiny_checkpoint, glue_like, out)) == 0
    for method in ("std", "r3f"):
        trials = counted(load(f"sqlite:///{out / 'sweep.db'}", f"sst2-{method}"))
        assert len(trials) == len({json.dumps(t.params, sort_keys=True) for t in trials}) == 3
    assert first[0].stat().st_mtime_ns == first_mtime  # the finished trial was not run again
    best = json.loads((out / "best_configs.json").read_text())
    assert set(best["sst2"]) == {"std", "r3f"} and best["sst2"]["r3f"]["trials"] == 3
    assert set(best["sst2"]["std"]["params"]) == {"learning_rate"}
    assert set(best["sst2"]["r3f"]["params"]) == {"learning_rate", "r3f_lambda", "noise_type"}

    # The best configuration feeds rxf compare.
    cmp = tmp_path / "cmp"
    assert main(["compare", "--tasks", "sst2", "--methods", "r3f", "--seeds", "1", "--model", str(tiny_checkpoint),
                 "--data-dir", str(glue_like), "--configs", str(out / "best_configs.json"), "--output-dir", str(cmp),
                 *TINY_RUN]) == 0
    run = json.loads((cmp / "runs/sst2/r3f/seed1/results.json").read_text())
    assert run["config"]["r3f_lambda"] == best["sst2"]["r3f"]["params"]["r3f_lambda"]
    assert run["config"]["learning_rate"] == best["sst2"]["r3f"]["params"]["learning_rate"]

    # The chosen trial is the comparison's run for the sweep's seed: scripts/runs_from_sweep.py
    # copies it, and rxf compare takes it as finished, after checking it is that very run.
    seeded = tmp_path / "seeded"
    subprocess.run([sys.executable, str(ROOT / "scripts/runs_from_sweep.py"), str(out), str(seeded)], check=True)
    copied = list(seeded.glob("runs/sst2/*/seed*/results.json"))
    assert sorted(p.parent.parent.name for p in copied) == ["r3f", "std"]
    seed = json.loads(copied[0].read_text())["seed"]
    before = {p: p.read_text() for p in copied}
    compare = ["compare", "--tasks", "sst2", "--methods", "std,r3f", "--seeds", str(seed), "--model", str(tiny_checkpoint),
               "--data-dir", str(glue_like), "--configs", str(out / "best_configs.json"), "--output-dir", str(seeded)]
    assert main([*compare, *TINY_RUN]) == 0
    assert {p: p.read_text() for p in copied} == before and not list(seeded.glob("runs/*/*/*/best"))
    # Compared at other settings, the copied trial is another run: refused, not reported.
    assert main([*compare, *TINY_RUN, "--max-length", "40"]) == 2
    # A comparison of other seeds in the same folder reports only those: the copied seed
    # would otherwise join their max and median.
    assert main([*compare[:6], str(seed + 1), *compare[7:], *TINY_RUN, "--max-steps", "2"]) == 0
    assert json.loads((seeded / "report.json").read_text())["summary"]["sst2"]["std"]["seeds"] == [seed + 1]


def test_open_study_retries_when_another_worker_is_creating_the_schema(tmp_path, monkeypatch):
    """Two workers on a new database race to create Optuna's schema; the loser's error
    (here raised once, as CI saw it) must turn into a retry that loads the study."""
    import sqlalchemy.exc

    real, calls = optuna.create_study, []

    def racing(**kwargs):
        calls.append(kwargs["study_name"])
        if len(calls) == 1:
            raise sqlalchemy.exc.IntegrityError("INSERT INTO alembic_version", {}, Exception("UNIQUE constraint failed"))
        return real(**kwargs)

    monkeypatch.setattr(optuna, "create_study", racing)
    monkeypatch.setattr(sweep.time, "sleep", lambda s: None)
    study = sweep.open_study("sst2-r3f", f"sqlite:///{tmp_path / 'shared.db'}")
    assert calls == ["sst2-r3f", "sst2-r3f"] and study.study_name == "sst2-r3f"
    monkeypatch.setattr(optuna, "create_study", lambda **kw: (_ for _ in ()).throw(
        sqlalchemy.exc.OperationalError("CREATE TABLE", {}, Exception("database is locked"))))
    with pytest.raises(sqlalchemy.exc.OperationalError):  # a lasting failure still surfaces
        sweep.open_study("sst2-r3f", f"sqlite:///{tmp_path / 'shared.db'}", attempts=2)


def test_compare_merges_several_sweeps_configs_and_refuses_a_conflict(tiny_checkpoint, glue_like, tmp_path,  # noqa: F811
                                                                       capsys):
    """Two sweeps' files (one per optimiser, say) give each method its own settings; a task and
    method set differently in two files is refused naming both, before anything trains; a
    method no file configures is said to run at the command's own settings."""
    a, b, clash = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "clash.json"
    a.write_text(json.dumps({"sst2": {"std": {"params": {"learning_rate": 3e-4}}}}))
    b.write_text(json.dumps({"sst2": {"r3f": {"params": {"learning_rate": 1e-4, "r3f_lambda": 0.5}}}}))
    clash.write_text(json.dumps({"sst2": {"std": {"params": {"learning_rate": 1e-3}}}}))
    common = ["compare", "--tasks", "sst2", "--seeds", "1", "--model", str(tiny_checkpoint),
              "--data-dir", str(glue_like), *TINY_RUN, "--max-steps", "2"]

    out = tmp_path / "cmp"
    assert main([*common, "--methods", "std,r3f,r4f", "--configs", str(a), "--configs", str(b),
                 "--output-dir", str(out)]) == 0
    config = {m: json.loads((out / "runs/sst2" / m / "seed1/results.json").read_text())["config"]
              for m in ("std", "r3f", "r4f")}
    assert config["std"]["learning_rate"] == 3e-4
    assert (config["r3f"]["learning_rate"], config["r3f"]["r3f_lambda"]) == (1e-4, 0.5)
    assert (config["r4f"]["learning_rate"], config["r4f"]["r3f_lambda"]) == (1e-3, 1.0)  # the command's own
    assert "no configuration for sst2/r4f" in capsys.readouterr().out

    refused = tmp_path / "refused"
    assert main([*common, "--methods", "std", "--configs", str(a), "--configs", str(clash),
                 "--output-dir", str(refused)]) == 2
    err = capsys.readouterr().err
    assert "sst2/std is configured differently" in err and str(a) in err and str(clash) in err
    assert not (refused / "runs").exists()

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"sst2": ["std"]}))
    assert main([*common, "--methods", "std", "--configs", str(bad), "--output-dir", str(refused)]) == 2
    assert str(bad) in capsys.readouterr().err


@pytest.mark.parametrize("content, says", [
    ({"sst2": {"std": {"learning_rate": 0.01}}}, 'sst2/std: expected {"params"'),  # no "params": was ignored
    ({"sst2": {"std": {"params": [1, 2]}}}, 'sst2/std: expected {"params"'),
    ({"sst2": {"std": {"params": None}}}, 'sst2/std: expected {"params"'),
    ({"sst2": {"stdd": {"params": {"learning_rate": 0.01}}}}, "sst2/stdd: unknown method"),
    ({"sst2": {"std": {"params": {"method": "r3f"}}}}, "unknown parameter 'method'"),
    ({"sst2": {"std": {"params": {"learning_rate": "0.001"}}}}, "learning_rate must be float, got '0.001'"),
    ({"sst2": {"std": {"params": {"epochs": True}}}}, "epochs must be float, got True"),
    ({"sst2": {"r3f": {"params": {"noise_type": "bogus"}}}}, "--configs sst2/r3f: noise_type"),
    ({"sst2": {"r3f": {"params": {"learning_rate": -1}}}}, "--configs sst2/r3f: --learning-rate must be > 0"),
])
def test_a_bad_configuration_is_refused_before_anything_trains(content, says, tiny_checkpoint, glue_like,  # noqa: F811
                                                                tmp_path, capsys):
    """Every entry of --configs is checked, with the file, task and method named, before the
    first run starts: a run at a value the file did not mean (an entry without "params" was
    ignored) or a traceback after other runs had trained were the alternatives."""
    configs = tmp_path / "configs.json"
    configs.write_text(json.dumps(content))
    out = tmp_path / "cmp"
    assert main(["compare", "--tasks", "sst2", "--methods", "std,r3f", "--seeds", "1", "--model", str(tiny_checkpoint),
                 "--data-dir", str(glue_like), "--configs", str(configs), "--output-dir", str(out),
                 *TINY_RUN, "--max-steps", "2"]) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1, err
    assert not list(out.glob("runs/*/*/*/results.json"))


def test_configs_that_configure_nothing_are_said_and_a_folder_is_refused(tiny_checkpoint, glue_like, tmp_path,  # noqa: F811
                                                                         capsys):
    empty = tmp_path / "empty.json"
    empty.write_text("{}")
    common = ["compare", "--tasks", "sst2", "--methods", "std", "--seeds", "1", "--model", str(tiny_checkpoint),
              "--data-dir", str(glue_like), *TINY_RUN, "--max-steps", "2"]
    assert main([*common, "--configs", str(tmp_path), "--output-dir", str(tmp_path / "a")]) == 2
    assert str(tmp_path) in capsys.readouterr().err
    assert main([*common, "--configs", str(empty), "--output-dir", str(tmp_path / "b")]) == 0
    assert "no configuration for sst2/std" in capsys.readouterr().out
    assert main(["sweep", "--tasks", "sst2", "--methods", "std", "--jobs", "0", "--model", str(tiny_checkpoint),
                 "--data-dir", str(glue_like), "--output-dir", str(tmp_path / "s"), *TINY_RUN]) == 2
    assert "--jobs must be >= 1" in capsys.readouterr().err


def test_runs_from_sweep_says_when_it_has_nothing_to_copy(tmp_path):
    script = [sys.executable, str(ROOT / "scripts/runs_from_sweep.py")]
    missing = subprocess.run([*script, str(tmp_path / "nowhere"), str(tmp_path / "cmp")], capture_output=True, text=True)
    assert missing.returncode != 0 and "best_configs.json: cannot be read" in missing.stderr
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep/best_configs.json").write_text(json.dumps({"sst2": {}}))
    nothing = subprocess.run([*script, str(tmp_path / "sweep"), str(tmp_path / "cmp"), "--tasks", "rte"],
                             capture_output=True, text=True)
    assert nothing.returncode != 0 and "names no configuration for rte" in nothing.stderr
    assert not (tmp_path / "cmp").exists()
