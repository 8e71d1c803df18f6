"""Config loading: defaults, relative paths, and errors that name the file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.config import DEFAULT_SCHEDULE, ConfigError, load


def _write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "data" / "a").mkdir(parents=True, exist_ok=True)
    (tmp_path / "val").mkdir(exist_ok=True)
    path = tmp_path / "watchtrain.toml"
    path.write_text(text)
    return path


def test_minimal_config_and_defaults(tmp_path):
    cfg = load(_write(tmp_path, '[[project]]\nname = "M"\ndataset = "data"\noutput = "out"\n'))
    (project,) = cfg.projects
    assert project.job.dataset == tmp_path / "data"  # relative to the config file
    assert project.job.output == tmp_path / "out"
    assert project.schedule == DEFAULT_SCHEDULE == "0 2 * * *"
    assert project.debounce_seconds == 10.0
    assert project.job.export.precision == "float16"


def test_full_config(tmp_path):
    cfg = load(_write(tmp_path, """
[daemon]
state_dir = "state"
log_level = "debug"
[[project]]
name = "M"
dataset = "data"
validation = "val"
output = "out"
schedule = "30 3 * * 1-5"
debounce_seconds = 2.5
validation_fraction = 0.2
keep_versions = 3
precision = "float32"
[project.head]
epochs = 10
learning_rate = 0.01
"""))
    job = cfg.projects[0].job
    assert cfg.state_dir == tmp_path / "state" and cfg.log_level == "debug"
    assert (job.head.epochs, job.head.learning_rate, job.keep_versions) == (10, 0.01, 3)
    assert cfg.projects[0].schedule == "30 3 * * 1-5"


@pytest.mark.parametrize("body, key, message", [
    ('[[project]]\nname = "M"\ndataset = "data"\noutput = "out"\ncolour = 1\n', "project[0].colour", "unknown key"),
    ('[daemon]\nlogs = 1\n[[project]]\nname = "M"\ndataset = "data"\noutput = "out"\n', "daemon.logs", "unknown key"),
    ('[[project]]\nname = "M"\ndataset = "missing"\noutput = "out"\n', "project[0].dataset", "does not exist"),
    ('[[project]]\nname = "M"\ndataset = "data"\noutput = "data/a/out"\n', "project[0].output", "inside the dataset"),
    ('[[project]]\nname = "M"\ndataset = "data"\noutput = "out"\nschedule = "every night"\n', "project[0].schedule",
     "invalid cron"),
    ('[[project]]\nname = "M"\ndataset = "data"\noutput = "out"\n[[project]]\nname = "N"\ndataset = "data/a"\n'
     'output = "out"\n', "project[1].output", "shared"),
    ('[[project]]\nname = "a/b"\ndataset = "data"\noutput = "out"\n', "project[0].name", "letters"),
    ('[[project]]\nname = "M"\noutput = "out"\n', "project[0].dataset", "required"),
    ('[[project]]\nname = "M"\ndataset = "data"\noutput = "out"\n[project.head]\nepochs = "many"\n',
     "project[0].head.epochs", "must be"),
    ("[[project]\n", "file", "not valid TOML"),
    ('[[project]]\nname = "M"\ndataset = "data"\noutput = "out"\ndebounce_seconds = -3\n',
     "project[0].debounce_seconds", "must be >= 0"),
    ('[[project]]\nname = "M"\ndataset = "data"\noutput = "out"\n[project.head]\nbatch_size = 0\n',
     "project[0].head.batch_size", "must be >= 1"),
    ('[[project]]\nname = "M"\ndataset = "data"\noutput = "out"\n[project.finetune]\nviews = 0\n',
     "project[0].finetune.views", "must be >= 1"),
    ("", "project", "at least one"),
    ('[[project]]\nname = "M"\ndataset = "data"\nvalidation = "data"\noutput = "out"\n', "project[0].validation",
     "overlaps the dataset"),
])
def test_errors_name_the_file_and_key(tmp_path, body, key, message):
    path = _write(tmp_path, body)
    with pytest.raises(ConfigError) as err:
        load(path)
    assert err.value.key == key
    assert str(path) in str(err.value) and message in str(err.value)
