#!/usr/bin/env python3
"""Write an image folder as WebDataset shards for ``edgekd ... --data webdataset:OUT``.

    python tools/make_shards.py FOLDER OUT [--shard-size N] [--seed S]

FOLDER is an image folder as edgekd reads it (train/ and test/ or val/, one sub-folder per class). OUT gets
train/shard-000000.tar, ... (and the same for the test split) and classes.txt. Samples are shuffled with
--seed before they are cut into shards of --shard-size samples, so every shard holds every class; image files
are copied byte for byte (JPEG, PNG, WebP; other formats become PNG). Under torchrun each process reads whole
shards: write at least as many training shards as processes (a multiple of their number keeps every process
on the same number of images). Exit 2 with one line on bad input.
"""

import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="image folder: train/ and test/ (or val/), one sub-folder per class")
    parser.add_argument("out", help="where to write the shards (a new or empty folder)")
    parser.add_argument("--shard-size", type=int, default=1000, metavar="N", help="samples per shard (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="the shuffle of samples before sharding (default 0)")
    args = parser.parse_args(argv)

    from edgekd import EdgeKDError
    from edgekd.core.shards import write_shards

    try:
        counts = write_shards(args.folder, args.out, args.shard_size, args.seed)
    except (EdgeKDError, OSError) as e:  # bad input, or a disk that refuses the output
        print(f"make_shards: error: {e}", file=sys.stderr)
        return 2
    print(", ".join(f"{split}: {n} shards" for split, n in counts.items()) + f" -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
