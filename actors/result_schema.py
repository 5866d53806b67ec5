"""The result table: one row per (line_id, seq), Hive-partitioned by line_id and date."""
import pyarrow as pa

STATUS_OK = "ok"
STATUS_ERROR = "error"

# Columns stored in each Parquet file; `line_id` and `date` are the Hive partition keys
# (directories `line_id=<id>/date=<YYYY-MM-DD>/`) and come back as columns when the dataset
# is read with partitioning="hive".
RESULT_SCHEMA = pa.schema(
    [
        pa.field("line_id", pa.string(), nullable=False),
        pa.field("seq", pa.int64(), nullable=False),
        pa.field("uri", pa.string()),
        pa.field("ingest_time", pa.timestamp("us", tz="UTC")),
        pa.field("scored_time", pa.timestamp("us", tz="UTC")),
        pa.field("latency_ms", pa.float64()),
        pa.field("score", pa.float64()),
        pa.field("is_anomaly", pa.bool_()),
        pa.field("threshold", pa.float64()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("model_id", pa.string()),
        pa.field("map_uri", pa.string()),
        pa.field("date", pa.string(), nullable=False),
    ]
)
PARTITION_COLUMNS = ("line_id", "date")
FILE_SCHEMA = pa.schema([f for f in RESULT_SCHEMA if f.name not in PARTITION_COLUMNS])
