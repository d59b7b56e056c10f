"""`python -m tests.server.serve_fake PORT TOKEN_DELAY DRAIN_TIMEOUT`: the real runner (signals,
drain) around the fake engine, for the subprocess shutdown test."""
import sys

from transformers import AutoTokenizer

from parallm.server.app import create_app
from parallm.server.config import ServerSettings
from parallm.server.runner import run_server
from tests.conftest import TOKENIZER_DIR
from tests.server.fake_engine import FakeEngine

if __name__ == "__main__":
    port, delay, drain_timeout = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
    engine = FakeEngine(AutoTokenizer.from_pretrained(str(TOKENIZER_DIR)), model_name="tiny",
                        context_length=4096, token_delay=delay)
    settings = ServerSettings(port=port, drain_timeout=drain_timeout)
    run_server(create_app(engine, settings), "127.0.0.1", port, drain_timeout, log_level="warning")
