"""Self-distilled re-tuning (dsee_scale/distill.py, issue 43): the kept teacher outputs are a plain
forward of the tuned model on the re-tune's rows, found by place in any split; the store is
streamed a step at a time; the distilled loss is the formula; α = 0 is the plain loss exactly.
Runs on 2 ranks (resume on 1, 2 and 3 ranks; α = 0 against the plain re-tune, structured):
tests/multirank/test_resume.py."""
import json
import random

import pytest
import torch
from conftest import tiny_model

from dsee_scale import distill
from dsee_scale.config import PruneConfig, TrainConfig
from dsee_scale.data import GlobalBatches

MICRO, ACCUM, STEPS, K = 2, 3, 3, 8


def dataset(task: str, n: int = 10) -> list[dict]:
    """Rows of 3 to 11 tokens; lm rows have no loss on a prompt of 1 to 3 tokens (e2e-like)."""
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        ids = [rng.randrange(1, 120) for _ in range(rng.randrange(3, 12))]
        prompt = rng.randrange(1, 4)
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:] if task == "lm" else rng.randrange(2)})
    return rows


def collate(rows: list[dict]) -> dict:
    """Right-padded, as data.collate pads."""
    width = max(len(r["input_ids"]) for r in rows)
    pad = lambda values, fill: [v + [fill] * (width - len(v)) for v in values]  # noqa: E731
    batch = {"input_ids": torch.tensor(pad([r["input_ids"] for r in rows], 0)), "attention_mask": torch.tensor(pad([[1] * len(r["input_ids"]) for r in rows], 0))}
    labels = [r["labels"] for r in rows]
    batch["labels"] = torch.tensor(pad(labels, -100) if isinstance(labels[0], list) else labels)
    return batch


def write(tmp_path, task: str, model, rows: list[dict], on_step=None) -> GlobalBatches:
    batches = GlobalBatches(len(rows), MICRO, ACCUM, 1, seed=1)

    def micro_batches(step: int):
        if on_step:
            on_step(step)
        for accum in range(ACCUM):
            yield batches.micro_positions(accum, 0), collate([rows[i] for i in batches.micro_indices(step, accum, 0)])

    logits_of = lambda b: model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits  # noqa: E731
    distill.label(tmp_path / "teacher", STEPS, micro_batches, logits_of, task, K, batches.global_batch, writer=True)
    return batches


@pytest.mark.parametrize("task, kind", [("cls", "bert"), ("lm", "llama")])
def test_kept_outputs_are_a_plain_forward_of_each_row_found_by_place_in_any_split(tmp_path, task, kind):
    """Written from micro-batches of 2 (padded), read a row alone and as another split's ranges
    (3 rows: a world size of 2 with micro-batches of 3): each row's outputs are those of the
    model on that row alone."""
    model, rows = tiny_model(kind, task), dataset(task)
    batches = write(tmp_path, task, model, rows)
    store = distill.TeacherStore(tmp_path / "teacher", task, STEPS, batches.global_batch)
    for step in range(STEPS):
        alone = []
        for place, index in enumerate(batches.global_indices(step)):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([rows[index]["input_ids"]])).logits
            kept = store.rows(step, range(place, place + 1))
            if task == "cls":
                torch.testing.assert_close(kept["logits"], logits, rtol=0, atol=1e-5)
            else:
                mask = distill.target_mask(torch.tensor([rows[index]["labels"]]))
                top = logits[mask].topk(K, dim=-1)
                assert kept["counts"].tolist() == [int(mask.sum())]
                assert torch.equal(kept["topk_ids"], top.indices.int())
                torch.testing.assert_close(kept["topk_logits"], top.values.bfloat16(), rtol=0, atol=0.02)  # bf16 of values near 1
            alone.append(kept)
        for first in (0, 3):  # another split's micro-batches: the same rows' outputs, concatenated
            together = store.rows(step, range(first, first + 3))
            for key, value in together.items():
                assert torch.equal(value, torch.cat([a[key] for a in alone[first : first + 3]])), key


def test_the_store_is_written_a_step_at_a_time_one_file_of_one_step_each(tmp_path):
    """Memory-bounded: when a step's rows are asked for, every earlier step is on disk already (in
    the staging folder), and each file holds one step's global batch, nothing more."""
    model, rows = tiny_model("llama"), dataset("lm")
    staging = tmp_path / ".staging-teacher"
    on_disk = []
    write(tmp_path, "lm", model, rows, on_step=lambda step: on_disk.append(len(list(staging.glob("step-*")))))
    assert on_disk == [0, 1, 2]
    assert not staging.exists() and json.loads((tmp_path / "teacher" / distill.META).read_text())["steps"] == STEPS
    from safetensors import safe_open

    batches = GlobalBatches(len(rows), MICRO, ACCUM, 1, seed=1)
    for step in range(STEPS):
        targets = sum(int(distill.target_mask(torch.tensor([rows[i]["labels"]])).sum()) for i in batches.global_indices(step))
        path = tmp_path / "teacher" / distill.step_file(step)
        with safe_open(str(path), framework="pt") as f:
            shapes = {key: list(f.get_slice(key).get_shape()) for key in f.keys()}
        assert shapes == {"counts": [MICRO * ACCUM], "topk_logits": [targets, K], "topk_ids": [targets, K]}
        data = MICRO * ACCUM * 8 + targets * K * (2 + 4)  # int64 counts, bf16 logits, int32 ids
        assert data < path.stat().st_size < data + 400  # and a header


