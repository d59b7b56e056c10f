"""A fine-tuning service in its own process, for the kill -9 test:
python service_main.py DATA_DIR MODEL_DIR BUSY_FLAG_FILE. Serving is 'busy' while the flag file exists."""
import sys
import time
from pathlib import Path

from parallm.finetune import FineTuning

data_dir, model_dir, busy_file = sys.argv[1:4]
ft = FineTuning.open(Path(data_dir), base_models={"tiny": model_dir}, checkpoint_every=1,
                     serving_busy=lambda: Path(busy_file).exists(), max_pause_s=None, worker_nice=0)
ft.start()
while True:
    time.sleep(1)
