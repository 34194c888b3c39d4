"""Print the README's results tables from the JSON files the benchmark scripts wrote.

    python benchmarks/readme_tables.py > /tmp/tables.md   # then paste into README.md

Sources (each written by the script named in its table's caption):
  results/segment_speed_h200.json, results/segment_speed_cpu.json  <- segment_speed.py --json
  results/train_speed_h200.json                                      <- train_speed.py --json
  results/la_eval_h200.json                                          <- the evaluation of reproduce_la.sh
  ../dtml_deploy/default_model/config.json                           <- the training run itself
  results/metrics_speed_cpu.json, results/backend_speed_cpu.json     <- metrics_speed.py / backend_speed.py --json
  results/qc_calibration_cpu.json                                    <- qc_calibration.py analyse
  results/scaling_cpu.json                                           <- scaling.py --json
  results/serve_throughput_cpu.json                                  <- serve_throughput.py --json
  results/openvino_accuracy_cpu.json, results/openvino_speed_cpu.json <- openvino_accuracy.py / openvino_speed.py
  results/openvino_int8_variants_cpu.json <- openvino_int8_variants.py
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
RES = HERE / "results"
PAPER = {"dice": 90.12, "jaccard": 82.14, "asd": 1.82, "hd95": 7.01}


def load(name: str) -> dict | None:
    p = RES / name
    return json.loads(p.read_text()) if p.is_file() else None


def fmt(v: object, digits: int = 3) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def speed_table(doc: dict, title: str) -> str:
    lines = [f"{title} ({doc['machine']})", "",
             "| comparison | method | volume | windows | seconds | Mvox/s | speed-up | max abs diff of p |",
             "|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        if "error" in r and "seconds" not in r:
            lines.append(f"| {r['section']} | {r['method']} | | | failed: {r['error']} | | | |")
            continue
        ratio = r.get("vs paper loop") or r.get("vs MONAI")
        base = " vs paper loop" if "vs paper loop" in r else (" vs MONAI" if "vs MONAI" in r else "")
        lines.append(f"| {r['section']} | {r['method']} | {r['volume']} | {r['windows']} | {r['seconds']:.3f} | "
                     f"{fmt(r['Mvox/s'])} | {fmt(ratio) + 'x' + base if ratio else ''} | {fmt(r.get('max |dp|'), 2)} |")
    return "\n".join(lines)


def accuracy_table(doc: dict) -> str:
    names = {"paper_seg": "paper protocol (stride 18/18/4, constant, fp32, LCC), M_s",
             "default_seg": "dtml grid (overlap 0.5, Gaussian, fp16, LCC), M_s (--head seg)",
             "default_sdm": "dtml grid, M_d (sigmoid(-k sdm), --head sdm)",
             "default_mean": "dtml grid, mean of both heads (--head mean, the default)"}
    lines = ["| evaluation | Dice % | Jaccard % | ASD vox | 95HD vox | median Dice % "
             "| cases flagged (agreement < 0.8) |",
             "|---|---|---|---|---|---|---|",
             f"| paper, DTML 16/64, test split (20 cases) | {PAPER['dice']} | {PAPER['jaccard']} | {PAPER['asd']} | "
             f"{PAPER['hd95']} | | |"]
    for key, label in names.items():
        if key not in doc:
            continue
        s, rows = doc[key]["summary"], doc[key]["rows"]
        median = statistics.median(r["dice"] for r in rows)
        flagged = sum(1 for r in rows if r.get("agreement") is not None and r["agreement"] < 0.8)
        lines.append(f"| {label}, 64 unlabeled training cases | {100 * s['dice']['mean']:.2f} | "
                     f"{100 * s['jaccard']['mean']:.2f} | {s['asd']['mean']:.2f} | {s['hd95']['mean']:.2f} | "
                     f"{100 * median:.1f} | {flagged} |")
    return "\n".join(lines)


def _config_rows(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        hd_missing = f" ({r['hd95_missing']} empty)" if r.get("hd95_missing") else ""
        forwards = f" ({r['forwards']:.0f} forwards)" if r["forwards"] != r["windows"] else ""
        out.append(f"| {r['protocol']} | {'on' if r['tta'] else 'off'} | {r['head']} | {r['precision']} | "
                   f"{r['cases']} | {100 * r['dice']:.2f} | {100 * r['jaccard']:.2f} | {r['hd95']:.2f}{hd_missing} | "
                   f"{r['asd']:.2f} | {100 * r['median_dice']:.1f} | {r['seconds']:.1f} | "
                   f"{r['windows']:.1f}{forwards} |")
    return out


def head_tta_protocol_table(doc: dict, gpu: dict | None) -> str:
    """Head x TTA x protocol on the 64 unlabeled cases, every configuration from the same run per case."""
    header = ["| protocol | TTA | head | precision | cases | Dice % | Jaccard % | 95HD vox | ASD vox | median Dice % "
              "| s/case | windows/case |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines = [f"All cases segmented by each configuration ({doc['machine']}; {doc['precision_note']}):", "",
             *header, *_config_rows([r for r in doc["table_all_cases"] if not r["tta"]])]
    if gpu and "paper_seg" in gpu:
        s, rows = gpu["paper_seg"]["summary"], gpu["paper_seg"]["rows"]
        median = statistics.median(r["dice"] for r in rows)
        lines.append(f"| paper (fp32 on the H200, la_eval_h200.json) | off | seg | fp32 | {len(rows)} | "
                     f"{100 * s['dice']['mean']:.2f} | {100 * s['jaccard']['mean']:.2f} | {s['hd95']['mean']:.2f} | "
                     f"{s['asd']['mean']:.2f} | {100 * median:.1f} | | |")
    tta = [r for r in doc["table_common_cases"] if r["config"] in ("dtml", "dtml-tta")]
    if any(r["tta"] for r in tta):
        lines += ["", f"TTA against none on the {doc['common_cases']} cases that the TTA run covered:", "",
                  *header, *_config_rows(tta)]
    return "\n".join(lines)


def qc_table(doc: dict) -> str:
    """The QC score's AUROC, and its threshold's precision and recall: held out (leave-one-out, each case
    flagged by a scale and threshold fitted on the other 63) and in-sample (the shipped threshold)."""
    qc = doc["qc"]
    lines = [f"QC score on {doc['calibrated_on']}; agreement part from `{qc['feature']}`, threshold "
             f"{qc['threshold']} ({qc.get('rule', 'tuned for F1')}):", "",
             "| failure | failures | AUROC | decisions | flagged | true positives | precision | recall |",
             "|---|---|---|---|---|---|---|---|"]
    rows = [("held out (leave-one-out)", qc["cross_validated"])] if "cross_validated" in qc else []
    for name, table in [*rows, ("in-sample (shipped threshold)", qc["at_threshold"])]:
        for key in qc["auroc"]:
            at = table[key]
            prec = "" if at["precision"] is None else f"{at['precision']:.2f}"
            rec = "" if at["recall"] is None else f"{at['recall']:.2f}"
            lines.append(f"| {key.replace('dice', 'Dice ')} | {at['failures']} | {fmt(qc['auroc'][key], 3)} | {name} | "
                         f"{at['flagged']} | {at['true_positives']} | {prec} | {rec} |")
    feats = ", ".join(f"{k} {fmt(v['dice<0.85'], 2)}" for k, v in doc["feature_auroc"].items())
    return "\n".join([*lines, "", f"AUROC of single features for Dice < 0.85: {feats}."])


def training_table() -> str:
    cfg = json.loads((HERE.parent / "dtml_deploy" / "default_model" / "config.json").read_text())
    t = cfg["training"]
    smoke = load("train_speed_h200.json")
    lines = ["| run | device | precision | it/s | 6000 iterations | peak GPU memory |", "|---|---|---|---|---|---|",
             "| released code (anchor, fp32, deterministic cuDNN, two backward calls) | H200 | fp32 | 0.66 "
             "| 153 min | |",
             f"| dtml train --recipe dtml (the shipped model) | {t['device']} | {t['amp']} + channels_last_3d | "
             f"{t['it_per_s']:.2f} | {t['wall_seconds'] / 60:.1f} min | |"]
    if smoke:
        for r in smoke["rows"]:
            lines.append(f"| benchmarks/train_speed.py (steady state) | {r['device']} | {r['amp']} | {r['it/s']:.2f} | "
                         f"{r['6000 it (min)']:.1f} min | {r['peak GB']:.2f} GB |")
    return "\n".join(lines)


def dtml_benchmark_table(doc: dict) -> str:
    lines = [f"`dtml benchmark` on {', '.join(doc.get('cases', []) or ['a random volume'])} ({doc['machine']})", "",
             "| row | status | agreement | ms/window b1 | ms/window best | s/case | Mvox/s |",
             "|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        if r["status"].startswith("skipped"):
            continue
        best = f"{r['ms_per_window_best']:.0f} (b{r['best_batch']})" if r.get("ms_per_window_best") else ""
        lines.append(f"| {r['name']} | {r['status']} | {fmt(r.get('agreement'), 4)} | "
                     f"{fmt(r.get('ms_per_window_b1'), 4)} | {best} | {fmt(r.get('seconds_per_case'), 3)} | "
                     f"{fmt(r.get('mvox_per_s'), 2)} |")
    return "\n".join(lines)


def scaling_table(doc: dict) -> str:
    where = "one GPU per rank" if str(doc["device"]).startswith("cuda") else "the CPU's cores split among the ranks"
    lines = [f"{doc['machine']}; {where}", "",
             "| ranks | threads/rank | cases | segmenting s | cases/s | speed-up | launch to exit s | speed-up incl. "
             "start | masks as 1 rank |", "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        if "error" in r:
            lines.append(f"| {r['ranks']} | | | failed: {r['error']} | | | | | |")
            continue
        threads = r.get("threads_per_rank") or ""
        lines.append(f"| {r['ranks']} | {threads} | {r['cases']} | {r['segment_seconds']:.1f} | "
                     f"{r['cases_per_s']:.3f} | "
                     f"{fmt(r.get('speedup'))}x | {r['wall_seconds']:.1f} | "
                     f"{fmt(r.get('speedup_wall'))}x | {'identical' if r.get('masks_match_first') else 'DIFFERENT'} |")
    return "\n".join(lines)


def serve_table(doc: dict) -> str:
    lines = [f"{doc['machine']}; {doc['scans']} real crops of {'x'.join(map(str, doc['crop']))}, the shipped model, "
             f"device {doc['device']}", "",
             "| how | total s | scans/s | p50 latency s | p95 latency s | forwards | masks as the CLI's |",
             "|---|---|---|---|---|---|---|"]
    for mode, r in doc["modes"].items():
        lines.append(f"| {mode} | {r['total_s']:.1f} | {r['scans_per_s']:.3f} | {r['latency_p50_s']:.2f} | "
                     f"{r['latency_p95_s']:.2f} | {fmt(r.get('forwards', ''))} | "
                     f"{'identical' if r['masks_equal_cli'] else 'DIFFERENT'} |")
    return "\n".join(lines)


def openvino_accuracy_table(doc: dict) -> str:
    s = doc["summary"]
    lines = [f"{s['cases']} unlabeled LA2018 cases, dtml protocol ({doc['machine']})", "",
             f"| IR | Dice % vs label | 95HD mm ({s['hd95_cases']} cases where both masks exist) | seconds per case |",
             "|---|---|---|---|"]
    for p in ("fp32", "int8"):
        lines.append(f"| OpenVINO {p} | {100 * s[f'{p}_dice']:.2f} | {s[f'{p}_hd95_mm']:.2f} | "
                     f"{s[f'{p}_seconds']:.1f} |")
    below = (f"; {s['cases_below_min_agreement']} case(s) below the export's {s['min_int8_agreement']}"
             if "cases_below_min_agreement" in s else "")
    lines += ["", f"int8 mask vs fp32 mask, Dice per case: mean {s['mask_dice_int8_vs_fp32_mean']:.4f}{below}, worst "
              f"{s['mask_dice_int8_vs_fp32_min']:.4f} ({s['worst_case']}, where fp32 scores Dice "
              f"{s['worst_case_fp32_dice']:.3f} against the label); worst of the {s['qc_passed_cases']} cases fp32's "
              f"QC score does not flag {s['mask_dice_int8_vs_fp32_min_qc_passed']:.4f} ({s['worst_qc_passed_case']}). "
              f"QC score |int8 - fp32|: mean "
              f"{fmt(s['qc_abs_diff_mean'], 2)}, max {fmt(s['qc_abs_diff_max'], 2)}; cases flagged by one and not "
              f"the other: {s['qc_flag_disagreements']}."]
    return "\n".join(lines)


def openvino_variants_table(doc: dict) -> str:
    scans = doc["scans"]
    lines = [f"Every window of {len(scans)} unlabeled scans ({sum(scans.values())} windows; the 5 the first int8 "
             f"export disagreed on most, and 3 others), mask = mean probability > 0.5, Dice with the fp32 IR's "
             f"mask per scan ({doc['machine']})", "",
             "| variant | calibration windows | quantise s | inference s | mean mask Dice | worst scan |",
             "|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        lines.append(f"| {r['variant']}: {r['what']} | {r['calibration_windows']} | {r['quantise_seconds']:.0f} | "
                     f"{r['infer_seconds']:.1f} | {r['mean_mask_dice']:.4f} | {r['min_mask_dice']:.4f} |")
    return "\n".join(lines)


def openvino_speed_table(doc: dict) -> str:
    lines = [f"{doc['machine']}; case {doc['case']} ({doc['volume']}), median of {doc['rounds']} interleaved "
             f"round(s){'; ' + doc['load'] if doc.get('load') else ''}", "",
             "| grid | method | windows | seconds | vs torch fp32 | vs torch bf16 | vs paper loop | mask agreement |",
             "|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        if "seconds" not in r:
            lines.append(f"| {r['grid']} | {r['method']} | {r['windows']} | | | | | |")
            continue
        ratios = [f"{r[k]:.2f}x" if r.get(k) else "" for k in ("vs torch fp32", "vs torch bf16", "vs paper loop")]
        lines.append(f"| {r['grid']} | {r['method']} | {r['windows']} | {r['seconds']:.1f} | {' | '.join(ratios)} | "
                     f"{fmt(r.get('agreement'), 4)} |")
    return "\n".join(lines)


def main() -> None:
    for name, title in (("segment_speed_h200.json", "GPU"), ("segment_speed_cpu.json", "CPU")):
        doc = load(name)
        if doc:
            print(speed_table(doc, f"**Segmentation speed, {title}** (`benchmarks/segment_speed.py`)"), end="\n\n")
    print("**Training speed** (`dtml train`, `benchmarks/train_speed.py`)\n")
    print(training_table(), end="\n\n")
    doc = load("la_eval_h200.json")
    if doc:
        print("**Accuracy of the shipped model** (`benchmarks/device/reproduce_la.sh`)\n")
        print(accuracy_table(doc), end="\n\n")
    doc = load("qc_calibration_cpu.json")
    if doc:
        print("**Head x TTA x protocol, 64 unlabeled cases** (`benchmarks/qc_calibration.py`)\n")
        print(head_tta_protocol_table(doc, load("la_eval_h200.json")), end="\n\n")
        print("**QC score** (`benchmarks/qc_calibration.py`)\n")
        print(qc_table(doc), end="\n\n")
    doc = load("dtml_benchmark_cpu.json")
    if doc:
        print("**Backends side by side with the shipped model**\n")
        print(dtml_benchmark_table(doc), end="\n\n")
    for name in ("scaling_h200.json", "scaling_cpu.json"):
        doc = load(name)
        if doc:
            print("**Cases per second across torchrun ranks** (`benchmarks/scaling.py`)\n")
            print(scaling_table(doc), end="\n\n")
    for name in ("serve_throughput_cpu.json",):
        doc = load(name)
        if doc:
            print("**dtml serve: 8 small scans at once** (`benchmarks/serve_throughput.py`)\n")
            print(serve_table(doc), end="\n\n")
    doc = load("openvino_accuracy_cpu.json")
    if doc:
        print("**OpenVINO int8 against fp32** (`benchmarks/openvino_accuracy.py`)\n")
        print(openvino_accuracy_table(doc), end="\n\n")
    doc = load("openvino_int8_variants_cpu.json")
    if doc:
        print("**int8 quantisation variants** (`benchmarks/openvino_int8_variants.py`)\n")
        print(openvino_variants_table(doc), end="\n\n")
    doc = load("openvino_speed_cpu.json")
    if doc:
        print("**OpenVINO on the CPU, whole scan** (`benchmarks/openvino_speed.py`)\n")
        print(openvino_speed_table(doc), end="\n\n")
    for name, title in (("metrics_speed_cpu.json", "Metrics speed"), ("backend_speed_cpu.json", "Backend speed")):
        doc = load(name)
        if doc:
            print(f"**{title}** ({doc.get('machine', '')})\n")
            print(doc.get("markdown", ""), end="\n\n")


if __name__ == "__main__":
    main()
