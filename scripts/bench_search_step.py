"""One search case of the benchmark suite (``bench.py``) in this process; prints its fields as one
JSON line (``compile_s``, ``step_s``, ``images_per_s``, ``peak_rss_mb`` among them).

  python scripts/bench_search_step.py --config configs/dl2.py --stage first --batch 32

The config's layout (``--config.search.programs``), depth and width apply; ``--steps`` timed
steps follow the first. ``--stage`` also takes the space a search left after a stage:

  python scripts/bench_search_step.py --config configs/dl2.py --stage runs/small/stages/stage0.json
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Search config file.', lock_config=True)
_STAGE = flags.DEFINE_string('stage', 'first', f'{" or ".join(bench.STAGES)} (that candidate set '
                             'on every edge), or a search\'s stages/stage<i>.json (its space for '
                             'stage i+1).')


def main(_):
  fields = bench.search_case(_CONFIG.value, _STAGE.value, bench.BATCH.value, bench.STEPS.value)
  print(json.dumps(fields | {'peak_rss_mb': fields['peak_rss_mib']}))


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  bench.cli.prepare_process()
  app.run(main)
