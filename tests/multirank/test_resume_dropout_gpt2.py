"""A run with dropout on, killed and resumed on another split of its global batch, ends as the
uninterrupted run: GPT-2 (the built-in tiny-gpt2: dropout 0.1 in embeddings, attention and residuals) (helpers/resume_dropout.py)."""
from helpers.resume_dropout import FROM_2_RANKS, resume_tests

runs, test_resume_on_another_split_gives_the_uninterrupted_run = resume_tests("gpt2", FROM_2_RANKS)
