"""Reading an export back: its logits on fixed ids, and compressed-tensors' load path."""
import torch


def logits(model) -> torch.Tensor:
    ids = torch.arange(1, 25).reshape(2, 12)
    with torch.no_grad():
        return model.eval()(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def load_compressed(folder):
    """compressed-tensors 0.13's load path: a model from the folder's config, then decompress.
    (transformers >= 5 reads compressed-tensors folders only with compressed-tensors >= 0.15,
    which has no sparse formats.)"""
    from compressed_tensors.compressors import ModelCompressor
    from transformers import AutoConfig

    from dsee_scale.models import TASK_MODELS

    model = TASK_MODELS["lm"].from_config(AutoConfig.from_pretrained(folder))
    ModelCompressor.from_pretrained(str(folder)).decompress(str(folder), model)
    model.tie_weights()  # decompress replaces every parameter: a tied head must be re-tied to the loaded embedding
    return model
