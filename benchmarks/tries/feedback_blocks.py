"""Throw-away try behind the default `feedback_blocks=8` (docs/method.md, Direct feedback
variants): validation perplexity of SAL-4 (token routing) on the transformer benchmark's GPT-2
(6 layers, d_model 256, 200 steps x 8 x 128 tokens of Shakespeare) with the compression of rank
256 dense (1 block) or block-diagonal (4, 8 blocks), two feedback seeds for 1 and 8 blocks.

    python benchmarks/tries/feedback_blocks.py

Kept as it was run, not polished.
"""
# ruff: noqa
import json, os, subprocess, sys
from pathlib import Path
ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "outputs" / "tries" / "feedback_blocks"
COMMON = ("--method sal --num_areas 4 --routing token --feedback_rank 256 --arch gpt2 --corpus shakespeare "
          "--tokenizer bpe --num_layers=6 --hidden_size=256 --num_heads=8 --block_size=128 --vocab_size=8192 "
          "--max_steps 200 --per_device_train_batch_size 8 --eval_strategy no --seed 0 --disable_tqdm true").split()
RUNS = {"b1": ["--feedback_blocks", "1"], "b8": ["--feedback_blocks", "8"], "b4": ["--feedback_blocks", "4"],
        "b1-seed1": ["--feedback_blocks", "1", "--sal_seed", "1"], "b8-seed1": ["--feedback_blocks", "8", "--sal_seed", "1"]}
accelerate = str(Path(sys.executable).parent / "accelerate")
for name, extra in RUNS.items():
    command = [accelerate, "launch", "--config_file", "accelerate_configs/cpu.yaml", "--num_cpu_threads_per_process", "1",
               "recipes/train_causal_lm.py", *COMMON, *extra, "--output_dir", str(OUT / name)]
    subprocess.run(command, cwd=ROOT, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    print(name, json.loads((OUT / name / "results.json").read_text())["eval_perplexity"], flush=True)
