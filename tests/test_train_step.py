"""The training step (platform/train_step.py): the graphed path, on padded batches of a growing
shape, updates the model exactly as the eager step does; on CUDA, with the forward and backward
replayed from CUDA graphs (one capture per shape). The CUDA test is skipped without a GPU (CI)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "model"))
from model_test_utils import REPO, random_table, tiny_config  # noqa: E402
from mtfm.model import Collator, build_model  # noqa: E402
from mtfm.model.padding import GrowingShape  # noqa: E402
from mtfm.platform.registry import load_registry  # noqa: E402
from mtfm.platform.train import TrainConfig  # noqa: E402
from mtfm.platform.train_step import TrainStep  # noqa: E402
from mtfm.platform.train_worker import make_optimizers  # noqa: E402

REGISTRY = load_registry(REPO / "configs")
LENGTHS = {"history": (0, 60), "realtime": (0, 12), "hp": (1, 8), "phf": (0, 6), "sqs": (0, 4)}


def padded_batches(device):
    """Five batches padded to one growing shape. The first two have no sqs targets, so the shape has no
    sqs rows and sqs's tower no gradient; the third grows the shape (sqs rows: a new capture, and
    optimizer state for sqs's parameters), the last two fit it."""
    shapes = GrowingShape(headroom=0.1, granule=16, max_user_tokens=64)
    batches = []
    for seed, users in enumerate([6, 4, 14, 3, 5]):
        lengths = LENGTHS | ({"sqs": (0, 0)} if seed < 2 else {})
        batches.append(shapes.pad(Collator(REGISTRY)(random_table(REGISTRY, users, seed, lengths=lengths))))
        assert shapes.grown == (1 if seed < 2 else 2), seed
    assert batches[0].features["sqs"].num_tokens == 0 < batches[2].features["sqs"].num_tokens
    return [b.to(device) for b in batches]


def trained(config, batches, device, cuda_graphs):
    torch.manual_seed(0)
    model = build_model(config, REGISTRY).to(device).train()
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizers = make_optimizers(model, TrainConfig(name="t", model="m", cuda_graphs=cuda_graphs))
    step = TrainStep(model, optimizers.values(), grad_clip=1.0, cuda_graphs=cuda_graphs)
    losses = torch.stack([step(b) for b in batches])
    assert len(set(losses.tolist())) == len(batches)  # each step's loss is its own, not a shared buffer's
    return initial, dict(model.named_parameters()), losses, step.captures


def test_graphed_step_on_the_cpu_trains_as_the_eager_step():
    """On the CPU the graphed path runs its static buffers eagerly: the same updates exactly."""
    batches, cpu = padded_batches(torch.device("cpu")), torch.device("cpu")
    _, eager, eager_losses, _ = trained(tiny_config(), batches, cpu, cuda_graphs=False)
    _, graphed, graphed_losses, captures = trained(tiny_config(), batches, cpu, cuda_graphs=True)
    assert captures == 0 and torch.equal(graphed_losses, eager_losses)
    for name, p in eager.items():
        assert torch.equal(graphed[name], p), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for graphs and the Triton kernels")
