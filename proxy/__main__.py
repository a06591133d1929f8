"""``python -m proxy``: read settings (CLI flags > env vars > .env), bind, then serve."""

from __future__ import annotations

import logging
import sys

from pydantic import ValidationError

from proxy.logs import configure_logging
from proxy.models_config import ModelsConfigError, load_models_config
from proxy.server import ListenError, bind_listener, run
from proxy.settings import Settings, describe_validation_error


def load_settings(argv: list[str]) -> Settings:
    return Settings(  # type: ignore[call-arg]
        _cli_parse_args=argv,
        _cli_kebab_case=True,
        _cli_prog_name="python -m proxy",
        _cli_exit_on_error=True,
    )


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings(sys.argv[1:] if argv is None else argv)
    except ValidationError as exc:
        print(f"error: {describe_validation_error(exc)}", file=sys.stderr)
        return 2
    if settings.models_config is not None:
        # Checked here too (the app reads it again), so a bad file is one line at once.
        try:
            load_models_config(settings.models_config, settings)
        except ModelsConfigError as exc:
            print(f"error: MODELS_CONFIG {settings.models_config}: {exc}", file=sys.stderr)
            return 2
    try:
        # Before anything else starts (model, upstream, workers): a taken port is one line.
        sock = bind_listener(settings)
    except ListenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    configure_logging(settings)
    if settings.workers > 1:
        # Imported only here: one process needs none of multiprocessing (~0.5 MB).
        from proxy.workers import run_workers

        return run_workers(settings, sock)
    try:
        run(settings, sock=sock)
    except RuntimeError as exc:  # start-up failures we can explain, e.g. a refused API key
        logging.getLogger("proxy").error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
