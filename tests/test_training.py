"""Training recipes: a smoke run of each (a few steps on tiny phantoms) writes a valid bundle,
training is deterministic for a seed, and the data helpers build correct CenterNet targets."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

pytest.importorskip("torch", reason="PyTorch (the train extra) is not installed")

from edge_runtime.bundle import Bundle
from edge_runtime.errors import ConfigError
from export.training import data
from export.training import train as train_mod
from export.training.cli import NAMES
from export.training.train import RECIPES, train

SMOKE = {"steps": 2, "n_train": 4, "n_eval": 2, "n_tune": 1, "phantom_size": (96, 96), "progress": False,
         "card": False}


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_smoke_run_writes_a_verified_bundle(name: str, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    moved: dict[str, float] = {}
    real_fit = train_mod._fit

    def fit(recipe, net, *args, **kwargs):  # the real loop; records how far each parameter moved
        before = {n: p.detach().clone() for n, p in net.named_parameters()}
        out = real_fit(recipe, net, *args, **kwargs)
        moved.update({n: float((p.detach() - before[n]).abs().max()) for n, p in net.named_parameters()})
        return out

    monkeypatch.setattr(train_mod, "_fit", fit)
    bundle = train(name, tmp_path / name, **SMOKE)
    assert moved and [n for n, d in moved.items() if not d > 0] == []  # the optimiser updated every parameter
    again = Bundle.load(tmp_path / name)  # re-verified from disk: hashes of every file
    assert again.sha256 == bundle.sha256
    m = bundle.manifest
    assert m["name"] == name and m["training"]["steps"] == 2 and m["training"]["counts"]["train_frames"] == 4
    assert set(bundle.manifest["files"]) == {"fp32.onnx", "train_log.jsonl"}
    log = [json.loads(line) for line in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1] and all(np.isfinite(r["loss"]) for r in log)
    proto = onnx.load(str(tmp_path / name / "fp32.onnx"))
    assert proto.opset_import[0].version >= 17
    assert [i.name for i in proto.graph.input] == ["image"]
    assert [o.name for o in proto.graph.output] == [o["name"] for o in m["outputs"]]
    assert all(v <= 1e-2 for v in m["artifacts"][0]["info"]["parity_max_abs_diff"].values())
    if m["task"] == "enhancement":  # dynamic spatial dims
        dims = proto.graph.input[0].type.tensor_type.shape.dim
        assert [d.dim_param for d in dims[2:]] == ["height", "width"]
        assert "psnr_db" in m["metrics"] and "nlm" in m["baselines"]
    else:
        assert "ap50" in m["metrics"] and "params" in m["baselines"]


@pytest.mark.parametrize("name", list(RECIPES))
def test_training_is_deterministic_for_a_seed(name: str, tmp_path) -> None:
    """Same seed, same weights (on one machine: phantoms differ in the last bit across instruction
    sets); another seed, other weights."""
    weights = []
    for run, seed in (("a", 0), ("b", 0), ("c", 1)):
        train(name, tmp_path / run, seed=seed, **SMOKE)
        proto = onnx.load(str(tmp_path / run / "fp32.onnx"))
        weights.append({i.name: numpy_helper.to_array(i) for i in proto.graph.initializer})
    assert weights[0].keys() == weights[1].keys() == weights[2].keys()
    for k in weights[0]:
        np.testing.assert_array_equal(weights[0][k], weights[1][k])
    assert any(not np.array_equal(weights[0][k], weights[2][k]) for k in weights[0])


def test_train_refuses_to_replace_a_folder_that_is_not_a_bundle_and_bad_counts(tmp_path) -> None:
    precious = tmp_path / "work" / "notes.txt"
    precious.parent.mkdir()
    precious.write_text("keep me")
    with pytest.raises(ConfigError, match="no bundle manifest.json"):
        train("us-despeckle", tmp_path / "work", **SMOKE)
    (precious.parent / "manifest.json").write_text('{"name": "a web app"}')  # someone else's manifest
    with pytest.raises(ConfigError, match="no bundle manifest.json"):
        train("us-despeckle", tmp_path / "work", **SMOKE)
    assert precious.read_text() == "keep me"
    for bad in (0, -3):
        with pytest.raises(ConfigError, match="steps: expected an integer >= 1"):
            train("us-despeckle", tmp_path / "new", **{**SMOKE, "steps": bad})
    bundle = train("us-despeckle", tmp_path / "b", **{**SMOKE, "steps": 3})  # an earlier bundle is replaced
    assert bundle.manifest["training"]["recipe"].endswith("--seed 0 --steps 3")
    assert train("us-despeckle", tmp_path / "b", **SMOKE).manifest["training"]["steps"] == 2


def test_a_card_for_a_bundle_written_elsewhere_goes_beside_it(tmp_path) -> None:
    from export.training.cards import DOCS_DIR

    shipped = {p: p.read_bytes() for p in DOCS_DIR.rglob("us-lesion-det*")}
    train("us-lesion-det", tmp_path / "mine", **{**SMOKE, "card": True})
    assert (tmp_path / "mine-card" / "us-lesion-det.md").is_file()
    assert {p: p.read_bytes() for p in DOCS_DIR.rglob("us-lesion-det*")} == shipped  # the shipped card untouched


def test_unknown_model_and_bad_seed_are_config_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="model name"):
        train("us-nothing", tmp_path)
    with pytest.raises(ConfigError, match="seed"):
        train("us-despeckle", tmp_path, seed=95)
    assert set(NAMES) == set(RECIPES)


def test_seed_ranges_are_disjoint() -> None:
    for seed in (0, 89):
        tr = data.train_seeds(seed, 5000)
        assert tr[-1] < data.HELDOUT_BASE
    assert data.heldout_seeds(3)[0] == data.HELDOUT_BASE


def test_centernet_targets_hand_computed() -> None:
    boxes = np.array([[8, 12, 24, 20], [0, 0, 2, 2]], np.float32)  # centre (16, 16), 16 x 8; tiny one
    heat, size, offset, mask = data.centernet_targets(boxes, np.array([1, 0]), 2, (16, 16), 4)
    assert heat[1, 4, 4] == 1.0 and heat[1].max() == 1.0 and 0 < heat[1, 4, 5] < 1
    np.testing.assert_allclose(size[:, 4, 4], np.log([4.0, 2.0]), rtol=1e-6)
    np.testing.assert_allclose(offset[:, 4, 4], [0.0, 0.0], atol=1e-6)
    # The tiny box: centre (1, 1) px -> cell (0, 0), offset 0.25 of a cell.
    assert heat[0, 0, 0] == 1.0 and mask.sum() == 2
    np.testing.assert_allclose(offset[:, 0, 0], [0.25, 0.25])


def test_detection_batch_flip_keeps_boxes_on_their_objects() -> None:
    img = np.zeros((1, 32, 32), np.uint8)
    img[0, 8:16, 0:8] = 255
    ds = data.DetectionSet(img, 255.0, [np.array([[0, 8, 8, 16]], np.float32)], [np.array([0])])
    rng = np.random.default_rng(0)
    for _ in range(6):  # both flipped and unflipped draws: the heatmap peak sits on the bright square
        x, heat, *_ = data.sample_detection_batch(ds, rng, 1, None, 1, 4)
        iy, ix = np.unravel_index(heat[0, 0].argmax(), heat[0, 0].shape)
        assert x[0, 0, iy * 4 + 2, ix * 4 + 2] == 1.0


def test_xr_vst_matches_the_phantom_detector_and_starts_as_identity() -> None:
    import torch

    from edge_runtime import phantoms
    from export.training.models import build
    from export.training.train import XR_VST

    # exp(offset - scale * x) is sqrt(counts / counts in air) for the phantom's stored values.
    mu = np.array([0.0, 1.0, 3.0, 5.0])
    x = (phantoms.XR_OFFSET + phantoms.XR_GAIN * mu) / (2 ** phantoms.XR_BITS - 1)
    np.testing.assert_allclose(np.exp(XR_VST["offset"] - XR_VST["scale"] * x), np.exp(-mu / 2), rtol=1e-5)
    net = build("denoise_unet", RECIPES["xr-denoise"].arch).eval()
    img = torch.rand(1, 1, 32, 48)
    with torch.no_grad():  # zero-initialised last conv: Exp then Log gives the input back
        np.testing.assert_allclose(net(img).numpy(), img.numpy(), atol=1e-6)
    # The transform is opt-in: the other recipes' architectures have none.
    assert all("vst" not in r.arch for n, r in RECIPES.items() if n != "xr-denoise")


def test_denoise_unet_depths_are_recorded_only_when_not_the_default() -> None:
    from export.training.models import DenoiseUNet, build

    small = build("denoise_unet", {"widths": [32, 32, 64], "factor": 4, "depths": [1, 2, 3, 2, 1]})
    assert small.config["depths"] == [1, 2, 3, 2, 1] and len(small.e1) == 1 and len(small.d1) == 1
    # The default layout writes no "depths": us-despeckle's manifest and graph stay as they were.
    assert "depths" not in DenoiseUNet().config and len(DenoiseUNet().e1) == 2
    assert build("denoise_unet", DenoiseUNet().config).config == DenoiseUNet().config
    with pytest.raises(ValueError, match="depths"):
        DenoiseUNet(depths=(1, 2, 0, 2, 1))
    # A 1x1 output conv (tried for speed) is recorded and rebuilt the same way; 3x3 writes nothing.
    k1 = build("denoise_unet", {"widths": [32, 32, 64], "factor": 4, "out_kernel": 1})
    assert k1.config["out_kernel"] == 1 and k1.d1[-1].kernel_size == (1, 1) and "out_kernel" not in small.config
    with pytest.raises(ValueError, match="out_kernel"):
        DenoiseUNet(out_kernel=5)


def test_denoise_unet_highpass_feeds_only_local_detail_to_the_convolutions() -> None:
    """With ``highpass`` the first convolution sees the unshuffled image minus its local block mean:
    adding a constant to the image changes nothing there (borders included), so the predicted
    residual is unchanged too and the output moves by exactly that constant."""
    import torch

    from export.training.models import DenoiseUNet, build

    net = build("denoise_unet", {"widths": [16, 32, 64], "factor": 4, "depths": [1, 1, 3, 1, 1], "highpass": 3}).eval()
    assert net.config["highpass"] == 3 and "highpass" not in DenoiseUNet().config
    assert build("denoise_unet", net.config).config == net.config
    torch.manual_seed(0)
    torch.nn.init.normal_(net.d1[-1].weight, std=0.1)  # a non-zero residual (it starts at zero)
    seen: list[torch.Tensor] = []
    net.e1.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].clone()))
    img = torch.rand(1, 1, 48, 64)
    with torch.no_grad():
        out_a, out_b = net(img), net(img + 0.3)
    torch.testing.assert_close(seen[0], seen[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(out_b - out_a, torch.full_like(out_a, 0.3), atol=1e-5, rtol=0)
    flat = torch.full((1, 1, 48, 64), 0.7)
    with torch.no_grad():
        net(flat)
    assert float(seen[-1].abs().max()) < 1e-6  # a flat image leaves nothing for the convolutions
    with torch.no_grad():
        assert float((net(img) - img).abs().max()) > 1e-3  # the residual is really there
    with pytest.raises(ValueError, match="highpass"):
        DenoiseUNet(highpass=2)
    with pytest.raises(ValueError, match="in_ch 1"):
        DenoiseUNet(in_ch=3, highpass=3)


def test_timing_passes_alternate_the_order_and_drop_the_warm_up() -> None:
    from export.training.evaluate import time_interleaved

    calls: list[tuple[str, int]] = []
    frames = [object(), object(), object()]
    fns = {k: (lambda f, k=k: calls.append((k, frames.index(f)))) for k in ("a", "b")}
    ms = time_interleaved(fns, frames, passes=2)  # type: ignore[arg-type]
    assert {k: len(v) for k, v in ms.items()} == {"a": 6, "b": 6} and min(ms["a"] + ms["b"]) >= 0
    order = [k for k, i in calls if i == 0]  # who starts each pass: warm-up a b, then b a, then a b
    assert order == ["a", "b", "b", "a", "a", "b"] and len(calls) == 18


def test_card_speed_verdict_holds_only_if_it_holds_in_every_round() -> None:
    """A model faster than the filter in the median but slower in one round is not called faster."""
    from export.training.cards import speed_verdict

    assert speed_verdict([3.0, 3.1, 2.9], [4.0, 4.2, 3.9], "bilateral")[:2] == (True, "met")
    faster, verdict, spread = speed_verdict([3.0, 3.1, 4.3], [4.0, 4.2, 4.0], "bilateral")
    assert not faster and verdict.startswith("not met: at parity") and "1.07" in spread and "over 3 rounds" in spread
    assert speed_verdict([4.5, 4.6], [4.0, 4.1], "bilateral")[1] == "missed"


def test_xr_training_doses_bracket_the_evaluation_dose() -> None:
    from export.training.train import XR_EVAL_DOSE, XR_TRAIN_DOSE

    doses = [data.xr_dose(s, *XR_TRAIN_DOSE) for s in data.train_seeds(0, 500)]
    assert XR_TRAIN_DOSE[0] <= min(doses) < XR_EVAL_DOSE < max(doses) <= XR_TRAIN_DOSE[1]


def test_pixel_unshuffle_exports_as_space_to_depth(tmp_path) -> None:
    """One SpaceToDepth node instead of Reshape-Transpose-Reshape, and ORT still equals PyTorch."""
    import torch

    from export.onnx_export import export_onnx
    from export.training.models import DenoiseUNet, fuse_model

    torch.manual_seed(0)
    net = fuse_model(DenoiseUNet((8, 8, 8)))
    for p in net.parameters():  # the last conv starts at zero (identity): give it something to do
        p.data.normal_(0, 0.1)
    x = np.random.default_rng(0).random((1, 1, 32, 48), dtype=np.float32)
    path = export_onnx(net, x, tmp_path / "d.onnx", input_names=["image"], output_names=["enhanced"],
                       dynamic_axes={"image": {2: "h", 3: "w"}}, extra_inputs=[x[:, :, :16, :32]])
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "SpaceToDepth" in ops and "Transpose" not in ops


def test_reexport_leaves_a_consistent_fp32_bundle_or_the_old_one(tmp_path) -> None:
    """On a copy of a shipped detector bundle: same outputs, derived artefacts dropped, hashes verify;
    a refused re-export (here: an impossible tolerance) leaves the old bundle as it was."""
    import shutil

    from export.training.cli import MODELS_DIR
    from export.training.train import reexport

    src = tmp_path / "us-lesion-det"
    shutil.copytree(MODELS_DIR / "us-lesion-det", src)
    before = Bundle.load(src).sha256
    with pytest.raises(Exception, match="within"):
        reexport("us-lesion-det", src, atol=-1.0)
    assert Bundle.load(src).sha256 == before and sorted(p.name for p in tmp_path.iterdir()) == ["us-lesion-det"]

    bundle = reexport("us-lesion-det", src)
    assert [a.precision for a in bundle.artifacts] == ["fp32"]
    assert set(bundle.manifest["files"]) == {"fp32.onnx", "train_log.jsonl"}
    assert "calibration" not in bundle.manifest and "validation" not in bundle.manifest
    assert bundle.artifact("fp32").info["reexported_max_abs_diff"] <= 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["us-lesion-det"]


def test_retune_baseline_replaces_only_the_baselines_record(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a copy of the shipped detector bundle, with a two-point grid to keep it short: the new record
    carries the grid's best parameters and the date; files, model metrics and the rest stay."""
    import shutil

    from export.training import baselines
    from export.training.cli import MODELS_DIR
    from export.training.train import retune_baseline

    src = tmp_path / "us-lesion-det"
    shutil.copytree(MODELS_DIR / "us-lesion-det", src)
    before = Bundle.load(src).manifest
    grid = [{**before["baselines"]["params"], "min_area": a} for a in (60, 5000)]  # 5000: finds nothing
    monkeypatch.setattr(baselines, "detector_grid", lambda name: grid)
    monkeypatch.setattr(train_mod, "get_recipe", lambda name: dataclasses.replace(RECIPES[name], n_tune=3, n_eval=4))
    after = retune_baseline("us-lesion-det", src, progress=False).manifest
    assert after["baselines"]["params"] == grid[0] and after["baselines"]["retuned"]
    assert after["baselines"]["ap50"] > 0
    assert after["files"] == before["files"] and after["metrics"] == before["metrics"]
    assert {k: v for k, v in after.items() if k != "baselines"} == {k: v for k, v in before.items() if k != "baselines"}
    Bundle.load(src, verify=True)
