"""Files users keep: adapter-only safetensors (with Ω and the DSEE config), merged HF folders (a
structured run's layers padded to the one size per layer an HF config holds), and their
compressed-tensors copy (pruned weights stored as non-zeros + bitmask)."""
from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from dsee_scale import dist, extras
from dsee_scale.arch import arch_of, attention_layers, ffn_layers
from dsee_scale.chat import end_of_turn
from dsee_scale.config import DSEEConfig, PruneConfig
from dsee_scale.inject import apply_dsee, dsee_layers, dsee_state_dict, load_dsee_state_dict, support_from_layers

ADAPTER_FILE = "dsee_adapter.safetensors"


def atomic_save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write then rename, so a crash never leaves a half-written file under the final name."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _model_type(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", type(model).__name__))


def save_adapter(model: nn.Module, folder: str | Path, config: DSEEConfig) -> Path:
    """Adapter-only file: A, B, S values, Ω and the task head. Collective under ZeRO-3; rank 0 writes."""
    state = dsee_state_dict(model)
    path = Path(folder) / ADAPTER_FILE
    if dist.is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {"dsee_config": json.dumps(config.to_dict()), "model_type": _model_type(model), "format": "dsee_scale/1"}
        atomic_save_file(state, path, metadata)
    dist.barrier()
    return path


def read_adapter(path: str | Path) -> tuple[dict[str, torch.Tensor], DSEEConfig, dict[str, str]]:
    """Tensors, DSEE config and metadata of an adapter file (safetensors: no code is executed)."""
    path = Path(path)
    if path.is_dir():
        path = path / ADAPTER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no DSEE adapter at {path}: expected a {ADAPTER_FILE} written by save_adapter")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if "dsee_config" not in metadata:
        raise ValueError(f"{path} is not a dsee_scale adapter (no dsee_config in its metadata)")
    return tensors, DSEEConfig(**json.loads(metadata["dsee_config"])), metadata


def load_adapter(model: nn.Module, path: str | Path, ds_config: dict | None = None) -> nn.Module:
    """Put a saved adapter on `model`: adapts a fresh base model first (reusing the saved Ω)."""
    tensors, config, metadata = read_adapter(path)
    if metadata.get("model_type") != _model_type(model):
        raise ValueError(f"adapter was saved from a {metadata.get('model_type')!r} model, this one is {_model_type(model)!r}")
    if not dsee_layers(model):
        apply_dsee(model, config, ds_config=ds_config, support=load_support(model, config, Path(path) / ADAPTER_FILE if Path(path).is_dir() else path))
    load_dsee_state_dict(model, tensors)
    return model



class _ShardWriter:
    """Writes a state dict in safetensors shards of bounded size, then HF's index file."""

    def __init__(self, folder: Path, max_shard_bytes: int) -> None:
        self.folder, self.max_bytes = folder, max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        folder.mkdir(parents=True, exist_ok=True)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.pending[name] = tensor.detach().to("cpu", copy=True).contiguous()
        self.pending_bytes += tensor.numel() * tensor.element_size()
        if self.pending_bytes >= self.max_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        path = self.folder / f"shard-{len(self.shards):05d}.safetensors.part"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.shards.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        self.flush()
        if len(self.shards) == 1:
            os.replace(self.shards[0][0], self.folder / "model.safetensors")
            return
        weight_map, total = {}, 0
        for i, (path, names) in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{len(self.shards):05d}.safetensors"
            os.replace(path, self.folder / final)
            total += (self.folder / final).stat().st_size
            weight_map.update({n: final for n in names})
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


# ---- structured pruning's per-layer sizes → one HF config ----------------------------------

def _module_names(model: nn.Module) -> dict[int, str]:
    return {id(m): name for name, m in model.named_modules()}


def export_layout(model: nn.Module) -> tuple[dict, dict[str, tuple[str, list[tuple[int, int]]]]]:
    """(config fields, {module name: (axis, [(size now, size exported) of each block])}) for a plain HF folder.

    HF configs hold one head count and one FFN size for all layers, so every layer is exported
    at the largest kept size, the smaller ones padded with zero heads / neurons (exact: a zero
    neuron and a zero head contribute nothing). BERT and GPT-2 derive head_dim from the head
    count, so their heads are padded back to the original count; LLaMA-style models store
    head_dim and export the kept count. A fused projection pads each of its parts (q, k, v;
    gate, up) in place.
    """
    if not hasattr(model.config, "dsee_structured"):
        return {}, {}
    names = _module_names(model)
    arch = arch_of(model)
    attns, ffns = attention_layers(model), ffn_layers(model)
    d = attns[0].head_dim
    if arch.head_dim_in_config:
        group = model.config.num_attention_heads // model.config.num_key_value_heads
        kv = max(a.kv_heads for a in attns)
        heads = kv * group
        fields = {"num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": d}
    else:
        heads = kv = model.config.num_attention_heads
        fields = {}
    size = max(f.size for f in ffns)
    fields[arch.ffn_field] = size
    fields["dsee_dense_fields"] = {key: getattr(model.config, key, None) for key in fields}  # for dense_config()
    blocks: dict[int, tuple[nn.Module, list[tuple[int, int, int]]]] = {}  # by module: its (first row, rows now, rows exported)

    def block(part: tuple[nn.Module, int], now: int, exported: int) -> None:
        blocks.setdefault(id(part[0]), (part[0], []))[1].append((part[1], now, exported))

    plan = {}
    for attn in attns:
        block(attn.q, attn.heads * d, heads * d)
        block(attn.k, attn.kv_heads * d, kv * d)
        block(attn.v, attn.kv_heads * d, kv * d)
        for module in attn.more:
            block((module, 0), attn.heads * d, heads * d)
        plan[names[id(attn.o)]] = ("in", [(attn.heads * d, heads * d)])
    for ffn in ffns:
        for up in ffn.ups:
            block(up, ffn.size, size)
        plan[names[id(ffn.down)]] = ("in", [(ffn.size, size)])
    for module, parts in blocks.values():
        plan[names[id(module)]] = ("out", [(now, exported) for _, now, exported in sorted(parts)])
    return fields, plan


