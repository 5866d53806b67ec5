"""Pipeline configuration: YAML validated by pydantic before any actor starts."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional, Union

from pydantic import Field, SerializeAsAny, field_validator, model_validator

from rareclip_core.config import DetectorSettings, StrictModel
from rareclip_core.data.frames import MAX_PIXELS, FrameDecoding
from rareclip_core.detectors.rareclip.config import RareCLIPConfig
from rareclip_core.registry import detector_class, detector_config_from_dict

CONFIG_DIR = Path(__file__).parent
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"  # where `run_cluster.py nats-server` listens


class FolderSourceConfig(StrictModel):
    """`<root>/<line_id>/<frames sorted by name>`; `watch` keeps polling for new files (live)."""

    kind: Literal["folder"]
    root: str = Field(description="the folder holding one folder of frames per line")
    lines: Optional[list[str]] = Field(None, description="the lines to read; default: every line folder")
    watch: bool = Field(False, description="keep polling for new files (`live` sets it)")
    poll_s: float = Field(1.0, gt=0, description="how often a watched folder is listed again")
    settle_s: float = Field(
        1.0, ge=0, description="watched folders: a file is taken once unmodified for this long (a camera still writing it)"
    )
    recursive: bool = Field(
        False, description="also read the frames in each line folder's subfolders (e.g. one per day), in the order of "
        "their path under the line folder; off, a line that has subfolders says once that they are not read",
    )
    max_file_age_s: float = Field(
        86_400.0,
        ge=0,
        description="watched folders: the ingest ledger remembers the files taken in the last 2 × this (bounded memory) "
        "and leaves out files modified more than this before the line's newest frame; 0 = remember every file",
    )


class ManifestSourceConfig(StrictModel):
    """A CSV or Parquet file with columns line_id, uri[, timestamp]."""

    kind: Literal["manifest"]
    path: str = Field(description="the CSV or Parquet manifest file")
    lines: Optional[list[str]] = Field(None, description="the lines to read; default: every line_id in the manifest")


class DatasetSourceConfig(StrictModel):
    """An MVTec AD / VisA / generic-layout dataset: each category is a line (test split)."""

    kind: Literal["dataset"]
    dataset: Literal["mvtec", "visa", "folder"] = Field(description="the dataset's layout")
    root: str = Field(description="the dataset's root folder")
    lines: Optional[list[str]] = Field(None, description="the categories to read; default: all")
    shuffle_seed: Optional[int] = Field(None, description="shuffle each category's test images with this seed; null: the official order")


class SyntheticSourceConfig(StrictModel):
    """Generated line images with known defects, written under `<out>/frames/<line_id>/`."""

    kind: Literal["synthetic"]
    lines: dict[str, Literal["object", "texture"]] = Field(min_length=1, description="line id -> what its frames show")
    frames: int = Field(30, ge=1, description="frames per line")
    seed: int = Field(0, description="seeds every line's drawing")
    size: int = Field(128, ge=16, description="frame side in pixels")
    defect_rate: float = Field(0.1, ge=0, le=1, description="share of frames drawn with a defect")


class NatsSourceConfig(StrictModel):
    """NATS JetStream: a camera publishes each frame's bytes to `<subject_prefix>.<line_id>`; a
    frame's seq is its position among its line's messages, kept in the line's ledger. `watch` (set by
    `live`) follows new frames."""

    kind: Literal["nats"]
    url: str = Field(DEFAULT_NATS_URL, description="the NATS server")
    stream: str = Field("FRAMES", pattern=r"^[A-Za-z0-9_-]+$", description="the JetStream stream (created if missing)")
    subject_prefix: str = Field("frames", description="frames of line L arrive on <subject_prefix>.L")
    lines: Optional[list[str]] = Field(
        None, min_length=1,
        description="the lines to read (one subject each); default: every line with a message in the stream, and "
        "(watched) each line whose camera starts publishing while the job runs",
    )
    watch: bool = Field(False, description="follow new frames (`live` sets it)")
    poll_s: float = Field(0.05, gt=0, description="how often a watched line looks for new frames")


SourceConfig = Annotated[
    Union[FolderSourceConfig, ManifestSourceConfig, DatasetSourceConfig, SyntheticSourceConfig, NatsSourceConfig],
    Field(discriminator="kind"),
]


class SnapshotConfig(StrictModel):
    every_frames: Optional[int] = Field(25, ge=1, description="snapshot a line after this many frames")
    every_s: Optional[float] = Field(None, gt=0, description="and/or after this many seconds")
    keep: int = Field(3, ge=1, description="newest snapshots kept per line")
    root: Optional[str] = Field(None, description="local path or object-store URI; default <out>/snapshots")


class AutoThresholdConfig(StrictModel):
    """`threshold: auto`: median + mads * MAD (normal-scaled) of the line's first `frames` ok scores."""

    frames: int = Field(20, ge=3, description="ok frames a line's `auto` threshold is calibrated on")
    mads: float = Field(3.0, gt=0, description="how many normal-scaled MADs above the median the threshold lies")


