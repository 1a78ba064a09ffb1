"""One training step: forward under autocast, the multi-task loss, backward, gradient clipping
and the optimizers' steps; eager, or replayed from a CUDA graph.

    step = TrainStep(model, optimizers, grad_clip=1.0, cuda_graphs=True)
    loss = step(batch)          # batch on the model's device; the step's loss, detached
    step(batch, loss_scale=0)   # a worker out of batches standing in for a DDP step (train_worker.py)

Eager, a step issues about 2,000 kernel launches and its optimizers loop over hundreds of
parameters in Python; where the GPU finishes before the host, the host sets the pace
(bench/RESULTS.md, "GPU training"). With `cuda_graphs` the forward, loss, backward, clipping
and the steps of the capturable optimizers (Adam made with `capturable=True`: the dense
parameters) are recorded once and replayed with one call; the others (Adagrad on the embedding
tables: a few launches) step eagerly after the replay. A graph replays fixed kernels on fixed
buffers, so the batches must share one shape: pad them where they are collated
(`mtfm.model.padding.GrowingShape`). A batch of a new shape is copied into new static buffers
and captured: one eager forward and backward on a side stream first (first-time work: Triton
compiles, cuBLAS's choices), then the captured optimizers' state is made for every parameter
that now has a gradient (a capture must not allocate it: each replay would zero it again), then
the capture; the previous graph and its memory go. A batch of the graph's shape is copied into
its static buffers (one device copy) and replayed. The gradients are the graph's own buffers,
written by each replay, so the graphed step never zeroes them.

Graphs need one worker (no DDP: its gradient all-reduce runs inside backward) and a step with
no host synchronisation (the Triton kernels; the PyTorch reference kernels synchronise). Steps
that keep parameters or some of their columns frozen (a warm start's `freeze_loaded_steps`) run eagerly. On a
CPU device nothing is captured: the graphed path runs eagerly on the same static buffers (the
padding, the copies into them), which the CPU tests check; the capture itself is tested on GPU.
"""
from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mtfm.model import TokenBatch, multitask_bce_loss


@dataclass
class FrozenColumns:
    """Columns of a 2-D parameter kept as they are while the rest of it trains (a warm start's first
    tokenizer layer: the columns of the features it loaded). Their gradient is zeroed before the
    optimizers step (no momentum builds up there from the loss) and their values are written back
    after it: weight decay moves a parameter whose gradient is zero. The optimizers' per-element
    state there (Adam's moments, which hold the decay term) is zeroed too."""

    param: nn.Parameter
    index: Tensor
    values: Tensor

    @classmethod
    def of(cls, param: nn.Parameter, columns: list[int]) -> "FrozenColumns":
        index = torch.tensor(columns, dtype=torch.long, device=param.device)
        return cls(param, index, param.detach().index_select(1, index).clone())


@dataclass
class _Graph:
    key: tuple
    static_input: Tensor  # the batch's bytes on the device (`TokenBatch.pack`)
    batch: TokenBatch     # viewing static_input
    loss: Tensor | None = None
    graph: "torch.cuda.CUDAGraph | None" = None


def _captured(opt: torch.optim.Optimizer) -> bool:
    """Whether a graph can hold this optimizer's step: Adam's family with device-side step counts."""
    return isinstance(opt, torch.optim.Adam) and all(g.get("capturable") for g in opt.param_groups)


