"""The ceiling a self-supervised run is measured against: the same encoder trained *with* the
labels (cross-entropy on its mean-pooled features, horizontal flips, AdamW with a linear warm-up)
for a given number of steps, scored on the val split. If the encoder cannot learn a label in N
supervised steps, a self-supervised run of N steps will not either (RESULTS.md, "Small budgets").

    python benchmarks/supervised_ceiling.py --data data/scenes3k --val-data data/val --label label --steps 1000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    from data_pipelines.loader import normalize
    from tcjepa.eval.common import lookup, read_split
    from tcjepa.models.vit import build_encoder

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--val-data", required=True)
    p.add_argument("--label", default="label", help="KEY.json key (dotted) to train and score on")
    p.add_argument("--encoder", default="vit_tiny_8")
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="append the result as one JSON line here")
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    train, val = read_split(args.data, args.image_size, "--data"), read_split(args.val_data, args.image_size, "--val-data")
    values = [lookup(m, args.label) for m in train.metas], [lookup(m, args.label) for m in val.metas]
    names = sorted(set(values[0]) | set(values[1]), key=str)
    index = {n: i for i, n in enumerate(names)}
    y_train, y_val = (torch.tensor([index[v] for v in vs]) for vs in values)
    encoder = build_encoder(args.encoder, args.image_size, depth=args.depth)
    head = nn.Linear(encoder.embed_dim, len(names))
    opt = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=args.lr, weight_decay=0.05)
    t0 = time.time()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / max(args.warmup, 1))
        rows = torch.randint(0, len(y_train), (args.batch_size,))
        x = normalize(train.images[rows])
        flip = torch.rand(len(rows)) < 0.5
        x[flip] = x[flip].flip(-1)
        loss = F.cross_entropy(head(encoder(x).mean(1)), y_train[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
    encoder.eval()
    with torch.no_grad():
        pred = torch.cat([head(encoder(normalize(val.images[i:i + 256])).mean(1)).argmax(1)
                          for i in range(0, len(y_val), 256)])
    out = {"label": args.label, "encoder": args.encoder, "steps": args.steps, "lr": args.lr, "seed": args.seed,
           "val_top1": round((pred == y_val).float().mean().item(), 3),
           "majority": round(torch.bincount(y_val).max().item() / len(y_val), 3),
           "final_loss": round(loss.item(), 3), "seconds": round(time.time() - t0)}
    print(json.dumps(out))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