def pad_for_export(tensor: torch.Tensor, pname: str, transposed: bool, axis: str, blocks: list[tuple[int, int]]) -> torch.Tensor:
    """Zero-pad a weight or bias along its output ('out') or input ('in') axis, block by block:
    each (size now, size exported) block keeps its entries first, then zeros."""
    if pname == "bias":
        if axis == "in":
            return tensor
        dim = 0
    else:
        dim = (1 if transposed else 0) if axis == "out" else (0 if transposed else 1)
    padded = []
    for part, (_, exported) in zip(tensor.split([now for now, _ in blocks], dim=dim), blocks):
        shape = list(part.shape)
        shape[dim] = exported - part.shape[dim]
        padded += [part, part.new_zeros(shape)]
    return torch.cat(padded, dim=dim)


def export_hf(model: nn.Module, folder: str | Path, merge: bool = True, remask: bool = False, max_shard_bytes: int = 1 << 30) -> Path:
    """An ordinary HF folder (config + safetensors) that `from_pretrained` loads without dsee_scale.

    merge=True stores W + ΔW for every adapted weight; merge=False stores the base weights alone
    (pair it with `save_adapter` for the exact adapted function). remask=True keeps pruned
    entries (zeros of the base weight) zero in the merged weight, so it is exactly as sparse.
    Collective under ZeRO-3: one module's parameters are gathered at a time and rank 0 writes
    shards of at most max_shard_bytes.
    """
    from dsee_scale import zero
    from dsee_scale.layer import DSEELayer, weight_is_transposed

    folder = Path(folder)
    writer = _ShardWriter(folder, max_shard_bytes) if dist.is_main() else None
    config_fields, padding = export_layout(model)
    seen: set[int] = set()
    bases = {id(m.base): m for m in model.modules() if isinstance(m, DSEELayer)}
    for name, module in model.named_modules():
        if isinstance(module, DSEELayer):
            continue
        prefix = name[: -len(".base")] if id(module) in bases else name
        params = [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for _, p in params)
        layer = bases.get(id(module))
        extra = layer.adapter_parameters() if layer is not None and merge and not layer.merged else []
        with torch.no_grad(), zero.gathered([p for _, p in params] + extra):
            for pname, param in params:
                tensor = layer.merged_weight(remask=remask) if pname == "weight" and extra else param.data
                if prefix in padding:
                    tensor = pad_for_export(tensor, pname, weight_is_transposed(module), *padding[prefix])
                if writer is not None:
                    writer.add(f"{prefix}.{pname}" if prefix else pname, tensor)
        for bname, buf in module.named_buffers(recurse=False):
            if bname not in module._non_persistent_buffers_set and bname != "sparse_index" and writer is not None:
                writer.add(f"{prefix}.{bname}" if prefix else bname, buf)
    if writer is not None:
        writer.close()
        config = copy.deepcopy(model.config)
        for key, value in config_fields.items():
            setattr(config, key, value)
        config.save_pretrained(str(folder))
    dist.barrier()
    return folder


def save_for_generation(model: nn.Module, tokenizer, folder: str | Path) -> None:
    """The tokenizer (its chat template included) and generation_config.json beside an exported
    model, so that plain transformers' generate() stops where an answer ends: eos_token_id lists
    the model's EOS, the tokenizer's and the chat template's end-of-turn token (<|im_end|> for
    ChatML), pad_token_id the tokenizer's pad. Not collective: run it on one rank."""
    tokenizer.save_pretrained(str(folder))
    if not model.can_generate():  # classification and regression heads
        return
    config = copy.deepcopy(model.generation_config)
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    eos = list(dict.fromkeys(t for t in (*eos, tokenizer.eos_token_id, end_of_turn(tokenizer)) if t is not None))
    config.eos_token_id = eos[0] if len(eos) == 1 else eos
    config.pad_token_id = tokenizer.pad_token_id
    config.save_pretrained(str(folder))


