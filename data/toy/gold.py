"""
data/toy/gold.py: the toy's gold reward r* (prepare.py) of sample.py files, with their KL from the SFT model: the mean
and 95% bootstrap CI per file, computed and printed as judge.py reports its scores.

    python data/toy/gold.py --files=samples/sft.jsonl,samples/tr.jsonl
    python data/toy/gold.py --files=samples/tr.jsonl --out=samples/tr.gold.json     # every number, as JSON

A sample whose prompt is not one of the toy's stops the run, naming the file and sample: r* knows no other. An out
that is one of the files is refused; one run at a time writes an out (out.lock), as judge.py.
"""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE)]  # judge.py and prepare.py, from any folder
from judge import lock_out, per_file, read_samples, report, sample_files  # noqa: E402
from prepare import gold_reward  # noqa: E402
from data.pairs import input_paths  # noqa: E402
from data.settings import (NOT_A_FOLDER, check_outputs, check_settings, defaults_of, need,  # noqa: E402
                           parse_overrides)

# settings: a setting a line, `name: its check = default  # meaning` (data/settings.py), checked before any work
files: str = ''                                 # comma-separated sample files (sample.py --out=) of the toy's prompts
bootstrap: need('bootstrap >= 1') = 1000        # resamples of the prompts for the 95% confidence intervals
seed: need('0 <= seed < 2**64') = 1337          # the bootstrap
out: NOT_A_FOLDER = ''                          # JSON of every number; '' = the table only
defaults = defaults_of(globals())


def gold(cfg):
    """A result per sample file: n, the mean gold reward r* and the mean kl, each with its 95% CI; printed as a table,
    and with out= written as JSON."""
    check_settings(cfg, globals())
    if not sample_files(cfg):
        raise SystemExit('error: files= needs one or more sample files (sample.py --out=), comma-separated')
    check_outputs([('out', cfg['out'])], [input_paths('files', f) for f in sample_files(cfg)])
    with lock_out(cfg):
        rows = []
        for f in sample_files(cfg):
            for number, row in enumerate(read_samples(f), 1):
                try:
                    rows.append(dict(row, file=f, scores={'gold': gold_reward(row['prompt'], row['completion'])}))
                except ValueError as e:  # r* is defined on the toy's prompts only
                    raise SystemExit(f'error: {f} sample {number}: {e} (sampled from other data than data/toy)')
        results = per_file(cfg, rows, ['gold'])
        report(cfg, results)
    return results


if __name__ == '__main__':
    gold(parse_overrides(sys.argv[1:], defaults, __file__))
