"""Learning stages measured by what they mean: reference entropies, recall and in-context probes, a tracker.

``StageTracker`` is what the trainer calls at every evaluation; ``track_run``
does the same over the checkpoints of a finished run; ``detect_stages`` is the
pure rule that turns a history of metrics into stages reached, when and in
which order. See ``mmrec.stages.criteria`` for the criteria and their numbers.
"""

from mmrec.stages.criteria import SEED_BANDS, STAGES, StageThresholds, convert_band, detect_stages, seed_band_table
from mmrec.stages.entropy import KneserNey, build_references, fit_references, unigram_entropy
from mmrec.stages.finished_run import track_run
from mmrec.stages.incontext import build_induction, build_kv
from mmrec.stages.plot import plot_stages
from mmrec.stages.probes import Probe, build_knowledge, build_knowledge_probes, run_probe
from mmrec.stages.tracker import REFS_FILE, STAGES_FILE, STAGES_PLOT, StageTracker

__all__ = [
    "REFS_FILE",
    "SEED_BANDS",
    "STAGES",
    "STAGES_FILE",
    "STAGES_PLOT",
    "KneserNey",
    "Probe",
    "StageThresholds",
    "StageTracker",
    "build_induction",
    "build_knowledge",
    "build_knowledge_probes",
    "build_kv",
    "build_references",
    "convert_band",
    "detect_stages",
    "fit_references",
    "plot_stages",
    "run_probe",
    "seed_band_table",
    "track_run",
    "unigram_entropy",
]
