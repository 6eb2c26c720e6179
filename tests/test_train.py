"""Training loop: outputs, exact resume, NaN handling, atomic checkpoints, DDP with 2 CPU ranks.

Tiny settings throughout (64 px shapes, narrow heads, a few iterations). The model runs on the
PyTorch fallback backend: the kernels themselves are tested in the interpreter by their own files.
"""
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

import kernels
from maskrcnn_fast import checkpoint
from maskrcnn_fast.errors import NonFiniteLossError
from maskrcnn_fast.evaluate import METRIC_NAMES
from maskrcnn_fast.train import LOSS_TERMS, TrainConfig, lr_factor, shapes_model_kwargs, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL = {**shapes_model_kwargs(64), "fpn_channels": 32, "representation_size": 64, "mask_layers": (16, 16),
              "rpn_batch_size_per_image": 32, "box_batch_size_per_image": 32, "rpn_post_nms_top_n_train": 64,
              "rpn_pre_nms_top_n_test": 64, "rpn_post_nms_top_n_test": 32, "box_detections_per_img": 10}


def tiny(out, **kw) -> TrainConfig:
    base = dict(out=str(out), iters=4, batch_size=2, image_size=64, train_images=6, val_images=3, warmup_iters=2,
                lr=0.01, eval_every=0, ckpt_every=0, device="cpu", workers=0, model_kwargs=TINY_MODEL)
    return TrainConfig(**{**base, **kw})