def test_cuda_graphed_step_trains_as_the_eager_step_in_float32():
    config = tiny_config(compute_dtype="float32").replace(attention_impl="triton", norm_impl="triton")
    batches, cuda = padded_batches(torch.device("cuda")), torch.device("cuda")
    _, eager, eager_losses, _ = trained(config, batches, cuda, cuda_graphs=False)
    _, graphed, graphed_losses, captures = trained(config, batches, cuda, cuda_graphs=True)
    assert captures == 2  # one per shape
    torch.testing.assert_close(graphed_losses, eager_losses, rtol=0, atol=1e-5)
    for name, p in eager.items():
        torch.testing.assert_close(graphed[name], p, rtol=0, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for graphs and the Triton kernels")
def test_cuda_graphed_step_trains_as_the_eager_step_under_bf16_autocast():
    """In bf16 the two runs round differently, and Adagrad's first steps move an embedding row by about
    its learning rate for any nonzero gradient, so the check is on the losses and on the dense
    parameters' total update: the graphed one within 5% of the eager one."""
    config = tiny_config(compute_dtype="bfloat16").replace(attention_impl="triton", norm_impl="triton")
    batches, cuda = padded_batches(torch.device("cuda")), torch.device("cuda")
    initial, eager, eager_losses, _ = trained(config, batches, cuda, cuda_graphs=False)
    _, graphed, graphed_losses, captures = trained(config, batches, cuda, cuda_graphs=True)
    assert captures == 2
    torch.testing.assert_close(graphed_losses, eager_losses, rtol=1e-2, atol=0)
    dense = [name for name in eager if "tables" not in name]
    update = torch.cat([(eager[n] - initial[n]).flatten() for n in dense]).norm()
    apart = torch.cat([(graphed[n] - eager[n]).flatten() for n in dense]).norm()
    assert update > 0 and apart < 0.05 * update, (float(apart), float(update))


def test_graphs_need_one_worker():
    model = build_model(tiny_config(), REGISTRY)
    ddp = torch.nn.parallel.DistributedDataParallel.__new__(torch.nn.parallel.DistributedDataParallel)
    with pytest.raises(ValueError, match="one worker"):
        TrainStep(model, [], module=ddp, cuda_graphs=True)


def _stand_in_worker(rank: int, out: str) -> None:
    """One of two DDP workers (gloo): rank 0 holds batch 0, at loss scale 2 (world size / workers
    holding a batch); rank 1 has run out and stands in with batch 1 at loss scale 0. Each saves
    its gradients after backward, i.e. after DDP's all-reduce (the average over the two)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = build_model(tiny_config(), REGISTRY).train()
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        step = TrainStep(model, make_optimizers(model, TrainConfig(name="t", model="m")).values(), module=ddp)
        batch = Collator(REGISTRY)(random_table(REGISTRY, 6, seed=10 + rank, lengths=LENGTHS))
        step.gradients(batch, loss_scale=2.0 if rank == 0 else 0.0)
        torch.save({name: p.grad for name, p in model.named_parameters()}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_a_worker_standing_in_leaves_the_gradient_of_the_worker_that_holds_a_batch(tmp_path):
    """Two real DDP workers: one holds a batch (scale 2), the other has run out and stands in with
    another batch (scale 0). Both get the gradient of the first batch alone, computed without DDP:
    the stand-in's batch adds nothing, and the average over two workers is not halved."""
    import torch.multiprocessing as mp

    mp.start_processes(_stand_in_worker, args=(str(tmp_path),), nprocs=2, start_method="spawn")
    torch.manual_seed(0)
    model = build_model(tiny_config(), REGISTRY).train()
    TrainStep(model, make_optimizers(model, TrainConfig(name="t", model="m")).values()).gradients(
        Collator(REGISTRY)(random_table(REGISTRY, 6, seed=10, lengths=LENGTHS)))
    alone = {name: p.grad for name, p in model.named_parameters()}
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in alone.values()) > len(alone) // 2
    for rank in (0, 1):
        ddp = torch.load(tmp_path / f"rank{rank}.pt")
        assert ddp.keys() == alone.keys()
        for name, grad in alone.items():
            # DDP all-reduces a gradient this worker's graph did not reach as zeros.
            expected = torch.zeros_like(ddp[name]) if grad is None else grad
            torch.testing.assert_close(ddp[name], expected, rtol=1e-5, atol=1e-7,
                                       msg=lambda m: f"rank {rank} {name}: {m}")


def test_a_graphed_step_refuses_a_loss_scale():
    model = build_model(tiny_config(), REGISTRY)
    step = TrainStep(model, make_optimizers(model, TrainConfig(name="t", model="m")).values(), cuda_graphs=True)
    with pytest.raises(ValueError, match="one worker"):
        step(Collator(REGISTRY)(random_table(REGISTRY, 2, seed=0, lengths=LENGTHS)), loss_scale=0.0)


def test_frozen_columns_stay_as_they_are_while_the_rest_of_their_parameter_trains():
    """A warm start's partly loaded first layer under freeze_loaded_steps: the frozen columns keep their
    values exactly, also under weight decay (which moves a parameter whose gradient is zero) and in a
    graphed step, which then runs eagerly; Adam's moments there stay zero (its decay term is in them);
    the other columns train."""
    from mtfm.platform.train_step import FrozenColumns

    for cuda_graphs in (False, True):
        torch.manual_seed(0)
        model = build_model(tiny_config(), REGISTRY).train()
        weight = model.tokenizer.groups["hp"].mlp[0].weight
        before = weight.detach().clone()
        kept = [0, 1, 2, 5, 9]
        optimizers = make_optimizers(model, TrainConfig(name="t", model="m", weight_decay=0.1,
                                                        cuda_graphs=cuda_graphs))
        step = TrainStep(model, optimizers.values(), grad_clip=1.0, cuda_graphs=cuda_graphs)
        frozen = [FrozenColumns.of(weight, kept)]
        for seed in range(3):
            step(Collator(REGISTRY)(random_table(REGISTRY, 4, seed, lengths=LENGTHS)), frozen_columns=frozen)
        assert torch.equal(weight.detach()[:, kept], before[:, kept])
        others = [c for c in range(weight.shape[1]) if c not in kept]
        assert (weight.detach()[:, others] - before[:, others]).abs().amax(0).min() > 0  # every other column moved
        moments = [optimizers["dense"].state[weight][key] for key in ("exp_avg", "exp_avg_sq")]
        assert all(not m[:, kept].any() and m[:, others].abs().amax(0).min() > 0 for m in moments)  # no decay kept
        # Unfrozen, the same columns train.
        step(Collator(REGISTRY)(random_table(REGISTRY, 4, 7, lengths=LENGTHS)))
        assert not torch.equal(weight.detach()[:, kept], before[:, kept])
