"""Graph-mode training (maskrcnn_fast.graphs): shape buckets, the on-device step, ``train --cuda-graphs``.

On CPU the step runs uncaptured (the same code a GPU captures), on the PyTorch backend; every check
compares against plain PyTorch: ``model.losses`` + ``torch.optim.SGD`` + ``LambdaLR`` + clipping.
The ``gpu`` tests capture and replay on CUDA and compare with the same step run eagerly.
"""
import contextlib
import copy

import pytest
import torch
import torch.distributed as dist

import kernels
from maskrcnn_fast import MaskRCNNConfig, checkpoint, rpn
from maskrcnn_fast.errors import NonFiniteLossError, UserError
from maskrcnn_fast.syncs import count_syncs
from maskrcnn_fast.graphs import GraphedTrainStep, bucket_shapes, for_training, lr_factor_tensor
from maskrcnn_fast.train import LOSS_TERMS, lr_factor, train
from test_model import NUM_CLASSES, tiny_model
from test_train import records, tiny

BASE_LR, TOTAL, WARMUP = 0.02, 10, 2


@pytest.fixture(autouse=True)
def torch_backend():
    with kernels.use_backend("torch"):
        yield


def _batch(seed, sizes=((64, 80), (60, 90)), objects=(1, 3), device="cpu"):
    """Images of the given sizes with 1..3 random objects each (``objects`` bounds the count)."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for h, w in sizes:
        n = int(torch.randint(objects[0], objects[1] + 1, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.5, h * 0.5])
        boxes = torch.cat([xy, xy + 8 + torch.rand(n, 2, generator=g) * torch.tensor([w * 0.4, h * 0.4])], 1)
        masks = torch.zeros(n, h, w, dtype=torch.uint8)
        for i, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
            masks[i, y1:y2, x1 + (x2 - x1) // 3:x2] = 1
        images.append(torch.rand(3, h, w, generator=g).to(device))
        targets.append({"boxes": boxes.to(device), "masks": masks.to(device),
                        "labels": torch.randint(1, NUM_CLASSES, (n,), generator=g).to(device)})
    return images, targets


def _sgd(model):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=BASE_LR, momentum=0.9, weight_decay=1e-4)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda it: lr_factor(it, TOTAL, WARMUP, "cosine"))


def _stepper(model, capture=False, amp_dtype=None, gt_capacity=4, warn=print):
    opt, sched = _sgd(model)
    return GraphedTrainStep(model, opt, sched, base_lr=BASE_LR, total=TOTAL, warmup=WARMUP, schedule="cosine",
                            clip_grad=0.5, amp_dtype=amp_dtype, batch_size=2, gt_capacity=gt_capacity,
                            warn=warn, capture=capture)


def test_bucket_shapes_hold_every_resized_image_of_their_group():
    assert bucket_shapes(MaskRCNNConfig(min_size=800, max_size=1333)) == [(800, 1344), (1344, 800)]
    assert bucket_shapes(MaskRCNNConfig(min_size=128, max_size=128)) == [(128, 128)]
    model = tiny_model()  # min_size 64, max_size 96
    wide, tall = bucket_shapes(model.cfg)
    for h, w in ((50, 200), (64, 64), (33, 97), (480, 640), (63, 64), (10, 11)):
        for hh, ww, shape in ((h, w, wide), (w, h, tall)):
            batch, sizes, _ = model.transform([torch.rand(3, hh, ww)], None, padded_hw=shape)
            assert tuple(batch.shape[-2:]) == shape and sizes[0][0] <= shape[0] and sizes[0][1] <= shape[1]


@pytest.mark.parametrize("schedule", ["cosine", "multistep"])
@pytest.mark.parametrize("warmup", [0, 7])
def test_lr_schedule_on_device_equals_host(schedule, warmup):
    for it in range(0, 130, 3):
        got = float(lr_factor_tensor(torch.tensor(it), 90, warmup, schedule))
        assert got == pytest.approx(lr_factor(it, 90, warmup, schedule), rel=1e-12, abs=1e-15), it


@contextlib.contextmanager
def _one_rank_group(backend, tmp_path, before_destroy=()):
    """A one-rank process group; ``before_destroy`` holds graph-mode steps to release first, also when the
    block fails (NCCL's destroy waits for every graph that captured its collectives: a hang, not a failure)."""
    dist.init_process_group(backend, init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        for step in before_destroy:
            step.release()
        dist.destroy_process_group()


@pytest.mark.parametrize("group", [None, "gloo"])
def test_step_equals_plain_pytorch_training(group, tmp_path):
    """Three steps (sampling, clipping, momentum, weight decay, warm-up + cosine lr) against plain PyTorch;
    also inside a one-rank process group, where the step broadcasts buffers and all-reduces gradients."""
    torch.manual_seed(0)
    model = tiny_model().train()
    ref = copy.deepcopy(model)
    with _one_rank_group(group, tmp_path) if group else contextlib.nullcontext():
        _three_steps_equal_plain_pytorch(model, ref)


def _three_steps_equal_plain_pytorch(model, ref):
    step = _stepper(model)
    assert step.world == dist.is_initialized()
    ref_opt, ref_sched = _sgd(ref)
    ref_params = [p for p in ref.parameters() if p.requires_grad]
    for i in range(3):
        images, targets = _batch(i)
        torch.manual_seed(100 + i)
        (row_it, values, lr, _), = step.step(images, targets, read=True)
        torch.manual_seed(100 + i)
        batch, sizes, gt = ref.transform(images, targets, padded_hw=(64, 96), gt_capacity=4)
        losses = ref.losses(batch, torch.tensor(sizes, dtype=torch.float32), gt)
        loss = sum(losses[k] for k in LOSS_TERMS)
        want_lr = ref_opt.param_groups[0]["lr"]
        ref_opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref_params, 0.5)
        ref_opt.step()
        ref_sched.step()
        assert row_it == i + 1 and lr == pytest.approx(want_lr, rel=1e-12)
        assert float(step.lr_t) == pytest.approx(want_lr, rel=1e-6)
        want = [float(loss.detach())] + [float(losses[k].detach()) for k in LOSS_TERMS]
        assert values == pytest.approx(want, rel=1e-5, abs=1e-7)
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)
    assert step.fallbacks == 0 and len(step.buckets) == 1
    assert ref_sched.last_epoch == step.scheduler.last_epoch == 3


