"""A run with dropout on, killed and resumed on another split of its global batch, ends as the
uninterrupted run: GPT-2 (the built-in tiny-gpt2: dropout 0.1 in embeddings, attention and residuals) (helpers/resume_dropout.py)."""
import pytest

from helpers.resume_dropout import RESUMES, check_resume, killed_runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2")
    return root, killed_runs("gpt2", root)


@pytest.mark.parametrize("killed_on, resumed_on", RESUMES)
def test_resume_on_another_split_gives_the_uninterrupted_run(runs, killed_on, resumed_on):
    check_resume("gpt2", *runs, killed_on, resumed_on)
