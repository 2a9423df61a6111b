"""Stop-21 experiment (not product; the change was measured and not adopted): run
scripts/study_postprocessing.py with a calibration table that steps every 0.001 from
p99.9 to p99.999 instead of the shipped table's steps (docs/BENCHMARKS.md, stop 21).

    python docs/benchmarks/stop21/study_table.py --data DATA --model MODEL -o OUT --baselines intensity \
        --pool-kinds --variants "fine:$B,bias_flatten=\"intensity\""
"""
import runpy
import sys
from pathlib import Path

import numpy as np

import AnomalySegLib.segmentation.calibration as cal

tail = np.round(np.arange(99900, 100000) / 1000.0, 3)  # 99.900 .. 99.999
cal.TABLE_PERCENTILES = np.unique(np.concatenate([np.round(np.linspace(0.0, 100.0, 1001), 10), tail]))
print("table", cal.TABLE_PERCENTILES.size, flush=True)
script = Path(__file__).resolve().parents[3] / "scripts" / "study_postprocessing.py"
sys.argv = [str(script)] + sys.argv[1:]
runpy.run_path(str(script), run_name="__main__")