def _poison(model, term: str, at_call: int):
    """``model`` whose ``losses`` returns NaN for ``term`` on its ``at_call``-th call (and only then)."""
    real_losses, calls = model.losses, [0]

    def poisoned(*args):
        out = real_losses(*args)
        calls[0] += 1
        return {**out, term: out[term] * float("nan")} if calls[0] == at_call else out

    model.losses = poisoned
    return model


def test_non_finite_step_is_skipped_on_the_device():
    torch.manual_seed(0)
    model = _poison(tiny_model().train(), "loss_box_reg", at_call=2)
    step = _stepper(model)
    step.step(*_batch(0))
    before = [p.detach().clone() for p in model.parameters()]
    momentum = [s["momentum_buffer"].clone() for s in step.optimizer.state.values()]
    step.step(*_batch(1))
    assert float(step.found_inf) == 1.0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before)), "a NaN step changed weights"
    assert all(torch.equal(s["momentum_buffer"], m) for s, m in zip(step.optimizer.state.values(), momentum))
    step.step(*_batch(2))
    assert float(step.found_inf) == 0.0 and not all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    rows = step.read()
    assert [r[0] for r in rows] == [1, 2, 3]
    finite = [all(v == v and abs(v) != float("inf") for v in r[1]) for r in rows]
    assert finite == [True, False, True]


