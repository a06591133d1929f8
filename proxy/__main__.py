"""``python -m proxy``: read settings (CLI flags > env vars > .env), then serve."""

from __future__ import annotations

import logging
import sys

from aiohttp import web
from pydantic import ValidationError

from proxy.app import create_app
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
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    app = create_app(settings)
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        access_log=None,
        print=lambda msg: logging.getLogger("proxy").info(
            "listening on http://%s:%d (upstream: %s)",
            settings.host,
            settings.port,
            settings.effective_upstream_kind,
        ),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
