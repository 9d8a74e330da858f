"""A run with dropout on, killed and resumed on another split of its global batch, ends as the
uninterrupted run: the real MiniLM-L6 (BERT: dropout 0.1 in embeddings, attention and residuals) on SST-2 rows
(helpers/resume_dropout.py). One resume (2 ranks to 1 with accumulation 2): GPT-2's file also resumes on 3 ranks."""
from helpers.resume_dropout import resume_tests

runs, test_resume_on_another_split_gives_the_uninterrupted_run = resume_tests("minilm", [("2 ranks", "1 rank, accumulation 2")])