@pytest.mark.parametrize("case, match", [
    ("objects", "more than the capacity 1"),
    ("mixed", "mixes wide and tall"),
    ("short", "a batch of 1 images"),
])
def test_batch_that_fits_no_bucket_runs_uncaptured_with_a_one_line_warning(case, match):
    torch.manual_seed(0)
    model = tiny_model().train()
    ref = copy.deepcopy(model)
    warnings = []
    step = _stepper(model, gt_capacity=1 if case == "objects" else 4, warn=warnings.append)
    sizes = {"objects": ((64, 80), (60, 90)), "mixed": ((64, 80), (90, 60)), "short": ((64, 80),)}[case]
    images, targets = _batch(3, sizes, objects=(2, 3))
    torch.manual_seed(7)
    (_, values, _, _), = step.step(images, targets, read=True)
    assert len(warnings) == 1 and "\n" not in warnings[0] and match in warnings[0], warnings
    assert warnings[0].startswith("iteration 1: ") and step.fallbacks == 1 and not step.buckets
    # the uncaptured step is the eager model's: same losses as model(images, targets)
    torch.manual_seed(7)
    want = ref(images, targets)
    assert values[1:] == pytest.approx([float(want[k]) for k in LOSS_TERMS], rel=1e-5, abs=1e-7)


# ---------------------------------------------------------------------- what CUDA would capture, on CPU
WIDE, TALL = ((64, 80), (60, 90)), ((80, 64), (90, 60))


class _CPUGraph:
    """Stands in for a CUDA graph on CPU: replay runs its bucket's step again (uncaptured)."""

    def __init__(self, step):
        self.step, self.replays = step, 0

    def replay(self):
        bucket = next(b for b in self.step.buckets.values() if b.graph is self)
        self.replays += 1
        self.step._eager(bucket.inputs)

    def reset(self):  # a CUDA graph frees its memory here (GraphedTrainStep.release)
        self.replays = -1


class _RecordingStep(GraphedTrainStep):
    """Graph mode's control flow on CPU (``capture=True``): where CUDA would capture, the step's Python runs
    under ``count_syncs``, which sees what capture would fail on (a sync, a tensor made from host data, a
    copy between devices). The body really runs there, once more: only the counts are checked."""

    def __init__(self, model):
        opt, sched = _sgd(model)
        super().__init__(model, opt, sched, base_lr=BASE_LR, total=TOTAL, warmup=WARMUP, schedule="cosine",
                         clip_grad=0.5, amp_dtype=None, batch_size=2, gt_capacity=4, capture=True)
        self.recorded = []  # (iteration, SyncCounts) of every step CUDA would capture

    def _side_stream(self):
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _recording(self):
        with count_syncs() as counts:
            yield
        self.recorded.append((self.it + 1, counts))

    def _new_graph(self):
        return _CPUGraph(self), self._recording()


def _evaluate(model, device="cpu"):
    model.eval()
    with torch.no_grad():
        model(_batch(50, sizes=((96, 72), (72, 96)), device=device)[0])  # other sizes than any bucket
    model.train()


@pytest.mark.parametrize("anchor_cache_size", [1, rpn.ANCHOR_CACHE_SIZE])
@pytest.mark.parametrize("order", ["wide tall wide tall", "wide eval wide", "tall eval wide tall wide"])
def test_what_cuda_would_capture_makes_no_sync_and_no_host_tensor(order, anchor_cache_size, monkeypatch):
    """For any order of buckets and evaluations, the step CUDA captures creates no tensor from host data,
    copies nothing between devices and never syncs; with a one-entry anchor cache too (every other shape
    evicts the entry), since capture follows its own warm-up in the same call. Every bucket is captured
    once, and its later steps replay."""
    monkeypatch.setattr(rpn, "ANCHOR_CACHE_SIZE", anchor_cache_size)
    torch.manual_seed(0)
    # the mask branch on every positive slot, as on CUDA (CPU's default compacts positives with a free sync)
    step = _RecordingStep(tiny_model(mask_branch_positives_only=False).train())
    for i, what in enumerate(order.split()):
        if what == "eval":
            _evaluate(step.model)
        else:
            step.step(*_batch(i, sizes=WIDE if what == "wide" else TALL))
    buckets = sorted({w for w in order.split() if w != "eval"})
    assert len(step.recorded) == len(buckets) == len(step.buckets), step.recorded
    for it, counts in step.recorded:
        assert counts.ops > 0
        assert counts.host_data == 0, (it, counts.host_data_sites)
        assert counts.syncs == 0, (it, counts.sync_sites)
    steps = [w for w in order.split() if w != "eval"]
    assert sum(b.graph.replays for b in step.buckets.values()) == len(steps) - len(buckets)
    assert step.fallbacks == 0


