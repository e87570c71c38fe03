"""The settings of the prior ladder and of the two comparisons with an ideal learner (reader-prior, reader-gap).

Plain dataclasses, apart from the modules that use them so that `evaluate.py` reads its options without
loading the model stack; each default is written here once, and the `Args:` entries are the options' help.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Learner = Literal["auto", "exact", "reader"]
LadderLearner = Literal["exact", "reader", "exact-demos", "meanfield"]


@dataclass(frozen=True)
class LadderConfig:
    """The ladder's world, conditions and analysis (evaluation/ladder.py).

    Args:
        data_config: YAML with the GINC world and ICL settings
        task: the task favoured and disfavoured
        strengths: factors the task's weight is multiplied (favour) or divided (disfavour) by
        k_values: example lengths (default: the data config's)
        prompts: prompts per (k, task) (default: the data config's)
        law: Bayesian law of the shift report
        resamples: resampled tables for the shift intervals
        starts: optimiser starts per fit
        device: where the learners run: cpu, cuda, or auto
        learner: the exact Bayesian learner (knows the prompt format), the document reader (knows documents
            only), or a counterfactual of the exact learner on the same prompts: exact-demos (its task
            posterior reads the demonstrations only, not the query) or meanfield (the law's own model: its
            per-task evidence and predictions averaged over the prompts)
    """

    data_config: Path
    task: int = 0
    strengths: tuple[float, ...] = (2.0, 4.0, 16.0)
    k_values: tuple[int, ...] | None = field(default=None, metadata={"flag": "k"})
    prompts: int | None = None
    law: str = "bayesian_scoring"
    resamples: int = 100
    starts: int = 16
    device: str = "auto"
    learner: LadderLearner = "exact"


@dataclass(frozen=True)
class IdealComparison:
    """What the two comparisons of a run with an ideal learner of its world share.

    Args:
        device: cpu, cuda, or auto
        learner: the ideal learner to compare with: the exact learner (knows the prompt format), the document
            reader (knows documents only), or auto: the exact learner for a run trained with ICL prompts in
            its data (data.demo_rate > 0), else the reader
    """

    device: str = "auto"
    learner: Learner = "auto"


@dataclass(frozen=True)
class ReaderPriorConfig(IdealComparison):
    """How reader-prior measures each run (evaluation/reader_prior.py).

    Args:
        prompts: ICL prompts per (k, task), from each run's own ICL settings
        documents: held-out documents of the world's mixture (document reader only)
    """

    prompts: int = 32
    documents: int = 64


@dataclass(frozen=True)
class ReaderGapConfig(IdealComparison):
    """How reader-gap measures each run (evaluation/reader_gap.py).

    Args:
        prompts: ICL prompts per (k, task), from each run's own ICL settings
        k_values: example lengths (default: each run's own)
    """

    prompts: int = 256
    k_values: tuple[int, ...] | None = field(default=None, metadata={"flag": "k"})
