"""The converter as an Apache Beam pipeline: DirectRunner here, Dataflow/Flink/Spark at scale.

  python -m tfrecord_tools.convert --runner=beam --input_dir=IMAGES --output_dir=OUT \
      [--beam_pipeline_options="--runner=DirectRunner --direct_num_workers=2"]

Everything but the image work is the local converter's (`tfrecord_tools.convert`),
unchanged: finding the files, the class mapping, the seeded split, the shard
plan, the manifest and the resume state. Beam runs step 5 ("write"), per image instead
of per shard so a runner can balance the load, with the local converter's
own per-image and per-shard code (`tfrecord_tools.shards`):

  launcher   find -> classes -> split -> plan_shards (`pipeline.convert`); the plan
             goes to OUT/.convert-state/beam-plan.jsonl (one line per image:
             shard, position, source, label; not the job graph, which has a
             size limit on Dataflow)
  pipeline   ReadFromText(plan) -> Reshuffle (spread the images over workers)
             -> PrepareImage (shards.convert_item): read, sha256,
                pixels.prepare_image, serialise the record; a bad file becomes
                a "skipped" entry and bumps the `images_skipped` counter
             -> GroupByKey(shard) -> WriteShard (shards.write_records):
                records in plan order, TFRecord framing, `<shard>.tmp-N` then
                rename; its statistics to `.convert-state/<shard>.json` (what
                the resume reads)
  launcher   pipeline's manifest from the shards' statistics -> dataset.json

Because the plan is the local converter's, the output is the local
converter's: the same shards, byte for byte, and the same dataset.json but
for timings and `args` (runner, pipeline options). A rerun after a failure
reuses the finished shards, like the local converter.

Beam counters (namespace `tfrecord_tools.convert`): images_converted,
images_skipped, shards_written; they show in the Dataflow UI and are logged
at the end. Workers need this package installed (on Dataflow:
`--setup_file=./setup.py` or `--requirements_file`/a container image; see
launch/dataflow_convert.sh) and read access to the input: for Dataflow, images
and output on gs://.
"""

from __future__ import annotations

import json
import shlex
import time
from typing import Callable, Iterable, Sequence

import apache_beam as beam
from apache_beam.metrics.metric import Metrics, MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from tfrecord_tools import pixels, shards, storage
from tfrecord_tools.convert import pipeline
from tfrecord_tools.convert.options import ConvertError, ConvertOptions

COUNTER_NAMESPACE = "tfrecord_tools.convert"
PLAN_NAME = "beam-plan.jsonl"
# Used when --beam_pipeline_options is empty: all cores of this machine.
DEFAULT_PIPELINE_OPTIONS = "--runner=DirectRunner --direct_running_mode=multi_processing"


def pipeline_args(options: str, num_workers: int = 0) -> list[str]:
  """The --beam_pipeline_options string as an argument list.

  Empty -> DEFAULT_PIPELINE_OPTIONS with `num_workers` processes (0: one per core).
  """
  if options.strip():
    return shlex.split(options)
  return shlex.split(DEFAULT_PIPELINE_OPTIONS) + [f"--direct_num_workers={num_workers}"]


# --------------------------------------------------------------------------
# The per-image and per-shard steps (run on Beam workers).
# --------------------------------------------------------------------------


class PrepareImage(beam.DoFn):
  """plan line (dict) -> (shard file, (position, `shards.convert_item`'s outcome))."""

  def __init__(self, max_side: int, channels: str, image_format: str, jpeg_quality: int,
               dicom_window: str = "full", max_pixels: int = pixels.MAX_PIXELS):
    self.args = dict(max_side=max_side, channels=channels, image_format=image_format,
                     jpeg_quality=jpeg_quality, dicom_window=dicom_window, max_pixels=max_pixels)
    self.converted = Metrics.counter(COUNTER_NAMESPACE, "images_converted")
    self.skipped = Metrics.counter(COUNTER_NAMESPACE, "images_skipped")

  def process(self, e: dict) -> Iterable[tuple[str, tuple]]:
    source = shards.Source(rel=e["rel"], split=e["split"], source_class="",
                           path=e["path"], size=e["size"], offset=e["offset"])
    item = shards.Item(source=source, split=e["split"], label=e["label"], text=e["text"],
                       patient_id=e["patient_id"], multi_hot=tuple(e.get("multi_hot", ())),
                       mask=tuple(e.get("mask", ())), name=e.get("name", ""),
                       meta=tuple(tuple(m) for m in e.get("meta", ())))
    record, info = shards.convert_item(item, **self.args)
    (self.skipped if record is None else self.converted).inc()
    yield e["shard"], (e["pos"], record, info)