def test_release_frees_every_graph_and_runs_before_the_process_group_is_destroyed():
    """``release`` drops every captured graph (a later step captures again); ``Dist.close`` calls it before
    ``destroy_process_group``, which NCCL blocks while a graph holding its collectives lives."""
    from maskrcnn_fast.distributed import Dist

    torch.manual_seed(0)
    step = _RecordingStep(tiny_model(mask_branch_positives_only=False).train())
    step.step(*_batch(0, sizes=WIDE))
    step.step(*_batch(1, sizes=TALL))
    assert len(step.recorded) == 2 and all(b.graph is not None for b in step.buckets.values())
    graphs = [b.graph for b in step.buckets.values()]
    step.release()
    assert all(b.graph is None and not b.keep for b in step.buckets.values())
    assert all(g.replays == -1 for g in graphs)  # each was reset
    step.step(*_batch(2, sizes=WIDE))
    assert len(step.recorded) == 3
    order = []
    ddp = Dist(torch.device("cpu"))
    ddp.before_close.append(lambda: order.append("release"))
    ddp.close()
    assert order == ["release"]


def test_fp16_and_a_bad_capacity_are_refused():
    with pytest.raises(UserError, match="bf16"):
        _stepper(tiny_model(), amp_dtype=torch.float16)
    with pytest.raises(UserError, match="--gt-capacity must be >= 1"):
        for_training(tiny("unused", cuda_graphs=True, gt_capacity=0), None, None, None, 0.01, 4, None, 0, print)


# ---------------------------------------------------------------------- train --cuda-graphs (uncaptured on CPU)
def test_cli_flags_reach_the_train_config():
    from maskrcnn_fast import cli

    args = cli.build_parser().parse_args(["train", "--cuda-graphs", "--gt-capacity", "7"])
    cfg = cli._train_config(args)
    assert cfg.cuda_graphs and cfg.gt_capacity == 7
    assert not cli._train_config(cli.build_parser().parse_args(["train"])).cuda_graphs
    with pytest.raises(UserError, match="--gt-capacity must be >= 1"):
        cli._train_config(cli.build_parser().parse_args(["train", "--gt-capacity", "0"]))


