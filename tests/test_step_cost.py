"""Per-step work is flat once a line's memories are full (issue 7): counted, not timed.

A tiny detector with small caps is streamed cheap synthetic frames (noisy copies of the backbone
features of 4 frames). Every torch call of a step is recorded with its input shapes (a
TorchFunctionMode). Once the banks and the image memory are full, every step from x to 2x makes
exactly the same calls on the same shapes, apart from the two parts whose size depends on the
data by design, recorded separately: incremental SCS recomputing the Eq. 8 rows whose nearest
earlier feature was evicted (R x N_F products, R bounded), and the image memory moving its rows
to the front once every `slack` images (amortized O(1)).
"""
import collections

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from rareclip_core.detectors.rareclip.detector import FrameFeatures, RareCLIPDetector
from rareclip_core.detectors.rareclip.image_memory import ImageMemory
from rareclip_core.detectors.rareclip.memory import PatchRarityBank
from rareclip_core.ops.rows import RowWindow

PRODUCTS = {"matmul", "__matmul__", "mm", "bmm", "linear", "conv2d", "addmm", "baddbmm", "einsum"}


class Recorder(TorchFunctionMode):
    """Records (function name, input shapes) of every torch call while not paused."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, tuple]] = []
        self.paused = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
            self.calls.append((getattr(func, "__name__", repr(func)), shapes))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def small_config(tiny_config):
    # M = 196 patches; banks full after 2 images (N_F) and 8 images (N_I,max), image memory after 12
    return tiny_config.model_copy(
        update={"max_features": 300, "max_images": 8, "image_memory_size": 12, "rescore_min_images": 4}
    )


def feature_stream(detector: RareCLIPDetector, frames, seed: int = 0):
    base = detector.encode(frames[:4])
    gen = torch.Generator().manual_seed(seed)
    i = 0
    while True:
        b = base[i % len(base)]
        tokens = {k: t + 0.3 * t.std() * torch.randn(t.shape, generator=gen) for k, t in b.tokens.items()}
        yield FrameFeatures(b.embedding, tokens)
        i += 1


def state_shapes(detector: RareCLIPDetector) -> dict:
    return {k: (tuple(v.shape), v.dtype) for k, v in detector.state_dict().items() if k != "images_seen"}


@pytest.mark.parametrize("branch", ["iprb", "dprb"])
def test_step_work_is_the_same_at_step_2x_as_at_step_x(small_config, frames, monkeypatch, branch):
    x = 16
    small_config = small_config.model_copy(update={"rarity_branch": branch})
    det = RareCLIPDetector(small_config)
    m, n_f, n_banks = det.n_patches, small_config.max_features, len(det.bank_keys)
    recorder = Recorder()
    stale_rows: list[list[int]] = []  # per step, R of each stale recomputation
    compactions: list[tuple[str, int]] = []  # (which memory, step index) of each compaction
    step_index = [0]

    original_stale = PatchRarityBank._recompute_stale
    original_compact = RowWindow._compact

    def recompute_stale(stale_mask, feats, redundancy, nearest):
        assert feats.shape[:2] == stale_mask.shape == (n_banks, n_f)
        recorder.paused += 1
        try:
            n_stale = original_stale(stale_mask, feats, redundancy, nearest)
        finally:
            recorder.paused -= 1
        stale_rows[-1].append(n_stale)
        return n_stale

    def compact(window):
        compactions.append((id(window), step_index[0]))
        recorder.paused += 1
        try:
            return original_compact(window)
        finally:
            recorder.paused -= 1

    monkeypatch.setattr(PatchRarityBank, "_recompute_stale", staticmethod(recompute_stale))
    monkeypatch.setattr(RowWindow, "_compact", compact)

    signatures, products, shapes_at = {}, {}, {}
    stream = feature_stream(det, frames)
    for i in range(2 * x + 1):
        step_index[0] = i
        stale_rows.append([])
        recorder.calls = []
        with recorder:
            det.step_features(next(stream))
        if i >= x:
            signatures[i] = collections.Counter(recorder.calls)
            products[i] = sorted(c for c in recorder.calls if c[0] in PRODUCTS)
        if i in (x, 2 * x):
            shapes_at[i] = state_shapes(det)
        assert getattr(det.banks, "last_stale", 0) == sum(stale_rows[-1])

    # memories at their caps, and the whole state the same size at step x and 2x
    assert det.images_seen == 2 * x + 1
    bank = det.banks
    if branch == "iprb":
        assert len(bank) == n_f and bank.image_similarity.shape == (n_banks, small_config.max_images, n_f)
        assert bank.redundancy.shape == bank.nearest_earlier.shape == (n_banks, n_f)
    else:
        assert bank.features.shape == (n_banks, small_config.max_images, int(0.333 * m), 64)
        assert bank.window.buffers["features"].shape[1] == small_config.max_images + bank.window.slack
    assert len(det.image_memory) == small_config.image_memory_size
    window = det.image_memory.window
    assert window.buffers["embeddings"].shape[0] == small_config.image_memory_size + window.slack
    assert shapes_at[x] == shapes_at[2 * x]

    # the matrix products of a step, and indeed every torch call, do not change from x to 2x
    assert products[x] == products[2 * x]
    if branch == "iprb":
        assert ("bmm", ((n_banks, m, 64), (n_banks, 64, n_f))) in products[x]  # F_test . PFM^T, full banks
    else:
        assert ("bmm", ((n_banks, m, 64), (n_banks, 64, small_config.max_images * (m // 3)))) in products[x]
    assert ("bmm", ((4, small_config.image_memory_size, 64), (4, 64, 1))) in products[x]  # LAIFs vs memory
    for i in range(x + 1, 2 * x + 1):
        assert signatures[i] == signatures[x], f"step {i} does other work than step {x}"

    # the data-dependent parts stay bounded: stale rows per recomputation (all banks) at most
    # banks x N_F (and in practice far fewer than the M rows each bank evicts per step, and not
    # growing); compaction amortized
    later = [r for rows in stale_rows[x:] for r in rows]
    earlier = [r for rows in stale_rows[2:x] for r in rows]
    assert max(later, default=0) <= n_banks * n_f
    assert sum(later) / (x + 1) <= sum(earlier) / (x - 2) + n_banks * m / 4
    assert max(later, default=0) <= n_banks * m
    for window in [det.image_memory.window] + ([det.banks.window] if branch == "dprb" else []):
        n_compactions = len([c for c in compactions if c[0] == id(window) and c[1] >= x])
        assert n_compactions <= x // window.slack + 1


def test_timings_hook_fills_sections_and_changes_nothing(small_config, frames):
    plain, timed = RareCLIPDetector(small_config), RareCLIPDetector(small_config)
    for frame in frames[:6]:
        timings: dict = {}
        a = plain.step(frame)
        b = timed.step(frame, timings=timings)
        assert a.score == b.score and np.array_equal(a.anomaly_map, b.anomaly_map)
        assert set(timings) == {"preprocess", "backbone", "text", "banks", "image_rarity", "fusion", "rescore", "output"}
        assert all(v >= 0 for v in timings.values())
    sa, sb = plain.state_dict(), timed.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("capacity", [1, 3, 12])
def test_image_memory_keeps_the_newest_rows_in_order_through_compactions(capacity):
    memory, reference = ImageMemory(capacity), []
    for i in range(5 * (capacity + memory.window.slack) + 3):
        emb, laifs = torch.full((5,), float(i)), torch.full((2, 4), float(i))
        memory.add(emb, laifs, torch.tensor(i, dtype=torch.float64))
        reference = (reference + [i])[-capacity:]
        assert memory.scores.tolist() == reference
        assert memory.embeddings[:, 0].tolist() == reference
        assert memory.laifs[1, :, 0].tolist() == reference
        if i % 7 == 0:  # a restored copy behaves the same from here on
            copy = ImageMemory(capacity)
            copy.load_state_dict({k: v.clone() for k, v in memory.state_dict().items()})
            assert torch.equal(copy.laifs, memory.laifs) and torch.equal(copy.scores, memory.scores)


HOST_SYNCS = {"tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero"}


@pytest.mark.parametrize("update", [{}, {"rarity_branch": "dprb"}, {"k": 2}])
def test_a_step_waits_for_the_device_only_once_its_results_are_computed(small_config, update):
    """On a GPU a host sync stalls the queueing of kernels: the step's only syncs are its results'
    two transfers to the host, then (IPRB with evictions) the banks' stale-row count."""
    k = update.pop("k", 0)
    det = RareCLIPDetector(small_config.model_copy(update=update))
    frames = [np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8) for i in range(6)]
    det.add_normal_references(frames[4 : 4 + k])
    stream = feature_stream(det, frames)
    for _ in range(10):  # past the caps: evictions, stale rows
        det.step_features(next(stream))
    recorder = Recorder()
    with recorder:
        det.step_features(next(stream))
    names = [name for name, _ in recorder.calls]
    syncs = [i for i, name in enumerate(names) if name in HOST_SYNCS]
    assert [names[i] for i in syncs[:2]] == ["tolist", "cpu"]  # the scalars, then the maps
    assert all(name not in HOST_SYNCS for name in names[: syncs[0]])
    expected_after = ["numpy"] + (["tolist"] if update.get("rarity_branch") != "dprb" else [])
    assert [names[i] for i in syncs[2:]] == expected_after
