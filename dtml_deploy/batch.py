"""A batch of files through one Predictor, shared among the ranks of a torchrun launch.

Only results travel between ranks (each case's report as a dict); what the user sees is drawn by the
caller from the `SegmentEvents` it passed.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from dtml_deploy.errors import InputError
from dtml_deploy.io.extent import voxel_estimate
from dtml_deploy.ranks import Beat, ShardSettings, run_cases
from dtml_deploy.segment import CaseReport, case_names, output_is_file

if TYPE_CHECKING:
    from dtml_deploy.predictor import Predictor, SegmentEvents


def check_output(inputs: list[Path], output: Path) -> None:
    """Refuse, before any work, an `-o` file with several inputs."""
    if output_is_file(output) and len(inputs) > 1:
        raise InputError(f"{output}: -o names one image file, but {len(inputs)} inputs were given; pass a folder")


def segment_batch(predictor: Predictor, inputs: list[Path], output: Path, overwrite: bool, events: SegmentEvents,
                  shard: ShardSettings) -> list[CaseReport] | None:
    """Every input segmented into `output`; see `Predictor.segment_files`."""
    check_output(inputs, output)
    segmenter, ranks = predictor.segmenter, predictor.ranks
    names = case_names(inputs)
    dupes = {n for n in names if names.count(n) > 1}

    def work(i: int, beat: Beat) -> dict:
        path, name = inputs[i], names[i]
        if name in dupes:
            return CaseReport(input=str(path), status="failed",
                              error=f"{path}: another input has the same case name '{name}'").to_dict()
        events.case_started(i, name)

        def progress(done: int, total: int) -> None:
            events.windows(i, done, total)
            beat()

        return segmenter.segment_file(path, output, overwrite, progress, name).to_dict()

    def on_result(i: int, result: dict) -> None:
        events.case_finished(i, names[i], CaseReport(**result))

    outcome = run_cases([str(p) for p in inputs], lambda i: voxel_estimate(inputs[i]), work, on_result,
                        ranks, shard, "segment")
    if outcome is None:
        return None
    events.batch_finished(outcome.stopped, outcome.ranks, sum(r is None for r in outcome.results))
    return [CaseReport(**r) if r is not None else
            CaseReport(input=str(p), status="failed", error=f"{p}: not segmented: {outcome.stopped}")
            for p, r in zip(inputs, outcome.results)]
