"""Nightly deep fine-tuning: the last K inverted-residual blocks, the final 1x1 conv and the head.

The frozen front of the network (``features[:split]``) runs once per photo and
augmented view; its output (7x7x160 for K <= 3) is cached in SQLite as float16, so
epochs only run the trainable tail forward and backward. Batch norm stays folded
(inference mode). Progress is checkpointed every epoch and resumed after a stop or
crash as long as the data, settings and starting backbone are the same.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import service  # noqa: F401
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from service.augment import AugmentSettings, view
from service.dataset import Photo
from service.embeddings import Cancelled
from service.images import ImageError, open_rgb
from service.mobilenet import MobileNetV2
from service.store import SqliteStore
from service.training import compiled_step

N_FEATURES = 19  # stem, 17 inverted residual blocks, final 1x1 conv


@dataclass(frozen=True)
class FinetuneSettings:
    # Measured on clothing-small (README): best validation accuracy K=1 0.891, K=2 0.912, K=3
    # 0.912 in 6-epoch runs; end to end K=3 with 12 epochs did best.
    blocks: int = 3  # K: trainable inverted-residual blocks (plus the final 1x1 conv and the head)
    epochs: int = 12
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 64
    warmup_epochs: int = 1
    patience: int = 4
    label_smoothing: float = 0.1
    dropout: float = 0.2
    from_imagenet: bool = False  # start from the ImageNet weights instead of the last nightly backbone
    seed: int = 0
    augment: AugmentSettings = AugmentSettings()

    @property
    def split(self) -> int:
        """Index of the first trainable layer in ``features``."""
        return N_FEATURES - 1 - self.blocks


@dataclass
class FinetuneResult:
    epochs_run: int
    best_epoch: int
    best_val_accuracy: float
    stop_reason: str
    resumed_from_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)


class FeatureCache(SqliteStore):
    """Frozen-front outputs by (content sha256, front fingerprint, split, view), float16."""

    def __init__(self, path: Path):
        super().__init__(path, [
            "CREATE TABLE IF NOT EXISTS feature (sha256 TEXT, backbone TEXT, split INTEGER, view INTEGER,"
            " shape TEXT, data BLOB, PRIMARY KEY (sha256, backbone, split, view))"])

    def get(self, sha: str, backbone: str, split: int, view_index: int) -> np.ndarray | None:
        with self._lock:
            row = self._db.execute("SELECT shape, data FROM feature WHERE sha256=? AND backbone=? AND split=? "
                                   "AND view=?", (sha, backbone, split, view_index)).fetchone()
        if row is None:
            return None
        return np.frombuffer(row[1], dtype=np.float16).reshape(json.loads(row[0]))

    def put_many(self, rows: list[tuple[str, str, int, int, np.ndarray]]) -> None:
        with self._lock, self._db:
            self._db.executemany("INSERT OR REPLACE INTO feature VALUES (?, ?, ?, ?, ?, ?)",
                                 [(s, b, sp, v, json.dumps(list(a.shape)), a.astype(np.float16).tobytes())
                                  for s, b, sp, v, a in rows])


def front_features(model: MobileNetV2, backbone_sha: str, split: int, photos: list[Photo], hashes: dict[str, str],
                   cache: FeatureCache, augment: AugmentSettings, n_views: int,
                   should_stop: Callable[[], bool], on_skip: Callable[[Photo, str], None],
                   batch_size: int = 16) -> tuple[dict[str, np.ndarray], int]:
    """``{path: [n_views, h, w, c]}`` frozen-front outputs; returns them and how many views were computed."""
    front = mx.compile(lambda x: model.backbone(x, 0, split))
    out: dict[str, np.ndarray] = {}
    pending: list[tuple[Photo, int, np.ndarray]] = []
    computed = 0

    def flush() -> None:
        nonlocal computed
        if not pending:
            return
        feats = np.array(front(mx.array(np.stack([p for _, _, p in pending]).astype(np.float32))))
        cache.put_many([(hashes[str(ph.path)], backbone_sha, split, v, f) for (ph, v, _), f in zip(pending, feats)])
        for (ph, v, _), f in zip(pending, feats):
            out.setdefault(str(ph.path), [None] * n_views)[v] = f.astype(np.float16)
        computed += len(pending)
        pending.clear()

    for photo in photos:
        sha = hashes[str(photo.path)]
        cached = [cache.get(sha, backbone_sha, split, v) for v in range(n_views)]
        if all(c is not None for c in cached):
            out[str(photo.path)] = cached
            continue
        if should_stop():
            raise Cancelled()
        try:
            img = open_rgb(photo.path)
        except ImageError as exc:
            on_skip(photo, str(exc))
            continue
        out[str(photo.path)] = cached
        for v in range(n_views):
            if cached[v] is None:
                pending.append((photo, v, view(img, sha, v, augment)))
        if len(pending) >= batch_size:
            flush()
    flush()
    return {k: np.stack(v) for k, v in out.items()}, computed


def front_fingerprint(model: MobileNetV2, split: int) -> str:
    """Identity of the frozen front: its tensors and how the input is normalized and padded.

    Nightly runs only change the layers from ``split`` on, so the front (and its cached
    outputs) stays the same from one night to the next.
    """
    digest = hashlib.sha256(f"{model.spec.padding}:{model.spec.normalization}:{split}".encode())
    for name, array in sorted(tree_flatten([layer.parameters() for layer in model.features[:split]])):
        digest.update(name.encode())
        digest.update(np.array(array).tobytes())
    return digest.hexdigest()


class Tail(nn.Module):
    """The trainable part: ``features[split:]`` of a model (shared, updated in place) and a head."""

    def __init__(self, model: MobileNetV2, split: int, n_labels: int, dropout: float):
        super().__init__()
        self.layers = model.features[split:]
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(model.features[-1].weight.shape[0], n_labels)

    def embed(self, x: mx.array) -> mx.array:
        for layer in self.layers[:-1]:
            x = layer(x)
        return self.layers[-1].pooled(x)  # the final 1x1 convolution, globally pooled

    def __call__(self, x: mx.array) -> mx.array:
        return self.classifier(self.dropout(self.embed(x)))


def tail_embeddings(tail: Tail, x: np.ndarray, batch: int = 128) -> np.ndarray:
    tail.eval()
    embed = mx.compile(tail.embed)
    parts = [np.array(embed(mx.array(x[i : i + batch].astype(np.float32)))) for i in range(0, len(x), batch)]
    return np.concatenate(parts) if parts else np.zeros((0, 1280), np.float32)


def _accuracy(tail: Tail, x: np.ndarray, y: np.ndarray, batch: int = 256) -> float:
    if not len(y):
        return float("nan")
    tail.eval()
    correct = 0
    for i in range(0, len(y), batch):
        logits = tail(mx.array(x[i : i + batch].astype(np.float32)))
        correct += int(mx.sum(mx.argmax(logits, axis=1) == mx.array(y[i : i + batch])).item())
    tail.train()
    return correct / len(y)


class Checkpoint:
    """Per-epoch progress: tail and optimizer state, best parameters, history."""

    def __init__(self, directory: Path, key: str):
        self.dir, self.key = directory, key

    def save(self, epoch: int, tail: Tail, optimizer: optim.Optimizer, best: dict[str, mx.array],
             info: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        arrays = {**{f"tail.{k}": v for k, v in tree_flatten(tail.parameters())},
                  **{f"best.{k}": v for k, v in best.items()},
                  **{f"optimizer.{k}": v for k, v in tree_flatten(optimizer.state)}}
        tmp = self.dir / "checkpoint.tmp.safetensors"
        mx.save_safetensors(str(tmp), arrays)
        tmp.replace(self.dir / "checkpoint.safetensors")
        meta = self.dir / "checkpoint.tmp.json"
        meta.write_text(json.dumps({"key": self.key, "epoch": epoch, **info}))
        meta.replace(self.dir / "checkpoint.json")  # written last: it names a complete array file

    def load(self) -> tuple[dict[str, Any], dict[str, mx.array]] | None:
        try:
            info = json.loads((self.dir / "checkpoint.json").read_text())
            if info.get("key") != self.key:
                return None
            return info, mx.load(str(self.dir / "checkpoint.safetensors"))
        except (OSError, ValueError, RuntimeError):
            return None

    def clear(self) -> None:
        for name in ("checkpoint.json", "checkpoint.safetensors"):
            (self.dir / name).unlink(missing_ok=True)


def checkpoint_key(settings: FinetuneSettings, backbone_sha: str, data_fingerprint: str, labels: list[str]) -> str:
    blob = json.dumps([asdict(settings), backbone_sha, data_fingerprint, labels], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def finetune(tail: Tail, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
             settings: FinetuneSettings, checkpoint: Checkpoint, should_stop: Callable[[], bool],
             log: Any) -> FinetuneResult:
    """Train ``tail`` (in place) on cached front features; leaves it at the best validation epoch.

    ``x_train``: ``[N, views, h, w, c]`` float16; each epoch draws one view per photo.
    """
    steps_per_epoch = max(1, -(-len(y_train) // settings.batch_size))
    warmup = settings.warmup_epochs * steps_per_epoch
    total = settings.epochs * steps_per_epoch
    schedule = optim.join_schedules(
        [optim.linear_schedule(settings.learning_rate / 20, settings.learning_rate, max(1, warmup)),
         optim.cosine_decay(settings.learning_rate, max(1, total - warmup), settings.learning_rate / 100)],
        [max(1, warmup)])
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=settings.weight_decay)
    optimizer.init(tail.trainable_parameters())
    tail.train()
    best_acc, best_epoch, history, start = _accuracy(tail, x_val, y_val), 0, [], 1
    best = dict(tree_flatten(tail.parameters()))
    resumed = checkpoint.load()
    if resumed is not None:  # before compiling: the compiled step captures these state objects
        info, arrays = resumed
        tail.update(tree_unflatten([(k[5:], v) for k, v in arrays.items() if k.startswith("tail.")]))
        optimizer.state = tree_unflatten([(k[10:], v) for k, v in arrays.items() if k.startswith("optimizer.")])
        best = {k[5:]: v for k, v in arrays.items() if k.startswith("best.")}
        best_acc, best_epoch, history, start = info["best_acc"], info["best_epoch"], info["history"], info["epoch"] + 1
        log.info("finetune_resumed", from_epoch=info["epoch"], best_val_accuracy=best_acc)
    step, state = compiled_step(tail, optimizer, settings.label_smoothing)
    resumed_from = start - 1
    reason = "max_epochs"
    epoch = start - 1
    views = x_train.shape[1]
    for epoch in range(start, settings.epochs + 1):
        mark = time.perf_counter()
        rng = np.random.default_rng([settings.seed, epoch])
        mx.random.seed(settings.seed * 1000 + epoch)
        order = rng.permutation(len(y_train))
        picks = rng.integers(0, views, size=len(y_train))
        losses = []
        for i in range(0, len(order), settings.batch_size):
            if should_stop():
                raise Cancelled()
            idx = order[i : i + settings.batch_size]
            x = mx.array(x_train[idx, picks[idx]].astype(np.float32))
            losses.append(step(x, mx.array(y_train[idx])))
            mx.eval(losses[-1], state)
        val_acc = _accuracy(tail, x_val, y_val)
        history.append({"epoch": epoch, "loss": float(np.mean([l.item() for l in losses])),
                        "val_accuracy": val_acc, "seconds": round(time.perf_counter() - mark, 2)})
        log.info("finetune_epoch", **history[-1])
        if val_acc > best_acc:
            best_acc, best_epoch = val_acc, epoch
            best = {k: mx.array(v) for k, v in tree_flatten(tail.parameters())}
        checkpoint.save(epoch, tail, optimizer, best, {"best_acc": best_acc, "best_epoch": best_epoch,
                                                        "history": history})
        if epoch - best_epoch >= settings.patience:
            reason = "early_stopping"
            break
    tail.update(tree_unflatten(list(best.items())))
    tail.eval()
    return FinetuneResult(epoch, best_epoch, best_acc, reason, resumed_from, history)


@dataclass
class NightlyResult:
    model: MobileNetV2
    backbone: Path  # the fine-tuned weights file; its sha256 keys the embedding cache from now on
    x_train: np.ndarray  # embeddings under the new backbone (view 0)
    x_val: np.ndarray
    weight: np.ndarray  # head
    bias: np.ndarray
    result: FinetuneResult
    front_computed: int
    kept_train: list[int]  # indices into train/val that had front features (all, unless a file vanished)
    kept_val: list[int]


def nightly(model: MobileNetV2, backbone_sha: str, train: list[Photo], val: list[Photo], hashes: dict[str, str],
            y_train: np.ndarray, y_val: np.ndarray, labels: list[str], init: tuple[np.ndarray, np.ndarray],
            settings: FinetuneSettings, state_dir: Path, name: str, data_fingerprint: str,
            log: Any, should_stop: Callable[[], bool]) -> NightlyResult:
    """Deep fine-tune ``model`` (in place) on ``train``; returns the new backbone and embeddings.

    ``train``/``val`` are the photos behind ``y_train``/``y_val``, in the same order.
    """
    split = settings.split
    n_views = settings.augment.n_views
    front_key = front_fingerprint(model, split)
    cache = FeatureCache(state_dir / "features.sqlite")
    try:
        skip = lambda photo, why: log.warning("photo_skipped", file=str(photo.path), reason=why)  # noqa: E731
        front_train, computed = front_features(model, front_key, split, train, hashes, cache, settings.augment,
                                               n_views, should_stop, skip)
        front_val, computed_val = front_features(model, front_key, split, val, hashes, cache, settings.augment, 1,
                                                 should_stop, skip)
    finally:
        cache.close()
    log.info("front_features", split=split, views=n_views, computed=computed + computed_val,
             photos=len(train) + len(val))
    keep_t = [i for i, p in enumerate(train) if str(p.path) in front_train]
    keep_v = [i for i, p in enumerate(val) if str(p.path) in front_val]
    x_train = np.stack([front_train[str(train[i].path)] for i in keep_t])
    x_val = np.stack([front_val[str(val[i].path)][0] for i in keep_v]) if keep_v else np.zeros((0,) + x_train.shape[2:])
    tail = Tail(model, split, len(labels), settings.dropout)
    tail.classifier.weight, tail.classifier.bias = mx.array(init[0]), mx.array(init[1])
    key = checkpoint_key(settings, backbone_sha, data_fingerprint, labels)
    checkpoint = Checkpoint(state_dir / "checkpoints" / name, key)
    result = finetune(tail, x_train, y_train[keep_t], x_val, y_val[keep_v], settings, checkpoint, should_stop, log)

    model.classifier = tail.classifier
    model.eval()
    backbone = state_dir / "backbones" / name / f"{time.strftime('%Y%m%dT%H%M%S')}-{key[:8]}.safetensors"
    backbone.parent.mkdir(parents=True, exist_ok=True)
    from service.weights import save_model

    save_model(model, backbone, {"labels": "\n".join(labels), "finetuned_from": backbone_sha})
    checkpoint.clear()  # the result is saved; a later start must not resume this run
    return NightlyResult(model, backbone, tail_embeddings(tail, x_train[:, 0]), tail_embeddings(tail, x_val),
                         np.array(tail.classifier.weight), np.array(tail.classifier.bias), result,
                         computed + computed_val, keep_t, keep_v)