class WriteShard(beam.DoFn):
  """(shard file, images) -> the shard, written by `shards.write_records` like a local one.

  Its statistics are saved where the resume logic (`shards.load_finished`)
  finds them; the launcher reads them back to build the manifest.
  """

  def __init__(self, output_dir: str, shard_meta: dict[str, dict]):
    self.output_dir = output_dir
    self.shards = shard_meta   # file -> {"split", "fingerprint"}
    self.written = Metrics.counter(COUNTER_NAMESPACE, "shards_written")

  def process(self, kv: tuple[str, Iterable[tuple]]) -> Iterable[str]:
    file, values = kv
    meta = self.shards[file]
    in_plan_order = ((record, info) for _, record, info in sorted(values, key=lambda v: v[0]))
    shards.write_records(self.output_dir, file, meta["split"], meta["fingerprint"],
                         in_plan_order)
    self.written.inc()
    yield file


# --------------------------------------------------------------------------
# The launcher side.
# --------------------------------------------------------------------------


def _plan_lines(tasks: Sequence[shards.ShardTask]) -> Iterable[str]:
  for t in tasks:
    for pos, it in enumerate(t.items):
      s = it.source
      yield json.dumps({"shard": t.file, "split": t.split, "pos": pos, "rel": s.rel,
                        "path": s.path, "offset": s.offset, "size": s.size,
                        "label": it.label, "text": it.text, "patient_id": it.patient_id,
                        "name": it.record_name,
                        **({"multi_hot": it.multi_hot, "mask": it.mask} if it.multi_hot else {}),
                        **({"meta": it.meta} if it.meta else {})})


def run_pipeline(tasks: Sequence[shards.ShardTask], opts: ConvertOptions,
                 args: Sequence[str], log: Callable[[str], None]) -> dict[str, int]:
  """Writes `tasks`' shards with a Beam pipeline; returns the pipeline's counters."""
  state_dir = storage.join(opts.output_dir, shards.STATE_DIR)
  plan_path = storage.join(state_dir, PLAN_NAME)
  storage.write_bytes(plan_path, "".join(l + "\n" for l in _plan_lines(tasks)).encode())
  shard_meta = {t.file: {"split": t.split, "fingerprint": t.fingerprint} for t in tasks}
  options = PipelineOptions(list(args))
  log(f"beam: {sum(len(t.items) for t in tasks)} images into {len(tasks)} shards; "
      f"pipeline options: {' '.join(args)}")
  p = beam.Pipeline(options=options)
  _ = (p
       | "ReadPlan" >> beam.io.ReadFromText(plan_path)
       | "ParsePlan" >> beam.Map(json.loads)
       # Break fusion with the read: decoding is the cost, spread it over workers.
       | "Spread" >> beam.Reshuffle()
       | "PrepareImage" >> beam.ParDo(PrepareImage(opts.max_side, opts.channels,
                                                   opts.image_format, opts.jpeg_quality,
                                                   opts.dicom_window, opts.max_pixels))
       | "GroupByShard" >> beam.GroupByKey()
       | "WriteShard" >> beam.ParDo(WriteShard(opts.output_dir, shard_meta)))
  result = p.run()
  result.wait_until_finish()
  state = str(result.state)
  if "DONE" not in state:
    raise ConvertError(f"the Beam pipeline ended in state {state}")
  counters = {}
  for c in result.metrics().query(MetricsFilter().with_namespace(COUNTER_NAMESPACE))["counters"]:
    name = c.key.metric.name
    counters[name] = counters.get(name, 0) + int(c.committed or c.attempted or 0)
  storage.remove(plan_path)
  return counters


def convert(opts: ConvertOptions, pipeline_options: str = "",
            log: Callable[[str], None] | None = None) -> dict:
  """`pipeline.convert` with the images processed by a Beam pipeline.

  Args:
    opts: the converter's options (`num_workers` sets the DirectRunner's
      processes when `pipeline_options` is empty).
    pipeline_options: Beam's own flags as one string, e.g.
      "--runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp".
  Returns:
    The manifest (also written to OUTPUT/dataset.json).
  Raises:
    ConvertError: as `pipeline.convert`, and for a pipeline that fails.
  """
  args = pipeline_args(pipeline_options, opts.num_workers)

  def run_with_beam(todo, opts, log):
    """pipeline.convert's `run_tasks` hook: the unfinished shards, written by Beam."""
    counters: dict[str, int] = {}
    t1 = time.monotonic()
    results = []
    if todo:
      counters = run_pipeline(todo, opts, args, log)
      for t in todo:
        r = shards.load_finished(t)
        if r is None:
          raise ConvertError(f"the Beam pipeline finished without writing {t.file}")
        results.append(r)
    rate = sum(len(t.items) for t in todo) / max(time.monotonic() - t1, 1e-9)
    log("beam counters: " + (", ".join(f"{k}={v}" for k, v in sorted(counters.items()))
                             or "none (every shard was already finished)"))
    return results, rate, opts.num_workers, {"runner": "beam",
                                             "beam_pipeline_options": " ".join(args)}

  return pipeline.convert(opts, log, run_tasks=run_with_beam)
