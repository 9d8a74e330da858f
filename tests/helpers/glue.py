"""The GLUE formats the tests cover and their recipes (launch/recipes/glue-<task>.yaml)."""
from conftest import RECIPES, ROOT

from dsee_scale.config import TrainConfig, train_config_from_argv

FORMATS = ("cola", "mrpc", "rte", "stsb")
TINY = ["--model", "builtin:tiny-bert"]


def recipe_config(task: str, *flags) -> TrainConfig:
    """launch/recipes/glue-<task>.yaml (and flags), its data paths made absolute."""
    cfg = train_config_from_argv(["--config", str(RECIPES / f"glue-{task}.yaml"), *map(str, flags)])
    cfg.train_file, cfg.eval_file = str(ROOT / cfg.train_file), str(ROOT / cfg.eval_file)
    return cfg
