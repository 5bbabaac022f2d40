"""What the quality step costs: the pipeline with face quality assessment against the same pipeline without
it, on one generated gallery, in alternating blocks of the same run (so load on the machine hits both).

    uv run python -m bench.quality --images 120

Prints images/s of each, the ratio, and the quality step's own seconds per face (summed over the decode
threads, where it runs). No timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=120, help="generated gallery size (default 120)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-side", type=int, default=2048)
    parser.add_argument("--block", type=int, default=16, help="images per alternating block (default 16)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)

    import torch

    from bench.common import UNTRAINED_BANNER, TempGallery, command_line, machine, table
    from facegate.settings import Settings
    from workers.pipeline import FacePipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    print(UNTRAINED_BANNER)
    settings = Settings(weights="untrained", device=args.device,
                        data_dir=Path(tempfile.gettempdir()) / "facegate-bench")
    pipe = FacePipeline.from_settings(settings)
    pipe.warm_up()
    totals = {True: [0.0, 0, 0, 0.0], False: [0.0, 0, 0, 0.0]}  # seconds, images, faces, quality seconds
    with TempGallery(args.images, seed=args.seed, max_side=args.max_side) as gallery:
        print(f"# {command_line()}")
        print(f"machine: {machine()}")
        print(f"gallery: {gallery.describe()}")
        paths = [str(p) for p in gallery.paths]
        pipe.assess_quality = True
        pipe.analyse(paths[: min(4, len(paths))])  # warm caches for both
        for start in range(0, len(paths), args.block):
            block = paths[start : start + args.block]
            # Alternate which goes first, so neither always runs on a warmer page cache.
            order = (True, False) if (start // args.block) % 2 == 0 else (False, True)
            for assess in order:
                pipe.assess_quality = assess
                began = time.perf_counter()
                images, _ = pipe.analyse(block)
                row = totals[assess]
                row[0] += time.perf_counter() - began
                row[1] += len(block)
                row[2] += sum(len(i.faces) for i in images)
                row[3] += pipe.last_times.quality_s
                if assess:
                    assert all(len(i.qualities) == len(i.faces) for i in images)
    with_q, without = totals[True], totals[False]
    rows = [["pipeline without quality", without[1], without[2], without[1] / without[0], "-"],
            ["pipeline with quality", with_q[1], with_q[2], with_q[1] / with_q[0],
             f"{1000 * with_q[3] / max(1, with_q[2]):.2f}"]]
    print(table(["run", "images", "faces", "images/s", "quality ms/face (threads)"], rows))
    print(f"ratio with/without quality: {without[0] / with_q[0]:.3f} of the throughput "
          f"({with_q[0] / without[0] - 1:+.1%} wall time)")


if __name__ == "__main__":
    main()
