"""Print the README's markdown tables from benchmarks/results/uncond_defenses.json (no number is typed by hand).

    python scripts/uncond_defenses_table.py [benchmarks/results/uncond_defenses.json]
"""
import json
import sys

path = sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/uncond_defenses.json"
data = json.loads(open(path).read())


def pct(v):
    return "–" if v is None else f"{100 * v:.0f} %"


def num(v, digits=2):
    return "–" if v is None else f"{v:.{digits}f}"


models = data["models"]
clean = sorted(n for n, m in models.items() if not m["backdoored"])
backdoored = sorted(n for n, m in models.items() if m["backdoored"])
print(f"Zoo measured: {len(clean)} clean ({', '.join(clean)}), {len(backdoored)} backdoored ({', '.join(backdoored)}); "
      f"{data['config']['count']} samples per attack-success measurement.\n")
print("| detector | AUROC (all) | fit A → apply B: acc / AUROC | fit B → apply A: acc / AUROC | scan s/model |")
print("|---|---|---|---|---|")
for det, d in data["detection"].items():
    cells = []
    for fold in ("fit A -> apply B", "fit B -> apply A"):
        f = d["folds"].get(fold)
        cells.append("skipped" if not isinstance(f, dict) else f"{pct(f['test_accuracy'])} / {num(f['auroc_test'])}")
    print(f"| {det} | {num(d['auroc_all'])} | {cells[0]} | {cells[1]} | {d['seconds_per_model']:.0f} |")
print("\n| detector | model | backdoored | score | attack success with the inverted trigger |")
print("|---|---|---|---|---|")
for det, d in data["detection"].items():
    for name, row in d["models"].items():
        inv = row.get("inverted_trigger_asr")
        print(f"| {det} | {name} | {'yes' if models[name]['backdoored'] else 'no'} | {num(row['score'], 3)} | "
              f"{pct(inv['value']) + ' (' + inv['sampler'] + ')' if inv else '–'} |")
if data.get("removal"):
    bar = data["config"]["bars"]["asr_after"]
    print(f"\n| method | backdoors removed (ASR ≤ {pct(bar)} on every sampler) | worst ASR after | SSIM to original |")
    print("|---|---|---|---|")
    methods = sorted({m for record in data["removal"].values() for m in record["methods"]})
    for method in methods:
        rows = {n: r["methods"][method]["per_sampler"] for n, r in data["removal"].items() if method in r["methods"]}
        removed = [n for n, per in rows.items() if all(v["asr_after"] <= bar for v in per.values())]
        worst_name, worst_sampler, worst = max(((n, s, v["asr_after"]) for n, per in rows.items()
                                                for s, v in per.items()), key=lambda e: e[2])
        ssim = [v["ssim_to_original"] for per in rows.values() for v in per.values()]
        where = f" ({worst_name}, {worst_sampler})" if worst > 0 else ""
        print(f"| {method} | {len(removed)} of {len(rows)} | {pct(worst)}{where} | "
              f"{num(min(ssim))}–{num(max(ssim))} |")
    print("\n| attack | model type | sampler | method | ASR before | ASR after | toy FID before → after | SSIM to original |")
    print("|---|---|---|---|---|---|---|---|")
    for name, record in data["removal"].items():
        for method, row in record["methods"].items():
            for s, v in row["per_sampler"].items():
                print(f"| {record['attack']} ({name}) | {record['kind']} | {s} | {method} | {pct(v['asr_before'])} | "
                      f"{pct(v['asr_after'])} | {num(v['toy_fid_before'], 1)} → {num(v['toy_fid_after'], 1)} | "
                      f"{num(v['ssim_to_original'])} |")
