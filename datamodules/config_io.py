"""Read the GINC data settings from a YAML file: a LightningCLI config (its `data:` section) or bare arguments."""
from __future__ import annotations

import inspect
from pathlib import Path

from datamodules.ginc_datamodule import GincDataModule
from datamodules.world import WorldConfigError
from safe_io.files import read_yaml_mapping
from user_errors import MissingInput


def read_data_settings(path: str | Path) -> dict:
    """The GincDataModule arguments a YAML file gives, checked against the module's signature."""
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"data config {path} does not exist; pass a YAML such as configs/data/ginc.yaml")
    cfg = read_yaml_mapping(path, "data config", WorldConfigError)
    if not cfg:  # otherwise the default world would run, and replace a report, as if it were asked for
        raise WorldConfigError(f"data config {path} is empty; give the world and ICL settings, "
                               "as configs/data/ginc.yaml does")
    cfg = cfg.get("data", cfg)
    cfg = dict(cfg.get("init_args", cfg))
    known = set(inspect.signature(GincDataModule.__init__).parameters) - {"self"}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise WorldConfigError(f"data config {path}: unknown setting(s) {', '.join(unknown)}; "
                               f"known: {', '.join(sorted(known))}")
    return cfg


def with_icl_overrides(settings: dict, k_values: list[int] | None = None, prompts_per_task: int | None = None,
                       icl_batch_size: int | None = None) -> dict:
    """A copy of data settings whose ICL section takes the given values (None keeps the setting's own)."""
    icl = dict(settings.get("icl") or {})
    for key, value in (("k_values", k_values), ("prompts_per_task", prompts_per_task), ("batch_size", icl_batch_size)):
        if value is not None:
            icl[key] = value
    return {**settings, "icl": icl}


def load_datamodule_config(path: str | Path, k_values: list[int] | None = None, prompts_per_task: int | None = None,
                           icl_batch_size: int | None = None) -> GincDataModule:
    """Build the data module a config describes, with optional overrides of its ICL settings."""
    settings = with_icl_overrides(read_data_settings(path), k_values, prompts_per_task, icl_batch_size)
    try:
        return GincDataModule(**settings)
    except TypeError as exc:
        raise WorldConfigError(f"data config {path}: {exc}; check the world/icl settings' names") from exc
