"""The training worker process: `python -m parallm.finetune.worker JOB_DIR`.

It trains with mlx-lm's tuner (`train`, `TrainingArgs`, `TrainingCallback`,
`linear_to_lora_layers`, its datasets) and adds only what a served job needs, in the callback,
which mlx-lm calls after every step (steps_per_report=1):
- a metrics event per step (loss, tokens/s, ETA) and the job's trained_tokens in SQLite;
- a checkpoint every `plan.checkpoint_every` steps, written whole-or-not-at-all;
- cancellation (the job row's cancel_requested) and parent death, by raising out of train();
- serving priority: waiting while the pause flag file exists.
See worker_spec.py for the protocol with the parent.
"""
from __future__ import annotations

import fcntl
import math
import os
import sys
import time
import traceback
import types
from pathlib import Path

from parallm.finetune.adapter_files import remove_temporaries, write_adapter_dir
from parallm.finetune.hyperparams import TrainingPlan
from parallm.finetune.ids import new_id
from parallm.finetune.store import CheckpointRecord, Store
from parallm.finetune.validation import read_rows
from parallm.finetune.worker_spec import (EXIT_CANCELLED, EXIT_FAILED, EXIT_ORPHANED,
                                                  EXIT_SUCCEEDED, WorkerSpec)

PAUSE_POLL_S = 0.05


class JobCancelled(Exception):
    pass


class ParentGone(Exception):
    pass


class TrainingDiverged(Exception):
    """The loss is NaN or infinite: every later step, and the adapter, would be NaN too."""


def load_base_model(source: str):
    """(model, tokenizer) in a trainable precision. parallm's loader when present (GGUF etc.),
    else mlx-lm's. Quantized layers are dequantized and, on the CPU, weights cast to float32:
    training the Q4 default model took 19 min where f32 took under one."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.utils import dequantize_model

    try:
        from parallm.models import DEFAULT_MODEL_NAME
        from parallm.models import load as parallm_load
    except ImportError:  # a checkout without the loader: mlx-lm directories only
        parallm_load = None
    if parallm_load is not None:
        loaded = parallm_load(None if source in ("", DEFAULT_MODEL_NAME) else source)
        model, tokenizer = loaded.model, loaded.tokenizer
    else:
        from mlx_lm import load as mlx_load

        model, tokenizer = mlx_load(source)
    if any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules()):
        model = dequantize_model(model)
    if mx.default_device() == mx.cpu:
        model.update(nn.utils.tree_map(
            lambda p: p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p, model.parameters()))
    return model, tokenizer


def adapter_config(spec: WorkerSpec, plan: TrainingPlan, num_layers: int) -> dict:
    """mlx-lm's adapter_config.json fields (read by mlx_lm.tuner.utils.load_adapters)."""
    return {
        "fine_tune_type": plan.method, "num_layers": num_layers,
        "lora_parameters": {"rank": plan.lora_rank, "scale": plan.lora_scale, "dropout": plan.lora_dropout},
        "base_model": spec.base_model, "model": spec.model_source, "fine_tuned_model": spec.fine_tuned_model,
        "parallm_job_id": spec.job_id,
    }


class JobCallback:
    """mlx-lm TrainingCallback for one job (duck-typed so this module imports without mlx)."""

    def __init__(self, spec: WorkerSpec, plan: TrainingPlan, store: Store, model, num_layers: int):
        self.spec, self.plan, self.store, self.model = spec, plan, store, model
        self.num_layers = num_layers
        self.last_loss = None

    def on_val_loss_report(self, info: dict) -> None:
        step = self.spec.resume_step + info["iteration"]
        if not math.isfinite(float(info["val_loss"])):
            raise TrainingDiverged(f"the validation loss became {info['val_loss']} at step {step}: the training "
                                   "diverged; try a lower learning_rate_multiplier")
        self.store.add_event(self.spec.job_id, f"Step {step}: validation loss={info['val_loss']:.4f}",
                             type="metrics", data={"step": step, "valid_loss": info["val_loss"]})

    def on_train_loss_report(self, info: dict) -> None:
        spec, plan = self.spec, self.plan
        step = spec.resume_step + info["iteration"]
        trained = spec.resume_trained_tokens + int(info["trained_tokens"])
        it_per_s = info["iterations_per_second"]
        eta = (plan.iters - step) / it_per_s if it_per_s > 0 else None
        self.last_loss = float(info["train_loss"])
        if not math.isfinite(self.last_loss):  # stop before a NaN reaches an event, a checkpoint or the adapter
            raise TrainingDiverged(f"the training loss became {self.last_loss} at step {step} (learning rate "
                                   f"{plan.learning_rate:g}): the training diverged; try a lower "
                                   "learning_rate_multiplier")
        self.store.add_event(
            spec.job_id, f"Step {step}/{plan.iters}: training loss={self.last_loss:.4f}", type="metrics",
            data={"step": step, "total_steps": plan.iters, "train_loss": self.last_loss,
                  "learning_rate": float(info["learning_rate"]), "tokens_per_second": float(info["tokens_per_second"]),
                  "eta_seconds": eta, "trained_tokens": trained})
        self.store.update_job(spec.job_id, trained_tokens=trained,
                              estimated_finish=int(time.time() + eta) if eta is not None else None)
        if step % plan.checkpoint_every == 0:
            self.save_checkpoint(step, trained)
        self.check_stop()
        self.wait_while_serving_busy()

    def save_checkpoint(self, step: int, trained_tokens: int) -> None:
        from mlx.utils import tree_flatten

        path = Path(self.spec.checkpoints_dir) / f"step-{step:07d}"
        write_adapter_dir(path, dict(tree_flatten(self.model.trainable_parameters())),
                          adapter_config(self.spec, self.plan, self.num_layers))
        self.store.add_checkpoint(CheckpointRecord(
            new_id("ftckpt"), self.spec.job_id, int(time.time()), step, str(path), trained_tokens,
            {"train_loss": self.last_loss}, f"{self.spec.fine_tuned_model}:ckpt-step-{step}"))
        self.store.add_event(self.spec.job_id, f"Checkpoint saved at step {step}", data={"step": step})

    def check_stop(self) -> None:
        job = self.store.get_job(self.spec.job_id)
        if job is None or job.cancel_requested:
            raise JobCancelled()
        if os.getppid() != self.spec.parent_pid:
            raise ParentGone()

    def wait_while_serving_busy(self) -> None:
        """Serving keeps priority: hold the next step while the server has requests in flight."""
        flag = Path(self.spec.pause_flag)
        started = time.monotonic()
        while flag.exists():
            if self.spec.max_pause_s is not None and time.monotonic() - started >= self.spec.max_pause_s:
                return
            time.sleep(PAUSE_POLL_S)
            self.check_stop()


