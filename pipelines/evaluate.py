"""`evaluate`: the paper's accuracy protocol (docs/algorithms/rareclip.md sec. 7) run through the replay actors.

Each category of an MVTec AD / VisA / generic-layout test split is a line of a
:class:`pipelines.line_cluster.LineCluster` (categories in parallel, a fresh detector state per
category), fed in the order ``random.seed(s); random.shuffle(list)`` of the official test order
for every seed ``s`` (a new cluster per seed, results in ``<out>/seed-<s>/results``). Rows are
joined back to their samples by (line_id = category, seq = position in that seed's shuffled
list); the stored float32 256 x 256 maps and the masks (``load_mask``) give the pixel metrics.
How maps and masks meet is the `protocol` (``PROTOCOLS``): ``authors`` as the RareCLIP authors'
evaluation code computes its Table 1 (masks squashed to the model's input size, legacy nearest
sampling to 256, maps resized bilinearly with align_corners=True, PRO at 200 thresholds with
the FPRs rescaled), ``aligned`` with masks cut as the model saw the frame and the exact PRO.
Metrics are in %:

* per category and seed: I-AUROC, I-F1-max, I-AP (``metrics.image_metrics``) and P-AUROC,
  P-F1-max, P-AP, PRO (``metrics.pixel_metrics``, at 256 x 256);
* per seed: the mean over categories (categories where a metric is undefined are skipped);
* reported: mean ± std over seeds, std being the population std (``numpy.std``, ddof=0).

Files in ``<out>``: ``metrics.md`` (per category and the mean, ``mean ± std``; the paper's
figures beside ours for mvtec and visa), ``metrics.csv`` (one row per category and seed,
``category=mean`` rows per seed, and ``seed=mean`` / ``seed=std`` rows over seeds) and
``metrics.json`` (everything, NaN as null).

A metric is NaN (and the reason is listed under the table) when the ground truth of a category
lacks a class: no anomalous image (image metrics), no defect pixel (pixel metrics, e.g. a
generic-layout category without masks), or no normal pixel; see ``rareclip_core.metrics``.
Anomalous images without a mask (generic layout) count for the image metrics only; frames the
pipeline could not decode (error rows) count for none, and are reported.

``<out>/evaluation.json`` records the setup (dataset, categories and their sizes, shots,
protocol, the detector's settings). A rerun into the same ``<out>`` with that setup keeps every seed it
finished, scores a seed it left part way again from the start, and can add seeds; an ``<out>``
holding another setup's seeds is refused with the settings that differ.
"""
from __future__ import annotations

import csv
import json
import math
import re
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from actors.result_table import STATUS_OK, MapUnavailable, read_map, read_results
from configs.loading import load_detector_config
from configs.pipeline import (
    CONFIG_DIR,
    DatasetSourceConfig,
    PipelineConfig,
    SnapshotConfig,
)
from rareclip_core import DetectorSettings, detector_class, detector_config_from_dict
from rareclip_core.config import ConfigError
from rareclip_core.data.datasets import Sample, load_dataset, load_mask, shuffled
from rareclip_core.data.files import atomic_write
from rareclip_core.metrics import PixelProtocol, image_metrics, pixel_metrics

from .common import EXIT_INTERRUPTED
from .preflight import out_problem, weights_problems

DEFAULT_CONFIG = CONFIG_DIR / "detector-paper.yaml"
DEFAULT_SEEDS = (0, 1, 2, 3, 4)
MAP_RESOLUTION = 256  # the protocol's metric resolution: maps are stored at it


@dataclass(frozen=True)
class EvaluationProtocol:
    """How the stored maps and the ground-truth masks meet for the pixel metrics."""

    description: str
    mask_view: Optional[str]  # load_mask's view; None: the detector's own input view
    map_resize: str  # how a line brings its maps to MAP_RESOLUTION (PipelineConfig.map_resize)
    pixels: PixelProtocol


