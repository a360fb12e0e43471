"""Recipe 2/3: train LocDiff on CLIP embeddings of MP16 (or any dataset file).

    python python/train.py --train data/mp16.safetensors --val data/im2gps3k.safetensors --out runs/mp16
    torchrun --nproc_per_node=8 python/train.py --train data/mp16.safetensors --out runs/mp16   # multi-GPU

Defaults are our choices for MP16-scale data (the paper's exact hyperparameters are not public; see
README "Design choices"): L=64, CS-UNet widths 2048-1024-512, 200k steps of batch 512.
"""

import argparse

import torch

from locdiff_ext import LocDiff, LocDiffConfig
from locdiff_ext.data import open_dataset
from locdiff_ext.calibrate import calibrate_and_save
from locdiff_ext.selection import tune_and_save
from locdiff_ext.train import Trainer, TrainConfig


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train", required=True)
    p.add_argument("--val", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--L", type=int, default=64)
    p.add_argument("--widths", type=int, nargs="+", default=[2048, 1024, 512])
    p.add_argument("--steps", type=int, default=200_000)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--eval-every", type=int, default=5000)
    p.add_argument("--checkpoint-every", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--retrieval-k", type=int, default=0, help="LocDiff-R: condition on the k most similar training "
                                                               "rows (needs --val when --train is a store)")
    p.add_argument("--overwrite", action="store_true", help="delete the run in --out and start afresh "
                                                             "(default: resume it; refused if its settings differ)")
    args = p.parse_args(argv)

    train = open_dataset(args.train)  # a store (`locdiff store build`) is read memory-mapped
    val = open_dataset(args.val) if args.val else None
    torch.manual_seed(args.seed)
    model = LocDiff(LocDiffConfig(cond_dim=train.dim, L=args.L, widths=tuple(args.widths), retrieval_k=args.retrieval_k))
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, eval_every=args.eval_every,
                      checkpoint_every=args.checkpoint_every, seed=args.seed,
                      warmup_steps=min(2000, max(1, args.steps // 10)))
    trainer = Trainer(model, train, args.out, cfg, val_data=val)
    trainer.fit(overwrite=args.overwrite)
    if trainer.rank == 0:
        if val is not None:  # LocDiff-R: its prior weight and hybrid radius; every model: its regions and radii
            tune_and_save(trainer.ema, val, f"{args.out}/final", seed=args.seed)
            calibrate_and_save(trainer.ema, val, f"{args.out}/final", seed=args.seed)
        print(f"model saved to {args.out}/final")


if __name__ == "__main__":
    main()
