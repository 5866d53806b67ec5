"""`lines`: one summary row per product line (counts, anomaly rate, score and latency percentiles)."""
from pipelines import query


def add_arguments(parser) -> None:
    query.add_output_arguments(parser)


def main(args) -> int:
    return query.print_result(lambda: query.lines_summary(query.results_dir_of(args)), args.format)