def test_distilled_loss_is_the_reference_formula_for_cls_reg_and_lm():
    """(1 − α)·task + α·T²·KL(teacher ‖ student) by hand, in float64, on one micro-batch: cls over
    the rows' classes (a mean over rows); lm over each target token's teacher top-k, both
    renormalised, summed and divided by the global batch's share (num_items); reg: α·MSE."""
    torch.manual_seed(0)
    alpha, t = 0.3, 2.0
    task_loss = torch.tensor(1.7)
    student, teacher = torch.randn(4, 3), torch.randn(4, 3)
    kept = distill.teacher_outputs(teacher, torch.zeros(4), "cls", K)
    p = torch.softmax(teacher.double() / t, -1)
    q = torch.softmax(student.double() / t, -1)
    reference = (1 - alpha) * 1.7 + alpha * t * t * (p * (p.log() - q.log())).sum(1).mean()
    got = distill.distilled_loss(task_loss, student, torch.zeros(4), kept, "cls", alpha, t)
    assert got.item() == pytest.approx(reference.item(), rel=1e-6)

    kept = distill.teacher_outputs(teacher[:, :1], torch.zeros(4), "reg", K)
    got = distill.distilled_loss(task_loss, student[:, :1], torch.zeros(4), kept, "reg", alpha, t)
    assert got.item() == pytest.approx((1 - alpha) * 1.7 + alpha * ((student[:, 0] - teacher[:, 0]) ** 2).mean().item(), rel=1e-6)

    labels = torch.tensor([[-100, -100, 5, 6, 7, -100], [-100, 9, 10, -100, -100, -100]])  # right-padded; the model shifts by one
    student, teacher = torch.randn(2, 6, 40, requires_grad=True), torch.randn(2, 6, 40)
    kept = distill.teacher_outputs(teacher, labels, "lm", K)
    total = 0.0
    for b, pos in [(0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]:  # positions whose next label is a target
        top = teacher[b, pos].topk(K)
        p = torch.softmax(top.values.bfloat16().double() / t, -1)  # as kept: bf16
        q = torch.softmax(student[b, pos, top.indices].double() / t, -1)
        total += (p * (p.log() - q.log())).sum()
    num_items = 2.5  # e.g. 10 target tokens in a global batch split 4 ways
    reference = (1 - alpha) * 1.7 + alpha * t * t * total / num_items
    got = distill.distilled_loss(task_loss, student, labels, kept, "lm", alpha, t, num_items)
    assert got.item() == pytest.approx(reference.item(), rel=1e-6)
    got.backward()  # a gradient reaches the student's logits at the teacher's ids only
    assert student.grad[0, 0].abs().sum() == 0 and (student.grad[0, 1] != 0).sum() == K
    with pytest.raises(ValueError, match="do not fit this batch's target tokens"):
        distill.distilled_loss(task_loss, student, labels.roll(1, 0), kept, "lm", alpha, t, num_items)


@pytest.mark.parametrize("task", ["cls", "lm"])
def test_alpha_0_is_the_task_loss_and_its_gradient_bit_for_bit(task):
    model, rows = tiny_model("llama" if task == "lm" else "bert", task), dataset(task, 4)
    batch = collate(rows)
    share = {"num_items_in_batch": 3.0} if task == "lm" else {}
    kept = distill.teacher_outputs(torch.randn(model(**batch).logits.shape), batch["labels"], task, K)
    grads = []
    for distilled in (False, True):
        model.zero_grad()
        out = model(**batch, **share)
        loss = distill.distilled_loss(out.loss, out.logits, batch["labels"], kept, task, 0.0, 2.0, share.get("num_items_in_batch")) if distilled else out.loss
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(grads[0][0], grads[1][0])
    assert all(torch.equal(a, b) for a, b in zip(grads[0][1], grads[1][1]))


def test_a_store_that_does_not_fit_is_refused_with_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no teacher outputs.*--overwrite"):
        distill.TeacherStore(tmp_path / "teacher", "lm", 3, 6)
    write(tmp_path, "lm", tiny_model("llama"), dataset("lm"))
    with pytest.raises(ValueError, match="3 re-tune steps of 6 rows, not of task lm, 4 steps of 6: keep --retune_steps at most 3"):
        distill.TeacherStore(tmp_path / "teacher", "lm", 4, 6)
    with pytest.raises(ValueError, match="prune.distill_topk 300 is more than the model's 128 logits"):
        distill.teacher_outputs(torch.zeros(1, 4, 128), torch.ones(1, 4, dtype=torch.long), "lm", 300)


@pytest.mark.parametrize("fields, message", [
    ({"prune": PruneConfig(distill=True), "method": "full"}, "method full does not prune: drop --prune.distill"),
    ({"prune": PruneConfig(distill=True), "stages": ["tune", "prune"]}, "keep retune in --stages with --retune_steps above 0"),
    ({"prune": PruneConfig(distill=True), "retune_steps": 0}, "keep retune in --stages with --retune_steps above 0"),
])
def test_distillation_without_a_re_tune_of_dsee_is_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**fields)


@pytest.mark.parametrize("field, value", [("distill_alpha", 1.5), ("distill_alpha", -0.1), ("distill_t", 0.0), ("distill_topk", 0)])
def test_distillation_settings_out_of_range_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        PruneConfig(**{field: value})
