"""A run with dropout on, killed and resumed on another split of its global batch, ends as the
uninterrupted run: the real MiniLM-L6 (BERT: dropout 0.1 in embeddings, attention and residuals) on SST-2 rows (helpers/resume_dropout.py)."""
from helpers.resume_dropout import resume_tests

runs, test_resume_on_another_split_gives_the_uninterrupted_run = resume_tests("minilm")
