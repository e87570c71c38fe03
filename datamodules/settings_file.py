"""Reading a YAML file of settings, with one clear error line; kept free of heavy imports, so that a
command can check its config before it loads torch or Lightning."""
from __future__ import annotations

from pathlib import Path

import yaml
from user_errors import UserError


def read_yaml_mapping(path: Path, what: str, error: type[UserError]) -> dict:
    """A YAML file of settings as a dict; one `error` line (naming `what` the file is) when it is not."""
    if path.is_dir():
        raise error(f"{what} {path} is a directory; a {what} is a YAML file (such as configs/tiny.yaml)")
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise error(f"{what} {path} cannot be read ({exc.strerror or type(exc).__name__}); check the path and its permissions") from None
    except UnicodeDecodeError:
        raise error(f"{what} {path} is not UTF-8 text; a {what} is a YAML file") from None
    except yaml.YAMLError as exc:
        raise error(f"{what} {path} is not valid YAML ({str(exc).splitlines()[0]}); fix the file") from None
    if not isinstance(cfg, dict):
        raise error(f"{what} {path} must be a mapping of settings, got {type(cfg).__name__}")
    return cfg