def compressed_format(model: nn.Module, prune: PruneConfig) -> str:
    """The compressed-tensors format for this run's pruning: sparse-24-bitmask for 2:4 (the layout
    2:4 kernels read), sparse-bitmask (any sparsity) otherwise.

    sparse-24-bitmask groups 4 consecutive entries of each stored row: nn.Linear's input dimension,
    the one 2:4 pruning groups along. GPT-2's Conv1D stores (in, out), so its groups run down the
    columns, and a transposed copy would not load into an HF Conv1D: such weights are refused here,
    before training, rather than exported wrong.
    """
    from transformers.pytorch_utils import Conv1D

    from dsee_scale.prune import prune_targets

    if prune.pattern != "2:4":
        return "sparse-bitmask"
    conv = [t.name for t in prune_targets(model, prune.include, prune.exclude) if isinstance(t.module, Conv1D)]
    if conv:
        raise ValueError(f"export_format compressed with prune.pattern 2:4 writes sparse-24-bitmask, whose groups run along each stored row, but {conv[0]} "
                         f"(and {len(conv) - 1} more) is a Conv1D weight stored (in, out), 2:4 down its columns: use export_format hf (the merged folder "
                         "is 2:4 along the input dimension; semistructured.to_semi_structured runs it) or unstructured pruning (sparse-bitmask)")
    return "sparse-24-bitmask"


def export_compressed(merged: str | Path, out: str | Path, fmt: str, weights: Iterable[str]) -> Path:
    """A merged HF folder (export_hf) rewritten in the compressed-tensors format `fmt`
    (sparse-bitmask or sparse-24-bitmask), for loaders that read it: config.json gains the
    `quantization_config` that ModelCompressor.update_config writes.

    Why: a dense file stores every pruned zero; this one stores each weight in `weights` as its
    non-zeros plus one bit per entry. `weights` are the names the run's masks carry, so exactly
    what was pruned is compressed (embeddings, norms and heads stay dense), not whatever happens
    to hold zeros. The library's own compressors write the tensors (compressed-tensors 0.13.0: the
    newest with sparse compressors that accepts transformers 5), one safetensors shard at a time,
    so only one shard is ever in memory (dense and compressed). Not collective: run it on one rank.
    """
    extras.require("compressed_tensors")
    from compressed_tensors.compressors import BaseCompressor, ModelCompressor
    from compressed_tensors.config import SparsityCompressionConfig

    from dsee_scale.semistructured import is_nm_sparse

    merged, out = Path(merged), Path(out)
    index_file = merged / "model.safetensors.index.json"
    index = json.loads(index_file.read_text()) if index_file.exists() else None
    shards = sorted(set(index["weight_map"].values())) if index else ["model.safetensors"]
    targets = {name.removesuffix(".weight") for name in weights}
    config = SparsityCompressionConfig.load_from_registry(fmt, targets=sorted(targets))
    compressor = BaseCompressor.load_from_registry(fmt, config=config)
    out.mkdir(parents=True, exist_ok=True)
    weight_map, found, zeros, numel = {}, set(), 0, 0
    for shard in shards:
        with safe_open(str(merged / shard), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        for name in (n for n in tensors if n.removesuffix(".weight") in targets):
            if fmt == "sparse-24-bitmask" and not is_nm_sparse(tensors[name], 2, 4, dim=1):
                raise ValueError(f"{name} is not 2:4 sparse along its rows: sparse-24-bitmask keeps 2 of every 4 entries of a row and would drop non-zeros")
            found.add(name.removesuffix(".weight"))
            zeros, numel = zeros + int((tensors[name] == 0).sum()), numel + tensors[name].numel()
        compressed = compressor.compress(tensors, compression_targets=targets)
        del tensors
        atomic_save_file(compressed, out / shard, {"format": "pt"})
        weight_map.update(dict.fromkeys(compressed, shard))
    if targets - found:
        raise ValueError(f"{merged} holds no weight {sorted(targets - found)[0]}.weight to compress")
    if index:
        total = sum((out / s).stat().st_size for s in shards)
        (out / index_file.name).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    for file in merged.iterdir():  # config, generation config, tokenizer files
        if file.is_file() and file.name not in {*shards, index_file.name}:
            shutil.copy2(file, out / file.name)
    config.global_sparsity = zeros / max(1, numel)  # of the compressed weights
    ModelCompressor(sparsity_config=config).update_config(str(out))
    return out


def load_support(model: nn.Module, config: DSEEConfig, path: str | Path) -> dict[str, torch.Tensor]:
    """Ω saved by an earlier run (support.safetensors) or inside an adapter file, as apply_dsee's
    `support` argument for this model."""
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    suffix = ".sparse_index"
    if any(k.endswith(suffix) for k in tensors):
        return support_from_layers(model, config, {k[: -len(suffix)]: v for k, v in tensors.items() if k.endswith(suffix)})
    return tensors
