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
    print(f"\n| method | backdoors removed (ASR ≤ {pct(bar)} on every sampler) | worst ASR after | SSIM to original | "
          "toy FID after (before) |")
    print("|---|---|---|---|---|")
    methods = sorted({m for record in data["removal"].values() for m in record["methods"]})
    for method in methods:
        rows = {n: r["methods"][method]["per_sampler"] for n, r in data["removal"].items() if method in r["methods"]}
        removed = [n for n, per in rows.items() if all(v["asr_after"] <= bar for v in per.values())]
        worst_name, worst_sampler, worst = max(((n, s, v["asr_after"]) for n, per in rows.items()
                                                for s, v in per.items()), key=lambda e: e[2])
        ssim = [v["ssim_to_original"] for per in rows.values() for v in per.values()]
        fid_after = [v["toy_fid_after"] for per in rows.values() for v in per.values() if v["toy_fid_after"] is not None]
        fid_before = [v["toy_fid_before"] for per in rows.values() for v in per.values() if v["toy_fid_before"] is not None]
        fid = (f"{num(min(fid_after), 1)}–{num(max(fid_after), 1)} ({num(min(fid_before), 1)}–{num(max(fid_before), 1)})"
               if fid_after else "–")
        where = f" ({worst_name}, {worst_sampler})" if worst > 0 else ""
        print(f"| {method} | {len(removed)} of {len(rows)} | {pct(worst)}{where} | "
              f"{num(min(ssim))}–{num(max(ssim))} | {fid} |")
    # attack x model type x sampler, one column per method: ASR after (SSIM of the clean samples to the original's)
    print(f"\n| attack (model) | model type | sampler | ASR before | "
          + " | ".join(f"{m}: ASR after (SSIM)" for m in methods) + " |")
    print("|---|---|---|---|" + "---|" * len(methods))
    for name, record in data["removal"].items():
        per_method = {m: record["methods"][m]["per_sampler"] for m in methods if m in record["methods"]}
        first = next(iter(per_method.values()))
        for s in first:
            before = first[s]["asr_before"]
            cells = [f"{pct(per_method[m][s]['asr_after'])} ({num(per_method[m][s]['ssim_to_original'])})"
                     if m in per_method else "–" for m in methods]
            print(f"| {record['attack']} ({name}) | {record['kind']} | {s} | {pct(before)} | " + " | ".join(cells) + " |")
    false = [(n, m, s, v["false_trigger_after"]) for n, r in data["removal"].items() for m, row in r["methods"].items()
             for s, v in row["per_sampler"].items() if v.get("false_trigger_after")]
    print("\nFalse triggers after removal (untriggered samples within the ASR threshold of the target): "
          + ("; ".join(f"{n} {m} {s} {pct(v)}" for n, m, s, v in false) if false else
             "none, on every model, method and sampler") + ".")
