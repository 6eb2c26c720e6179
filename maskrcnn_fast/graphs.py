"""A training step captured whole in a CUDA graph, once per shape bucket, and replayed (MLPerf's main lever).

What varies between batches of one bucket is data, never shape or control flow:

    bucket = (B, Hp, Wp, G): B images of one aspect-ratio group (wide w >= h, or tall), padded to
             the largest size the transform can produce for that group, ground truth padded to G slots
    step   = forward (autocast, no weight-cast cache) + backward + gradient clipping + fused SGD, with
             * the learning rate computed on the device from an iteration counter on the device,
             * the update skipped on the device when a loss is not finite (fused SGD's ``found_inf``),
             * the loss values written to a ring buffer on the device,
             so the host never waits: it reads the ring buffer once per ``READ_EVERY`` steps (one sync),
             and before every checkpoint or evaluation.

On CUDA the first step of a bucket runs eagerly on a side stream (Triton compiles its kernels, caches
fill, momentum buffers are created) and is captured at once, in the same call: nothing can run between
the warm-up and the capture (another bucket's step, an evaluation at other sizes) and evict a cache
entry the capture needs, which would then be rebuilt from host data inside the capture and fail it.
That holds for every shape-keyed cache, present or future, whatever its eviction policy. Every later
step of the bucket is a copy of the batch into the bucket's static inputs plus one replay. On CPU the
same code runs uncaptured, so CI tests its logic (tests/test_graphs.py also records on CPU what CUDA would
capture, and counts its syncs and tensors made from host data). A batch that fits no bucket (too many
objects, a mixed or short batch) runs the same step uncaptured, with a one-line warning: never a silently
wrong result.

With several processes (torchrun) the step does DDP's work itself, inside what is captured: rank 0's
buffers are broadcast before the forward, and one all-reduce after the backward averages the
gradients together with the loss values, so every rank clips, skips a non-finite step and updates
alike (:mod:`maskrcnn_fast.distributed`).

Tensors a captured graph reads are kept alive by the bucket (anchors, folded frozen-BN affines), so a
cache dropping them later (evaluation at other sizes) cannot hand their memory to someone else.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

from maskrcnn_fast.distributed import (average_across_ranks, broadcast_from_rank0, host_group, process_group_world,
                                       same_on_all_ranks)
from maskrcnn_fast.errors import UserError
from maskrcnn_fast.model import (DoesNotFitError, _as_image_list, _check_target_values, _check_targets,
                                 _to_device)
from maskrcnn_fast.schedule import LOSS_TERMS, lr_factor, lr_factor_tensor

READ_EVERY = 20  # steps between reads of the loss ring buffer (the only host sync of graph mode)


def bucket_shapes(cfg) -> list[tuple[int, int]]:
    """Padded ``(H, W)`` per aspect-ratio group: wide images (w >= h) are resized to at most
    ``min_size`` x ``max_size``, tall ones to the transpose; one shape when both are the same."""
    d = cfg.size_divisible
    short, long = -(-cfg.min_size // d) * d, -(-cfg.max_size // d) * d
    return [(short, long)] if short == long else [(short, long), (long, short)]


@dataclass
class _Bucket:
    shape: tuple                       # (B, Hp, Wp, G)
    inputs: tuple | None = None        # static batch, image_hw, gt dict
    graph: object = None               # torch.cuda.CUDAGraph once captured
    keep: list = field(default_factory=list)


class GraphedTrainStep:
    """Bucketed training steps, captured (CUDA) or run as the same code uncaptured (CPU).

    Takes over ``optimizer`` (an ``SGD``): its learning rate becomes a device tensor written inside
    the step, its update fused (``fused=True``: a tensor lr and ``found_inf`` without a host sync).
    ``scheduler`` only has its ``last_epoch`` kept in step, for the checkpoint.
    """

    def __init__(self, model, optimizer, scheduler, *, base_lr: float, total: int, warmup: int, schedule: str,
                 clip_grad: float | None, amp_dtype, batch_size: int, gt_capacity: int, start_iter: int = 0,
                 warn=print, capture: bool | None = None, read_every: int = READ_EVERY):
        device = next(model.parameters()).device
        if amp_dtype == torch.float16:
            raise UserError("--cuda-graphs needs bf16 or fp32 (fp16 needs a GradScaler, whose step syncs); "
                            "this GPU has no bf16: use --no-amp")
        if not isinstance(optimizer, torch.optim.SGD) or len(optimizer.param_groups) != 1:
            raise UserError("--cuda-graphs steps a single-group torch.optim.SGD")
        self.model, self.optimizer, self.scheduler, self.device = model, optimizer, scheduler, device
        self.capture = device.type == "cuda" if capture is None else capture
        self.base_lr, self.total, self.warmup, self.schedule = base_lr, total, warmup, schedule
        self.clip_grad, self.amp_dtype, self.warn = clip_grad, amp_dtype, warn
        self.batch_size, self.gt_capacity, self.window = batch_size, gt_capacity, read_every
        self.shapes = bucket_shapes(model.cfg)
        self.buckets: dict[tuple, _Bucket] = {}
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.world = process_group_world()  # 0: no process group, no collectives
        self.host_group = host_group() if self.world else None
        if self.world:  # as DDP does when it wraps a model: every rank starts from rank 0's weights
            broadcast_from_rank0(list(model.parameters()) + list(model.buffers()))
        # buffers the forward updates (BatchNorm's running statistics); the frozen ones never change, and
        # rewriting them would only invalidate the folded frozen-BN affines every step
        self.running_stats = [b for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                              for b in m.buffers(recurse=False)]
        # device state, written only inside the step
        self.it = start_iter
        self.it_t = torch.full((), start_iter, dtype=torch.int64, device=device)
        self.lr_t = torch.zeros((), dtype=torch.float32, device=device)  # fused SGD reads a float32 lr
        self.found_inf = torch.zeros((), dtype=torch.float32, device=device)
        self.history = torch.zeros(read_every, 6, dtype=torch.float32, device=device)
        self.pending, self.fallbacks, self.disagreements, self._t_read = 0, 0, 0, time.perf_counter()
        group = optimizer.param_groups[0]
        group.update(lr=self.lr_t, fused=True, foreach=False)
        optimizer.found_inf = self.found_inf  # fused SGD skips the whole update while this is 1

    # ------------------------------------------------------------------ the step
    def _body(self, batch, image_hw, gt) -> None:
        """Forward, backward, clip, lr, update, log: device work only (what is captured)."""
        if self.world and self.running_stats:  # DDP's broadcast_buffers: rank 0's BatchNorm statistics
            broadcast_from_rank0(self.running_stats)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None,
                            cache_enabled=False):  # a weight-cast cache would outlive the capture
            losses = self.model.losses(batch, image_hw, gt)
        terms = [losses[k] for k in LOSS_TERMS]
        loss = sum(terms)  # as the eager loop sums them
        values = torch.stack([loss] + terms).detach().float()
        loss.backward()
        if self.world:  # one all-reduce: gradients and logged losses averaged over ranks
            for p in self.params:  # a parameter this rank did not use gets DDP's zero gradient
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            average_across_ranks([p.grad for p in self.params] + [values])
        self.found_inf.copy_(~torch.isfinite(values).all())  # the same on every rank after the average
        if self.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad)
        self.lr_t.copy_(self.base_lr * lr_factor_tensor(self.it_t, self.total, self.warmup, self.schedule))
        self.optimizer.step()
        self.history.index_copy_(0, (self.it_t % self.window).view(1), values.view(1, -1))
        self.it_t += 1

    def _eager(self, inputs) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self._body(*inputs)

    def _warm_up_and_capture(self, bucket: _Bucket) -> None:
        """A bucket's first step: run for real, eagerly, then captured at once (see the module docstring).
        The capture only records; the graph first replays at the bucket's next step."""
        with self._side_stream():
            self._eager(bucket.inputs)
        self.optimizer.zero_grad(set_to_none=True)  # backward allocates .grad in the graph's pool
        bucket.graph, recording = self._new_graph()
        with recording:
            self._body(*bucket.inputs)
        bucket.keep = self._cached_tensors()

    @contextlib.contextmanager
    def _side_stream(self):
        """Warm-up runs off the capture's stream, as capture wants."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            yield
        torch.cuda.current_stream(self.device).wait_stream(stream)

    def _new_graph(self):
        """``(graph, context that records into it)``; tests replace this to check what is recorded on CPU."""
        graph = torch.cuda.CUDAGraph()
        # thread_local: the data loader's pinning thread may call CUDA while we capture
        return graph, torch.cuda.graph(graph, capture_error_mode="thread_local")

    def step(self, images, targets, read: bool = False) -> list:
        """One training iteration on a list of device images and their targets. Returns :meth:`read`'s
        rows when ``read`` is set or the ring buffer is full (one host sync), else ``[]`` (none)."""
        images = _as_image_list(images)
        _check_targets(images, targets)
        bucket, inputs, why = self._prepare(images, targets)
        if self.world:
            # NCCL wants every rank to replay the same captured collectives, or none: each rank decides from
            # its own batch (wide or tall, fits or not), so they agree first, on the host, or all run uncaptured
            plan = -1 if bucket is None else self.shapes.index(bucket.shape[1:3])
            if not same_on_all_ranks(plan, self.host_group) and bucket is not None:  # every rank asks
                bucket, why = None, "another rank's batch goes to another bucket or to none"
                self.disagreements += 1
        if bucket is None:
            self.fallbacks += 1
            other = why.startswith("another rank")  # frequent with two aspect-ratio groups: 1st, 101st, ... told
            if not other or self.disagreements % 100 == 1:
                count = f" ({self.disagreements} such steps so far)" if other else ""
                self.warn(f"iteration {self.it + 1}: {why}; this step runs uncaptured{count}")
            self._eager(inputs)
        elif bucket.graph is not None:
            bucket.graph.replay()
        elif not self.capture:
            self._eager(bucket.inputs)
        else:
            self._warm_up_and_capture(bucket)
        self.it += 1
        self.pending += 1
        if self.scheduler is not None:
            self.scheduler.last_epoch = self.it
        return self.read() if read or self.pending == self.window else []

    def _prepare(self, images, targets):
        """``(bucket, inputs, None)`` with the batch copied into the bucket's static inputs, or
        ``(None, inputs, reason)`` for a batch that fits no bucket (padded to its own size)."""
        model = self.model
        wide = [im.shape[-1] >= im.shape[-2] for im in images]
        shape, why = None, None
        if len(images) != self.batch_size:
            why = f"a batch of {len(images)} images (buckets hold {self.batch_size})"
        elif len(self.shapes) == 1 or all(wide) or not any(wide):
            shape = self.shapes[0] if len(self.shapes) == 1 or all(wide) else self.shapes[1]
        else:
            why = "the batch mixes wide and tall images"
        prepared = None
        if shape is not None:
            try:
                prepared = model.transform(images, targets, padded_hw=shape, gt_capacity=self.gt_capacity)
            except DoesNotFitError as e:
                why = str(e)
        if prepared is None:
            prepared = model.transform(images, targets)
        batch, sizes, gt = prepared
        _check_target_values(gt, model.cfg.num_classes)
        inputs = (batch, _to_device(sizes, batch.device), gt)
        if why is not None:
            return None, inputs, why
        key = (len(images), *shape, self.gt_capacity)
        bucket = self.buckets.setdefault(key, _Bucket(key))
        if bucket.inputs is None:
            bucket.inputs = (torch.empty_like(inputs[0]), torch.empty_like(inputs[1]),
                             {k: torch.empty_like(v) for k, v in inputs[2].items()})
        static_batch, static_hw, static_gt = bucket.inputs
        static_batch.copy_(inputs[0])
        static_hw.copy_(inputs[1])
        for k, v in inputs[2].items():
            static_gt[k].copy_(v)
        return bucket, bucket.inputs, None

    def release(self) -> None:
        """Free every captured graph (they replay no more; a later step of a bucket captures again). Call it
        before destroying a process group: NCCL (>= 2.26) waits in ``destroy_process_group`` for every graph
        that captured one of its collectives to be destroyed, so a live graph there hangs forever."""
        for bucket in self.buckets.values():
            if bucket.graph is not None:
                bucket.graph.reset()
            bucket.graph, bucket.keep = None, []

    def _cached_tensors(self) -> list:
        """Tensors from the model's caches that the step just captured reads (see the module docstring)."""
        keep = list(self.model.rpn._anchor_cache.values())
        keep += [dict(m._affine_cache) for m in self.model.modules() if hasattr(m, "_affine_cache")]
        return keep

    # ------------------------------------------------------------------ reading the losses
    def read(self) -> list[tuple[int, list[float], float, float]]:
        """``(iteration, [loss, *LOSS_TERMS], lr, seconds)`` for every step since the last read, in
        order; one host sync. ``seconds`` is the wall time since the last read, shared evenly."""
        if not self.pending:
            return []
        rows = self.history.tolist()
        now = time.perf_counter()
        dt, self._t_read = (now - self._t_read) / self.pending, now
        out = [(it + 1, rows[it % self.window], self.base_lr * lr_factor(it, self.total, self.warmup, self.schedule),
                dt) for it in range(self.it - self.pending, self.it)]
        self.pending = 0
        return out


def for_training(cfg, model, optimizer, scheduler, base_lr: float, total: int, amp_dtype, start: int,
                 warn) -> GraphedTrainStep:
    """The graph-mode step of ``train --cuda-graphs`` (a :class:`maskrcnn_fast.train.TrainConfig`)."""
    if cfg.gt_capacity < 1:
        raise UserError(f"--gt-capacity must be >= 1, got {cfg.gt_capacity}")
    return GraphedTrainStep(model, optimizer, scheduler, base_lr=base_lr, total=total, warmup=cfg.warmup_iters,
                            schedule=cfg.schedule, clip_grad=cfg.clip_grad, amp_dtype=amp_dtype,
                            batch_size=cfg.batch_size, gt_capacity=cfg.gt_capacity, start_iter=start, warn=warn)