PROTOCOLS = {
    "authors": EvaluationProtocol(
        "as the RareCLIP authors' test.py computes Table 1: masks squashed to the input size (for frames that are "
        "not square they do not line up with a centre-cropping detector's maps), legacy nearest sampling to 256, "
        "maps resized bilinearly (align_corners=True), PRO at 200 thresholds with the kept FPRs rescaled to [0, 1]",
        "squash", "bilinear", PixelProtocol(mask_resize="nearest", pro_curve="steps"),
    ),
    "aligned": EvaluationProtocol(
        "masks cut as the detector saw each frame, sampled at pixel centres; maps area-averaged; the exact PRO "
        "curve up to FPR 0.3 (the MVTec AD evaluation code's)",
        None, "area", PixelProtocol(),
    ),
}
DEFAULT_PROTOCOL = "authors"
IMAGE_METRICS = {"I-AUROC": "auroc", "I-F1-max": "f1_max", "I-AP": "ap"}
PIXEL_METRICS = {"P-AUROC": "auroc", "P-F1-max": "f1_max", "P-AP": "ap", "PRO": "pro"}
METRICS = (*IMAGE_METRICS, *PIXEL_METRICS)
COUNTS = ("images", "anomalous", "errors", "pixel_images")
STD_NOTE = "population standard deviation over seeds (numpy.std, ddof=0)"

MVTEC_TEXTURES = frozenset({"carpet", "grid", "leather", "tile", "wood"})
_UNREADABLE = "n/a*"
_UNREADABLE_NOTE = "*reported in the paper but not readable unambiguously from our text copy of the table"


class EvaluationError(Exception):
    """The run produced a result table that does not match the dataset (e.g. it was interrupted)."""


@dataclass(frozen=True)
class Plan:
    """A validated evaluation: every check that needs no actor has passed."""

    dataset: str
    root: str
    detector: DetectorSettings
    seeds: tuple[int, ...]
    out: Path
    samples: dict[str, list[Sample]]  # category -> samples in the official test order
    shots: int = 0  # normal references per category
    train: dict[str, list[Sample]] = field(default_factory=dict)  # category -> train (good) samples, with shots
    protocol: str = DEFAULT_PROTOCOL  # a key of PROTOCOLS

    @property
    def categories(self) -> list[str]:
        return list(self.samples)

    def references(self, category: str, seed: int) -> list[str]:
        """The category's normal references for a seed: the first `shots` train images in the
        order `random.seed(seed); random.shuffle` gives (as the test order; ours)."""
        return [s.path for s in shuffled(self.train.get(category, []), seed)[: self.shots]]

    def results_dir(self, seed: int) -> Path:
        return self.out / f"seed-{seed}" / "results"

    @property
    def record_path(self) -> Path:
        """What was evaluated under `out`: a rerun with the same setup keeps the seeds it finished."""
        return self.out / "evaluation.json"

    def setup(self) -> dict:
        """Everything that makes one seed's rows what they are (the seeds themselves aside), as JSON
        (round-tripped, so that it compares equal with the record read back)."""
        return json.loads(json.dumps({
            "dataset": self.dataset, "root": self.root, "shots": self.shots, "protocol": self.protocol,
            "images": {c: len(s) for c, s in self.samples.items()},
            "detector": self.detector.fingerprinted_settings(),  # not where it runs: a rerun may use another device
        }))

    def seed_is_complete(self, seed: int) -> bool:
        """Whether the seed's table has a row for every image of every category."""
        rows = read_results(self.results_dir(seed), ["line_id", "seq"]).to_pylist()
        seqs: dict[str, set[int]] = {}
        for row in rows:
            seqs.setdefault(row["line_id"], set()).add(row["seq"])
        return all(seqs.get(c) == set(range(len(s))) for c, s in self.samples.items())


