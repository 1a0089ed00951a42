"""`python -m tfds_lidc build [tfds build flags]`: the `tfds build` command for this dataset.

The `tfds` console script of tensorflow-datasets 4.9 imports TensorFlow for its `convert_format`
sub-command even when only building; this entry point runs the same `build` command without it.
Example: python -m tfds_lidc build tfds_lidc/lidc_idri --manual_dir DIR --data_dir DIR --config crop32_1mm
"""
import importlib.util
import sys

from absl import app
from tensorflow_datasets.scripts.cli import build
from tensorflow_datasets.scripts.cli import cli_utils


def main() -> None:
    argv = [a for i, a in enumerate(sys.argv) if not (i == 1 and a == 'build')]
    if any(a.startswith('--beam_pipeline_options') for a in argv) and importlib.util.find_spec('apache_beam') is None:
        sys.exit("tfds_lidc build: --beam_pipeline_options needs the 'beam' extra (apache_beam is not installed): "
                 "pip install 'autorad-jax[beam]'")
    parse = cli_utils.make_flags_parser(build.Args, description='Build the lidc_idri TFDS dataset.')
    app.run(lambda args: args.execute(), argv=argv, flags_parser=parse)


if __name__ == '__main__':
    main()
