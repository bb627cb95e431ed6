"""``workdir/report.html``: one self-contained page per run.

The recorded config (``workdir/config.json`` when the run wrote one, else
the config given), the final test metrics, the attention summary table
(split ``attention`` of ``metrics.jsonl``) and every PNG under
``workdir/figures``, linked relatively so the workdir can be moved or
copied as a whole.
"""

from __future__ import annotations

import glob
import html
import json
import os
import re
from typing import Any

from experiments import metrics_io

REPORT = "report.html"
_CONFIG_FILES = ("config.json", "config.yaml", "config.txt")


def _config_text(workdir: str, config: Any) -> tuple[str, str]:
  for name in _CONFIG_FILES:
    path = os.path.join(workdir, name)
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        return f.read(), name
  if config is None:
    return "(no config recorded)", "none"
  if hasattr(config, "to_dict"):
    try:
      return json.dumps(config.to_dict(), indent=2, sort_keys=True,
                        default=str), "config passed to train_and_evaluate"
    except TypeError:
      pass
  return str(config), "config passed to train_and_evaluate"


def _fmt(v) -> str:
  return f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))


def _table(record: dict | None) -> str:
  if not record:
    return "<p>(none recorded)</p>"
  rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td></tr>"
                 for k, v in record.items() if k not in ("split",))
  return f"<table><tr><th>metric</th><th>value</th></tr>{rows}</table>"


def _attention_table(record: dict | None) -> str:
  """``module/head_n/stat`` keys -> rows (module, head), columns stats."""
  if not record:
    return "<p>(no attention maps)</p>"
  rows: dict = {}
  stats: list = []
  for k, v in record.items():
    m = re.fullmatch(r"(.*)/head_(\d+)/(\w+)", k)
    if not m:
      continue
    path, head, stat = m.group(1), int(m.group(2)), m.group(3)
    rows.setdefault((path, head), {})[stat] = v
    if stat not in stats:
      stats.append(stat)
  head = "".join(f"<th>{html.escape(s)}</th>" for s in stats)
  body = "".join(
      f"<tr><td>{html.escape(p)}</td><td>{h}</td>"
      + "".join(f"<td>{_fmt(vals.get(s, ''))}</td>" for s in stats)
      + "</tr>" for (p, h), vals in rows.items())
  return (f"<p>step {record.get('step')}</p><table><tr><th>module</th>"
          f"<th>head</th>{head}</tr>{body}</table>")


def write_report(workdir: str, config: Any = None) -> str:
  """Writes ``workdir/report.html`` and returns its path."""
  records = metrics_io.read_metrics(workdir)
  test = [r for r in records if r.get("split") == "test"]
  attention = [r for r in records if r.get("split") == "attention"]
  config_text, config_source = _config_text(workdir, config)
  figures = sorted(glob.glob(os.path.join(workdir, "figures", "**", "*.png"),
                             recursive=True))
  final = [f for f in figures if os.sep + "step_" not in f]
  during = [f for f in figures if f not in final]
  blocks = []
  for title, group in (("Figures (best checkpoint)", final),
                       ("Figures during training", during)):
    if not group:
      continue
    blocks.append(f"<h2>{title}</h2>")
    for f in group:
      rel = os.path.relpath(f, workdir).replace(os.sep, "/")
      blocks.append(f'<figure><a href="{html.escape(rel)}"><img src="'
                    f'{html.escape(rel)}" alt="{html.escape(rel)}"></a>'
                    f"<figcaption>{html.escape(rel)}</figcaption></figure>")
  texts = sorted(glob.glob(os.path.join(workdir, "figures", "**", "*.txt"),
                           recursive=True))
  for f in texts:
    with open(f, encoding="utf-8") as fh:
      blocks.append(f"<h3>{html.escape(os.path.relpath(f, workdir))}</h3>"
                    f"<pre>{html.escape(fh.read())}</pre>")
  name = os.path.basename(os.path.abspath(workdir))
  page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(name)}</title>
<style>
body {{ font-family: sans-serif; max-width: 1100px; margin: 1em auto; }}
table {{ border-collapse: collapse; margin: 0.5em 0; }}
td, th {{ border: 1px solid #ccc; padding: 2px 8px; text-align: left; }}
img {{ max-width: 100%; }} figure {{ margin: 1em 0; }}
pre {{ background: #f6f6f6; padding: 0.5em; overflow-x: auto; }}
</style></head><body>
<h1>Run {html.escape(name)}</h1>
<h2>Final test metrics (best checkpoint)</h2>
{_table(test[-1] if test else None)}
<h2>Attention summary</h2>
{_attention_table(attention[-1] if attention else None)}
{''.join(blocks)}
<h2>Config ({html.escape(config_source)})</h2>
<pre>{html.escape(config_text)}</pre>
</body></html>
"""
  path = os.path.join(workdir, REPORT)
  with open(path, "w", encoding="utf-8") as f:
    f.write(page)
  return path