def plan_evaluation(dataset, root, detector_config, seeds=DEFAULT_SEEDS, mode=None, out="out/evaluate",
                    categories=None, shots: int = 0, protocol: str = DEFAULT_PROTOCOL) -> Plan:
    """Validate everything before any actor starts. Raises ConfigError (bad detector config),
    FileNotFoundError / ValueError (missing or malformed dataset, unknown category, bad seeds,
    unknown protocol) or FileExistsError (`out` holds seeds of an evaluation with another setup:
    detector, dataset, categories, shots or protocol; those of the same setup are kept, or
    scored again if unfinished)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {sorted(PROTOCOLS)}, got {protocol!r}")
    if problem := out_problem(str(out)):
        raise ConfigError(problem)
    if isinstance(detector_config, (DetectorSettings, dict)):
        detector = detector_config_from_dict(detector_config)
    else:
        detector = load_detector_config(str(detector_config))
    if mode is not None:
        if "mode" not in type(detector).model_fields:
            raise ConfigError(f"--mode: detector kind {detector.kind!r} has no online/offline mode")
        detector = detector_config_from_dict({**detector.model_dump(), "mode": mode}, source="--mode")
    seeds = tuple(int(s) for s in seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and at least one, got {list(seeds)}")
    root = str(Path(root).resolve())  # the line actors may run elsewhere than this directory
    data = load_dataset(dataset, root, split="test")
    if categories:
        unknown = sorted(set(categories) - set(data))
        if unknown:
            raise ValueError(f"categories {unknown} not in {root}; found {sorted(data)}")
        data = {c: data[c] for c in dict.fromkeys(categories)}
    if "mean" in data:
        raise ValueError("a category named 'mean' would clash with the tables' mean row; evaluate the others")
    train = {}
    if shots < 0:
        raise ValueError(f"--shots must be >= 0, got {shots}")
    if shots:
        if not detector_class(detector).supports_references:
            raise ConfigError(f"--shots: detector kind {detector.kind!r} takes no normal references")
        train = load_dataset(dataset, root, split="train")
        short = {c: len(train.get(c, [])) for c in data if len(train.get(c, [])) < shots}
        if short:
            raise ValueError(f"--shots {shots}: too few train images in {short}")
    problems = weights_problems(detector)  # before Ray starts, as a job checks them (after the local checks: it may ask the Hub)
    if problems:
        raise ConfigError("; ".join(problems))
    plan = Plan(dataset, root, detector, seeds, Path(out), dict(sorted(data.items())), shots, train, protocol)
    used = [seed for seed in seeds if _has_files(plan.results_dir(seed).parent)]
    if used:
        earlier = json.loads(plan.record_path.read_text()) if plan.record_path.is_file() else None
        if earlier != plan.setup():
            what = "no record of what it evaluated" if earlier is None else "; ".join(_differences(earlier, plan.setup()))
            raise FileExistsError(
                f"{plan.results_dir(used[0]).parent} holds the rows of another evaluation ({what}); "
                "choose another --out or remove it"
            )
    return plan


def _has_files(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir())


def _differences(then: dict, now: dict, path: str = "") -> list[str]:
    """`key: X then, Y now` for each setting that differs between two setups (nested keys dotted)."""
    found = []
    for key in dict.fromkeys([*then, *now]):
        a, b = then.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += _differences(a, b, f"{path}{key}.")
        elif a != b:
            found.append(f"{path}{key}: {a!r} then, {b!r} now")
    return found


def evaluate(dataset, root, detector_config, seeds=DEFAULT_SEEDS, mode=None, out="out/evaluate",
             categories=None, address=None, progress: bool = True, shots: int = 0,
             protocol: str = DEFAULT_PROTOCOL) -> dict:
    """Run the protocol and write metrics.md/.csv/.json under `out`; returns the metrics.json
    content (with NaN, not null). `detector_config`: detector settings, a dict, or the path of a
    detector YAML or of a pipeline YAML with a `detector:` section; `mode` ('online' or
    'offline') overrides its `mode`, None keeps it; `shots` normal references per category;
    `protocol` a key of PROTOCOLS."""
    plan = plan_evaluation(dataset, root, detector_config, seeds, mode, out, categories, shots, protocol)
    run_plan(plan, address, progress)
    return score_plan(plan)


def category_settings(detector: DetectorSettings, category: str) -> dict:
    """The per-category detector settings the protocol implies: kinds with class-aware prompts
    (a `product` setting) name the category ('metal_nut' -> 'metal nut'), and use texture
    prompts for MVTec AD's five textures where they have an `is_texture` setting."""
    fields = type(detector).model_fields
    settings = {"product": category.replace("_", " ")} if "product" in fields else {}
    if "is_texture" in fields:
        settings["is_texture"] = category in MVTEC_TEXTURES
    return settings