def test_train_cuda_graphs_logs_every_iteration_and_resumes_exactly(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    train(tiny(full, iters=6, cuda_graphs=True))
    train(tiny(part, iters=6, cuda_graphs=True, stop_after=3))
    assert [r["iter"] for r in records(part)] == [1, 2, 3]
    train(tiny(part, iters=1, resume=True))  # stored settings (cuda_graphs included) win
    a, b = records(full), records(part)
    assert [r["iter"] for r in a] == [r["iter"] for r in b] == list(range(1, 7))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bitwise
    for r in a:
        assert r["lr"] == pytest.approx(0.01 * lr_factor(r["iter"] - 1, 6, 2, "cosine"), rel=1e-12)
        assert r["loss"] == pytest.approx(sum(r[k] for k in LOSS_TERMS), rel=1e-5) and r["img_s"] > 0
    ckpt = checkpoint.load(str(full / "last.pt"))
    assert ckpt["iter"] == 6 and ckpt["train_config"]["cuda_graphs"] and ckpt["scheduler"]["last_epoch"] == 6


def test_train_cuda_graphs_nan_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    import maskrcnn_fast.train as train_mod

    real_build = train_mod.build_model

    monkeypatch.setattr(train_mod, "build_model",
                        lambda *a, **kw: _poison(real_build(*a, **kw), "loss_mask", at_call=3))
    with pytest.raises(NonFiniteLossError, match=r"iteration 3: .*loss_mask=nan.*last.pt \(iteration 2\) is kept"):
        train(tiny(tmp_path, iters=6, ckpt_every=2, cuda_graphs=True))
    ckpt = checkpoint.load(str(tmp_path / "last.pt"))
    assert ckpt["iter"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert [r["iter"] for r in records(tmp_path)] == [1, 2]


# ---------------------------------------------------------------------- CUDA: capture + replay
@pytest.mark.gpu
@pytest.mark.parametrize("amp_dtype, rtol", [(None, 1e-4), (torch.bfloat16, 2e-2)])
def test_capture_and_replay_equal_eager_on_cuda(amp_dtype, rtol):
    """Step 1 runs eagerly (warm-up) and is captured at once, steps 2 and 3 replay: losses and weights
    equal the same three steps run eagerly (up to atomic-add order in RoIAlign's backward)."""
    _capture_matches_eager(amp_dtype, rtol)


@pytest.mark.gpu
def test_capture_with_nccl_collectives_equals_eager(tmp_path):
    """The same in a one-rank NCCL process group, with trainable BatchNorm: the captured step holds the
    BatchNorm-statistics broadcast, the gradient all-reduce and the host-side bucket agreement of
    multi-process graph mode (two ranks are tested on CPU, in test_train); the running statistics
    the graph updates equal eager's."""
    released = []
    with _one_rank_group("nccl", tmp_path, before_destroy=released):
        graphed, graphed_model, eager_model = _capture_matches_eager(None, 1e-4, batch_norm=True,
                                                                     captured=released)
    assert graphed.world == 1 and graphed.running_stats
    for (name, b), c in zip(graphed_model.named_buffers(), eager_model.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("order", ["wide tall wide tall", "wide eval wide", "tall eval wide tall wide"])
def test_two_buckets_and_evaluations_capture_and_replay_on_cuda(order):
    """Buckets captured in any order, with evaluations at other sizes in between (which evict anchors from
    the cache): every capture succeeds, and losses and weights equal the same steps run eagerly."""
    with kernels.use_backend("triton"):
        torch.manual_seed(0)
        graphed_model = tiny_model(mask_branch_positives_only=False).cuda().train()
        eager_model = copy.deepcopy(graphed_model)
        graphed, eager = _stepper(graphed_model, True), _stepper(eager_model, False)
        for i, what in enumerate(order.split()):
            if what == "eval":
                _evaluate(graphed_model, "cuda")
                _evaluate(eager_model, "cuda")
                continue
            images, targets = _batch(i, sizes=WIDE if what == "wide" else TALL, device="cuda")
            rows = []
            for stepper in (graphed, eager):
                torch.manual_seed(100 + i)
                rows.append(stepper.step(images, targets, read=True)[0][1])
            assert rows[0] == pytest.approx(rows[1], rel=1e-4, abs=1e-5), (i, what)
        kinds = {w for w in order.split() if w != "eval"}
        assert len(graphed.buckets) == len(kinds) and all(b.graph is not None for b in graphed.buckets.values())
        assert graphed.fallbacks == 0
        for (name, p), q in zip(graphed_model.named_parameters(), eager_model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def _capture_matches_eager(amp_dtype, rtol, batch_norm=False, captured=None):
    from maskrcnn_fast.train import _use_batch_norm

    with kernels.use_backend("triton"):
        torch.manual_seed(0)
        graphed_model = tiny_model()
        if batch_norm:
            _use_batch_norm(graphed_model.backbone)
        graphed_model = graphed_model.cuda().train()
        eager_model = copy.deepcopy(graphed_model)
        graphed, eager = _stepper(graphed_model, True, amp_dtype), _stepper(eager_model, False, amp_dtype)
        if captured is not None:
            captured.append(graphed)
        for i in range(3):
            images, targets = _batch(i, device="cuda")
            rows = []
            for stepper in (graphed, eager):
                torch.manual_seed(100 + i)
                rows.append(stepper.step(images, targets, read=True)[0][1])
            assert rows[0] == pytest.approx(rows[1], rel=rtol, abs=1e-5), i
        assert graphed.buckets and all(b.graph is not None for b in graphed.buckets.values())
        for (name, p), q in zip(graphed_model.named_parameters(), eager_model.parameters()):
            torch.testing.assert_close(p, q, rtol=rtol, atol=1e-5, msg=name)
        # later batches replay the graph: new data, new losses
        images, targets = _batch(9, device="cuda")
        before = graphed.buckets[next(iter(graphed.buckets))].graph
        assert graphed.step(images, targets, read=True)[0][1] != rows[0]
        assert graphed.buckets[next(iter(graphed.buckets))].graph is before
        eager.step(images, targets, read=True)  # the same 4 steps on both, for the caller's comparisons
    return graphed, graphed_model, eager_model
