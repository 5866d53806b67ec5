"""`anomalies`: a line's frames flagged anomalous, or its N highest scores, highest first."""
from pipelines import query
from pipelines.common import at_least


def add_arguments(parser) -> None:
    parser.add_argument("--line", required=True, help="line id")
    parser.add_argument("--since", type=query.iso_time, help="frames scored at or after this ISO time (UTC if no zone)")
    parser.add_argument("--top", type=at_least(1), help="the N highest-scoring ok frames, flagged or not")
    query.add_output_arguments(parser)


def main(args) -> int:
    return query.print_result(
        lambda: query.top_anomalies(query.results_dir_of(args), args.line, since=args.since, top=args.top), args.format
    )

