r"""Image folders -> sharded, validated TFRecords + dataset.json.

  python -m tfrecord_tools.convert --input_dir=data/chest_xray --output_dir=gs://bucket/chest_xray \
      [--val_fraction=0.15 --test_fraction=0.15 --seed=0] [--group_regex='^(\w+?)_'] \
      [--class_map=NORMAL=Normal,PNEUMONIA=BacterialPneumonia+ViralPneumonia] \
      [--max_side=1024 --image_format=keep|png|jpeg --channels=keep|1|3] \
      [--num_shards=0 --num_workers=0 --max_skipped_fraction=0.05 --overwrite] \
      [--input_format=folders|keras_pair] \
      [--runner=local|beam --beam_pipeline_options="--runner=DataflowRunner ..."]

Input layouts: input/<split>/<class>/* (train, val, test taken as they are) or
input/<class>/* (splits drawn with the fractions). The work is done by
`tfrecord_tools.convert.convert`; see the package's docstring for every step.
--runner=beam runs the same steps as an Apache Beam pipeline
(`tfrecord_tools.convert.beam`; needs `pip install 'xraytpu[beam]'`).
"""

from __future__ import annotations

import importlib.util
from typing import Sequence

from absl import flags

from tfrecord_tools import cli
from tfrecord_tools.convert import ConvertError, ConvertOptions, convert, summary_table

cli.define_flags(ConvertOptions)
_RUNNER = flags.DEFINE_enum("runner", "local", ["local", "beam"], "local: a process pool on "
                            "this machine. beam: an Apache Beam pipeline (DirectRunner, "
                            "Dataflow, Flink, Spark), same output.")
_BEAM_OPTIONS = flags.DEFINE_string("beam_pipeline_options", "", "With --runner=beam: Beam's "
                                    "own flags as one string, e.g. \"--runner=DataflowRunner "
                                    "--project=P --region=R --temp_location=gs://B/tmp\". "
                                    "Default: the DirectRunner on --num_workers processes.")


def main(argv: Sequence[str]) -> None:
  cli.no_arguments(argv)
  opts = cli.from_flags(ConvertOptions)
  if _BEAM_OPTIONS.value and _RUNNER.value != "beam":
    raise ConvertError("--beam_pipeline_options needs --runner=beam")
  if _RUNNER.value == "beam":
    if importlib.util.find_spec("apache_beam") is None:
      raise ConvertError("--runner=beam needs Apache Beam: pip install 'xraytpu[beam]'")
    from tfrecord_tools.convert import beam  # only with Beam installed
    manifest = beam.convert(opts, _BEAM_OPTIONS.value)
  else:
    manifest = convert(opts)
  print(summary_table(manifest))
  print(f"converted {manifest['num_converted']} of {manifest['num_found']} files "
        f"(skipped {manifest['num_skipped']}, dropped {manifest['num_dropped']}) "
        f"in {manifest['elapsed_s']:.1f} s, {manifest['images_per_sec']:.1f} img/s "
        f"-> {opts.output_dir}")


def run() -> None:
  cli.run(main)


if __name__ == "__main__":
  run()
