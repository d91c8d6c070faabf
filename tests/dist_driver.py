"""Train with a world-size-invariant global batch, for the distributed-equivalence tests.

The production loader gives every rank its own shards, so a 2-process run never sees the same
global batch as a single process. To compare the *optimisation* path (gradient averaging, ZeRO
partitioning, loss reduction, EMA over gathered weights) one to one, this driver replaces the
loader with a synthetic global batch drawn from the step alone, (images and captions) of which each rank
takes its slice, and draws the masks for the whole global batch from the step alone, each rank again taking
its rows. Everything else is ``tcjepa.train.train`` unchanged.

    torchrun --nproc_per_node 2 tests/dist_driver.py RECIPE OUT KEY=VALUE ... [--stop-at N] [--resume]
    python tests/dist_driver.py RECIPE OUT KEY=VALUE ...          # the single-process reference

Because the batches and masks depend on the step only, a run stopped at step N and resumed with
another world size must also end where the uninterrupted run ends.
"""

from __future__ import annotations

import os
import sys

import torch

WORDS = ("a", "red", "blue", "green", "small", "large", "circle", "square", "star", "left", "right", "top")


def main(recipe: str, out: str, overrides: list[str], stop_at: int | None = None, resume: bool = False) -> None:
    import tcjepa.train as loop
    from tcjepa.config import load_config
    from tcjepa.masks import sample_masks

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cfg = load_config(recipe, overrides)
    global_batch, size = cfg.train.batch_size, cfg.model.image_size
    micro = global_batch // world
    mine = slice(rank * micro, (rank + 1) * micro)

    def loader(spec):
        def batches():
            step = spec.consumed
            while True:
                g = torch.Generator().manual_seed(10_000 + step)
                images = torch.randint(0, 256, (global_batch, 3, size, size), generator=g, dtype=torch.uint8)
                lengths = torch.randint(0, 7, (global_batch,), generator=g).tolist()  # some captions empty
                words = torch.randint(0, len(WORDS), (global_batch, 6), generator=g).tolist()
                captions = [" ".join(WORDS[w] for w in row[:n]) for row, n in zip(words, lengths)]
                yield {"images": images[mine], "captions": captions[mine], "skipped": {"worker": 0, "counts": {}},
                       "stream": {"role": 0, "state": {"step": step + 1}}}
                step += 1
        return batches()

    def global_masks(batch_size, grid, generator, **kw):
        masks = sample_masks(batch_size * world, grid, generator, **kw)
        return type(masks)(masks.context_idx[mine], masks.context_valid[mine], masks.target_idx[mine],
                           masks.target_valid[mine])

    loop.resolve_shards = lambda spec, key: ["<driver>"]
    loop.make_loader = loader
    loop.sample_masks = global_masks
    loop._mask_seed = lambda seed, rank, step: seed * 1_000_003 + step  # the same generator on every rank
    loop.train(cfg, out, progress=False, resume=resume, stop_at=stop_at)
    from tcjepa.distributed import shutdown

    shutdown()  # as `tcjepa` does: left to interpreter teardown, a rank can abort (SIGABRT) after its last step


if __name__ == "__main__":
    args = sys.argv[1:]
    resume = "--resume" in args
    stop_at = int(args[args.index("--stop-at") + 1]) if "--stop-at" in args else None
    rest = [a for i, a in enumerate(args) if a != "--resume" and a != "--stop-at" and (i == 0 or args[i - 1] != "--stop-at")]
    main(rest[0], rest[1], rest[2:], stop_at, resume)
    # the run is on disk and the group destroyed: skip interpreter teardown, where a C++ thread of
    # the communication backend, still joinable, can abort a rank on a loaded machine (seen once
    # in CI, "terminate called without an active exception", with everything written)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
