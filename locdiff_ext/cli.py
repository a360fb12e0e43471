"""Console script ``locdiff``: demo | train | eval | predict | store | bench (``locdiff <command> --help``).

``train`` reads an (embeddings, coords) file or store, ``eval`` prints the metrics table of a model on
one, ``store`` builds, indexes and checks the on-disk embedding stores that large datasets are read from, ``predict`` geolocates images or embedding files, ``bench`` times the kernels and a sampling
step here.  Multi-GPU: ``torchrun --nproc_per_node=N -m locdiff_ext train ...``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch


def _device(value: str) -> str:
    """--device: 'cpu', 'cuda' or 'cuda:N', refused here (exit status 2) when no such GPU is visible."""
    try:
        dev = torch.device(value)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a device: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{value!r}: no CUDA GPU is visible to torch (a CPU build of torch, "
                                             "or no GPU): use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{value!r}: there are {torch.cuda.device_count()} GPUs")
    elif dev.type != "cpu":
        raise argparse.ArgumentTypeError(f"{value!r}: only cpu and cuda devices are supported")
    return value


def _positive_int(value: str) -> int:
    try:
        v = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _timeit(fn, min_time: float = 0.2, max_reps: int = 50) -> float:
    """Median seconds per call over repeated calls (after one warm-up)."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_time and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


BENCH_OUTPUT_BYTES = 1 << 30  # the basis output per timed call: `locdiff bench` stays under ~2 GB at any L


