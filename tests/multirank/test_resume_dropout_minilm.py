"""A run with dropout on, killed and resumed on another split of its global batch, ends as the
uninterrupted run: the real MiniLM-L6 (BERT: dropout 0.1 in embeddings, attention and residuals) on SST-2 rows (helpers/resume_dropout.py)."""
import pytest

from helpers.resume_dropout import RESUMES, check_resume, killed_runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("minilm")
    return root, killed_runs("minilm", root)


@pytest.mark.parametrize("killed_on, resumed_on", RESUMES)
def test_resume_on_another_split_gives_the_uninterrupted_run(runs, killed_on, resumed_on):
    check_resume("minilm", *runs, killed_on, resumed_on)
