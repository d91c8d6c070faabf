"""Under torchrun: each rank reads SHARDS in evaluation mode (as every ``tcjepa eval`` split is
read) and writes the keys it saw to OUT/rank_R.json; tests/test_distributed.py checks that the
ranks' keys are disjoint and cover the data set once."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(shards: str, out: str, workers: int) -> None:
    from data_pipelines.loader import LoaderSpec, make_loader, resolve_shards
    from tcjepa.distributed import init_distributed

    info = init_distributed()
    spec = LoaderSpec(resolve_shards(shards), 5, 16, train=False, rank=info.rank, world_size=info.world_size,
                      workers=workers)
    keys = [k for batch in make_loader(spec) for k in batch["keys"]]
    Path(out, f"rank_{info.rank}.json").write_text(json.dumps(keys))
    from tcjepa.distributed import shutdown

    shutdown()  # as `tcjepa` does, so that no rank aborts at interpreter teardown


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
