"""A batch of files through one Predictor, shared among the ranks of a torchrun launch.

Only results travel between ranks (each case's report as a dict); what the user sees is drawn by the
caller from the `SegmentEvents` it passed.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from dtml_deploy.io.extent import voxel_estimate
from dtml_deploy.io.outputs import RunPlan, plan_run
from dtml_deploy.ranks import Beat, ShardSettings, run_cases, sigterm_stops
from dtml_deploy.segment import CaseReport, Segmenter, case_names

if TYPE_CHECKING:
    from dtml_deploy.predictor import Predictor, SegmentEvents


def plan_outputs(segmenter: Segmenter, inputs: list[Path], output: Path) -> RunPlan:
    """Every case's outputs laid out before any work; paths two cases (or a case and an input) would share
    are refused with both names (io/outputs.py)."""
    return plan_run(inputs, case_names(inputs), output, segmenter.output_spec())


def segment_batch(predictor: Predictor, inputs: list[Path], output: Path, overwrite: bool, events: SegmentEvents,
                  shard: ShardSettings) -> list[CaseReport] | None:
    """Every input segmented into `output`; see `Predictor.segment_files`."""
    segmenter, ranks = predictor.segmenter, predictor.ranks
    names = case_names(inputs)
    protected = frozenset(plan_run(inputs, names, output, segmenter.output_spec()).taken)

    def work(i: int, beat: Beat) -> dict:
        events.case_started(i, names[i])

        def progress(done: int, total: int) -> None:
            events.windows(i, done, total)
            beat()

        return segmenter.segment_file(inputs[i], output, overwrite, progress, protected, names[i]).to_dict()

    def on_result(i: int, result: dict) -> None:
        events.case_finished(i, names[i], CaseReport(**result))

    with sigterm_stops():  # a stopped run removes its temporaries; no half-written case stays behind
        outcome = run_cases([str(p) for p in inputs], lambda i: voxel_estimate(inputs[i]), work, on_result,
                            ranks, shard, "segment")
    if outcome is None:
        return None
    events.batch_finished(outcome.stopped, outcome.ranks, sum(r is None for r in outcome.results))
    return [CaseReport(**r) if r is not None else
            CaseReport(input=str(p), status="failed", error=f"{p}: not segmented: {outcome.stopped}")
            for p, r in zip(inputs, outcome.results)]