def run_plan(plan: Plan, address=None, progress: bool = True) -> None:
    """Replay every seed's shuffled categories through a fresh LineCluster."""
    from .line_cluster import LineCluster, start_ray

    start_ray(address)
    n = len(plan.categories)
    plan.out.mkdir(parents=True, exist_ok=True)
    atomic_write(plan.record_path, lambda tmp: tmp.write_text(json.dumps(plan.setup(), indent=1)))
    for i, seed in enumerate(plan.seeds):
        seed_dir = plan.results_dir(seed).parent
        if _has_files(seed_dir):
            if plan.seed_is_complete(seed):
                print(f"seed {seed} ({i + 1}/{len(plan.seeds)}): scored by an earlier run of this evaluation; kept",
                      file=sys.stderr, flush=True)
                continue
            print(f"seed {seed} ({i + 1}/{len(plan.seeds)}): an earlier run stopped part way; scoring it again",
                  file=sys.stderr, flush=True)
            shutil.rmtree(seed_dir)
        cfg = PipelineConfig(
            detector=plan.detector,
            source=DatasetSourceConfig(kind="dataset", dataset=plan.dataset, root=plan.root,
                                       lines=plan.categories, shuffle_seed=seed),
            out=str(plan.out / f"seed-{seed}"),
            threshold=None,
            map_resolution=MAP_RESOLUTION,
            map_dtype="float32",
            map_resize=PROTOCOLS[plan.protocol].map_resize,
            references={c: plan.references(c, seed) for c in plan.categories} if plan.shots else {},
            line_detector={c: category_settings(plan.detector, c) for c in plan.categories},
            # no snapshots: a restarted line replays its category from seq 0 with a fresh state,
            # which gives the same rows; the paper model's banks would cost ~0.2 GB per snapshot
            snapshot=SnapshotConfig(every_frames=None, every_s=None),
        )
        print(f"seed {seed} ({i + 1}/{len(plan.seeds)}): {n} categories, {sum(map(len, plan.samples.values()))} "
              f"images, {plan.detector.kind}" + (f", {plan.detector.mode} mode" if hasattr(plan.detector, "mode") else ""),
              file=sys.stderr, flush=True)
        cluster = LineCluster(cfg, fit_all=True)  # every category at once
        try:
            summary = cluster.run(progress=progress)
        finally:
            cluster.shutdown()
        if summary.interrupted:
            raise KeyboardInterrupt
        done = summary.counts
        short = {c: done.get(c, 0) for c, s in plan.samples.items() if done.get(c, 0) < len(s)}
        if short:
            raise EvaluationError(f"seed {seed}: the run stopped early (frames fed per category: {short})")


def score_plan(plan: Plan) -> dict:
    """Metrics from the result tables of a finished run; writes the three files."""
    per_seed: dict[str, dict[int, dict]] = {}
    notes: list[str] = []
    for category, samples in plan.samples.items():
        view = PROTOCOLS[plan.protocol].mask_view or plan.detector.input_view
        masks = _category_masks(samples, plan.detector.image_size, view)
        per_seed[category] = {}
        seen: dict[str, list[int]] = {}  # message -> seeds it came up for
        for seed in plan.seeds:
            values, caught = category_metrics(plan, category, seed, masks)
            per_seed[category][seed] = values
            for msg in caught:
                seen.setdefault(msg, []).append(seed)
        for msg, seeds in seen.items():
            where = "" if len(seeds) == len(plan.seeds) else f" (seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))})"
            notes.append(f"{category}{where}: {msg}")
    seed_means = {
        seed: {m: _nanmean([per_seed[c][seed][m] for c in plan.categories]) for m in METRICS} for seed in plan.seeds
    }
    for seed, means in seed_means.items():
        for key in COUNTS:
            means[key] = sum(per_seed[c][seed][key] for c in plan.categories)
    summary = {c: _over_seeds([per_seed[c][s] for s in plan.seeds]) for c in plan.categories}
    summary["mean"] = _over_seeds([seed_means[s] for s in plan.seeds])
    detector = plan.detector
    result = {
        "dataset": plan.dataset,
        "root": plan.root,
        "mode": getattr(detector, "mode", None),
        "seeds": list(plan.seeds),
        "shots": plan.shots,
        "categories": plan.categories,
        "metrics": list(METRICS),
        "units": "%",
        "std": STD_NOTE,
        "category_mean": "mean over categories per seed, skipping categories where a metric is NaN",
        "map_resolution": MAP_RESOLUTION,
        "protocol": {"name": plan.protocol, "description": PROTOCOLS[plan.protocol].description},
        "model_id": detector.model_id,
        "detector": detector.model_dump(),
        "results": {str(s): str(plan.results_dir(s)) for s in plan.seeds},
        "per_seed": {c: {str(s): v for s, v in seeds.items()} for c, seeds in per_seed.items()}
        | {"mean": {str(s): v for s, v in seed_means.items()}},
        "summary": summary,
        "paper": paper_figures(plan.dataset, detector, plan.shots),
        "notes": notes,
    }
    write_tables(plan, result)
    return result


