"""Ingest throughput: the FaceGate pipeline against facenet-pytorch's README loop, same gallery, same run.

    python -m bench.ingest                      # 300 generated images, default settings
    python -m bench.ingest --images 40          # a quick run
    python -m bench.ingest --variant max_detect_side=800 --variant embed_precision=bf16,max_detect_side=800

The naive loop is facenet-pytorch's README usage, one image at a time: `MTCNN(keep_all=True)` on the
full-size image (its `forward`, i.e. `detect` then `extract`, called as two steps so that the boxes are
kept for the comparison), then `resnet(face.unsqueeze(0))` for each face, under `torch.no_grad()`
(which only makes the baseline faster). Both run on the same device with the same torch thread count,
on the same images; the gallery is processed in blocks, naive and pipeline alternating, so that any
background load falls on both alike.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch


@dataclass
class Run:
    name: str
    seconds: float = 0.0
    images: int = 0
    faces: int = 0
    boxes: dict[str, list[tuple[np.ndarray, float]]] = field(default_factory=dict)
    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    stages: dict[str, float] = field(default_factory=dict)


def _parse_variant(text: str) -> dict[str, object]:
    out: dict[str, object] = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        out[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else value.strip()
    return out


def make_settings(settings_cls, values: dict):
    """Settings with these values; a field facegate.settings does not have (yet) is set on the copy, read by getattr."""
    known = {k: v for k, v in values.items() if k in settings_cls.model_fields}
    extra = {k: v for k, v in values.items() if k not in settings_cls.model_fields}
    settings = settings_cls(**known)
    return settings.model_copy(update=extra) if extra else settings


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match(naive: Run, ours: Run, min_probability: float) -> dict[str, float]:
    """How many of the naive loop's faces the pipeline also finds (IoU >= 0.5), and their embedding agreement."""
    found_strong = strong = found_all = total = 0
    cosines: list[float] = []
    for path, theirs in naive.boxes.items():
        mine = ours.boxes.get(path, [])
        used: set[int] = set()
        for k, (box, prob) in enumerate(theirs):
            best, best_j = 0.0, -1
            for j, (other, _) in enumerate(mine):
                if j not in used and (v := _iou(box, other)) > best:
                    best, best_j = v, j
            hit = best >= 0.5
            total += 1
            found_all += hit
            if prob >= min_probability:
                strong += 1
                found_strong += hit
            if hit:
                used.add(best_j)
                cosines.append(float(naive.vectors[path][k] @ ours.vectors[path][best_j]))
    return {"strong": strong, "found_strong": found_strong, "total": total, "found_all": found_all,
            "cosine_mean": float(np.mean(cosines)) if cosines else float("nan"),
            "cosine_min": float(np.min(cosines)) if cosines else float("nan")}


class NaiveLoop:
    """facenet-pytorch README: MTCNN on the full image, then InceptionResnetV1 one face at a time."""

    def __init__(self, device: torch.device, state_dict: dict) -> None:
        from facenet_pytorch import MTCNN, InceptionResnetV1

        self.device = device
        self.mtcnn = MTCNN(keep_all=True, device=device)
        self.resnet = InceptionResnetV1(pretrained=None).eval().to(device)
        self.resnet.load_state_dict(state_dict)

    def run(self, paths: list[Path], into: Run) -> None:
        from PIL import Image

        started = time.perf_counter()
        for path in paths:
            img = Image.open(path)
            # == mtcnn(img): MTCNN.forward with keep_all is detect(img, landmarks=True) then extract().
            boxes, probs, _points = self.mtcnn.detect(img, landmarks=True)
            faces = self.mtcnn.extract(img, boxes, None)
            vectors = []
            if faces is not None:
                with torch.no_grad():
                    for face in faces:
                        vectors.append(self.resnet(face.unsqueeze(0).to(self.device))[0].cpu().numpy())
            into.images += 1
            into.faces += len(vectors)
            # Compared clipped to the image, as FaceGate reports boxes (MTCNN's may reach past the border).
            w, h = img.size
            into.boxes[str(path)] = [] if boxes is None else \
                [(np.clip(np.asarray(b, dtype=float), 0, [w, h, w, h]), float(p)) for b, p in zip(boxes, probs)]
            into.vectors[str(path)] = np.stack(vectors) if vectors else np.empty((0, 512), np.float32)
        into.seconds += time.perf_counter() - started