def records(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(autouse=True)
def torch_backend():
    with kernels.use_backend("torch"):
        yield


def test_few_iterations_write_log_metrics_checkpoints_and_curves(tmp_path):
    metrics = train(tiny(tmp_path, iters=3))
    recs = records(tmp_path)
    assert [r["iter"] for r in recs] == [1, 2, 3]
    for r in recs:
        assert set(LOSS_TERMS) | {"loss", "lr", "img_s"} <= set(r)
        assert r["loss"] == pytest.approx(sum(r[k] for k in LOSS_TERMS), rel=1e-5) and r["img_s"] > 0
    assert recs[0]["lr"] == pytest.approx(0.01 * 0.5 * 0.5 * (1 + 1))  # warm-up 1/2 at cosine's start
    with open(tmp_path / "metrics.json") as f:
        saved = json.load(f)
    for iou_type in ("bbox", "segm"):
        assert set(saved[iou_type]) == set(METRIC_NAMES) and saved[iou_type] == metrics[iou_type]
    for name in ("last.pt", "best.pt", "curves.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert checkpoint.load(str(tmp_path / "last.pt"))["iter"] == 3


def test_lr_schedule_warmup_cosine_multistep():
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_factor(50, 100, 10, "cosine") == pytest.approx(0.5)
    assert [lr_factor(i, 90, 0, "multistep") for i in (59, 60, 80)] == pytest.approx([1, 0.1, 0.01])


def test_resume_is_exact(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    train(tiny(full, iters=8))
    train(tiny(part, iters=8, stop_after=4))
    assert [r["iter"] for r in records(part)] == [1, 2, 3, 4] and not (part / "metrics.json").exists()
    train(tiny(part, iters=1, lr=5.0, resume=True))  # stored settings win over the command line's
    a, b = records(full), records(part)
    assert [r["iter"] for r in b] == list(range(1, 9))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bitwise, iterations 1..8


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    import maskrcnn_fast.train as train_mod

    real_build = train_mod.build_model

    def build_with_nan_at_call_3(*args, **kwargs):
        model = real_build(*args, **kwargs)
        forward, calls = model.forward, [0]

        def poisoned(images, targets=None):
            out = forward(images, targets)
            if model.training:
                calls[0] += 1
                if calls[0] == 3:
                    out = {**out, "loss_mask": out["loss_mask"] * float("nan")}
            return out

        model.forward = poisoned
        return model

    monkeypatch.setattr(train_mod, "build_model", build_with_nan_at_call_3)
    with pytest.raises(NonFiniteLossError, match=r"iteration 3: .*loss_mask=nan.*last.pt \(iteration 2\) is kept"):
        train(tiny(tmp_path, iters=6, ckpt_every=2))
    ckpt = checkpoint.load(str(tmp_path / "last.pt"))
    assert ckpt["iter"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert [r["iter"] for r in records(tmp_path)] == [1, 2]


def test_checkpoint_write_interrupted_leaves_previous_loadable(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    checkpoint.save({"format": checkpoint.FORMAT, "iter": 1, "w": torch.ones(3)}, path)

    def torch_save_then_die(obj, f):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # as if killed mid-write

    monkeypatch.setattr(checkpoint.torch, "save", torch_save_then_die)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save({"format": checkpoint.FORMAT, "iter": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert checkpoint.load(path)["iter"] == 1 and os.listdir(tmp_path) == ["last.pt"]


def test_checkpoint_process_killed_mid_write(tmp_path):
    """A real hard exit (no cleanup handlers) halfway through writing the new checkpoint."""
    path = str(tmp_path / "last.pt")
    checkpoint.save({"format": checkpoint.FORMAT, "iter": 1}, path)
    script = textwrap.dedent(f"""
        import os, torch
        from maskrcnn_fast import checkpoint
        def die(obj, f):
            f.write(b"x" * 1000); f.flush(); os._exit(9)
        torch.save = die
        checkpoint.save({{"format": checkpoint.FORMAT, "iter": 2}}, {path!r})
    """)
    rc = subprocess.run([sys.executable, "-c", script], cwd=ROOT).returncode
    assert rc == 9
    assert checkpoint.load(path)["iter"] == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_cpu_ranks_eager_and_graph_mode(tmp_path):
    """Two gloo ranks, eager DDP then ``--cuda-graphs`` (uncaptured on CPU: the step broadcasts rank 0's
    buffers and all-reduces gradients itself). Graph mode pads ground truth to ``gt_capacity`` slots,
    which changes which RoIs are sampled, so the eager reference pads the same way (the bucket of these
    64 px images is 64 x 64); both then see the same per-rank batches and random numbers, and graph
    mode must log the losses eager DDP logs and end on the same weights."""
    script = tmp_path / "ddp_train.py"
    eager, graph = tiny(tmp_path / "eager", iters=3), tiny(tmp_path / "graph", iters=3, cuda_graphs=True)
    script.write_text(textwrap.dedent(f"""
        import json, os, torch
        torch.set_num_threads(1)
        import torch.distributed as dist
        import maskrcnn_fast.train as train_module
        from maskrcnn_fast.model import MaskRCNN
        from maskrcnn_fast.train import TrainConfig, train
        built, build = [], train_module.build_model
        train_module.build_model = lambda *a, **kw: built.append(build(*a, **kw)) or built[-1]
        unpadded = MaskRCNN.transform
        def padded(self, images, targets, padded_hw=None, gt_capacity=None):
            if targets is not None:  # training: pad as the graph-mode bucket does
                padded_hw, gt_capacity = (64, 64), {graph.gt_capacity}
            return unpadded(self, images, targets, padded_hw, gt_capacity)
        MaskRCNN.transform = padded
        dist.init_process_group("gloo")  # one group for both runs (train() leaves a group it did not make)
        from maskrcnn_fast.distributed import average_across_ranks, broadcast_from_rank0
        r = dist.get_rank()
        nhwc = (torch.arange(120.0).view(2, 3, 4, 5) * (r + 1)).to(memory_format=torch.channels_last)
        ints, grads = torch.arange(4) + 100 * r, torch.tensor([1.0, -2.0]) * (r + 1)
        broadcast_from_rank0([nhwc, ints])
        average_across_ranks([grads])
        torch.save([nhwc, ints, grads], os.path.join({str(tmp_path)!r}, f"collectives{{r}}.pt"))
        # host-side agreements: a step every rank must take alike, and the bucket of a graph-mode step
        import sys
        sys.path.insert(0, "tests")
        from maskrcnn_fast.distributed import Dist
        from test_graphs import _batch, _stepper
        from test_model import tiny_model
        ddp = Dist(torch.device("cpu"))
        MaskRCNN.transform = unpadded  # the stepper pads to its own buckets
        agreed = [ddp.all_true(r == 0), ddp.all_true(True)]
        told = []
        stepper = _stepper(tiny_model().train(), warn=told.append)
        wide, tall = ((64, 80), (60, 90)), ((80, 64), (90, 60))
        stepper.step(*_batch(0, wide if r == 0 else tall))  # rank 0 wide, rank 1 tall: both run uncaptured
        stepper.step(*_batch(1, wide))  # both wide: the bucket
        torch.save([agreed, told, stepper.fallbacks, stepper.disagreements, len(stepper.buckets)],
                   os.path.join({str(tmp_path)!r}, f"agreements{{r}}.pt"))
        MaskRCNN.transform = padded
        for name, cfg in (("eager", {json.dumps(eager.__dict__)!r}), ("graph", {json.dumps(graph.__dict__)!r})):
            metrics = train(TrainConfig(**json.loads(cfg)))
            torch.save(dict(built.pop().named_buffers()), os.path.join({str(tmp_path)!r},
                                                                      f"{{name}}-buffers{{os.environ['RANK']}}.pt"))
            with open(os.path.join({str(tmp_path)!r}, f"{{name}}-rank{{os.environ['RANK']}}.json"), "w") as f:
                json.dump(metrics, f)
        dist.destroy_process_group()
    """))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           str(script)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for r in (0, 1):  # the coalesced collectives of graph mode, any memory format and dtype
        nhwc, ints, grads = torch.load(tmp_path / f"collectives{r}.pt")
        assert torch.equal(nhwc, torch.arange(120.0).view(2, 3, 4, 5)) and nhwc.is_contiguous(
            memory_format=torch.channels_last)
        assert torch.equal(ints, torch.arange(4)) and torch.equal(grads, torch.tensor([1.5, -3.0]))
        agreed, told, fallbacks, disagreements, buckets = torch.load(tmp_path / f"agreements{r}.pt")
        assert agreed == [False, True], r
        assert (fallbacks, disagreements, buckets) == (1, 1, 1 + r), r  # rank 1 also made its "tall" bucket
        assert len(told) == 1 and told[0].startswith("iteration 1: another rank's batch goes to another bucket")
    for name in ("eager", "graph"):
        out = tmp_path / name
        assert [r["iter"] for r in records(out)] == [1, 2, 3]
        with open(tmp_path / f"{name}-rank0.json") as f0, open(tmp_path / f"{name}-rank1.json") as f1:
            m0, m1 = json.load(f0), json.load(f1)
        assert m0 == m1  # metrics are computed from all ranks' predictions, the same on every rank
        with open(out / "metrics.json") as f:
            assert json.load(f)["segm"] == m0["segm"]
        ckpt = checkpoint.load(str(out / "last.pt"))
        assert len(ckpt["rng"]) == 2 and ckpt["iter"] == 3
    for a, b in zip(records(tmp_path / "eager"), records(tmp_path / "graph")):
        for k in ("loss",) + LOSS_TERMS:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["iter"], k)
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-12)
    for r in (0, 1):  # BatchNorm statistics: rank 0's broadcast before every forward, as DDP does
        want, got = (torch.load(tmp_path / f"{name}-buffers{r}.pt") for name in ("eager", "graph"))
        assert any("running_mean" in k for k in want)
        for k, v in want.items():
            torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-6, msg=f"rank {r} {k}")
    want = checkpoint.load(str(tmp_path / "eager" / "last.pt"))["model"]
    got = checkpoint.load(str(tmp_path / "graph" / "last.pt"))["model"]
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-6, msg=k)
