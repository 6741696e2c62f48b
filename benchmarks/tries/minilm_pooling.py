"""Throw-away try: MiniLM on Rotten Tomatoes with the classifier on the mean of the last layer's
real tokens (the pooling all-MiniLM-L6-v2 was trained with) instead of BERT's pooler on [CLS].
Validation split only, the sweep's budget (150 steps x 16, max_length 64, split seed 0).

    python benchmarks/tries/minilm_pooling.py METHOD SEED OUT [recipe options...]

Kept as it was run, not polished.
"""
# ruff: noqa
import sys, json
from pathlib import Path
import torch
import torch.nn.functional as F
from transformers import BertForSequenceClassification
from transformers.modeling_outputs import SequenceClassifierOutput
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "recipes"))
import finetune_text_classifier as recipe


class MeanPooledBert(BertForSequenceClassification):
    def __init__(self, config):
        super().__init__(config)
        self.bert.pooler = None

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None,
                **kwargs):
        hidden = self.bert(input_ids, attention_mask=attention_mask,
                           token_type_ids=token_type_ids).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        logits = self.classifier(self.dropout(pooled))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


class Auto:
    @staticmethod
    def from_pretrained(path, **kwargs):
        return MeanPooledBert.from_pretrained(path, **kwargs)


recipe.AutoModelForSequenceClassification = Auto
method, seed, out, *rest = sys.argv[1:]
torch.set_num_threads(1)
results = recipe.main(["--method", method, "--seed", seed, "--split_seed", "0",
                       "--output_dir", out, "--max_steps", "150",
                       "--per_device_train_batch_size", "16", "--max_length", "64",
                       "--eval_strategy=steps", "--eval_steps=150", "--save_strategy=no",
                       "--evaluate_test", "false", "--disable_tqdm", "true", *rest])
print("RESULT", method, seed, rest, results["best_validation_accuracy"])
