r"""One command that proves a machine: what it has, how fast it trains, whether the input keeps up,
and that convert -> train -> evaluate -> export -> serve works on it.

  python -m benchmarks.device_check                        # a GPU box or a TPU VM (defaults)
  python -m benchmarks.device_check --strategy=tpu --tpu=local
  python -m benchmarks.device_check --models=xray_cnn --image_size=32 --batch_size=8 \
      --steps=4 --steps_per_execution=1,2 --films=24 --film_side=256 --smoke_epochs=1   # CPU, tiny (CI)

It prints one table (and --json writes the numbers):
  1. devices: TensorFlow, the accelerator, the strategy and its replicas;
  2. training images/sec of each --models entry on batches held in device memory (the step
     alone: Keras' compiled train step, augmentation included), float32 and the accelerator's
     mixed precision (bfloat16 on TPU and CPU, float16 on GPU), with XLA wherever TensorFlow
     can compile it (not over several CPU replicas: xraytpu.training.distribute.check_supported);
  3. a steps_per_execution sweep of the first model at the mixed precision;
  4. the input pipeline (xraytpu.data, no cache: every film decoded) against the independent
     decode bound (benchmarks.input_pipeline's (Bj)) on --films synthetic JPEG films of
     --film_side px, and whether the step waits on the input (input images/sec below the
     step's);
  5. an end-to-end smoke: synthetic films -> convert -> train -> evaluate -> export -> serve
     (a real `python -m xraytpu.serve` answering one TF Serving :predict request).

What good looks like: on one A100, NVIDIA publishes about 2,400 images/sec for ResNet-50
training in TensorFlow with XLA and mixed precision (224 px, RGB); xraytpu's resnet50 row at
--image_size=224 --channels=3 is that measurement. The input row should keep up with the step
(ratio >= 1), or the job needs more host cores, a cache, or the tf.data service.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Sequence

from absl import app, flags


def define_flags() -> None:
  """The command's flags, defined when it runs: importing this module defines none (tests
  call its functions in-process beside other modules that define the same names)."""
  flags.DEFINE_enum("strategy", "auto", ["auto", "default", "mirrored", "tpu"],
                    "auto: tpu when a TPU answers at --tpu, mirrored over several "
                    "GPUs, else default.")
  flags.DEFINE_string("tpu", "local", "With a TPU: its name, grpc:// address or 'local'.")
  flags.DEFINE_list("models", ["xray_cnn", "keras_tpu_cnn", "resnet50"],
                    "Models to time (xraytpu.models.MODELS names).")
  flags.DEFINE_integer("image_size", 224, "Training image side, px.")
  flags.DEFINE_integer("channels", 1, "Image channels (3: ImageNet-style RGB).")
  flags.DEFINE_integer("batch_size", 0, "Global batch (0: 32 per replica on CPU, "
                       "128 per replica on a GPU or TPU).")
  flags.DEFINE_integer("steps", 20, "Timed steps per measurement (after a warm-up call).")
  flags.DEFINE_list("steps_per_execution", ["1", "8", "32"], "steps_per_execution sweep.")
  flags.DEFINE_integer("films", 320, "Synthetic films for the input and smoke parts.")
  flags.DEFINE_integer("film_side", 1024, "Their side, px (real films: 2000-3000).")
  flags.DEFINE_integer("smoke_epochs", 2, "Epochs of the smoke training.")
  flags.DEFINE_string("json", "", "Also write the results here.")
  flags.DEFINE_string("work_dir", "", "Scratch folder (default: a temporary one, removed).")


def pick_strategy(name: str, tpu: str):
  import tensorflow as tf  # noqa: PLC0415
  from xraytpu.training import distribute  # noqa: PLC0415
  if name == "auto":
    if tf.config.list_logical_devices("TPU"):
      name = "tpu"
    elif len(tf.config.list_logical_devices("GPU")) > 1:
      name = "mirrored"
    else:
      try:
        return distribute.get_strategy("tpu", tpu=tpu), "tpu"
      except distribute.StrategyError:
        name = "default"
  return distribute.get_strategy(name, tpu=tpu), name


def devices(strategy, name: str) -> dict:
  import tensorflow as tf  # noqa: PLC0415
  from xraytpu.training import distribute  # noqa: PLC0415
  info = distribute.describe(strategy, name)
  physical = [f"{d.device_type}:{d.name.split(':')[-1]}" for d in tf.config.list_physical_devices()]
  gpu_names = []
  for d in tf.config.list_physical_devices("GPU"):
    gpu_names.append(tf.config.experimental.get_device_details(d).get("device_name", "GPU"))
  return {"tensorflow": tf.__version__, "accelerator": info.accelerator, "strategy": info.cls,
          "replicas": info.replicas, "devices": physical, "gpu_names": gpu_names,
          "cpus": os.cpu_count()}


def mixed(accelerator: str) -> str:
  return "float16" if accelerator == "gpu" else "bfloat16"


def step_speed(strategy, name: str, model: str, precision: str, *, size: int, channels: int,
               batch: int, steps: int, spe: int) -> dict:
  """Images/sec of Keras' compiled train step on one batch held on the device, repeated."""
  import numpy as np  # noqa: PLC0415
  import tensorflow as tf  # noqa: PLC0415
  from xraytpu.training import distribute, train_lib  # noqa: PLC0415
  from xraytpu import models
  from xraytpu._keras import keras  # noqa: PLC0415
  from xraytpu.config import Config  # noqa: PLC0415
  info = distribute.describe(strategy, name)
  jit = not (info.accelerator == "cpu" and info.replicas > 1)
  cfg = Config(model=model, image_size=size, channels=channels, batch_size=batch, weights="none",
               mixed_precision=precision, jit_compile=jit, steps_per_execution=spe,
               augment="light", seed=0).resolve_augment()
  policy = distribute.mixed_precision_policy(precision, strategy)
  keras.mixed_precision.set_global_policy(policy)
  try:
    per_replica = distribute.per_replica_batch(batch, strategy)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (per_replica, size, size, channels), dtype=np.uint8)
    labels = rng.integers(0, 2, (per_replica, 1)).astype(np.float32)
    ds = strategy.distribute_datasets_from_function(
        lambda ctx: tf.data.Dataset.from_tensors((images, labels)).repeat())
    with strategy.scope():
      m = models.build_model(cfg, num_classes=2, channels=channels, output_bias=[0.0])
      train_lib.compile_model(m, cfg, learning_rate=1e-4, num_classes=2, jit_compile=jit)
    it = iter(ds)
    m.make_train_function()
    calls = max(1, -(-steps // spe))
    float(m.train_function(it)["loss"])   # trace + compile
    t0 = time.perf_counter()
    for _ in range(calls):
      logs = m.train_function(it)
    float(logs["loss"])
    seconds = time.perf_counter() - t0
    return {"model": model, "precision": policy, "jit": jit, "steps_per_execution": spe,
            "images_per_sec": round(calls * spe * batch / seconds, 1), "params": m.count_params()}
  except Exception as e:  # noqa: BLE001 - a row that cannot run says why; the check goes on
    return {"model": model, "precision": policy, "jit": jit, "steps_per_execution": spe,
            "error": f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"}
  finally:
    keras.mixed_precision.set_global_policy("float32")


def make_films(work: str, n: int, side: int) -> tuple[str, str]:
  """Synthetic JPEG films (class folders, with splits) and their conversion; (images, data_dir)."""
  from tfrecord_tools import convert as convert_lib, synthetic  # noqa: PLC0415
  images, data = os.path.join(work, "images"), os.path.join(work, "tfrecords")
  synthetic.generate(images, num_images=n, size=side, bit_depth=8, num_classes=2, seed=0,
                     with_splits=True, image_format="jpeg")
  convert_lib.convert(convert_lib.ConvertOptions(input_dir=images, output_dir=data, quiet=True))
  return images, data


def input_speed(data_dir: str, size: int, batch: int, channels: int, rounds: int = 2) -> dict:
  """xraytpu's input alone, no cache (every epoch decodes), against the independent bound."""
  from benchmarks import input_pipeline as ip  # noqa: PLC0415
  from benchmarks import stored  # noqa: PLC0415
  ours = ip.XraytpuContender(data_dir, size, batch, 2, channels, 0, {}, cache="off", alone=True)
  bound = ip.IndependentBound(stored.encoded_images(data_dir), size, channels)
  results = {r.name: r.images_per_sec for r in ip.run_rounds([ours, bound], rounds)}
  got = results.get("xraytpu_input_no_cache", 0.0)
  return {"input_images_per_sec": round(got, 1),
          "bound_images_per_sec": round(results["bound_independent"], 1),
          "ratio_to_bound": round(got / results["bound_independent"], 2)}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def smoke(work: str, images: str, data_dir: str, strategy_name: str, tpu: str, precision: str,
          epochs: int) -> dict:
  """convert (done) -> train -> evaluate -> export -> serve, as a user runs them; seconds each."""
  py, run = sys.executable, os.path.join(work, "run")
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  steps = [
      ("train", [py, "-m", "xraytpu.train", f"--data_dir={data_dir}", f"--model_dir={run}",
                 "--model=xray_cnn", "--image_size=64", "--batch_size=16", f"--epochs={epochs}",
                 f"--strategy={strategy_name}", f"--tpu={tpu}", f"--mixed_precision={precision}",
                 "--steps_per_execution=2", "--verbosity=-1"]),
      ("evaluate", [py, "-m", "xraytpu.evaluate", f"--model_dir={run}", "--noplots",
                    "--bootstrap_resamples=100"]),
      ("export_savedmodel", [py, "-m", "xraytpu.export", f"--model_dir={run}"]),
  ]
  out: dict = {}
  for name, cmd in steps:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    out[name] = {"ok": r.returncode == 0, "seconds": round(time.perf_counter() - t0, 1)}
    if r.returncode:
      out[name]["error"] = (r.stderr.strip().splitlines() or ["?"])[-1][:300]
      return out
  from xraytpu.run import rundir  # noqa: PLC0415 - the run directory's layout lives there
  report = json.load(open(rundir.eval_report_paths(run)[0]))
  auc = report.get("auc")
  out["evaluate"]["test_auc"] = round(auc.get("value") if isinstance(auc, dict) else auc, 3)
  port = _free_port()
  t0 = time.perf_counter()
  proc = subprocess.Popen([py, "-m", "xraytpu.serve", f"--model_dir={run}", f"--port={port}",
                           "--noaccess_log"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=env)
  try:
    for line in proc.stdout:
      if line.startswith("Serving on"):
        break
    film = next(os.path.join(d, f) for d, _, fs in os.walk(images) for f in sorted(fs)
                if f.endswith(".jpeg") or f.endswith(".jpg"))
    body = json.dumps({"instances": [{"b64": base64.b64encode(open(film, "rb").read()).decode()}]})
    url = f"http://127.0.0.1:{port}/v1/models/xray_cnn:predict"
    t1 = time.perf_counter()
    reply = json.loads(urllib.request.urlopen(url, body.encode(), timeout=120).read())
    out["serve"] = {"ok": bool(reply.get("predictions")), "seconds": round(t1 - t0, 1),
                    "request_ms": round((time.perf_counter() - t1) * 1e3, 1)}
  except Exception as e:  # noqa: BLE001 - reported in the table
    out["serve"] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:300]}
  finally:
    proc.terminate()
    proc.wait(timeout=60)
  return out


def run_check(*, strategy: str = "auto", tpu: str = "local", models: Sequence[str],
              image_size: int, channels: int, batch_size: int, steps: int,
              steps_per_execution: Sequence[int], films: int, film_side: int,
              smoke_epochs: int, work_dir: str = "") -> dict:
  strat, name = pick_strategy(strategy, tpu)
  dev = devices(strat, name)
  fast = mixed(dev["accelerator"])
  batch = batch_size or dev["replicas"] * (32 if dev["accelerator"] == "cpu" else 128)
  report: dict = {"devices": dev, "global_batch": batch, "image_size": image_size,
                  "channels": channels, "training": [], "sweep": []}
  kw = dict(size=image_size, channels=channels, batch=batch, steps=steps)
  ran = {}
  for model in models:
    for precision in ("off", fast):
      row = ran[model, precision] = step_speed(strat, name, model, precision, spe=1, **kw)
      print("training:", json.dumps(row), flush=True)
      report["training"].append(row)
  for spe in steps_per_execution:
    # The training rows ran steps_per_execution=1: the first model's mixed-precision row is
    # this sweep's point 1 already (same strategy, model, precision, batch and steps).
    row = (dict(ran[models[0], fast]) if spe == 1 else
           step_speed(strat, name, models[0], fast, spe=spe, **kw))
    print("sweep:", json.dumps(row), flush=True)
    report["sweep"].append(row)
  own = not work_dir
  work = work_dir or tempfile.mkdtemp(prefix="xraytpu_device_check_")
  try:
    images, data_dir = make_films(work, films, film_side)
    report["input"] = input_speed(data_dir, image_size, batch, channels)
    step = next((r["images_per_sec"] for r in report["training"]
                 if r["model"] == models[0] and "error" not in r and r["precision"] != "float32"), None)
    report["input"]["step_images_per_sec"] = step
    report["input"]["step_waits_on_input"] = bool(step and report["input"]["input_images_per_sec"] < step)
    print("input:", json.dumps(report["input"]), flush=True)
    report["smoke"] = smoke(work, images, data_dir, name, tpu,
                            "auto" if dev["accelerator"] != "cpu" else "bfloat16", smoke_epochs)
    print("smoke:", json.dumps(report["smoke"]), flush=True)
  finally:
    if own:
      shutil.rmtree(work, ignore_errors=True)
  return report


def format_table(r: dict) -> str:
  d = r["devices"]
  lines = [f"devices: {d['accelerator']} ({', '.join(d['gpu_names']) or ', '.join(d['devices'])}); "
           f"{d['strategy']} with {d['replicas']} replica(s); TensorFlow {d['tensorflow']}; "
           f"{d['cpus']} host cores",
           f"batches: global {r['global_batch']}, {r['image_size']}x{r['image_size']}x{r['channels']}",
           "", "| part | model | precision | XLA | steps/exec | images/sec | note |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
  for part in ("training", "sweep"):
    for row in r[part]:
      ips = f"{row['images_per_sec']:.1f}" if "images_per_sec" in row else "-"
      lines.append(f"| {part} | {row['model']} | {row['precision']} | {'yes' if row['jit'] else 'no'} "
                   f"| {row['steps_per_execution']} | {ips} | {row.get('error', '')} |")
  i = r.get("input")
  if i:
    lines.append(f"| input | xraytpu.data, no cache | - | - | - | {i['input_images_per_sec']:.1f} | "
                 f"{i['ratio_to_bound']:.2f} of the decode bound ({i['bound_images_per_sec']:.1f}); "
                 f"step {'WAITS' if i['step_waits_on_input'] else 'does not wait'} on input |")
  for stage, s in (r.get("smoke") or {}).items():
    note = s.get("error") or ", ".join(f"{k} {v}" for k, v in s.items() if k not in ("ok", "seconds"))
    lines.append(f"| smoke | {stage} | - | - | - | - | {'ok' if s['ok'] else 'FAILED'} in "
                 f"{s.get('seconds', '-')} s {note} |")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  F = flags.FLAGS
  del argv
  report = run_check(strategy=F.strategy, tpu=F.tpu, models=F.models,
                     image_size=F.image_size, channels=F.channels,
                     batch_size=F.batch_size, steps=F.steps,
                     steps_per_execution=[int(s) for s in F.steps_per_execution], films=F.films,
                     film_side=F.film_side, smoke_epochs=F.smoke_epochs,
                     work_dir=F.work_dir)
  print()
  print(format_table(report))
  if F.json:
    with open(F.json, "w") as f:
      json.dump(report, f, indent=2)
  failed = [k for k, v in (report.get("smoke") or {}).items() if not v["ok"]]
  if failed:
    sys.exit(f"device_check: the smoke failed at {failed[0]}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
