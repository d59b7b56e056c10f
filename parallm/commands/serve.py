"""`parallm serve`: load a model, start the engine, serve the OpenAI API until SIGTERM/SIGINT."""
from __future__ import annotations

import argparse
import logging
import sys

from parallm.server.config import ConfigError, ServerSettings, load_settings

log = logging.getLogger("parallm.server")

EXIT_ENGINE_DIED = 3  # the engine worker died (--exit-on-engine-death): a supervisor should restart us

# option -> (type, help). Each maps onto the ServerSettings field of the same name.
_OPTIONS = {
    "model": (str, "model spec: an mlx-lm dir, a HF repo id, or a .gguf file (default: the built-in SmolLM2-135M); "
                   "repeat it to serve several base models at once"),
    "served_model_name": (str, "the model name clients send (default: the loader's name); repeated, it pairs "
                               "with --model by position"),
    "host": (str, "address to bind (default 127.0.0.1; 0.0.0.0 exposes the server to the network)"),
    "port": (int, "port (default 8000)"),
    "device": (str, "auto | cpu | gpu (default auto)"),
    "max_num_seqs": (int, "sequences the engine runs at once (default 64)"),
    "max_num_batched_tokens": (int, "tokens per engine step: prefill chunks plus decodes (default 2048 on a CUDA GPU, 512 elsewhere)"),
    "max_queue": (int, "requests that may wait for a free row; past it the server answers 429 (default 256)"),
    "kv_budget_bytes": (int, "KV cache budget of all running sequences, in bytes (default: half the GPU memory the model leaves free; 2 GiB on the CPU)"),
    "prefix_cache_bytes": (int, "prefix cache size in bytes; 0 turns it off (default: the engine's, 256 MiB)"),
    "api_key": (str, "require 'Authorization: Bearer KEY' on /v1/* (also PARALLM_API_KEY)"),
    "drain_timeout": (float, "seconds requests in flight may take to finish after SIGTERM (default 30)"),
    "max_body_bytes": (int, "largest request body accepted, in bytes (default 8 MiB)"),
    "log_level": (str, "debug | info | warning | error (default info)"),
    "log_format": (str, "text | json: human-readable lines (default) or one JSON object per line"),
    "data_dir": (str, "where uploaded files, fine-tuning jobs and their adapters live (default ~/.local/share/parallm)"),
    "max_upload_bytes": (int, "largest /v1/files upload, in bytes (default 512 MiB)"),
    "memory_budget_bytes": (int, "bytes of weights all base models may take; a run-time load past it evicts "
                                 "the least recently used idle models (default: no budget)"),
    "adapters_dir": (str, "directory that run-time /v1/load_lora_adapter paths must lie under (default: off)"),
    "header_timeout": (float, "seconds a connection gets to send a request's headers (default 10)"),
    "max_header_bytes": (int, "largest request headers accepted, in bytes (default 32768)"),
    "keep_alive_timeout": (float, "seconds an idle keep-alive connection stays open (default 5)"),
    "max_connections": (int, "open connections at most; past it new ones are refused and /health still answers "
                             "(default: below the process's open-files limit)"),
    "stream_stall_timeout": (float, "abort a stream whose client has read nothing for this many seconds and free "
                                    "its row; 0 never (default 60)"),
    "admin_key": (str, "key for the admin routes (model/adapter load and unload); without it they are off unless "
                       "the server binds to loopback (also PARALLM_ADMIN_KEY)"),
    "models_dir": (str, "directory that run-time model loads must lie under (default: no local paths)"),
    "allowed_hub_models": (str, "comma-separated Hugging Face repo ids (fnmatch patterns) loadable at run time "
                                "(default: none)"),
    "cors_origin": (str, "comma-separated origins allowed to call the API from a browser (default: no CORS headers)"),
}
_REPEATABLE = ("model", "served_model_name")  # append to a list; one value stays a plain string
# Flags without a value; each maps onto the ServerSettings field of the same name.
_FLAGS = {"log_prompts": "include prompt text in access-log lines (off by default: prompts may be private)",
          "allow_client_chat_template": "let requests send their own chat template (chat_template_kwargs."
                                        "chat_template); it then renders in a sandbox with time and size limits"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML file with settings (keys as below, snake_case; "
                        "top level or a [server] table). Precedence: command line > PARALLM_* env > file.")
    for name, (kind, help_text) in _OPTIONS.items():
        # default=None everywhere: None means "not given", so the env var and the file can fill it.
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None, help=help_text,
                            action="append" if name in _REPEATABLE else "store")
    for name, help_text in _FLAGS.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, action="store_const", const=True,
                            default=None, help=help_text)
    parser.add_argument("--exit-on-engine-death", dest="exit_on_engine_death", action=argparse.BooleanOptionalAction,
                        default=None, help="when an engine worker dies, exit non-zero after a short grace period "
                        "so a supervisor restarts the server (default on)")
    parser.add_argument("--no-fine-tuning", dest="fine_tuning", action="store_const", const=False, default=None,
                        help="turn off /v1/files and /v1/fine_tuning/jobs")
    from parallm.commands.serve_distributed import add_arguments as add_distributed_arguments

    add_distributed_arguments(parser)  # --distributed and its tuning flags
    parser.add_argument("--adapter", dest="adapters", action="append", default=None, metavar="NAME=PATH",
                        help="serve an mlx-lm LoRA/DoRA adapter dir as model NAME (repeatable); it runs on the "
                        "first model, or on the served model MODEL when written NAME=PATH@MODEL")


