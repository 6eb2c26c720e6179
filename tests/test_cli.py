"""CLI: subcommands, the no-argument default, bad input (one clear line, no traceback, non-zero exit),
eval, and predict output (COCO result JSON with RLE masks + PNG overlays)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import kernels
from maskrcnn_fast import checkpoint, cli
from maskrcnn_fast.data.shapes import ShapesDataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train import tiny  # noqa: E402


@pytest.fixture(autouse=True)
def torch_backend():
    with kernels.use_backend("torch"):
        yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from maskrcnn_fast.train import train

    out = tmp_path_factory.mktemp("run")
    with kernels.use_backend("torch"):
        train(tiny(out, iters=2))
    return out


def run_main(argv, capsys):
    rc = cli.main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_one_line_error(rc, err, fragment):
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert fragment in lines[0] and "Traceback" not in err


def test_no_arguments_runs_the_default_train_demo(monkeypatch):
    seen = {}
    monkeypatch.setattr(cli, "cmd_train", lambda args: seen.setdefault("args", args) and 0)
    assert cli.main([]) == 0
    cfg = cli._train_config(seen["args"])
    assert cfg.data == "shapes" and cfg.device is None and cfg.eval_every > 0 and cfg.iters is None


def test_subcommands_are_registered():
    parser = cli.build_parser()
    for cmd, extra in (("train", []), ("eval", ["--checkpoint", "x"]), ("predict", ["--checkpoint", "x", "a.png"]),
                       ("ablate", []), ("selfcheck", [])):
        assert parser.parse_args([cmd] + extra).func.__name__ == f"cmd_{cmd}"


def _bad_coco(tmp_path, kind):
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    data = {"images": [{"id": 1, "file_name": "a.png", "height": 8, "width": 8}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 4, 4]}],
            "categories": [{"id": 1, "name": "x"}]}
    if kind == "category":
        data["annotations"][0]["category_id"] = 5
    path = tmp_path / "ann.json"
    path.write_text("{not json" if kind == "malformed" else json.dumps(data))
    if kind != "image":
        from PIL import Image

        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img_dir / "a.png")
    return f"coco:{path}:{img_dir}"


@pytest.mark.parametrize("case, fragment", [
    ("missing_ann", "annotation file not found"),
    ("malformed", "not valid JSON"),
    ("image", "image not found"),
    ("category", "not in 'categories'"),
    ("scheme", "unknown --data scheme"),
    ("out", "not writable"),
    ("option", "invalid int value"),
])
def test_bad_train_input(tmp_path, capsys, case, fragment):
    out = str(tmp_path / "out")
    data = {"missing_ann": f"coco:{tmp_path}/none.json:{tmp_path}", "scheme": "imagenet:/x"}.get(case)
    if case in ("malformed", "image", "category"):
        data = _bad_coco(tmp_path, case)
    argv = ["train", "--data", data or "shapes", "--out", out, "--iters", "1"]
    if case == "out":
        (tmp_path / "file").write_text("x")
        argv[argv.index("--out") + 1] = str(tmp_path / "file" / "sub")  # a folder below a file: unwritable
    if case == "option":
        argv[-1] = "many"
    assert_one_line_error(*run_main(argv, capsys)[::2], fragment)


def test_checkpoint_of_another_model(tmp_path, capsys, trained):
    other = str(tmp_path / "other.pt")
    ckpt = checkpoint.load(str(trained / "last.pt"))
    ckpt["model_config"] = {**ckpt["model_config"], "num_classes": 3}
    checkpoint.save(ckpt, other)
    assert_one_line_error(*run_main(["eval", "--checkpoint", other], capsys)[::2], "num_classes=3")
    plain = str(tmp_path / "plain.pt")
    torch.save({"conv.weight": torch.zeros(1)}, plain)
    assert_one_line_error(*run_main(["eval", "--checkpoint", plain], capsys)[::2], "neither")
    assert_one_line_error(*run_main(["eval", "--checkpoint", str(tmp_path / "nope.pt")], capsys)[::2],
                          "checkpoint not found")


def test_bad_input_in_a_fresh_process_prints_no_traceback(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "maskrcnn_fast", "train", "--data", "voc:x", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: unknown --data scheme 'voc' in 'voc:x'; use one of: shapes, coco:ANN.json:IMAGE_DIR, coins"]


def test_eval_writes_metrics(tmp_path, capsys, trained):
    rc, out, _ = run_main(["eval", "--checkpoint", str(trained / "last.pt"), "--out", str(tmp_path)], capsys)
    assert rc == 0 and "segm:" in out and "bbox:" in out
    with open(tmp_path / "metrics.json") as f:
        metrics = json.load(f)
    assert set(metrics["segm"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}


def _write_images(tmp_path, n=2, size=64):
    from PIL import Image

    paths = []
    ds = ShapesDataset("val", n, size, seed=7)
    for i in range(n):
        p = str(tmp_path / f"img{i}.png")
        Image.fromarray(ds.raw(i)[0]).save(p)
        paths.append(p)
    return paths


def _check_predictions(out_dir, paths):
    from PIL import Image
    from pycocotools import mask as mask_utils

    with open(os.path.join(out_dir, "predictions.json")) as f:
        results = json.load(f)
    assert isinstance(results, list)
    for r in results:
        assert {"image_id", "category_id", "bbox", "score", "segmentation", "file_name"} <= set(r)
        assert isinstance(r["segmentation"]["counts"], str)
        m = mask_utils.decode({**r["segmentation"], "counts": r["segmentation"]["counts"].encode()})
        assert m.shape == (64, 64)
    for p in paths:
        stem = os.path.splitext(os.path.basename(p))[0]
        overlay = Image.open(os.path.join(out_dir, f"{stem}_pred.png"))
        assert overlay.size == (64, 64) and overlay.mode == "RGB"
    return results


def test_predict_writes_coco_results_and_overlays(tmp_path, capsys, trained):
    paths = _write_images(tmp_path)
    out = str(tmp_path / "pred")
    rc, _, err = run_main(["predict", "--checkpoint", str(trained / "last.pt"), *paths, "--out", out,
                           "--score-thresh", "0.0"], capsys)
    assert rc == 0, err
    _check_predictions(out, paths)
    rc, _, err = run_main(["predict", "--checkpoint", str(trained / "last.pt"), str(tmp_path / "no.png"),
                           "--out", out], capsys)
    assert_one_line_error(rc, err, "image not found")


def test_predict_accepts_torchvision_weights(tmp_path, capsys):
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    torch.manual_seed(0)
    tv = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3)
    path = str(tmp_path / "tv.pt")
    torch.save({"model": tv.state_dict()}, path)  # torchvision's reference scripts save this layout
    paths = _write_images(tmp_path, n=1)
    rc, _, err = run_main(["predict", "--checkpoint", path, *paths, "--out", str(tmp_path / "p")], capsys)
    assert rc == 0, err
    _check_predictions(str(tmp_path / "p"), paths)
