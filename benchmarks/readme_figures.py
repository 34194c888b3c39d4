"""Regenerate the README's pictures (into docs/), each from real data the repository holds:

  docs/preview.png          `dtml segment --preview` of a real LA scan (tests/data/la_sample) with the shipped model
  docs/sample_report.html   `dtml evaluate --report` of the three sample cases with the shipped model
  docs/la_report.html       the report of the shipped model's 64-case LA evaluation (results/la_eval_h200.json)
  docs/la_report.png        a headless-chromium screenshot of its summary and charts (skipped without chromium)
  docs/training_curves.png  the shipped model's training log (results/la_train_log_h200.jsonl.gz)
  docs/benchmark.png        `dtml benchmark --plot` of results/dtml_benchmark_cpu.json

    python benchmarks/readme_figures.py          # about a minute on 2 CPU cores; prints the summary table
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dtml_deploy.evaluate import score_model  # noqa: E402
from dtml_deploy.io.datasets import open_source  # noqa: E402
from dtml_deploy.metrics import summarise  # noqa: E402
from dtml_deploy.predictor import Predictor  # noqa: E402
from dtml_deploy.viz.bench_plot import write_benchmark_plot  # noqa: E402
from dtml_deploy.viz.curves import write_curves  # noqa: E402
from dtml_deploy.viz.report import PAPER, Thumbnails, write_html_report  # noqa: E402

DOCS = ROOT / "docs"
RES = ROOT / "benchmarks" / "results"
SAMPLE = ROOT / "tests" / "data" / "la_sample"
CASE = "SN4LF8SGBSRQUPTDSX78"  # the README's quick-start scan


def preview() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        (rep,) = Predictor.load(device="cpu", preview=True).segment_files([SAMPLE / "images" / f"{CASE}.nii.gz"],
                                                                           Path(tmp))  # type: ignore[misc]
        shutil.copy(rep.preview, DOCS / "preview.png")


def sample_report() -> None:
    predictor = Predictor.load(device="cpu", keep_uncertainty=True)
    source = open_source(SAMPLE)
    thumbs = Thumbnails()
    rows = score_model(predictor, [source.labeled(i) for i in source.case_ids], visit=thumbs)
    extra = {"model": "dtml_deploy/default_model", "bundle_hash": predictor.bundle.content_hash,
             "backend": predictor.describe(), "engine": {"head": predictor.settings.engine.head},
             "cases_from": "tests/data/la_sample"}
    write_html_report(DOCS / "sample_report.html", rows, summarise(rows), extra, thumbs.png)


def la_report() -> str:
    """The 64-case report from stored rows; returns its summary as a Markdown table in the paper's layout."""
    doc = json.loads((RES / "la_eval_h200.json").read_text())["default_seg"]
    extra = {"model": "dtml_deploy/default_model", "engine": {"head": "seg"}, "backend": "NVIDIA H200",
             "cases_from": "unlabeled_16 (64 LA2018 cases whose labels training never read)"}
    html = write_html_report(DOCS / "la_report.html", doc["rows"], doc["summary"], extra)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("chromium not found: docs/la_report.png not regenerated", file=sys.stderr)
    else:
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--screenshot={DOCS / 'la_report.png'}", "--window-size=1100,1130", html.as_uri()],
                       check=True, capture_output=True, timeout=120)
    cols = [(k, h, f) for k, h, f in PAPER if k in doc["summary"]]
    s = doc["summary"]
    return "\n".join(["| cases | " + " | ".join(h for _, h, _ in cols) + " |", "|---" * (len(cols) + 1) + "|",
                      f"| {len(doc['rows'])} | " + " | ".join(
                          f"{s[k]['mean'] * f:.2f} ± {s[k]['std'] * f:.2f}" for k, _, f in cols) + " |"])


def main() -> None:
    DOCS.mkdir(exist_ok=True)
    preview()
    sample_report()
    with gzip.open(RES / "la_train_log_h200.jsonl.gz", "rt") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    write_curves(rows, DOCS / "training_curves.png", title="shipped model (H200)")
    write_benchmark_plot(json.loads((RES / "dtml_benchmark_cpu.json").read_text()), DOCS / "benchmark.png")
    print(la_report())


if __name__ == "__main__":
    main()