def build_engine(settings: ServerSettings):
    """Load the model(s), each in its own AsyncEngine with its adapter manager, behind one
    MultiModelEngine (parallm.commands.engines). Raises ModelLoadError, a startup adapter's
    EngineError, or ConfigError, each with a readable message."""
    from parallm.commands.engines import build_multi_engine

    return build_multi_engine(settings)


def adapter_specs(settings: ServerSettings) -> list:
    """The startup adapters of `settings.adapters` ("NAME=PATH[@MODEL][,...]"); ConfigError if malformed."""
    from parallm.engine.adapter_manager import AdapterSpec
    from parallm.commands.engines import startup_adapters

    return [AdapterSpec(a.name, a.path) for a in startup_adapters(settings)]


def engine_config(settings: ServerSettings, config_class):
    """The engine's settings from ours; a setting left unset keeps the engine's default."""
    values = dict(max_num_seqs=settings.max_num_seqs, max_num_batched_tokens=settings.max_num_batched_tokens,
                  max_queue=settings.max_queue)
    if settings.kv_budget_bytes is not None:
        values["kv_budget_bytes"] = settings.kv_budget_bytes
    if settings.prefix_cache_bytes is not None:
        values["prefix_cache_bytes"] = settings.prefix_cache_bytes
    return config_class(**values)


def cli_settings(args: argparse.Namespace) -> dict:
    """The ServerSettings values given on the command line (None where not given)."""
    cli = {name: getattr(args, name, None) for name in [*_OPTIONS, *_FLAGS, "fine_tuning", "exit_on_engine_death"]}
    for name in _REPEATABLE:  # one --model stays a plain string, exactly as before
        if isinstance(cli.get(name), list) and len(cli[name]) == 1:
            cli[name] = cli[name][0]
    if getattr(args, "adapters", None):
        cli["adapters"] = ",".join(args.adapters)
    return cli


def run(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(cli_settings(args), config_file=args.config)
        adapter_specs(settings)  # a malformed --adapter is a usage error, before any loading
        from parallm.commands.engines import model_specs

        if len(model_specs(settings)) > 1 and getattr(args, "distributed", False):
            raise ConfigError("--distributed serves one model; give --model once")
    except ConfigError as e:
        print(f"parallm serve: {e}", file=sys.stderr)
        return 2
    from parallm.server.connections import import_mlx_lm_keeping_file_limit
    from parallm.server.logging_setup import LogSettings, configure_logging
    configure_logging(LogSettings(format=settings.log_format, level=settings.log_level))
    import_mlx_lm_keeping_file_limit()  # before any model loads: it would lower the hard limit
    if getattr(args, "distributed", False):  # tensor parallel under mlx.launch: its own startup
        from parallm.commands.serve_distributed import serve_distributed

        return serve_distributed(args, settings)
    from parallm.engine.errors import EngineError
    from parallm.models import ModelLoadError
    from parallm.commands.data_dir_lock import DataDirInUse
    from parallm.commands.fine_tuning_setup import lock_fine_tuning_data, mount_fine_tuning

    try:  # before loading anything: a second server on the same data dir stops at once
        data_lock = lock_fine_tuning_data(settings)
    except DataDirInUse as e:
        print(f"parallm serve: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"parallm serve: cannot open the data directory for fine-tuning: {e} "
              "(set --data-dir, or --no-fine-tuning)", file=sys.stderr)
        return 1
    try:
        engine = build_engine(settings)
    except ModelLoadError as e:  # the input's fault: say which model and why
        print(f"parallm serve: cannot load model {settings.model or '(default)'}: {e}", file=sys.stderr)
        return 1
    except EngineError as e:  # a startup --adapter that cannot load (missing, corrupt, wrong shapes)
        print(f"parallm serve: cannot load adapter: {e.message}", file=sys.stderr)
        return 1
    except ConfigError as e:  # e.g. --adapter ...@MODEL for a model not served, a budget too small
        print(f"parallm serve: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # ours or the platform's: still a clear line and a non-zero exit
        log.debug("load failed", exc_info=True)
        print(f"parallm serve: loading model {settings.model or '(default)'} failed: {type(e).__name__}: {e}",
              file=sys.stderr)
        return 1
    from parallm.server.app import create_app
    from parallm.server.http_server import ConnectionLimits, run_server

    if settings.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("binding %s: the server is reachable from the network%s; the admin routes are %s",
                    settings.host, "" if settings.api_key else " and has no --api-key",
                    "behind --admin-key" if settings.admin_key else "off (no --admin-key)")
    try:
        fine_tuning = mount_fine_tuning(engine, settings, data_lock)
    except Exception as e:  # e.g. an unwritable data dir: say so, do not serve half a server
        print(f"parallm serve: cannot open the data directory for fine-tuning: {e} "
              "(set --data-dir, or --no-fine-tuning)", file=sys.stderr)
        return 1
    app = create_app(engine, settings, routers=fine_tuning.routers if fine_tuning else [])
    if fine_tuning:
        app.state.metrics.sources.fine_tuning_jobs = fine_tuning.job_counts
        fine_tuning.service.start()
    log.info("serving %s on http://%s:%d", ", ".join(engine.model_names()), settings.host, settings.port)
    try:
        failure = run_server(app, settings.host, settings.port, settings.drain_timeout, settings.log_level,
                             exit_on_engine_death=settings.exit_on_engine_death,
                             limits=ConnectionLimits.from_settings(settings))
    finally:
        if fine_tuning:
            fine_tuning.service.shutdown()
    if failure:
        log.error("exiting with status %d: %s", EXIT_ENGINE_DIED, failure)
        return EXIT_ENGINE_DIED
    return 0