class StageProfiler:
    """cProfile of the model stages, which run in the pipeline's detection and embedding threads.

    One profiler per thread (cProfile hooks the thread that enables it), merged when printed.
    """

    def __init__(self) -> None:
        self._local = threading.local()
        self._all: list[cProfile.Profile] = []
        self._lock = threading.Lock()

    def wrap(self, fn):
        def profiled(*args, **kwargs):
            prof = getattr(self._local, "prof", None)
            if prof is None:
                prof = self._local.prof = cProfile.Profile()
                with self._lock:
                    self._all.append(prof)
            prof.enable()
            try:
                return fn(*args, **kwargs)
            finally:
                prof.disable()
        return profiled

    def install(self, pipeline) -> None:
        pipeline.detector.detect_prepared = self.wrap(pipeline.detector.detect_prepared)
        pipeline.embedder.embed = self.wrap(pipeline.embedder.embed)

    def report(self, top: int = 18) -> str:
        buf = io.StringIO()
        stats = pstats.Stats(self._all[0], stream=buf)
        for prof in self._all[1:]:
            stats.add(prof)
        stats.sort_stats("tottime").print_stats(top)
        return "\n".join(line for line in buf.getvalue().splitlines()[2:] if line.strip())


def run_pipeline(pipeline, paths: list[Path], chunk: int, into: Run, profiler=None) -> None:
    started = time.perf_counter()
    for start in range(0, len(paths), chunk):
        part = [str(p) for p in paths[start : start + chunk]]
        images, outcomes = pipeline.analyse(part)
        times = pipeline.last_times
        for name in ("detect_s", "embed_s", "decode_s", "crop_s", "wait_s", "wall_s"):
            into.stages[name] = into.stages.get(name, 0.0) + getattr(times, name)
        into.images += len(outcomes)
        for img in images:
            into.faces += len(img.faces)
            into.boxes[img.path] = [(np.asarray(f.box, dtype=float), f.probability) for f in img.faces]
            into.vectors[img.path] = img.embeddings
    into.seconds += time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300, help="generated gallery size (default 300)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-side", type=int, default=2048, help="largest generated image side (default 2048)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both (default: torch's)")
    parser.add_argument("--weights", default="untrained",
                        help="'untrained' (default: speed only), or a state dict file (set FACEGATE_WEIGHTS_SHA256)")
    parser.add_argument("--chunk", type=int, default=None, help="images per analyse() call (default: index_chunk_size)")
    parser.add_argument("--block", type=int, default=16, help="images per alternating naive/pipeline block")
    parser.add_argument("--variant", action="append", default=[],
                        help="extra pipeline settings to measure too, e.g. max_detect_side=800,embed_precision=bf16")
    parser.add_argument("--no-default", action="store_true", help="measure only the --variant pipelines")
    parser.add_argument("--profile", action="store_true", help="cProfile the first pipeline's detection thread")
    parser.add_argument("--gallery-dir", default=None, help="keep the generated gallery here and reuse it")
    args = parser.parse_args(argv)

    from facegate.settings import Settings
    from workers.models.embedder import build_untrained_network
    from workers.pipeline import FacePipeline
    from workers.weights import load_state_dict, resolve_weights

    from bench.common import UNTRAINED_BANNER, TempGallery, command_line, machine, table

    if args.threads:
        torch.set_num_threads(args.threads)
    base = dict(weights=args.weights, device=args.device, data_dir=Path(tempfile.gettempdir()) / "facegate-bench")
    if args.weights == "untrained":
        print(UNTRAINED_BANNER)
    configs: list[tuple[str, dict]] = [] if args.no_default else [("FaceGate pipeline (default settings)", {})]
    for text in args.variant:
        configs.append((f"FaceGate pipeline ({text})", _parse_variant(text)))
    pipelines = []
    for name, overrides in configs:
        settings = make_settings(Settings, {**base, **overrides})
        pipe = FacePipeline.from_settings(settings)
        pipe.warm_up()
        pipelines.append((name, settings, pipe, Run(name)))
    first = pipelines[0][2]
    resolved = resolve_weights(args.weights, pipelines[0][1].weights_sha256, seed=pipelines[0][1].untrained_seed)
    state = build_untrained_network(resolved.seed).state_dict() if resolved.untrained else load_state_dict(resolved)
    naive = NaiveLoop(first.detector.device, state)
    naive_run = Run("naive loop (facenet-pytorch README, one image at a time)")
    profiler = StageProfiler() if args.profile else None

    with TempGallery(args.images, seed=args.seed, max_side=args.max_side, keep=args.gallery_dir) as gallery:
        print(f"# {command_line()}")
        print(f"machine: {machine()}")
        print(f"gallery: {gallery.describe()}")
        for name, settings, pipe, _ in pipelines:
            p = pipe.batch_policy
            print(f"{name}: max_detect_side={settings.max_detect_side} min_face_size={settings.min_face_size} "
                  f"min_face_probability={settings.min_face_probability} precision={pipe.embedder.precision} "
                  f"channels_last={pipe.embedder.channels_last} embed_batch={p.max_faces} "
                  f"detect_images={p.detect_images} decode_threads={p.decode_threads} "
                  f"chunk={args.chunk or settings.index_chunk_size}")
        # Warm-up on one image each, outside the timings.
        naive.run(gallery.paths[:2], Run("warm-up"))
        for _, _, pipe, _ in pipelines:
            run_pipeline(pipe, gallery.paths[:2], 2, Run("warm-up"), None)
        if profiler:
            profiler.install(pipelines[0][2])

        paths = gallery.paths
        for n, start in enumerate(range(0, len(paths), args.block)):
            block = paths[start : start + args.block]
            order = [None] + list(range(len(pipelines)))
            if n % 2:
                order.reverse()
            for which in order:
                if which is None:
                    naive.run(block, naive_run)
                else:
                    name, settings, pipe, run = pipelines[which]
                    run_pipeline(pipe, block, args.chunk or settings.index_chunk_size, run,
                                  profiler if which == 0 else None)

    naive_fps = naive_run.faces / naive_run.seconds
    rows = [[naive_run.name, naive_run.images, naive_run.faces, naive_run.seconds, naive_run.images / naive_run.seconds,
             naive_fps, 1.0, "-"]]
    details = []
    for name, settings, _pipe, run in pipelines:
        m = match(naive_run, run, settings.min_face_probability)
        fps = run.faces / run.seconds
        rows.append([name, run.images, run.faces, run.seconds, run.images / run.seconds, fps, fps / naive_fps,
                     f"{m['found_strong']}/{m['strong']} = {100 * m['found_strong'] / max(1, m['strong']):.1f}%"])
        details.append((name, m, run))
    print()
    print(table(["method", "images", "faces", "seconds", "images/s", "faces/s", "x naive (faces/s)",
                 "naive faces found (p>=0.9)"], rows))
    print()
    stage_rows = []
    for name, m, run in details:
        s = run.stages
        stage_rows.append([name, s["wall_s"], s["detect_s"], s["embed_s"], run.faces / max(s["embed_s"], 1e-9),
                           s["decode_s"], s["crop_s"], s["wait_s"],
                           f"{m['found_all']}/{m['total']}", f"{m['cosine_mean']:.4f} (min {m['cosine_min']:.4f})"])
    print(table(["pipeline", "analyse wall s", "detect s", "embed s", "embed stage faces/s", "decode s (threads)",
                 "crop s (threads)", "waiting for decode s", "all naive faces found (p>=0.7)",
                 "cosine to naive embedding (matched faces)"], stage_rows))
    if profiler:
        print("\ncProfile of the first pipeline's model stages (detection and embedding threads, merged; "
              "the profiler's own overhead inflates many-call functions):")
        print(profiler.report())


if __name__ == "__main__":
    main()