def _bench(args) -> int:
    from importlib.metadata import version
    from .kernels import has_cuda, sh_basis, shdd_decode, shdd_encode
    from .kernels._loader import _C
    from .kernels.reference import great_circle_km, sh_basis_ref

    device = torch.device(args.device)
    if device.type == "cuda" and not (torch.cuda.is_available() and has_cuda()):
        print("locdiff bench: --device cuda needs a GPU and a CUDA build of locdiff_ext", file=sys.stderr)
        return 2
    dtype = torch.float32 if args.dtype == "float32" else torch.float64
    g = torch.Generator().manual_seed(0)
    n, B = (20_000, 64) if args.quick else (100_000, 256)
    z = torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1
    coords = torch.stack([torch.rad2deg(torch.asin(z)), torch.rand(n, generator=g, dtype=torch.float64) * 360 - 180], 1)
    print(f"locdiff_ext {version('locdiff_ext')}: {device}, {args.dtype}, CPU threads {_C.num_threads()}, "
          f"CUDA kernels compiled: {has_cuda()}")
    print(f"{'L':>5} {'N':>7} {'sh_basis':>12} {'ns/coef':>8} {'max err':>9} {'shdd_decode B=' + str(B):>20} "
          f"{'max km':>8}")
    budget = BENCH_OUTPUT_BYTES if not args.quick else BENCH_OUTPUT_BYTES // 4
    for L in args.degrees:
        m = max(B, min(n, budget // ((L + 1) ** 2 * (4 if dtype == torch.float32 else 8))))  # points at this L
        c = coords[:m].to(device=device, dtype=dtype)
        t_basis = _timeit(lambda: sh_basis(c, L))
        ref = sh_basis_ref(c[:200].cpu().double(), L)
        err = (sh_basis(c[:200], L).cpu().double() - ref).abs().max().item()
        x = shdd_encode(c[:B], L)
        t_dec = _timeit(lambda: shdd_decode(x))
        modes, _ = shdd_decode(x)
        km = great_circle_km(modes[:, 0].cpu(), coords[:B]).max().item()
        ns = t_basis / (m * (L + 1) ** 2) * 1e9
        print(f"{L:>5} {m:>7} {t_basis * 1e3:>9.2f} ms {ns:>8.3f} {err:>9.1e} {t_dec * 1e3:>17.2f} ms {km:>8.1e}")
    _bench_sampling(device, args.quick)
    return 0


def _bench_sampling(device: torch.device, quick: bool = False) -> None:
    """One DDIM step (network + x0 update) and one full geolocate call of a default-size model
    (``quick``: 8 inputs x 4 samples instead of 64 x 16)."""
    from .locdiff import LocDiff, LocDiffConfig

    n, S = (8, 4) if quick else (64, 16)
    for L in (16, 32):
        model = LocDiff(LocDiffConfig(cond_dim=512, L=L)).to(device).eval()
        emb = torch.randn(n, 512, device=device)
        t_step = _timeit(lambda: model.sample(model.condition(emb), 1, steps=1))
        t_full = _timeit(lambda: model.predict(emb, num_samples=S), min_time=0.5, max_reps=5)
        print(f"L={L:<3} K={model.shdd.dim:<5} one sampling step, {n} inputs: {t_step * 1e3:8.2f} ms   "
              f"geolocate {n} inputs x {S} samples x {model.config.sample_steps} steps: {t_full * 1e3:8.1f} ms "
              f"({t_full / n * 1e3:.2f} ms per input)")


# ---------------------------------------------------------------------- train / eval / predict


def _load_data(path: str, coords: Optional[str]):
    """An embedding store directory (opened memory-mapped) or a data file (read into memory)."""
    from .data import open_dataset

    return open_dataset(path, coords)


def _store(args) -> int:
    from .data.index import GalleryIndex, recall_at_k
    from .data.store import EmbeddingStore, build_store

    if args.store_command == "build":
        store = build_store(args.source, args.out, args.coords, args.dtype, overwrite=args.overwrite,
                            progress=not args.no_progress)
        print(f"wrote {store} ({store.nbytes() / 1e6:,.1f} MB)")
        return 0
    store = EmbeddingStore(args.store)
    if args.store_command == "index":
        index = GalleryIndex.build(store, args.kind, nprobe=args.nprobe, progress=not args.no_progress)
        index.save()
        g = torch.Generator().manual_seed(0)
        q = store.take(torch.randint(0, len(store), (min(1000, len(store)),), generator=g)).embeddings
        q = q + 0.05 * q.norm(dim=1, keepdim=True) / q.shape[1] ** 0.5 * torch.randn(q.shape, generator=g)
        r = recall_at_k(index, q / q.norm(dim=1, keepdim=True), 8)
        print(f"{store.path}: index {index.kind} saved; recall@8 against exact search on {len(q)} perturbed rows: {r:.3f}")
    elif args.store_command == "verify":
        store.verify()
        print(f"{store}: every byte matches its content SHA-256")
    else:  # info
        print(json.dumps(dict(store.header, path=str(store.path), bytes_on_disk=store.nbytes(),
                              files=sorted(p.name for p in store.path.iterdir())), indent=1))
    return 0


def _train(args) -> int:
    from .locdiff import LocDiff, LocDiffConfig
    from .train import Trainer, TrainConfig

    cfg_file = json.loads(Path(args.config).read_text()) if args.config else {}
    if not isinstance(cfg_file, dict) or not all(isinstance(v, dict) for v in cfg_file.values()):
        raise ValueError('--config: expected {"model": {...}, "train": {...}}')
    unknown = sorted(set(cfg_file) - {"model", "train"})
    if unknown:
        raise ValueError(f"--config: unknown sections {unknown} (expected 'model' and 'train')")
    data = _load_data(args.data, args.coords)
    val = _load_data(args.val, args.val_coords) if args.val else None
    model_cfg = dict(cfg_file.get("model", {}))
    model_cfg["cond_dim"] = data.dim
    for key in ("L", "widths", "dropout", "loss", "prediction", "cond_drop_prob", "retrieval_k", "retrieval_metric"):
        if getattr(args, key) is not None:
            model_cfg[key] = getattr(args, key)
    train_cfg = dict(cfg_file.get("train", {}))
    for key in ("steps", "batch_size", "lr", "eval_every", "checkpoint_every", "seed"):
        if getattr(args, key) is not None:
            train_cfg[key] = getattr(args, key)
    if "steps" not in train_cfg:  # scale with the data: about 50 epochs, within [1000, 20000] steps
        batch = train_cfg.get("batch_size", TrainConfig.batch_size)
        train_cfg["steps"] = int(min(20_000, max(1_000, round(50 * len(data) / max(1, batch)))))
        print(f"locdiff train: {train_cfg['steps']} steps, about {train_cfg['steps'] * batch / len(data):.0f} epochs "
              f"of {len(data)} rows (the default scales with the data; --steps to choose)", file=sys.stderr)
    train_config = TrainConfig.from_dict(train_cfg)
    torch.manual_seed(train_config.seed)  # the initial weights, reproducibly
    model = LocDiff(LocDiffConfig.from_dict(model_cfg))
    trainer = Trainer(model, data, args.out, train_config, val, progress=not args.no_progress, device=args.device)
    trainer.fit(resume=not args.no_resume, overwrite=args.overwrite)
    if trainer.rank == 0:
        if val is not None:  # LocDiff-R: its prior weight and hybrid radius; every model: its regions and radii
            from .calibrate import calibrate_and_save
            from .selection import tune_and_save

            tune_and_save(trainer.ema, val, Path(args.out) / "final", seed=train_config.seed)
            calibrate_and_save(trainer.ema, val, Path(args.out) / "final", seed=train_config.seed)
        print(f"model saved to {Path(args.out) / 'final'}")
    return 0


def _model_dir(path: str) -> Path:
    """A save_pretrained directory, or a training run's out_dir (its final/ or newest checkpoint)."""
    from .data.checkpoint import MANIFEST, latest_checkpoint

    p = Path(path)
    if (p / MANIFEST).is_file() or not p.is_dir():
        return p
    if (p / "final" / MANIFEST).is_file():
        return p / "final"
    return latest_checkpoint(p) or p


def _load_model(args):
    from .inference import default_model_dir
    from .locdiff import LocDiff

    path = _model_dir(args.model) if args.model else default_model_dir()
    if not args.model:
        if not path.exists():
            raise FileNotFoundError(f"no --model given and no demo model at {path}: run `locdiff demo` first")
        print(f"locdiff {args.command}: no --model given: using the demo model at {path}", file=sys.stderr)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return LocDiff.from_pretrained(path, map_location=device)


def _eval(args) -> int:
    from .evaluation import geolocation_metrics, markdown_table, write_report

    if args.json and Path(args.json).is_dir():
        raise ValueError(f"--json: {args.json!r} is a directory; give the name of the JSON file to write")
    model = _load_model(args)
    data = _load_data(args.data, args.coords)
    preds, truth = [], []
    for part in data.chunks(65536):  # a store is read a chunk at a time
        coords, _, _ = model.predict(part.embeddings, num_samples=args.num_samples, steps=args.steps,
                                     batch_size=args.batch_size, seed=args.seed, progress=not args.no_progress,
                                     hybrid=args.hybrid, prior_weight=args.prior_weight)
        preds.append(coords[:, 0])
        truth.append(part.coords)
    rows = {"LocDiff": geolocation_metrics(torch.cat(preds), torch.cat(truth))}
    print(markdown_table(rows))
    if args.json:
        write_report(args.json, rows, {"model": str(args.model), "data": args.data})
        print(f"wrote {args.json} and {Path(args.json).with_suffix('.md')}")
    return 0


def _calibrate(args) -> int:
    from .calibrate import calibrate_and_save
    from .evaluation.conformal import coverage_table
    from .inference import default_model_dir

    model = _load_model(args)
    path = _model_dir(args.model) if args.model else default_model_dir()
    data = _load_data(args.data, args.coords)
    report = calibrate_and_save(model, data, path, seed=args.seed, rows=args.rows, map_size=tuple(args.map_size),
                                batch_size=args.batch_size, progress=not args.no_progress,
                                num_samples=args.num_samples, steps=args.steps, hybrid=args.hybrid,
                                prior_weight=args.prior_weight)
    if report is None:
        raise ValueError(f"data: {len(data)} rows are too few to calibrate on")
    print(coverage_table({"raw maps (on the calibration rows)": report["raw"],
                          "calibrated (in sample: >= the level by construction)": report["in_sample"]}))
    print(f"saved into {path}/calibration.json; candidate signals (geometric-mean 90% area, km^2, cross-fitted): "
          + ", ".join(f"{k} {v:.3g}" for k, v in report["candidates"].items()))
    return 0


def _predict(args) -> int:
    from .inference import geolocate

    missing = [p for p in args.inputs if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"input file(s) not found: {', '.join(missing)}")
    model = _load_model(args)
    emb_files = [p for p in args.inputs if Path(p).suffix.lower() in (".npy", ".npz")]
    if emb_files and len(emb_files) != len(args.inputs):
        raise ValueError("inputs: pass either image files or embedding files (.npy/.npz), not both")
    if emb_files:
        from .data import read_embeddings

        arrays = [read_embeddings(f) for f in emb_files]
        inputs = torch.cat(arrays)
        names = [f"{f}[{i}]" for f, a in zip(emb_files, arrays) for i in range(len(a))]
    else:
        inputs, names = list(args.inputs), list(args.inputs)
    results = geolocate(inputs, model=model, top_k=args.top_k, num_samples=args.num_samples, steps=args.steps,
                        batch_size=args.batch_size, seed=args.seed, progress=not args.no_progress,
                        hybrid=args.hybrid, prior_weight=args.prior_weight)
    records = []
    for n, r in zip(names, results):
        rec = {"input": n, "modes": [{"lat": a, "lon": b, "score": s} for a, b, s in r.modes], "calibrated": r.calibrated}
        if r.calibrated:  # the conformal radius around the answer: "within 180 km, 90%"
            rec["radius_km"] = {f"{p:g}": r.radius_km(p) for p in (0.5, 0.9)}
        records.append(rec)
    if not any(r.calibrated for r in results) and results:
        print(f"locdiff predict: no radius shown: {results[0].uncalibrated_reason}", file=sys.stderr)
    if args.json:
        print(json.dumps(records, indent=1))
    else:
        for rec in records:
            modes = "  ".join(f"({m['lat']:.4f}, {m['lon']:.4f}) score {m['score']:.3f}" for m in rec["modes"])
            rad = rec.get("radius_km")
            where = f"  [within {rad['0.5']:,.0f} km: 50%; {rad['0.9']:,.0f} km: 90%]" if rad else ""
            print(f"{rec['input']}: {modes or 'no mode found'}{where}")
    return 0


def _demo(args) -> int:
    from .datasets.demo import DemoConfig, run_demo

    cfg = DemoConfig.quick(encoder=args.encoder) if args.quick else DemoConfig(encoder=args.encoder)
    if args.retrieval_k is not None:
        if args.retrieval_k < 0:
            raise ValueError(f"--retrieval-k must be >= 0, got {args.retrieval_k}")
        cfg.retrieval_k = args.retrieval_k
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    run_demo(cfg, out=args.out, progress=not args.no_progress)
    return 0


def _add_inference_flags(p) -> None:
    p.add_argument("--model", help="directory written by save_pretrained or a training out_dir "
                                    "(default: the demo model)")
    p.add_argument("--num-samples", type=int, default=None, help="diffusion samples per input (default: model config)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: model config)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=_device, default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines (stderr)")
    p.add_argument("--hybrid", action=argparse.BooleanOptionalAction, default=None,
                   help="LocDiff-H (retrieval models): snap each answer to the most similar gallery entry near it "
                        "(default: as saved with the model)")
    p.add_argument("--prior-weight", type=float, default=None,
                   help="retrieval models: the kNN density's share of the answer, 0-1 (default: as saved)")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="locdiff", description="LocDiff geolocalization")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a LocDiff model on an (embeddings, coords) file or store",
                       description="Train on DATA (a store directory from `locdiff store build`, read "
                                   "memory-mapped; or .npz/.safetensors with 'embeddings' and 'coords', .parquet "
                                   "with lat/lon and embedding columns, or .npy embeddings with --coords).")
    p.add_argument("data")
    p.add_argument("--coords", help=".npy of [N, 2] (lat, lon) when DATA is an .npy of embeddings")
    p.add_argument("--val", help="validation data (default: a random split of DATA)")
    p.add_argument("--val-coords")
    p.add_argument("--out", required=True, help="output directory: checkpoints, history.json, final/; a run "
                                                "already there is resumed if its settings and data match")
    p.add_argument("--config", help='JSON file {"model": {LocDiffConfig fields}, "train": {TrainConfig fields}}')
    p.add_argument("--L", type=int, help="SH degree")
    p.add_argument("--widths", type=int, nargs="+", help="CS-UNet widths, e.g. 1024 512 256")
    p.add_argument("--dropout", type=float)
    p.add_argument("--loss", choices=["shdd_kl", "mse"])
    p.add_argument("--prediction", choices=["x0", "epsilon"])
    p.add_argument("--cond-drop-prob", type=float)
    p.add_argument("--retrieval-k", type=int, help="LocDiff-R: condition on the k most similar training rows (default 0)")
    p.add_argument("--retrieval-metric", choices=("cosine", "learned"),
                   help="LocDiff-R's search: cosine similarity (default) or a query map fitted on the training rows")
    p.add_argument("--steps", type=int, help="optimisation steps (default: about 50 epochs, 1,000 to 20,000)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", type=_device, default=None, help="cpu or cuda (default: cuda if available; under torchrun "
                                                   "each process takes its LOCAL_RANK's GPU)")
    p.add_argument("--no-resume", action="store_true",
                   help="start a fresh run; refused where OUT holds a run, unless --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the run in OUT (checkpoints, final/, history.json) and start afresh")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="metrics of a model on an (embeddings, coords) file")
    p.add_argument("data")
    p.add_argument("--coords")
    p.add_argument("--json", help="also write the metrics as JSON (and a .md table beside it)")
    _add_inference_flags(p)
    p.set_defaults(func=_eval)

    p = sub.add_parser("predict", help="geolocate image files or embedding files (.npy/.npz)")
    p.add_argument("inputs", nargs="+")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    _add_inference_flags(p)
    p.set_defaults(func=_predict)

    p = sub.add_parser("calibrate", help="calibrate a model's credible regions and radii on held-out data",
                       description="Split conformal calibration (per group of inputs by how localizable they "
                                   "are): on DATA (validation rows the model never trained on, never the test "
                                   "set) the model's 90% region and radius are fitted to hold the truth 90% of the "
                                   "time; saved into the model directory (calibration.json) and used by geolocate "
                                   "and `locdiff predict` with the same inference settings.")
    p.add_argument("data")
    p.add_argument("--coords")
    p.add_argument("--rows", type=_positive_int, default=2000, help="calibration rows drawn from DATA (default 2000)")
    p.add_argument("--map-size", type=_positive_int, nargs=2, default=[180, 360], metavar=("NLAT", "NLON"),
                   help="the probability maps' grid that regions are calibrated on (default 180 360, geolocate's)")
    _add_inference_flags(p)
    p.set_defaults(func=_calibrate)

    p = sub.add_parser("demo", help="train and evaluate on real satellite images (Blue Marble), offline",
                       description="Builds the Blue Marble crop dataset, embeds it with a frozen image encoder, "
                                   "chooses settings on validation crops, trains LocDiff and the baselines, prints "
                                   "the test table and the calibration of credible regions, writes map and "
                                   "reliability PNGs and saves the model that geolocate() and `locdiff predict` use "
                                   "by default.")
    p.add_argument("--quick", action="store_true", help="the one-minute version (smaller data, fewer steps)")
    p.add_argument("--out", help="output directory (default: $LOCDIFF_HOME, else ~/.cache/locdiff)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="CPU threads for torch and the kernels (one OpenMP runtime; default: every core)")
    p.add_argument("--retrieval-k", type=int, default=None,
                   help="neighbours a retrieval-conditioned LocDiff sees (default 8; 0: the paper's plain LocDiff)")
    p.add_argument("--encoder", choices=["efficientnet", "cnn"], default="efficientnet",
                   help="image features: frozen ImageNet EfficientNet-Lite0 (default, the paper's setting) or "
                        "a small CNN trained on the training crops' geography")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_demo)

    p = sub.add_parser("store", help="on-disk embedding stores for large datasets: build | index | verify | info",
                       description="A store is a directory of .npy files (float16/float32 embeddings, float64 "
                                   "coords) that train, eval and the gallery of a retrieval model read memory-mapped.")
    ssub = p.add_subparsers(dest="store_command", required=True)
    q = ssub.add_parser("build", help="write a store from a data file or an embedding cache")
    q.add_argument("source", help=".npz/.safetensors/.parquet, an .npy of embeddings (with --coords), or an "
                                  "embedding cache directory (embed_images; with --coords)")
    q.add_argument("out", help="the store directory to write")
    q.add_argument("--coords", help=".npy of [N, 2] (lat, lon) for an .npy or a cache")
    q.add_argument("--dtype", choices=["float16", "float32"], default="float16",
                   help="embedding dtype on disk (default float16: half the disk and page cache)")
    q.add_argument("--overwrite", action="store_true")
    q.add_argument("--no-progress", action="store_true")
    q = ssub.add_parser("index", help="build the gallery index of a store (exact, or FAISS above 200k x 768)")
    q.add_argument("store")
    q.add_argument("--kind", help="'exact' or a FAISS factory string (default: by size, see data/index.py)")
    q.add_argument("--nprobe", type=_positive_int, default=16)
    q.add_argument("--no-progress", action="store_true")
    q = ssub.add_parser("verify", help="re-read every byte of a store and check its content hash")
    q.add_argument("store")
    q = ssub.add_parser("info", help="a store's header and files")
    q.add_argument("store")
    p.set_defaults(func=_store)

    p = sub.add_parser("bench", help="time the SH kernels and a sampling step on this machine")
    p.add_argument("--device", type=_device, default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--degrees", type=int, nargs="+", default=[16, 64, 128], metavar="L")
    p.add_argument("--quick", action="store_true", help="smaller problem sizes")
    p.set_defaults(func=_bench)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, ImportError, OSError) as exc:  # OSError: missing files, full disks, permissions
        print(f"locdiff {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