def paper_figures(dataset: str, detector: DetectorSettings, shots: int = 0) -> Optional[dict]:
    """The detector's paper figures for this dataset, setting and number of references (None
    where the paper reports none): per metric its value (mean, std) and status (reported,
    unreadable, not reported)."""
    figures = detector_class(detector).paper_figures(dataset, detector, shots)
    if figures is None:
        return None
    values = figures.values
    return {
        "source": figures.source,
        "row": figures.row,
        "note": figures.note,
        "values": {m: ({"mean": values[m][0], "std": values[m][1]} if values.get(m) else None) for m in METRICS},
        "status": {m: ("reported" if values.get(m) else "unreadable" if m in values else "not reported")
                   for m in METRICS},
    }


def category_metrics(plan: Plan, category: str, seed: int, masks: dict[str, np.ndarray]) -> tuple[dict, list[str]]:
    """The seven metrics (in %) and counts of one category and seed, with the reasons of any NaN."""
    results = plan.results_dir(seed)
    rows = read_results(results, ["seq", "uri", "score", "status", "error", "map_uri"], line_id=category).to_pylist()
    joined = join_rows(plan.samples[category], seed, rows, category)
    ok = [(s, r) for s, r in joined if r["status"] == STATUS_OK]  # official order
    pixel = [(s, r) for s, r in ok if not (s.label and s.mask_path is None)]
    values = {"images": len(joined), "anomalous": sum(s.label for s, _ in joined),
              "errors": len(joined) - len(ok), "pixel_images": len(pixel)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if ok:
            image = image_metrics([s.label for s, _ in ok], [r["score"] for s, r in ok])
        else:
            image = dict.fromkeys(IMAGE_METRICS.values(), math.nan)
            warnings.warn("image metrics are undefined (no scored image)", RuntimeWarning)
        if pixel:
            maps = np.stack([_load_map(results, r) for _, r in pixel])
            pix = pixel_metrics(np.stack([masks[s.path] for s, _ in pixel]), maps, size=MAP_RESOLUTION,
                                protocol=PROTOCOLS[plan.protocol].pixels)
        else:
            pix = dict.fromkeys(PIXEL_METRICS.values(), math.nan)
            warnings.warn("pixel metrics are undefined (no scored image with a mask)", RuntimeWarning)
    for name, key in IMAGE_METRICS.items():
        values[name] = 100.0 * image[key]
    for name, key in PIXEL_METRICS.items():
        values[name] = 100.0 * pix[key]
    messages = _undefined_by_reason([str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)])
    if values["errors"]:
        messages.append(f"{values['errors']} frame(s) could not be read and are left out of every metric")
    unmasked = len(ok) - len(pixel)
    if unmasked:
        messages.append(f"{unmasked} anomalous image(s) without a mask are left out of the pixel metrics")
    return values, messages


_UNDEFINED = re.compile(r"^(image|pixel) (\w+) is undefined \((.+)\); returning NaN$")  # metrics._warn_undefined


