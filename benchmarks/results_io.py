"""Where a benchmark's results go: one JSON line per result, printed and appended to its --out
file (benchmarks/results/<name>.jsonl unless given). Importable by every script here, as
`python benchmarks/<script>.py` puts this folder first on sys.path."""
import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def add_out(parser: argparse.ArgumentParser, name: str) -> None:
    """--out, by default benchmarks/results/<name>.jsonl."""
    parser.add_argument("--out", default=str(RESULTS / f"{name}.jsonl"), help=f"JSON-lines file the results are appended to (default: benchmarks/results/{name}.jsonl)")


def record(line: dict, out: str | Path, echo: bool = True) -> None:
    """Print `line` as one JSON line (echo False: a worker's line, its driver reports it) and
    append it to `out`, creating its folder."""
    text = json.dumps(line)
    if echo:
        print(text, flush=True)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        f.write(text + "\n")
