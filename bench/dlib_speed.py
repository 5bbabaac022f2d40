"""Speed of dlib's ResNet face descriptor in PyTorch against dlib's own `compute_face_descriptor`.

    uv run python -m bench.dlib_speed [--faces 64] [--rounds 5] [--threads 1 2]

Both run on the same 150x150 chips (dlib's alignment of the fixture photos, repeated to `--faces`), in
the same run. dlib's descriptor (the `dlib-bin` wheel, CPU) runs one chip at a time, as FaceGate would
have to call it, and as one list call; the torch network runs batched, fp32 and bf16 on CPU at each
thread count, and fp16/bf16 on a GPU when there is one. Printed: faces/s and the ratio to dlib's.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
from PIL import Image

from bench.common import FIXTURES


def _chips(n: int) -> np.ndarray:
    import dlib

    from facegate.embedding_models import DLIB_SHAPE_PREDICTOR_FILE, dlib_file

    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(dlib_file(DLIB_SHAPE_PREDICTOR_FILE)))
    paths = sorted((FIXTURES / "photos").glob("*.jpg")) + [FIXTURES / "multiface.jpg"]
    paths += sorted((FIXTURES.parent / "identities").glob("*/*.jpg"))
    chips = []
    for path in paths:
        pixels = np.asarray(Image.open(path).convert("RGB"))
        for rect in detector(pixels, 0):
            chips.append(dlib.get_face_chip(pixels, predictor(pixels, rect), size=150, padding=0.25))
    if not chips:
        raise SystemExit(f"no faces found in {FIXTURES}")
    return np.stack([chips[i % len(chips)] for i in range(n)])


def _best(fn, rounds: int) -> float:
    """The fastest of `rounds` runs, in seconds (after one warm-up)."""
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faces", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--gpu-batch", type=int, default=256)
    args = parser.parse_args(argv)

    import dlib

    from facegate.embedding_models import dlib_file
    from workers.models.base import cpu_has_native_bf16
    from workers.models.dlib_resnet import DlibDescriptorNet

    print(f"$ uv run python -m bench.dlib_speed --faces {args.faces} --rounds {args.rounds} "
          f"--threads {' '.join(map(str, args.threads))}")
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads "
          f"available, torch {torch.__version__}, dlib {dlib.__version__} (CUDA {dlib.DLIB_USE_CUDA}), "
          f"native CPU bf16: {cpu_has_native_bf16()}")
    chips = _chips(args.faces)
    model = dlib.face_recognition_model_v1(str(dlib_file()))
    rows = []
    single = _best(lambda: [model.compute_face_descriptor(c) for c in chips], args.rounds)
    baseline = args.faces / single
    rows.append(("dlib compute_face_descriptor, one chip per call", "cpu", "fp32", 1, baseline))
    listed = _best(lambda: model.compute_face_descriptor(list(chips)), args.rounds)
    rows.append(("dlib compute_face_descriptor, one list call", "cpu", "fp32", args.faces, args.faces / listed))
    reference = np.array([np.asarray(model.compute_face_descriptor(c)) for c in chips[:8]])

    precisions = ["fp32", "bf16"]
    for threads in args.threads:
        torch.set_num_threads(threads)
        for precision in precisions:
            net = DlibDescriptorNet(torch.device("cpu"), precision=precision)
            seconds = _best(lambda: net.descriptors(chips), args.rounds)
            err = float(np.linalg.norm(net.descriptors(chips[:8]) - reference, axis=1).max())
            rows.append((f"torch, {threads} thread(s) (max L2 to dlib {err:.1e})", "cpu", precision, args.faces,
                         args.faces / seconds))
    if torch.cuda.is_available():
        device = torch.device("cuda")
        gpu_chips = np.stack([chips[i % len(chips)] for i in range(args.gpu_batch)])
        for precision in ("fp32", "fp16", "bf16"):
            net = DlibDescriptorNet(device, precision=precision)

            def run() -> None:
                net.descriptors(gpu_chips)
                torch.cuda.synchronize()

            seconds = _best(run, args.rounds)
            err = float(np.linalg.norm(net.descriptors(chips[:8]) - reference, axis=1).max())
            rows.append((f"torch on {torch.cuda.get_device_name(0)} (max L2 to dlib {err:.1e})", "cuda", precision,
                         args.gpu_batch, args.gpu_batch / seconds))
    else:
        print("no GPU here: CPU figures only")

    print(f"\n{'what':<62} {'device':<6} {'prec':<5} {'batch':>5} {'faces/s':>9} {'vs dlib':>8}")
    for what, device, precision, batch, rate in rows:
        print(f"{what:<62} {device:<6} {precision:<5} {batch:>5} {rate:>9.1f} {rate / baseline:>7.2f}x")
    print(f"\nbaseline: dlib's own descriptor, {1000 / baseline:.1f} ms per face")


if __name__ == "__main__":
    main()