def _undefined_by_reason(messages: list[str]) -> list[str]:
    """The metrics' "<level> <metric> is undefined (<reason>)" warnings as one message per reason,
    naming the table's columns (`I-AUROC, I-F1-max, I-AP undefined (no positive samples)`)."""
    columns = {("image", key): name for name, key in IMAGE_METRICS.items()}
    columns |= {("pixel", key): name for name, key in PIXEL_METRICS.items()}
    by_reason: dict[str, list[str]] = {}
    others = []
    for message in messages:
        match = _UNDEFINED.match(message)
        if match and (match[1], match[2]) in columns:
            by_reason.setdefault(match[3], []).append(columns[match[1], match[2]])
        else:
            others.append(message)
    return [f"{', '.join(names)} undefined ({reason})" for reason, names in by_reason.items()] + others


def join_rows(samples: Sequence[Sample], seed: int, rows: list[dict], category: str) -> list[tuple[Sample, dict]]:
    """(sample, row) pairs in the official order: row `seq` belongs to ``shuffled(samples, seed)[seq]``."""
    order = shuffled(samples, seed)
    by_seq = {r["seq"]: r for r in rows}
    if len(by_seq) != len(rows) or sorted(by_seq) != list(range(len(order))):
        raise EvaluationError(
            f"{category}, seed {seed}: the result table has seqs {sorted(by_seq)[:5]}... ({len(rows)} rows), "
            f"expected exactly 0..{len(order) - 1}"
        )
    joined = {}
    for seq, sample in enumerate(order):
        row = by_seq[seq]
        if row["uri"] != sample.path:
            raise EvaluationError(f"{category}, seed {seed}: row {seq} is {row['uri']}, expected {sample.path}")
        joined[sample.path] = row
    return [(s, joined[s.path]) for s in samples]


def _category_masks(samples: Sequence[Sample], image_size: int, view: str) -> dict[str, np.ndarray]:
    return {s.path: load_mask(s, image_size, view) for s in samples if not (s.label and s.mask_path is None)}


def _load_map(results_dir: Path, row: dict) -> np.ndarray:
    try:
        return read_map(results_dir, row["map_uri"])
    except MapUnavailable as exc:
        raise EvaluationError(f"row {row['seq']} ({row['uri']}): {exc}") from None


def _nanmean(values) -> float:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr[~np.isnan(arr)].mean()) if (~np.isnan(arr)).any() else math.nan


def _over_seeds(rows: list[dict]) -> dict:
    """mean and population std (ddof=0) over seeds of each metric; counts of the first seed."""
    out = {m: {"mean": float(np.mean([r[m] for r in rows])), "std": float(np.std([r[m] for r in rows], ddof=0))}
           for m in METRICS}
    out.update({k: rows[0][k] for k in COUNTS})
    return out


# ---- output ------------------------------------------------------------------------------------
def _cell(mean, std) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "NaN"
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


def format_markdown(result: dict) -> str:
    seeds = ", ".join(map(str, result["seeds"]))
    det = result["detector"]
    lines = [
        f"# Evaluation of {det['kind']}: {result['dataset']} ({result['root']})"
        + (f", {result['mode']} mode" if result["mode"] else ""),
        "",
        f"Detector `{result['model_id']}` (image size {det['image_size']})"
        + (f", {result['shots']} normal references per category (the first of its train images shuffled by the "
           f"seed, learned before the test images)" if result["shots"] else "") + f". Seeds {seeds}: "
        f"each category's official test order shuffled by `random.seed(s); random.shuffle`, a fresh state per "
        f"category and seed. Metrics in %, maps and masks at {result['map_resolution']}x{result['map_resolution']}, "
        f"protocol `{result['protocol']['name']}` ({result['protocol']['description']}); "
        f"each cell is the mean ± {result['std']}; the mean row averages the categories per seed first "
        f"(skipping a category where a metric is NaN).",
        "",
        "| category | images | " + " | ".join(METRICS) + " |",
        "|---|---:|" + "---:|" * len(METRICS),
    ]
    summary = result["summary"]
    for name in [*result["categories"], "mean"]:
        row = summary[name]
        label = "**mean**" if name == "mean" else name
        lines.append(f"| {label} | {row['images']} | "
                     + " | ".join(_cell(row[m]["mean"], row[m]["std"]) for m in METRICS) + " |")
    paper = result["paper"]
    footnotes = []
    if paper:
        cells = []
        for m in METRICS:
            value, status = paper["values"][m], paper["status"][m]
            cells.append(_cell(value["mean"], value["std"]) if value else _UNREADABLE if status == "unreadable" else "not reported")
        lines.append(f"| paper: {paper['row']} | | " + " | ".join(cells) + " |")
        footnotes.append(f"Paper row: {paper['source']}" + (f" ({paper['note']})." if paper["note"] else "."))
        if _UNREADABLE in cells:
            footnotes.append(_UNREADABLE_NOTE + ".")
    if result["notes"]:
        footnotes.append("Notes: " + "; ".join(result["notes"]) + ".")
    return "\n".join(lines + ([""] + footnotes if footnotes else [])) + "\n"