def train_job(spec: WorkerSpec, store: Store) -> None:
    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.datasets import CacheDataset, create_dataset
    from mlx_lm.tuner.trainer import TrainingArgs, train
    from mlx_lm.tuner.utils import linear_to_lora_layers

    plan = TrainingPlan.from_dict(spec.plan)
    mx.random.seed(spec.seed + spec.resume_step)
    np.random.seed((spec.seed + spec.resume_step) % (2**32))  # mlx-lm's batch order

    model, tokenizer = load_base_model(spec.model_source)
    num_layers = min(plan.num_layers, len(model.layers))
    model.freeze()
    if plan.method == "full":
        for layer in model.layers[-num_layers:]:
            layer.unfreeze()
    else:
        linear_to_lora_layers(model, num_layers, {"rank": plan.lora_rank, "scale": plan.lora_scale,
                                                  "dropout": plan.lora_dropout}, use_dora=plan.method == "dora")
    if spec.resume_checkpoint:
        weights = mx.load(str(Path(spec.resume_checkpoint) / "adapters.safetensors"))
        model.load_weights(list(weights.items()), strict=False)

    dataset_config = types.SimpleNamespace(mask_prompt=False)
    train_set = CacheDataset(create_dataset(read_rows(spec.training_file), tokenizer, dataset_config))
    val_set = (CacheDataset(create_dataset(read_rows(spec.validation_file), tokenizer, dataset_config))
               if spec.validation_file else None)

    remaining = plan.iters - spec.resume_step
    scratch = Path(spec.checkpoints_dir).parent / "scratch"  # mlx-lm's own saves land here, never served
    scratch.mkdir(parents=True, exist_ok=True)
    callback = JobCallback(spec, plan, store, model, num_layers)

    class _Callback(TrainingCallback):  # mlx-lm's base class, forwarding to ours
        on_train_loss_report = staticmethod(callback.on_train_loss_report)
        on_val_loss_report = staticmethod(callback.on_val_loss_report)

    if remaining > 0:
        args = TrainingArgs(batch_size=plan.batch_size, iters=remaining, steps_per_report=1,
                            steps_per_eval=max(1, plan.checkpoint_every), steps_per_save=10**9,
                            val_batches=8, max_seq_length=plan.max_seq_length,
                            adapter_file=str(scratch / "adapters.safetensors"))
        train(model=model, optimizer=optim.Adam(learning_rate=plan.learning_rate), train_dataset=train_set,
              val_dataset=val_set, args=args, training_callback=_Callback())
    callback.check_stop()
    from mlx.utils import tree_flatten

    write_adapter_dir(Path(spec.adapter_dir), dict(tree_flatten(model.trainable_parameters())),
                      adapter_config(spec, plan, num_layers))
    store.add_event(spec.job_id, f"Training finished after {plan.iters} steps; adapter written")


def main(argv: list[str]) -> int:
    job_dir = Path(argv[0])
    spec = WorkerSpec.read(job_dir)
    if spec.nice and hasattr(os, "nice"):
        os.nice(spec.nice)  # before mlx starts its threads, so they all inherit it
    # One worker per job at a time: a worker orphaned by a killed parent holds this lock until
    # it notices (after its current step) and exits.
    lock = open(job_dir / "worker.lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    store = Store(Path(spec.data_dir))
    remove_temporaries(Path(spec.checkpoints_dir))
    remove_temporaries(Path(spec.adapter_dir).parent)
    try:
        train_job(spec, store)
        return EXIT_SUCCEEDED
    except JobCancelled:
        store.add_event(spec.job_id, "Training stopped: the job was cancelled")
        return EXIT_CANCELLED
    except ParentGone:
        return EXIT_ORPHANED
    except TrainingDiverged as e:  # the job fails with the reason; no adapter is written
        store.add_event(spec.job_id, f"Training stopped: {e}", level="error")
        store.update_job(spec.job_id, worker_error=str(e))
        return EXIT_FAILED
    except Exception as e:  # reported to the parent through the store; the server stays up
        traceback.print_exc()
        store.update_job(spec.job_id, worker_error=f"{type(e).__name__}: {e}")
        return EXIT_FAILED
    finally:
        store.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
