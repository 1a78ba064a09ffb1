"""The dynamic mask builder against hand-worked examples (MTGR's figure: H, R and T tokens)."""

import torch

from mtfm.kernels.mask import TokenKind, build_dynamic_mask

H, R, T = TokenKind.H, TokenKind.R, TokenKind.T


def test_token_kind_values():
    """The Triton attention kernels count a user's H and R rows by these values (`_user_block`)."""
    assert (H, R, T) == (0, 1, 2)


def test_mtgr_figure_case_and_a_second_user_with_a_tie():
    # User 0: 2 history, 2 realtime, 3 targets of two scenarios (A: ts 150, 250; B: ts 120).
    # User 1: a target whose ts ties with the realtime event, which it must not see.
    kind = torch.tensor([H, H, R, R, T, T, T, H, R, T], dtype=torch.int8)
    ts = torch.tensor([10, 20, 100, 200, 150, 250, 120, 5, 50, 50])
    offsets = torch.tensor([0, 7, 10])
    #                 keys: H0 H1 R0 R1 T0 T1 T2      query
    expected_user0 = [[1, 1, 0, 0, 0, 0, 0],  # H0 ts 10: all history, itself
                      [1, 1, 0, 0, 0, 0, 0],  # H1 ts 20
                      [1, 1, 1, 0, 0, 0, 0],  # R0 ts 100: history, itself
                      [1, 1, 1, 1, 0, 0, 0],  # R1 ts 200: history, R0 (100 < 200), itself
                      [1, 1, 1, 0, 1, 0, 0],  # T0 ts 150: history, R0, itself; not R1 (200)
                      [1, 1, 1, 1, 0, 1, 0],  # T1 ts 250: history, both R, itself
                      [1, 1, 1, 0, 0, 0, 1]]  # T2 ts 120: history, R0, itself
    expected_user1 = [[1, 0, 0],  # H ts 5
                      [1, 1, 0],  # R ts 50
                      [1, 0, 1]]  # T ts 50: R's ts is not strictly earlier
    masks = build_dynamic_mask(offsets, kind, ts)
    assert len(masks) == 2
    assert masks[0].dtype == torch.bool
    assert torch.equal(masks[0], torch.tensor(expected_user0, dtype=torch.bool))
    assert torch.equal(masks[1], torch.tensor(expected_user1, dtype=torch.bool))


def test_empty_user_gets_an_empty_mask():
    masks = build_dynamic_mask(torch.tensor([0, 0, 1]), torch.tensor([T], dtype=torch.int8), torch.tensor([3]))
    assert masks[0].shape == (0, 0)
    assert torch.equal(masks[1], torch.ones(1, 1, dtype=torch.bool))


def test_the_kernel_benchmarks_pair_count_is_the_masks():
    """bench/kernels.py's TFLOP/s figures rest on its own count of visible pairs: it must be the mask's."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_kernels", Path(__file__).parents[2] / "bench" / "kernels.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for length, seed in ((80, 1), (200, 2)):
        batch = bench.make_batch(length, 3, 2, 1, 8, torch.float32, "cpu", seed=seed)
        masks = build_dynamic_mask(batch["offsets"], batch["kind"], batch["ts"])
        full = sum(int(m.sum()) for m in masks)
        target = sum(int(m[-batch["n_t"]:].sum()) for m in masks)
        assert bench.visible_pairs(batch) == (full, target)