def write_tables(plan: Plan, result: dict) -> None:
    plan.out.mkdir(parents=True, exist_ok=True)
    (plan.out / "metrics.md").write_text(format_markdown(result))
    with (plan.out / "metrics.json").open("w") as fh:
        json.dump(_json_ready(result), fh, indent=2, allow_nan=False)
        fh.write("\n")
    with (plan.out / "metrics.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["category", "seed", *COUNTS, *METRICS])
        per_seed = result["per_seed"]
        for name in [*result["categories"], "mean"]:
            for seed in result["seeds"]:
                row = per_seed[name][str(seed)]
                writer.writerow([name, seed, *(row[k] for k in COUNTS), *(_csv_number(row[m]) for m in METRICS)])
        for name in [*result["categories"], "mean"]:
            row = result["summary"][name]
            for stat in ("mean", "std"):
                writer.writerow([name, stat, *(row[k] for k in COUNTS), *(_csv_number(row[m][stat]) for m in METRICS)])


def _csv_number(value: float) -> str:
    return "nan" if math.isnan(value) else repr(float(value))


def _json_ready(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value


# ---- command line ------------------------------------------------------------------------------
def add_arguments(parser) -> None:
    parser.add_argument("--dataset", required=True, choices=("mvtec", "visa", "folder"), help="dataset layout")
    parser.add_argument("--root", required=True, help="dataset root folder")
    parser.add_argument(
        "--config", default=str(DEFAULT_CONFIG),
        help="detector YAML, or a pipeline YAML with a `detector:` section (default: %(default)s)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS),
                        help="shuffle seeds, one full run each (default: 0 1 2 3 4, the paper's)")
    parser.add_argument("--mode", choices=("online", "offline"),
                        help="detector mode (default: the config's `mode`)")
    parser.add_argument("--out", default="out/evaluate",
                        help="result tables in <out>/seed-<s>/results, metrics.md/.csv/.json in <out>; a rerun "
                             "with the same setup keeps the seeds it finished (default: %(default)s)")
    parser.add_argument("--categories", nargs="+", help="evaluate only these categories (default: all)")
    parser.add_argument("--shots", type=int, default=0,
                        help="normal references per category from its train split, learned first (k-shot; default 0)")
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default=DEFAULT_PROTOCOL,
                        help="how maps meet masks for the pixel metrics: authors (as the RareCLIP authors' code "
                             "computes the paper's table) or aligned (masks cut as the detector saw each frame, "
                             "the exact PRO curve); default %(default)s")
    parser.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args) -> int:
    try:
        plan = plan_evaluation(args.dataset, args.root, args.config, args.seeds, args.mode, args.out, args.categories,
                               args.shots, args.protocol)
    except (ConfigError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from .line_cluster import stop_ray

    started = time.monotonic()
    try:
        run_plan(plan, args.address, progress=not args.no_progress)
        result = score_plan(plan)
    except EvaluationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted: the seeds finished so far are in {plan.out}; an evaluation starts afresh "
              "(remove its folder or choose another --out)", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        stop_ray()
    print(f"\nevaluated {len(plan.categories)} categories x {len(plan.seeds)} seeds in "
          f"{time.monotonic() - started:.0f}s; result tables in {plan.out}/seed-*/results, metrics in "
          f"{plan.out}/metrics.md, metrics.csv, metrics.json\n")
    print(format_markdown(result), end="")
    return 0
