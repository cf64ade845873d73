"""The Hub bundle: every piece loads through the Auto classes, remote code works without tokenizer-bridge installed,
the model card says what the bundle is, and push_to_hub sends every file through huggingface_hub's real client to a
local stand-in of the Hub's upload endpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoProcessor,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.dynamic_module_utils import (
    get_class_from_dynamic_module,
    get_relative_import_files,
)

from tests.hub_stand_in import FakeHub, hub_cache
from mllm.bundle.bundle import Bundle, load_bundle, push_bundle_to_hub, save_bundle
from mllm.bundle.remote_code import (
    REMOTE_CODE_FOLDER,
    write_bundle_remote_code,
    write_code_package,
    write_remote_code,
)
from mllm.text_tokenizers import build_word_tokenizer
from mllm.training.recipe import recipe_from_dict
from tokenizer_bridge import VisualTokenizer, VisualTokenizerConfig
from tokenizer_bridge.image_processing_visual_tokenizer import (
    VisualTokenizerImageProcessor,
)
from tokenizer_bridge.modeling_pretrained_vq import FAMILIES, PretrainedVQTokenizer
from tokenizer_bridge.processing_unified import UnifiedProcessor
from tokenizer_bridge.vocab.bridge import bridge_llm

WORDS = "a red green blue circle square draw describe"
RECIPE = {"stage": "llm", "output_dir": "out", "visual_tokenizer": "vt", "model": {"config": {"hidden_size": 32}},
          "data": {"image_size": 32, "tasks": {"captioning": 1.0}}, "train": {"steps": 7, "batch_size": 2}}


def tiny_llm(vocab_size: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=128)).eval()


def bridged(visual_tokenizer, size: int):
    tokenizer = build_word_tokenizer([WORDS])
    model = tiny_llm(len(tokenizer))
    vocab = bridge_llm(model, tokenizer, visual_tokenizer.codebook_size,
                       grid_size=visual_tokenizer.config.grid_size(size, size),
                       tokenizer_fingerprint=visual_tokenizer.fingerprint())
    image_processor = VisualTokenizerImageProcessor(size=size, size_divisor=visual_tokenizer.config.downsample)
    return model, UnifiedProcessor(image_processor, tokenizer, vocab, visual_tokenizer=visual_tokenizer)


@pytest.fixture(scope="module")
def ours():
    torch.manual_seed(0)
    config = VisualTokenizerConfig(base_channels=16, latent_dim=16, codebook_size=32, downsample=8, image_size=32)
    return bridged(VisualTokenizer(config).eval(), 32)


@pytest.fixture(scope="module")
def emu3():
    torch.manual_seed(0)
    family = FAMILIES["emu3"]
    vq = family.model_class()(family.config_class()(
        codebook_size=64, embed_dim=4, latent_channels=4, base_channels=32, channel_multiplier=[1, 1, 1],
        num_res_blocks=1, attn_resolutions=[], hidden_size=32))
    return bridged(PretrainedVQTokenizer.from_vq_model(vq.eval()), 16)


@pytest.fixture(scope="module")
def arrays():
    rng = np.random.RandomState(0)
    return [rng.randint(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(2)]


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)


# ---------------------------------------------------------------------------------------------------- pieces
def test_every_piece_loads_with_the_auto_classes(ours, arrays, tmp_path):
    model, processor = ours
    Bundle(model, processor, recipe=recipe_from_dict(RECIPE), base_model="org/tiny-llama").save_pretrained(tmp_path)
    vocab = processor.image_vocab
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer.convert_tokens_to_ids(["<boi>", "<img_0>"]) == [vocab.boi_token_id, vocab.offset]
    loaded = AutoProcessor.from_pretrained(tmp_path)
    kwargs = dict(text=["<image> describe"], target=["a red circle"], images=arrays[:1], return_tensors="pt")
    assert isinstance(loaded, UnifiedProcessor) and same(loaded(**kwargs), processor(**kwargs))
    vt = AutoModel.from_pretrained(tmp_path, subfolder="visual_tokenizer")
    assert isinstance(vt, VisualTokenizer) and vt.fingerprint() == processor.visual_tokenizer.fingerprint()
    llm = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = processor(**kwargs)["input_ids"]
    with torch.no_grad():
        assert torch.equal(llm(input_ids=ids).logits, model(input_ids=ids).logits)
    bundle = Bundle.from_pretrained(tmp_path)
    assert recipe_from_dict(bundle.recipe) == recipe_from_dict(RECIPE)  # training_recipe.yaml round trip
    assert same(bundle.processor(**kwargs), processor(**kwargs))


def test_model_card(ours, tmp_path):
    model, processor = ours
    save_bundle(tmp_path, model, processor, base_model="org/tiny-llama", recipe=RECIPE)
    card = (tmp_path / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["base_model"] == "org/tiny-llama" and "tokenizer-bridge" in metadata["tags"]
    fingerprint = processor.visual_tokenizer.fingerprint()
    for expected in ("Base model: `org/tiny-llama`", "35 tokens = 32 image ids + 3 specials", "grid 4x4",
                     "vq quantizer with 32 codes", "downsample x8", fingerprint, "## Training recipe",
                     "7 steps, batch 2", '"captioning": 1.0', "trust_remote_code=True"):
        assert expected in card, expected


# ---------------------------------------------------------------------------------------------------- remote code
def test_remote_code_is_one_package_folder(ours, tmp_path):
    model, processor = ours
    save_bundle(tmp_path, model, processor)
    for folder in (tmp_path, tmp_path / "visual_tokenizer"):
        assert sorted(p.name for p in folder.glob("*.py")) == []  # no code beside the weights and configs
        package = folder / REMOTE_CODE_FOLDER
        assert (package / "__init__.py").is_file() and (package / "quantizers_base.py").is_file()
        assert [p for p in package.iterdir() if not p.name.endswith(".py")] == []  # flat: no subfolder
        for source in package.glob("*.py"):
            assert not any(line.lstrip().startswith("from .quantizers.") for line in source.read_text().splitlines())
    processor_config = json.loads((tmp_path / "processor_config.json").read_text())
    assert processor_config["auto_map"] == {"AutoProcessor": "remote_code/processing_unified.UnifiedProcessor"}
    image_map = {"AutoImageProcessor": "remote_code/image_processing_visual_tokenizer.VisualTokenizerImageProcessor"}
    assert processor_config["image_processor"]["auto_map"] == image_map
    assert json.loads((tmp_path / "preprocessor_config.json").read_text())["auto_map"] == image_map
    vt_config = json.loads((tmp_path / "visual_tokenizer" / "config.json").read_text())
    assert vt_config["auto_map"] == {"AutoConfig": "remote_code/configuration_visual_tokenizer.VisualTokenizerConfig",
                                     "AutoModel": "remote_code/modeling_visual_tokenizer.VisualTokenizer"}
    for entry in ("remote_code/processing_unified.py", "visual_tokenizer/remote_code/modeling_visual_tokenizer.py"):
        assert all(os.path.isfile(f) for f in get_relative_import_files(str(tmp_path / entry)))
    # in-process, tokenizer-bridge installed: transformers still imports the folder's copy, not the package
    remote = get_class_from_dynamic_module(vt_config["auto_map"]["AutoModel"], str(tmp_path / "visual_tokenizer"))
    assert remote.__module__.startswith("transformers_modules.") and ".remote_code." in remote.__module__
    with pytest.raises(ValueError, match="must be a Python identifier"):
        write_code_package(tmp_path, {"AutoModel": VisualTokenizer}, package="remote-code")


def test_export_rewrites_every_import_form(tmp_path, monkeypatch):
    package = tmp_path / "src" / "pkgx"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from .leaf import LEAF\n")
    (package / "sub" / "leaf.py").write_text('LEAF = "leaf"\n')
    (package / "util.py").write_text("from .sub.leaf import (\n    LEAF as L,\n)\nVALUE = L + '!'\n")
    (package / "entry.py").write_text(textwrap.dedent("""\
        \"\"\"Docstring mentioning pkgx.sub.\"\"\"
        from __future__ import annotations
        from .sub import LEAF
        from pkgx.util import VALUE


        class Entry:
            def value(self):
                from . util import VALUE as V  # a lazy import, oddly spaced
                return LEAF + V
        """))
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    out = tmp_path / "out"
    out.mkdir()
    from pkgx.entry import Entry

    assert write_remote_code(out, {"AutoModel": Entry}) == {"AutoModel": "entry.Entry"}
    assert sorted(p.name for p in out.iterdir()) == ["entry.py", "sub.py", "sub_leaf.py", "util.py"]
    assert "from .sub_leaf import LEAF as L\nVALUE" in (out / "util.py").read_text()
    (out / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    from out.entry import Entry as Flat  # the flat copy is a working package of its own

    assert Flat().value() == "leafleaf!"
    (package / "bad.py").write_text("from . import util\nclass Bad: pass\n")
    from pkgx.bad import Bad

    with pytest.raises(ValueError, match="from . import name"):
        write_remote_code(out, {"AutoModel": Bad})


HIDDEN = '''
import json, sys
job = json.load(open(sys.argv[1]))
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path[:] = [p for p in sys.path if not p.startswith(job["repo"])] + [job["site"]]
try:
    import tokenizer_bridge  # noqa: F401
    hidden = False
except ImportError:
    hidden = True
import numpy as np
import torch
from transformers import AutoImageProcessor, AutoModel, AutoProcessor
from transformers.dynamic_module_utils import get_class_from_dynamic_module

torch.set_num_threads(1)
inputs = torch.load(job["inputs"], weights_only=True)
out = {"hidden": hidden, "modules": {}}
for key in ("bundle", "old_bundle"):  # the current layout, and one saved the earlier way (flat code files)
    processor = AutoProcessor.from_pretrained(job[key], trust_remote_code=True)
    batch = processor(text=["<image> describe"], target=["a red circle"], images=list(inputs["arrays"].numpy()),
                      return_tensors="pt")
    out[key + "/input_ids"] = batch["input_ids"]
    out[key + "/decoded"] = torch.as_tensor(np.array(processor.decode(batch["input_ids"][0])[0]))
    vt = AutoModel.from_pretrained(job[key] + "/visual_tokenizer", trust_remote_code=True)
    vt_sub = AutoModel.from_pretrained(job[key], subfolder="visual_tokenizer", trust_remote_code=True)
    out[key + "/ids"] = vt.encode(inputs["pixels"])
    out[key + "/ids_sub"] = vt_sub.encode(inputs["pixels"])
    out[key + "/reconstruction"] = vt.decode(out[key + "/ids"]).detach()
    out[key + "/fingerprint"] = vt.fingerprint()
    out["modules"][key] = [type(x).__module__ for x in (processor, processor.image_processor, vt, vt_sub)]
emu3 = AutoModel.from_pretrained(job["emu3_bundle"] + "/visual_tokenizer", trust_remote_code=True)
out["emu3_ids"] = emu3.encode(inputs["emu3_pixels"])
out["emu3_reconstruction"] = emu3.decode(out["emu3_ids"])
out["modules"]["emu3"] = [type(emu3).__module__]
# the pushed repo, from the Hub cache (offline): transformers' Hub branch fetches each relative import by its path
repo = job["hub_repo"]
vt_hub = AutoModel.from_pretrained(repo, subfolder="visual_tokenizer", trust_remote_code=True)
out["hub/ids"] = vt_hub.encode(inputs["pixels"])
image_processor = AutoImageProcessor.from_pretrained(repo, trust_remote_code=True)
out["hub/pixel_values"] = image_processor(list(inputs["arrays"].numpy()), return_tensors="pt")["pixel_values"]
processor_class = get_class_from_dynamic_module(job["processor_ref"], repo)
out["modules"]["hub"] = [type(vt_hub).__module__, type(image_processor).__module__, processor_class.__module__]
torch.save(out, job["out"])
'''


def test_bundles_load_with_remote_code_without_the_package(ours, emu3, arrays, fake_hub, tmp_path):
    (model, processor), (emu3_model, emu3_processor) = ours, emu3
    save_bundle(tmp_path / "bundle", model, processor)
    save_bundle(tmp_path / "emu3_bundle", emu3_model, emu3_processor)
    old = save_bundle(tmp_path / "old_bundle", model, processor, remote_code=False)
    write_bundle_remote_code(old, processor, package=None)  # the layout bundles were saved with before
    assert {"processing_unified.py", "visual_tokenizer/modeling_visual_tokenizer.py"} <= set(local_files(old))
    info = push_bundle_to_hub(tmp_path / "bundle", "org/tiny", token="hf_test", endpoint=fake_hub)
    assert FakeHub.files == local_files(tmp_path / "bundle")
    hub_cache(tmp_path / "hf", "org/tiny", info.oid, FakeHub.files)
    torch.manual_seed(0)
    pixels, emu3_pixels = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 16, 16) * 2 - 1
    inputs = {"arrays": torch.from_numpy(np.stack(arrays[:1])), "pixels": pixels, "emu3_pixels": emu3_pixels}
    torch.save(inputs, tmp_path / "in.pt")
    repo = str(Path(__file__).resolve().parents[3])
    job = {"repo": repo, "site": sysconfig.get_paths()["purelib"], "bundle": str(tmp_path / "bundle"),
           "old_bundle": str(old), "emu3_bundle": str(tmp_path / "emu3_bundle"), "inputs": str(tmp_path / "in.pt"),
           "out": str(tmp_path / "out.pt"), "hub_repo": "org/tiny",
           "processor_ref": "remote_code/processing_unified.UnifiedProcessor"}
    (tmp_path / "job.json").write_text(json.dumps(job))
    (tmp_path / "hidden.py").write_text(HIDDEN)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    # -I: no PYTHONPATH, no user site, no script dir; -S: no site-packages .pth files (the editable install's hook)
    run = subprocess.run([sys.executable, "-I", "-S", str(tmp_path / "hidden.py"), str(tmp_path / "job.json")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    assert got["hidden"], "tokenizer_bridge was importable in the subprocess"
    modules = got["modules"]
    assert all(m.startswith("transformers_modules.") for names in modules.values() for m in names), modules
    assert all(".remote_code." in m for key in ("bundle", "hub") for m in modules[key]), modules
    assert not any(".remote_code." in m for m in modules["old_bundle"]), modules
    assert all(".org.tiny." in m for m in modules["hub"]), modules  # the Hub copy, not the local folder's
    batch = processor(text=["<image> describe"], target=["a red circle"], images=arrays[:1], return_tensors="pt")
    vt = processor.visual_tokenizer
    ids = vt.encode(pixels)
    for key in ("bundle", "old_bundle"):
        assert torch.equal(got[key + "/input_ids"], batch["input_ids"])
        assert torch.equal(got[key + "/decoded"], torch.as_tensor(np.array(processor.decode(batch["input_ids"][0])[0])))
        assert torch.equal(got[key + "/ids"], ids) and torch.equal(got[key + "/ids_sub"], ids)
        with torch.no_grad():
            assert torch.equal(got[key + "/reconstruction"], vt.decode(ids))
        assert got[key + "/fingerprint"] == vt.fingerprint()
    assert torch.equal(got["hub/ids"], ids)
    pixel_values = processor.image_processor(arrays[:1], return_tensors="pt")["pixel_values"]
    assert torch.equal(got["hub/pixel_values"], pixel_values)
    emu3_vt = emu3_processor.visual_tokenizer
    assert torch.equal(got["emu3_ids"], emu3_vt.encode(emu3_pixels))
    assert torch.equal(got["emu3_reconstruction"], emu3_vt.decode(got["emu3_ids"]))


# ---------------------------------------------------------------------------------------------------- wrapped VQ
def test_bundle_with_a_wrapped_emu3_tokenizer(emu3, tmp_path):
    model, processor = emu3
    rng = np.random.RandomState(1)
    image = rng.randint(0, 256, (16, 16, 3), dtype=np.uint8)
    save_bundle(tmp_path, model, processor, base_model="org/tiny-llama")
    assert "wrapping the pretrained emu3 VQ (`Emu3VQVAE`) with 64 codes, downsample x4" in (
        tmp_path / "README.md").read_text()
    loaded_model, loaded = load_bundle(tmp_path)
    assert isinstance(loaded.visual_tokenizer, PretrainedVQTokenizer)
    batch = processor(text=["a <image>"], images=[image], return_tensors="pt")
    assert same(loaded(text=["a <image>"], images=[image]), batch)
    assert np.array_equal(np.asarray(loaded.decode(batch["input_ids"][0])[1]),
                          np.asarray(processor.decode(batch["input_ids"][0])[1]))
    vt = AutoModel.from_pretrained(tmp_path, subfolder="visual_tokenizer")
    assert isinstance(vt, PretrainedVQTokenizer) and vt.fingerprint() == processor.visual_tokenizer.fingerprint()
    assert isinstance(AutoProcessor.from_pretrained(tmp_path).visual_tokenizer, PretrainedVQTokenizer)


# ---------------------------------------------------------------------------------------------------- push
def local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_push_to_hub_uploads_every_file(ours, fake_hub, tmp_path):
    model, processor = ours
    bundle = Bundle(model, processor, base_model="org/tiny-llama")
    folder = bundle.save_pretrained(tmp_path / "bundle")
    expected = local_files(folder)
    assert {"model.safetensors", "visual_tokenizer/model.safetensors", "remote_code/processing_unified.py",
            "visual_tokenizer/remote_code/modeling_visual_tokenizer.py"} <= set(expected)
    assert {name.rpartition("/")[0] for name in expected if name.endswith(".py")} == {
        "remote_code", "visual_tokenizer/remote_code"}  # no code file outside the two package folders

    info = push_bundle_to_hub(folder, "org/tiny", token="hf_test", endpoint=fake_hub, commit_message="first")
    assert info.oid == "c" * 40 and FakeHub.files == expected
    assert [c[1] for c in FakeHub.calls if c[0] == "POST"] == [
        "/api/repos/create", "/api/validate-yaml", "/api/models/org/tiny/preupload/main",
        "/api/models/org/tiny/commit/main"]
    assert {c[2] for c in FakeHub.calls if c[0] == "POST"} == {"Bearer hf_test"}
    assert ("commit", "first") in FakeHub.calls

    FakeHub.files = {}
    bundle.push_to_hub("org/tiny", token="hf_test", endpoint=fake_hub)  # saves to a temporary folder first
    assert FakeHub.files == expected  # saving is deterministic: byte-identical files
    with pytest.raises(FileNotFoundError, match="not a saved bundle"):
        push_bundle_to_hub(tmp_path, "org/tiny", token="hf_test", endpoint=fake_hub)
