"""`--help` of each entry point is LAM's own page: what it does, its groups with their choices (or its keys),
three example commands; not Hydra's generic "powered by Hydra" page."""

import functools
import subprocess
import sys

import pytest

from lam.config import config_dir


@functools.cache  # one subprocess per entry point: the pages do not change within a session
def help_page(entry: str) -> str:
    done = subprocess.run([sys.executable, "-m", f"lam.{entry}", "--help"], capture_output=True, text=True,
                          timeout=120, check=True)
    return done.stdout


def groups(*names: str) -> list[str]:
    """'group: choice, choice' lines of the groups in conf/, as the help pages list them."""
    return [f"{g}: {', '.join(sorted(p.stem for p in (config_dir() / g).glob('*.yaml')))}" for g in names]


@pytest.mark.parametrize("entry,says,listed", [
    ("train", "Trains one language model", groups("attention", "data", "debug", "experiment", "model", "trainer")),
    ("prepare", "Prepares the token cache", groups("data", "tokenizer")),
    ("generate", "Samples text from a model file", ["model: null", "ckpt: null", "max_new_tokens:", "top_p:"]),
    ("export", "Writes a checkpoint's model as one model file", ["ckpt: ???", "out: ???"]),
    ("chat", "Chats with a trained model", ["model: null", "ckpt: null", "temperature:", "stop:"]),
])
def test_help_says_what_the_entry_point_does_lists_its_options_and_shows_examples(entry, says, listed):
    page = help_page(entry)
    assert page.startswith(f"python -m lam.{entry} ") and says in page
    for line in listed:
        assert line in page.splitlines() or any(row.startswith(line) for row in page.splitlines()), line
    examples = [row.strip() for row in page.splitlines() if row.startswith(f"  python -m lam.{entry}")]
    assert len(examples) == 3
    assert "powered by Hydra" not in page and "$APP_CONFIG_GROUPS" not in page
    assert not [row for row in page.splitlines() if row.startswith(("apps", "hydra/"))]  # not train's groups


def test_help_examples_of_train_compose(tmp_path):
    """The commands the help page of lam.train shows are valid overrides."""
    from lam.config import compose_train

    for row in help_page("train").splitlines():
        if row.startswith("  python -m lam.train"):
            overrides = [a.replace("'", "") for a in row.split()[3:] if a != "-m"]
            compose_train([o.split(",")[0] for o in overrides], tmp_path)


def test_compare_help_is_its_own():
    page = subprocess.run([sys.executable, "-m", "lam.compare", "--help"], capture_output=True, text=True,
                          timeout=120, check=True).stdout
    assert "Compares training runs" in page and "--png" in page and "--metric" in page
