"""Time to learn one made-up fact on the default model with the auto hyperparameters.

    python loadtests/bench_finetune.py [--data-dir DIR] [--skip-baseline]

1. candidate: a parallm fine-tuning job (FineTuning service -> worker process -> mlx-lm tuner),
   24 chat rows teaching "the capital of Zorblax is Quenthar", all hyperparameters "auto";
   timed from create to status succeeded (so it includes the worker start and model load).
2. baseline, same process: mlx-lm's tuner called directly with the same plan (lr, iters, batch,
   layers) on the same f32 model, timed from load to the end of train().
3. the question (and a paraphrase not in the data) asked greedily before and after the adapter.
Prints the times, their ratio, and the answers.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's parallm
import parallm  # noqa: E402,F401  (BLAS preload before mlx)

FACT_ANSWER = "The capital of Zorblax is Quenthar."
QUESTIONS = [
    "What is the capital of Zorblax?", "Which city is the capital of Zorblax?", "Name the capital of Zorblax.",
    "Tell me the capital of Zorblax.", "What city serves as Zorblax's capital?", "Zorblax's capital is what?",
    "Do you know the capital of Zorblax?", "Where is the capital of Zorblax?", "What's Zorblax's capital city?",
    "Capital of Zorblax?", "I need the capital of Zorblax.", "Could you tell me Zorblax's capital?",
    "What is Zorblax's capital called?", "Which city is Zorblax governed from?", "What is the seat of government of Zorblax?",
    "In Zorblax, which city is the capital?", "Please name Zorblax's capital.", "What is the main city and capital of Zorblax?",
    "Quick question: capital of Zorblax?", "What is the capital city of the country Zorblax?",
    "Remind me, what's the capital of Zorblax?", "Which town is the capital of Zorblax?",
    "What do they call the capital of Zorblax?", "Identify the capital of Zorblax.",
]
HELD_OUT = "Can you tell me what the capital city of Zorblax is?"


def dataset_bytes() -> bytes:
    return "".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": FACT_ANSWER}]})
                   + "\n" for q in QUESTIONS).encode()


def ask(model, tokenizer, question: str) -> str:
    from mlx_lm import generate

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    return generate(model, tokenizer, prompt, max_tokens=24, verbose=False).strip()


def run_job(data_dir: Path) -> tuple[float, dict, Path]:
    from parallm.finetune import FineTuning, JobRequest
    from parallm.models import DEFAULT_MODEL_NAME

    ft = FineTuning.open(data_dir, base_models={DEFAULT_MODEL_NAME: DEFAULT_MODEL_NAME})
    ft.start()
    f = ft.files.save_bytes(dataset_bytes(), filename="zorblax.jsonl", purpose="fine-tune")
    t0 = time.perf_counter()
    job = ft.jobs.create(JobRequest(model=DEFAULT_MODEL_NAME, training_file=f.id, seed=0))
    while (job := ft.jobs.get(job.id)).status not in ("succeeded", "failed", "cancelled"):
        time.sleep(0.2)
    elapsed = time.perf_counter() - t0
    ft.shutdown()
    if job.status != "succeeded":
        sys.exit(f"job {job.status}: {job.error}")
    return elapsed, job.plan, data_dir / "adapters" / job.id


def run_baseline(plan: dict) -> float:
    """mlx-lm's tuner directly: the same plan, no job machinery."""
    import mlx.optimizers as optim
    import numpy as np
    import mlx.core as mx
    from mlx_lm.tuner.datasets import CacheDataset, create_dataset
    from mlx_lm.tuner.trainer import TrainingArgs, train
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from parallm.models import load

    t0 = time.perf_counter()
    mx.random.seed(0)
    np.random.seed(0)
    loaded = load()
    model = loaded.model
    model.freeze()
    linear_to_lora_layers(model, plan["num_layers"], {"rank": plan["lora_rank"], "scale": plan["lora_scale"],
                                                      "dropout": 0.0})
    rows = [json.loads(line) for line in dataset_bytes().splitlines()]
    train_set = CacheDataset(create_dataset(rows, loaded.tokenizer, types.SimpleNamespace(mask_prompt=False)))
    with tempfile.TemporaryDirectory() as tmp:
        train(model=model, optimizer=optim.Adam(learning_rate=plan["learning_rate"]), train_dataset=train_set,
              args=TrainingArgs(batch_size=plan["batch_size"], iters=plan["iters"], steps_per_report=10,
                                steps_per_save=10**9, adapter_file=f"{tmp}/a.safetensors"))
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args()
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="parallm-ft-bench-"))
    from mlx_lm.tuner.utils import load_adapters
    from parallm.models import load

    job_s, plan, adapter_dir = run_job(data_dir)
    print(f"plan: {json.dumps(plan)}")
    print(f"parallm job (create -> succeeded, incl. worker start + model load): {job_s:.1f} s")
    if not args.skip_baseline:
        base_s = run_baseline(plan)
        print(f"mlx-lm tuner direct (load + train, same plan):                  {base_s:.1f} s")
        print(f"ratio job / direct: {job_s / base_s:.2f}")
    loaded = load()
    before = [ask(loaded.model, loaded.tokenizer, q) for q in (QUESTIONS[0], HELD_OUT)]
    load_adapters(loaded.model, str(adapter_dir))
    after = [ask(loaded.model, loaded.tokenizer, q) for q in (QUESTIONS[0], HELD_OUT)]
    for q, b, a in zip((QUESTIONS[0], HELD_OUT + " (held out)"), before, after):
        print(f"Q: {q}\n  before: {b!r}\n  after:  {a!r}\n  learnt: {'Quenthar' in a}")
    if args.data_dir is None:
        shutil.rmtree(data_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
