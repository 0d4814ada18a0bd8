"""kdlsq-pl entry point: ``python run.py [stage=teacher|student] task=<task> quant=<bits> ...``.

Hydra composes ``conf/``; ``-m`` runs a multirun sweep (one job per grid cell). Bad input gets one
line on stderr and exit status 2.
"""

from __future__ import annotations

import logging
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_SILENT", "true")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from kdlsq_pl.config import conf_options  # noqa: E402
from kdlsq_pl.errors import ConfigError, NumericalError  # noqa: E402

GROUPS = ("task", "model", "quant", "method", "loss", "optim", "trainer", "logger", "callbacks", "paths", "experiment")


def check_group_overrides(argv: list[str]) -> None:
    """Reject ``group=option`` overrides naming an option with no ``conf/<group>/<option>.yaml``.

    Hydra's own message for this spans several lines; this gives the one-line form.
    """
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep or key not in GROUPS:
            continue
        allowed = conf_options(key)
        for option in value.split(","):  # multirun: task=rte,mrpc
            if option and option != "null" and option not in allowed:
                raise ConfigError(f"{key}={option} is not a known option; allowed: {', '.join(allowed)}")


def is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.get().mode == RunMode.MULTIRUN


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """One run, or one grid cell of a multirun. In a multirun a failing cell is recorded as
    ``failed`` in its ``result.json`` and the sweep goes on; a single run exits non-zero."""
    from kdlsq_pl.config import validate

    try:
        validate(cfg)  # before the heavy imports: a bad value costs a second, not a model load
        from kdlsq_pl.pipeline import run

        record = run(cfg, validated=True)
    except Exception as e:
        multirun = is_multirun()
        if multirun:
            from kdlsq_pl.pipeline import record_failure

            record_failure(cfg, e)
        if isinstance(e, (ConfigError, NumericalError)):
            print(f"error: {e}", file=sys.stderr)
            if not multirun:
                sys.exit(2 if isinstance(e, ConfigError) else 3)
        elif not multirun:
            raise
        else:
            logging.getLogger("kdlsq_pl").exception("cell failed; the sweep goes on")
        return None
    return record.get("best")


if __name__ == "__main__":
    try:
        check_group_overrides(sys.argv[1:])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    main()
