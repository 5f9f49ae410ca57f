"""One summarisation fine-tuning run: source/target pairs -> seq2seq model ->
RXFSeq2SeqTrainer (label-smoothed CE, plus R3F's token-level KL) -> evaluation by
generation with ROUGE -> best checkpoint, ``predictions.jsonl`` and ``results.json``.
The same folder layout and resume behaviour as ``rxf.finetune``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from rxf.errors import OptionError
from rxf.finetune import (
    FinetuneSpec, check_run_folder, finish_run, load_model, load_tokenizer, open_run_folder, run_record,
    train_and_report, training_arguments, validate_spec,
)
from rxf.models import check_max_length
from rxf.methods.generation import check_generation_method
from rxf.methods.options import MethodOptions
from rxf.tasks.loading import parse_column_map
from rxf.tasks.summarization import Pairs, SummarizationTask, load_summarization, rouge


def _tokenize(pairs: Pairs, tokenizer, spec: FinetuneSpec):
    from datasets import Dataset

    encoded = tokenizer(pairs.sources, max_length=spec.max_length, truncation=True)
    encoded["labels"] = tokenizer(text_target=pairs.targets, max_length=spec.max_target_length, truncation=True)["input_ids"]
    return Dataset.from_dict(dict(encoded))


def run_generation(spec: FinetuneSpec, options: MethodOptions, task: SummarizationTask) -> dict:
    """Fine-tune a seq2seq model on ``task``; returns (and writes) results.json's content
    with ROUGE on the dev split and the generated summaries in ``predictions.jsonl``."""
    validate_spec(spec)
    options.validate()
    check_generation_method(options.method)
    out = Path(spec.output_dir)
    splits = load_summarization(task, spec.data_dir, parse_column_map(spec.columns), spec.train_file, spec.dev_file,
                                spec.trust_remote_code)
    splits = {name: pairs.head(spec.max_train_samples if name == "train" else spec.max_eval_samples)
              for name, pairs in splits.items()}
    if spec.model is None:
        raise OptionError("--model: summarisation needs a seq2seq model (e.g. facebook/bart-large or a local "
                          "folder); the embedded MiniLM is an encoder")

    from transformers import AutoModelForSeq2SeqLM, DataCollatorForSeq2Seq, set_seed

    from rxf.trainer import RXFSeq2SeqConfig, RXFSeq2SeqTrainer

    record = run_record(spec, options, spec.model, splits)
    finished = check_run_folder(out, record, spec.overwrite)
    if finished is not None:
        return finished
    tokenizer = load_tokenizer(spec.model, spec)
    set_seed(spec.seed)
    model = load_model(AutoModelForSeq2SeqLM, spec.model, spec)
    check_max_length("--max-length", spec.max_length, model, tokenizer)
    open_run_folder(out, record, spec.overwrite)
    model.generation_config.no_repeat_ngram_size = spec.no_repeat_ngram_size
    model.generation_config.min_length = spec.min_target_length
    datasets = {name: _tokenize(pairs, tokenizer, spec) for name, pairs in splits.items()}

    def decode(ids: np.ndarray) -> list[str]:
        ids = np.where(ids < 0, tokenizer.pad_token_id, ids)
        return [text.strip() for text in tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def compute_metrics(prediction):
        return rouge(decode(prediction.predictions), splits["dev"].targets)

    config = training_arguments(
        RXFSeq2SeqConfig, spec, options, out, "dev_rougeL", predict_with_generate=True,
        generation_max_length=spec.max_target_length, generation_num_beams=spec.num_beams,
    )
    trainer = RXFSeq2SeqTrainer(
        model=model, args=config, train_dataset=datasets["train"], eval_dataset={"dev": datasets["dev"]},
        processing_class=tokenizer, data_collator=DataCollatorForSeq2Seq(tokenizer, model=model),
        compute_metrics=compute_metrics,
    )
    data_info = {name: {"source": p.source, "examples": len(p)} for name, p in splits.items()}
    results = train_and_report(trainer, spec, options, task.name, spec.model, data_info, ["dev"], "rougeL", write=False)

    generated = decode(trainer.predict(datasets["dev"]).predictions)  # the best model, loaded at the end
    lines = [json.dumps({"source": s, "reference": r, "prediction": p}, ensure_ascii=False)
             for s, r, p in zip(splits["dev"].sources, splits["dev"].targets, generated)]
    if trainer.is_world_process_zero():
        tmp = out / "predictions.jsonl.tmp"
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        tmp.replace(out / "predictions.jsonl")
    results["rouge"] = rouge(generated, splits["dev"].targets)
    results["generated"] = generated
    finish_run(trainer, spec, results)
    return results
