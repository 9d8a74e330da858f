"""DSEE inside a Hugging Face `Trainer` with a ZeRO-3 DeepSpeed config.

    deepspeed --num_gpus 2 launch/hf_trainer_example.py --model <folder> --train_file train.tsv \
        --eval_file dev.tsv --ds_config ds_configs/zero3.json --output_dir runs/hf_trainer

Three things matter: TrainingArguments(deepspeed=...) must exist before the model is loaded (it
registers the HF DeepSpeed config, so `from_pretrained` partitions the weights and keeps HF's
initialisation); `apply_dsee` then adapts the partitioned model (creating its parameters under
zero.Init); the Trainer's optimizer sees only the parameters left trainable. On CPU the process
group is created with gloo first, since Accelerate would pick no backend there.
"""
import argparse
import json
import os
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="local pretrained folder (e.g. the MiniLM package's model/)")
    p.add_argument("--train_file", required=True, help="TSV with sentence and label columns")
    p.add_argument("--eval_file", required=True)
    p.add_argument("--ds_config", default="ds_configs/zero3.json")
    p.add_argument("--output_dir", default="runs/hf_trainer")
    p.add_argument("--max_steps", type=int, default=100)
    p.add_argument("--max_train_samples", type=int, default=None)
    p.add_argument("--lr", type=float, default=1e-3)
    args, _ = p.parse_known_args()

    import datasets
    import torch
    from accelerate import PartialState
    from deepspeed.accelerator import get_accelerator
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer, TrainingArguments

    from dsee_scale import DSEEConfig, apply_dsee, count_parameters, save_adapter
    from dsee_scale.zero.single_host import unlink_shm_buffers
    from dsee_scale.export import export_hf

    # Accelerate picks no backend for DeepSpeed on CPU: configure its state with ours first.
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend=get_accelerator().communication_backend_name())
    ds_config = json.loads(Path(args.ds_config).read_text())
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "gradient_clipping"):
        ds_config[key] = "auto"  # the Trainer fills these from TrainingArguments
    training_args = TrainingArguments(
        output_dir=args.output_dir, per_device_train_batch_size=8, per_device_eval_batch_size=16, max_steps=args.max_steps,
        learning_rate=args.lr, weight_decay=0.0, warmup_steps=0, logging_steps=10, save_strategy="no", report_to=[],
        deepspeed=ds_config, bf16=False, fp16=False, seed=42, remove_unused_columns=True,
        accelerator_config={"use_configured_state": True},
    )
    if torch.distributed.is_initialized():  # DeepSpeed's CPU collectives made their /dev/shm buffers with it
        unlink_shm_buffers()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    data = datasets.load_dataset("csv", data_files={"train": args.train_file, "eval": args.eval_file}, delimiter="\t", quoting=3)
    if args.max_train_samples:
        data["train"] = data["train"].select(range(args.max_train_samples))
    data = data.map(lambda b: tokenizer(b["sentence"], truncation=True, max_length=64), batched=True, remove_columns=["sentence"])
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)  # partitioned under ZeRO-3
    dsee = DSEEConfig(rank=8, alpha=16.0, nnz=64, support="grebsmo")
    apply_dsee(model, dsee)
    trainer = Trainer(model=model, args=training_args, train_dataset=data["train"], eval_dataset=data["eval"], data_collator=DataCollatorWithPadding(tokenizer))
    trainer.train()
    predictions = trainer.predict(data["eval"])
    accuracy = float((predictions.predictions.argmax(-1) == predictions.label_ids).mean())
    trainable, total = count_parameters(model)
    save_adapter(model, Path(args.output_dir) / "adapter", dsee)
    export_hf(model, Path(args.output_dir) / "merged", merge=True)
    if training_args.process_index == 0:
        tokenizer.save_pretrained(str(Path(args.output_dir) / "merged"))
        result = {"accuracy": accuracy, "trainable": trainable, "total": total, "world_size": training_args.world_size}
        (Path(args.output_dir) / "result.json").write_text(json.dumps(result))
        print(result)
    if torch.distributed.is_initialized():  # see dsee_scale.engine.end_process_group_at_exit
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
