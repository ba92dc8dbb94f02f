"""Turns a benchmark JSON (list of {job, *_iops, ratio}) into a Markdown table and,
when matplotlib is importable, a PNG bar chart of the ratios."""
import json
import sys

path, title = sys.argv[1], sys.argv[2]
rows = json.load(open(path))
keys = [k for k in rows[0] if k != "job"]
md = [f"# {title}", "", "| job | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
for r in rows:
    md.append(f"| {r['job']} | " + " | ".join(str(round(r[k], 2)) if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")
open(path.replace(".json", ".md"), "w").write("\n".join(md) + "\n")
print("\n".join(md))
try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    print("(matplotlib not installed: pip install matplotlib for the PNG plot)")
    sys.exit(0)
fig, ax = plt.subplots(figsize=(7, 3.5))
ax.bar([r["job"] for r in rows], [r["ratio"] for r in rows], color="#4477aa")
ax.axhline(1.0, color="black", linewidth=0.8)
ax.set_ylabel("ratio (higher is better)")
ax.set_title(title)
plt.tight_layout()
plt.savefig(path.replace(".json", ".png"), dpi=100)