class VerdictsConfig(StrictModel):
    """Every row is also published as a JSON verdict to `<subject_prefix>.<line_id>` once scored."""

    kind: Literal["nats"]
    url: Optional[str] = Field(None, description="default: the NATS source's url")
    stream: str = Field("VERDICTS", pattern=r"^[A-Za-z0-9_-]+$", description="the JetStream stream (created if missing)")
    subject_prefix: str = Field("verdicts", description="the verdict of line L is published to <subject_prefix>.L")
    duplicate_window_s: float = Field(120.0, gt=0, description="a new stream's message-id deduplication window")


class PipelineConfig(StrictModel):
    detector: SerializeAsAny[DetectorSettings] = Field(
        default_factory=RareCLIPConfig, description="the detector's settings; `kind` selects it (default rareclip)"
    )
    line_detector: dict[str, dict] = Field(
        default_factory=dict,
        description="per-line detector settings that differ from `detector`, e.g. {widget: {product: 'metal disc'}}",
    )
    references: dict[str, list[str]] = Field(
        default_factory=dict,
        description="per line, normal reference images (paths or URIs) the line learns first (k-shot)",
    )
    source: SourceConfig = Field(description="where frames come from: its `kind` is folder, manifest, dataset, synthetic or nats")
    out: str = Field("out", description="results in <out>/results, snapshots in <out>/snapshots")
    threshold: Optional[Union[float, Literal["auto"]]] = Field(
        None, description="is_anomaly = score >= threshold; `auto`: calibrated per line (auto_threshold); null leaves it empty"
    )
    thresholds: dict[str, Union[float, Literal["auto"]]] = Field(
        default_factory=dict, description="per-line thresholds (a number or `auto`)"
    )
    auto_threshold: AutoThresholdConfig = Field(
        default_factory=AutoThresholdConfig, description="how lines with `threshold: auto` calibrate it"
    )
    lines_per_gpu: int = Field(4, ge=1, description="each line actor takes 1/lines_per_gpu of a GPU")
    line_num_cpus: float = Field(0.5, gt=0, description="CPU share reserved per line actor")
    line_resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources per line actor, e.g. {line_host: 1} pins lines to such nodes"
    )
    ingest_actors: int = Field(1, ge=1, description="ingestion actors; the lines are shared out among them")
    decode_threads: int = Field(4, ge=1, description="threads per ingestion actor decoding frames side by side")
    max_in_flight: int = Field(8, ge=1, description="frames submitted but not yet scored, per line")
    max_pixels: int = Field(MAX_PIXELS, ge=64, description="frames with more pixels get an error row")
    frame_bits: Optional[int] = Field(
        None, ge=9, le=32,
        description="bits per pixel of high-bit grayscale frames (16-bit PNG/TIFF), e.g. 12 for Mono12: they are "
        "scaled to 8 bits by v * 255 / (2**frame_bits - 1); null gives such frames an error row",
    )
    gap_timeout_s: float = Field(60.0, gt=0, description="wait this long for a missing seq, then an error row")
    retire_gone_lines_s: Optional[float] = Field(
        600.0, gt=0,
        description="in a live job that takes new lines, a line whose folder (or stream subject) has been gone this long is "
        "retired: it scores what it recorded, is snapshotted, and its actor ends (its GPU share is free for another "
        "line); if it comes back it rejoins where it stopped. null keeps such lines until the job stops",
    )
    map_resolution: Optional[int] = Field(64, ge=8, description="stored anomaly map side; null stores none")
    map_dtype: Literal["float16", "float32"] = Field(
        "float16", description="dtype of stored maps; float32 for evaluation (no quantization)"
    )
    map_resize: Literal["area", "bilinear"] = Field(
        "area", description="how a map is brought to map_resolution: area (each stored pixel the mean of the pixels it "
        "covers) or bilinear with align_corners=True (the RareCLIP authors' evaluation)",
    )
    maps_keep_days: Optional[int] = Field(
        None, ge=0, description="delete the stored maps of rows dated more than this many days before a line's newest "
        "row (the rows stay); null keeps every map",
    )
    backbone_batch: int = Field(1, ge=1, description="frames per backbone call (replay); scores unchanged")
    writer_batch_rows: int = Field(256, ge=1, description="buffered rows that make the writer write a file")
    writer_flush_s: float = Field(2.0, gt=0, description="... or the age in seconds of its oldest buffered row")
    writer_compact_files: int = Field(
        64, ge=0, description="merge a line's files of one date into one once it has this many small ones (0: never)"
    )
    writer_compact_rows: int = Field(50_000, ge=2, description="a file with this many rows is not merged again")
    writer_max_held_rows: int = Field(
        50_000, ge=1, description="rows the writer holds in memory while it cannot write (a full disk); past them it "
        "refuses rows and ingestion pauses until it can write, and then the lines score the refused frames again from "
        "their snapshots",
    )
    snapshot: SnapshotConfig = Field(default_factory=SnapshotConfig, description="when and where line state is saved")
    verdicts: Optional[VerdictsConfig] = Field(None, description="also publish each row as a verdict (NATS)")

    @property
    def frame_decoding(self) -> FrameDecoding:
        return FrameDecoding(self.max_pixels, self.frame_bits)

    @property
    def ledger_dir(self) -> str:
        """Where ingestion records each line's frames and their seqs (folder and manifest sources)."""
        return str(Path(self.out).resolve() / "ledger")

    @property
    def references_dir(self) -> Path:
        """Where the references added to lines while they run are kept (actors/reference_log.py)."""
        return Path(self.out).resolve() / "references"

    def reference_log_dir(self, line_id: str) -> str:
        return str(self.references_dir / line_id)

    @property
    def results_dir(self) -> Path:
        return Path(self.out) / "results"

    @property
    def snapshot_root(self) -> str:
        return self.snapshot.root or str(Path(self.out).resolve() / "snapshots")

    @property
    def verdict_stream(self):
        """Where verdicts are published (`StreamSettings`), or None."""
        from rareclip_core.data.nats_stream import StreamSettings

        if self.verdicts is None:
            return None
        url = self.verdicts.url or (self.source.url if isinstance(self.source, NatsSourceConfig) else DEFAULT_NATS_URL)
        return StreamSettings(url, self.verdicts.stream, self.verdicts.subject_prefix, self.verdicts.duplicate_window_s)

    def takes_new_lines(self, lines: Optional[list[str]] = None) -> bool:
        """Whether a line that appears while the job runs joins it: a watched folder or stream whose
        lines are named neither in the source nor by the command's `lines`."""
        source = self.source
        return isinstance(source, (FolderSourceConfig, NatsSourceConfig)) and source.watch and not source.lines and not lines

    def threshold_for(self, line_id: str) -> Optional[Union[float, Literal["auto"]]]:
        """The line's threshold: a number, `auto` (calibrated by the line), or None."""
        return self.thresholds.get(line_id, self.threshold)

    def detector_for(self, line_id: str) -> DetectorSettings:
        """The detector settings of one line: `detector` with the line's `line_detector` entries."""
        changes = self.line_detector.get(line_id)
        if not changes:
            return self.detector
        return detector_config_from_dict({**self.detector.model_dump(), **changes}, prefix=f"line_detector.{line_id}.")

    @model_validator(mode="after")
    def _line_detectors_are_valid(self):
        for line_id in self.line_detector:
            self.detector_for(line_id)  # raises ConfigError naming the field
        for line_id, uris in self.references.items():
            detector = self.detector_for(line_id)
            if uris and not detector_class(detector).supports_references:
                raise ValueError(f"references.{line_id}: detector kind {detector.kind!r} takes no normal references")
            for i, uri in enumerate(uris):
                if "://" not in uri and not Path(uri).expanduser().is_file():
                    raise ValueError(f"references.{line_id}[{i}]: no file at {uri!r}")
        return self

    @model_validator(mode="after")
    def _out_is_not_read_as_a_line(self):
        """A folder source lists every folder under its root as a line: the job's own output
        folder must not be one of them (a line `out`, or lines `results`, `snapshots`, ...)."""
        source = self.source
        if not isinstance(source, FolderSourceConfig) or source.lines:
            return self
        root, out = Path(source.root).resolve(), Path(self.out).resolve()
        if out == root or (out.is_relative_to(root) and not out.relative_to(root).parts[0].startswith(".")):
            raise ValueError(
                f"out: {self.out!r} lies in source.root {source.root!r}, whose folders are the lines: the job's own "
                "results and snapshots would be read as a line. Put out outside source.root, or name the lines in "
                "source.lines"
            )
        return self

    @field_validator("detector", mode="before")
    @classmethod
    def _detector_of_its_kind(cls, value):
        """A mapping becomes the settings of the kind it names (the registry's)."""
        return detector_config_from_dict(value, prefix="detector.")

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>") -> "PipelineConfig":
        """Validated settings; the detector section first, so that its errors name its fields."""
        if isinstance(data.get("detector"), dict):
            data = {**data, "detector": detector_config_from_dict(data["detector"], source, "detector.")}
        base = data.get("detector") or RareCLIPConfig()
        for line_id, changes in (data.get("line_detector") or {}).items():
            if isinstance(changes, dict):
                detector_config_from_dict({**base.model_dump(), **changes}, source, f"line_detector.{line_id}.")
        return super().from_dict(data, source)