class TrainStep:
    """Forward, loss, backward and update of `model` (called through `module`, e.g. its DDP wrapper)."""

    def __init__(self, model: nn.Module, optimizers: Collection[torch.optim.Optimizer], *,
                 module: nn.Module | None = None, grad_clip: float | None = 1.0, cuda_graphs: bool = False):
        self.model, self.module = model, module if module is not None else model
        self.optimizers, self.grad_clip, self.cuda_graphs = list(optimizers), grad_clip, cuda_graphs
        if cuda_graphs and isinstance(self.module, nn.parallel.DistributedDataParallel):
            raise ValueError("cuda_graphs needs one worker: DDP all-reduces gradients inside backward")
        self.captures = 0
        self._graph: _Graph | None = None
        self._frozen_columns: Collection[FrozenColumns] = ()  # of the step whose update is next

    def __call__(self, batch: TokenBatch, frozen: Collection[nn.Parameter] = (), loss_scale: float = 1.0,
                 frozen_columns: Collection[FrozenColumns] = ()) -> Tensor:
        loss = self.gradients(batch, frozen, loss_scale=loss_scale, frozen_columns=frozen_columns)
        self.update()
        return loss

    def gradients(self, batch: TokenBatch, frozen: Collection[nn.Parameter] = (),
                  mark: Callable[[], None] | None = None, loss_scale: float = 1.0,
                  frozen_columns: Collection[FrozenColumns] = ()) -> Tensor:
        """Sets every parameter's gradient for `batch` (None for `frozen` ones, zero in `frozen_columns`,
        whose values the next `update` writes back) and returns the loss, detached (a tensor of its
        own). A graph replay also clips and steps the captured optimizers.
        `mark` is called between forward and backward (eager only). The gradients are those of
        `loss_scale` x the loss: DDP averages them over the workers, so the workers that hold a
        batch scale by world size / their number and the others stand in with 0 (train_worker.py)."""
        self._frozen_columns = frozen_columns
        if self.cuda_graphs and not frozen and not frozen_columns:
            if loss_scale != 1.0:
                raise ValueError(f"cuda_graphs: a graphed step takes no loss_scale (found {loss_scale}): it runs "
                                 "on one worker")
            return self._replay(batch).clone()
        self._graph = None  # its gradient buffers stop being the parameters' below
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        loss = self._forward_backward(batch, mark=mark, loss_scale=loss_scale)
        for p in frozen:
            p.grad = None  # the optimizers skip it
        for columns in frozen_columns:
            if columns.param.grad is not None:
                columns.param.grad.index_fill_(1, columns.index, 0.0)
        return loss

    def update(self) -> None:
        """Clips the gradients and steps the optimizers (after a replay: those the graph does not hold)."""
        replayed = self._graph is not None and self._graph.graph is not None
        if self.grad_clip and not replayed:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        for opt in self.optimizers:
            if not (replayed and _captured(opt)):
                opt.step()
        with torch.no_grad():
            for columns in self._frozen_columns:
                columns.param.index_copy_(1, columns.index, columns.values)
                for opt in self.optimizers:  # Adam's weight decay enters its moments: the thaw finds them at zero
                    for state in opt.state.get(columns.param, {}).values():
                        if torch.is_tensor(state) and state.shape == columns.param.shape:
                            state.index_fill_(1, columns.index, 0.0)
        self._frozen_columns = ()

    def _forward_backward(self, batch: TokenBatch, cache: bool = True,
                          mark: Callable[[], None] | None = None, loss_scale: float = 1.0) -> Tensor:
        with self.model.autocast(batch.device.type, cache=cache):
            output = self.module(batch)
        loss, _ = multitask_bce_loss(output, batch)
        if mark is not None:
            mark()
        if loss.requires_grad:  # a batch with no labelled target has nothing to learn from
            (loss if loss_scale == 1.0 else loss * loss_scale).backward()
        return loss.detach()

    def _replay(self, batch: TokenBatch) -> Tensor:
        key = tuple((t.dtype, t.shape) for t in batch.tensors())
        entry = self._graph
        if entry is None or entry.key != key:
            self._graph = entry = None  # the old graph goes before the new one takes memory of its own
            entry = self._graph = self._capture(batch, key)
        else:
            batch.pack(out=entry.static_input)
        if entry.graph is not None:
            entry.graph.replay()
        else:
            self._clear_gradients()
            entry.loss = self._forward_backward(entry.batch)
        return entry.loss

    def _clear_gradients(self) -> None:
        for p in self.model.parameters():
            p.grad = None

    def _capture(self, batch: TokenBatch, key: tuple) -> _Graph:
        static_input = batch.pack()
        entry = _Graph(key, static_input, batch.unpack(static_input))
        self._clear_gradients()
        if static_input.device.type != "cuda":
            return entry
        device = static_input.device
        torch.cuda.empty_cache()  # the old graph's pool
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            self._forward_backward(entry.batch, cache=False)
        torch.cuda.current_stream(device).wait_stream(side)
        for opt in self.optimizers:
            if _captured(opt):
                _make_state(opt)
        self._clear_gradients()
        torch.cuda.empty_cache()  # the warm-up's blocks: the graph takes its memory from its own pool
        entry.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(entry.graph, capture_error_mode="thread_local"):
                entry.loss = self._forward_backward(entry.batch, cache=False)
                if self.grad_clip:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
                for opt in self.optimizers:
                    if _captured(opt):
                        opt.step()
        except RuntimeError as exc:
            raise RuntimeError("cuda_graphs: capturing the training step failed; a step that waits for the GPU "
                               "(a .item(), .tolist(), or the PyTorch reference kernels: attention_impl or "
                               "norm_impl 'reference') cannot be captured; use the Triton kernels or set "
                               f"cuda_graphs: false ({exc})") from exc
        self.captures += 1
        return entry


@torch.no_grad()
def _make_state(opt: torch.optim.Optimizer) -> None:
    """Makes Adam's state for each parameter that has a gradient and none yet, changing no value:
    one real step, then every parameter and state tensor back as it was (a new state to its
    initial zeros), in place, so that the graph captured next reads and writes these tensors."""
    params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
    if all(opt.state.get(p) for p in params):
        return
    saved = {p: (p.clone(), {k: v.clone() for k, v in opt.state.get(p, {}).items() if torch.is_tensor(v)})
             for p in params}
    opt.step()
    for p, (value, state) in saved.items():
        p.copy_(value)
        for name, t in opt.state[p].items():
            if not torch.is_tensor(t):
                continue
            if name in state:
                t.copy_(state[name])
            else:
                t.zero_()
