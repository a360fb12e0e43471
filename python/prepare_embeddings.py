"""Recipe 1/3: image CSV + images -> CLIP embeddings -> an (embeddings, coords) dataset file.

    python python/prepare_embeddings.py --csv MP16_Pro_filtered.csv --images mp16/ \
        --encoder hf:openai/clip-vit-large-patch14 --cache cache/mp16 --out data/mp16.safetensors
    python python/prepare_embeddings.py --csv im2gps3k_places365.csv --images im2gps3ktest/ \
        --encoder hf:openai/clip-vit-large-patch14 --cache cache/im2gps3k --out data/im2gps3k.safetensors

--images is a folder or a .tar archive; --encoder 'hf:<dir or cached name>' (transformers) or
'open_clip:<model>:<weights>'.  The embedding cache resumes where a killed run stopped; images that
cannot be read are skipped and listed in <cache>/failures.json.  Nothing is downloaded: the CLIP
weights must be in a local directory or already in your cache.
"""

import argparse

from locdiff_ext.data import EmbeddingDataset, build_store, read_image_csv
from locdiff_ext.encoders import embed_images, failures, load_embeddings, parse_encoder_spec


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--csv", required=True)
    p.add_argument("--images", required=True, help="image folder or .tar archive")
    p.add_argument("--encoder", required=True, help="hf:<path> or open_clip:<model>:<weights>")
    p.add_argument("--cache", required=True, help="embedding cache directory (resumable)")
    p.add_argument("--out", required=True, help="dataset to write: a store directory (any name without .npz / "
                                                "    .safetensors: read memory-mapped, for MP16-sized data) or a file")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="a store's embedding dtype")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--shard-size", type=int, default=8192)
    p.add_argument("--workers", type=int, default=8, help="image-decoding threads")
    p.add_argument("--device", default=None)
    p.add_argument("--limit", type=int, default=None, help="only the first N rows (a dry run)")
    args = p.parse_args(argv)

    refs, coords, missing = read_image_csv(args.csv, args.images)
    if missing:
        print(f"{len(missing)} rows of {args.csv} name images that are not in {args.images}: dropped")
    if args.limit:
        refs, coords = refs[: args.limit], coords[: args.limit]
    encoder = parse_encoder_spec(args.encoder)
    embed_images(encoder, refs, args.cache, batch_size=args.batch_size, shard_size=args.shard_size,
                 device=args.device, workers=args.workers)
    bad = failures(args.cache)
    if bad:
        print(f"{len(bad)} images could not be read (see {args.cache}/failures.json): dropped")
    if args.out.endswith((".npz", ".safetensors")):
        emb, valid = load_embeddings(args.cache)
        EmbeddingDataset(emb[valid], coords[valid]).save(args.out)
        print(f"wrote {args.out}: {int(valid.sum())} rows, embedding width {emb.shape[1]}")
    else:  # streamed shard by shard: the embeddings are never all in memory
        store = build_store(args.cache, args.out, coords=coords, dtype=args.dtype, overwrite=True)
        print(f"wrote {store}")


if __name__ == "__main__":
    main()
