"""Learning stages measured by what they mean: reference entropies, recall and in-context probes, a tracker.

``StageTracker`` is what the trainer calls at every evaluation; ``track_run``
does the same over the checkpoints of a finished run; ``detect_stages`` is the
pure rule that turns a history of metrics into stages reached, when and in
which order. See ``mmrec.stages.tracker`` for the criteria and their numbers.
"""

from mmrec.stages.entropy import KneserNey, build_references, fit_references, unigram_entropy
from mmrec.stages.probes import Probe, build_induction, build_knowledge, build_knowledge_probes, build_kv, run_probe
from mmrec.stages.tracker import (
    REFS_FILE,
    SEED_BANDS,
    STAGES,
    STAGES_FILE,
    STAGES_PLOT,
    StageThresholds,
    StageTracker,
    convert_band,
    detect_stages,
    plot_stages,
    seed_band_table,
    track_run,
)

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