def config_default(field: str, model: type[StrictModel] = PipelineConfig):
    """A setting's default, for the actors' settings objects: the config owns every default."""
    return model.model_fields[field].default


def open_source(source: SourceConfig, ledger_dir: Optional[str] = None):
    """The frame source a (materialized) source config describes. With `ledger_dir`, each line's
    frames and their seqs are recorded in a ledger there (only ingestion writes it); a dataset's
    fixed order needs none."""
    from rareclip_core.data.sources import (
        DatasetSource,
        FolderSource,
        ManifestSource,
        Source,
    )

    if isinstance(source, FolderSourceConfig):
        folder = FolderSource(
            source.root, source.lines, source.watch, source.settle_s, source.max_file_age_s, recursive=source.recursive
        )
        return Source(folder, ledger_dir)
    if isinstance(source, ManifestSourceConfig):
        return Source(ManifestSource(source.path, source.lines), ledger_dir)
    if isinstance(source, DatasetSourceConfig):
        return Source(DatasetSource(source.dataset, source.root, source.lines, source.shuffle_seed))
    if isinstance(source, NatsSourceConfig):
        from rareclip_core.data.nats_stream import NatsFrameSource, StreamSettings

        settings = StreamSettings(source.url, source.stream, source.subject_prefix)
        return NatsFrameSource(settings, source.lines, source.watch, ledger_dir=ledger_dir)
    raise ValueError("synthetic sources are written to folders first (pipelines.line_cluster.materialize_source)")
