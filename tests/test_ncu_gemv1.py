"""scripts/ncu_gemv1.py's summary of Nsight Compute's exports (no GPU): metrics, stall table and the SASS
lines with the most stall samples, per kernel in launch order, labelled with the profiled shapes."""

from __future__ import annotations

import json

from tests.helpers import run_script

HEAD = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size",'
        '"Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"\n')


def _row(i, name, metric, value, section="GPU Speed Of Light Throughput"):
    return f'"{i}","1","py","h","{name}","1","7","(128, 1, 1)","(42, 8, 1)","0","9.0","{section}","{metric}","us","{value}"\n'


def test_summary_of_two_kernels(tmp_path):
    (tmp_path / "d.csv").write_text(HEAD + _row(0, "_quant_x_kernel", "Duration", "2.75")
                                    + _row(1, "_int4_gemv1_kernel", "Duration", "11.84")
                                    + _row(1, "_int4_gemv1_kernel", "Executed Instructions", "2,349,564")
                                    + _row(1, "_int4_gemv1_kernel", "Not a metric we keep", "1"))
    table = ("    Table Name : Warp State (All Cycles)\n    ---- ---- ----\n    Metric Name  Metric Unit Metric Value\n"
             "    Stall Long Scoreboard           inst         {}\n    Selected   inst  1\n"
             "    Stall Wait                      inst         0.68\n    ---- ---- ----\n\n  Section: next\n")
    (tmp_path / "d.txt").write_text(table.format("2.73") + table.format("6.03"))
    sass = ('"Kernel Name","_quant_x_kernel",""\n"Address","Source","Warp Stall Sampling (All Samples)",'
            '"Instructions Executed"\n"0x0","  LDC R1","4","32"\n'
            '"Kernel Name","_int4_gemv1_kernel",""\n"Address","Source","Warp Stall Sampling (All Samples)",'
            '"Instructions Executed"\n"0x0","  LDG.E.128 R4","1","1344"\n"0x10","  LOP3.LUT R9","3","5376"\n')
    (tmp_path / "s.csv").write_text(sass)
    out = tmp_path / "sum.json"
    r = run_script("scripts.ncu_gemv1", "--shapes", "o", "--summarize", str(tmp_path / "d.csv"),
                   str(tmp_path / "d.txt"), str(tmp_path / "s.csv"), "--out", str(out), timeout=120)
    assert r.returncode == 0, r.stderr
    k = json.loads(out.read_text())["kernels"]
    assert [x["kernel"] for x in k] == ["_quant_x_kernel", "_int4_gemv1_kernel"] and {x["shape"] for x in k} == {"o"}
    assert k[1]["Duration"] == 11.84 and k[1]["Executed Instructions"] == 2349564 and "Not a metric we keep" not in k[1]
    assert k[0]["stalls"] == {"Long Scoreboard": 2.73, "Wait": 0.68} and k[1]["stalls"]["Long Scoreboard"] == 6.03
    top = k[1]["top_stall_lines"]
    assert top[0]["sass"] == "LOP3.LUT R9" and top[0]["share"] == 0.75 and top[0]["executed"] == 5376


def test_summarize_names_a_missing_file(tmp_path):
    r = run_script("scripts.ncu_gemv1", "--summarize", str(tmp_path / "no.csv"), str(tmp_path / "no.txt"),
                   str(tmp_path / "no2.csv"), "--out", str(tmp_path / "x.json"), timeout=120)
    assert r.returncode == 2 and "no.csv" in r.stderr and "Traceback" not in r.stderr
