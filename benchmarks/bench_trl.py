"""TRL's side of benchmarks/bench.py: its GRPOTrainer on the fixed work, and its loss on the recorded
batches, padded as TRL pads them. bench.py starts each in a child process of its own (`--child trl`,
`--child real:trl`); see its docstring for what is measured.
"""

import os
import time

from bench import recorded_batches, report  # bench.py's child protocol and its batches: one source


def trl_trainer(a, model, tok, **config):
    """A GRPOTrainer over the built-in prompts with our reward (its loss is what both rows time)."""
    import datasets
    from trl import GRPOConfig, GRPOTrainer
    from lib import data
    from reward import reward
    problems, _ = data.load_problems("builtin", "train")
    prompts = datasets.Dataset.from_dict({"prompt": [data.render_prompt(tok, p.prompt) for p in problems],
                                          "answer": [p.answer for p in problems]})

    def correct(completions, answer, **_):
        return [reward(c, x) for c, x in zip(completions, answer)]
    cfg = GRPOConfig(output_dir=os.path.join(a.model_dir, "out_trl"), seed=0, num_generations=a.group,
                     temperature=1.0, top_p=1.0, top_k=0, learning_rate=a.lr, lr_scheduler_type="constant",
                     optim="adamw_torch", weight_decay=0.0, max_grad_norm=1.0, beta=0.0, epsilon=0.2,
                     loss_type="dapo", num_iterations=1, bf16=False, gradient_checkpointing=False, use_vllm=False,
                     use_cpu=True, report_to=[], logging_strategy="no", save_strategy="no", disable_tqdm=True,
                     **config)
    return GRPOTrainer(model=model, reward_funcs=correct, args=cfg, train_dataset=prompts, processing_class=tok)


def run_trl_fixed(a, turns):
    """TRL's GRPOTrainer with our reward, our prompts and the same settings; a callback clocks the steps."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    tok = AutoTokenizer.from_pretrained(os.path.join(a.model_dir, "fixed"))
    model = AutoModelForCausalLM.from_pretrained(os.path.join(a.model_dir, "fixed"), dtype=torch.float32)
    steps = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            turns.take()
            steps.append({"step_s": time.perf_counter()})

        def on_step_end(self, args, state, control, **kwargs):
            steps[-1]["step_s"] = time.perf_counter() - steps[-1]["step_s"]
            if state.global_step < a.steps:
                turns.give()
                self.on_train_begin()

    trainer = trl_trainer(a, model, tok, max_steps=a.steps, per_device_train_batch_size=a.micro_batch,
                          gradient_accumulation_steps=a.prompts * a.group // a.micro_batch,
                          max_completion_length=a.new_tokens, generation_kwargs={"min_new_tokens": a.new_tokens})
    trainer.add_callback(Clock())
    trainer.train()
    report({"steps": steps[a.warmup:], "threads": torch.get_num_threads()})


def run_trl_realistic(a, turns):
    """TRL's loss (GRPOTrainer._compute_loss, loss_type dapo) on the same groups, padded as TRL pads a
    generation batch: prompts left, completions right, all to the batch's longest, then split into
    micro-batches of real_trl_micro rows; one AdamW step with gradient clipping after them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import hapo
    tok = AutoTokenizer.from_pretrained(os.path.join(a.model_dir, "realistic"))
    model = AutoModelForCausalLM.from_pretrained(os.path.join(a.model_dir, "realistic"), dtype=torch.float32)
    n_micro = a.prompts * a.group // a.real_trl_micro
    trainer = trl_trainer(a, model, tok, per_device_train_batch_size=a.real_trl_micro,
                          gradient_accumulation_steps=n_micro, max_completion_length=a.real_max * 3)
    trainer.current_gradient_accumulation_steps = n_micro  # what its training loop would set
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
    model.train()
    steps, batches = [], recorded_batches(a)
    for b, groups in enumerate(batches):
        turns.take()
        t = time.perf_counter()
        adv = hapo.advantages(groups)  # [M, N]
        rows = [(g.prompt_ids, r, float(adv[i, k])) for i, g in enumerate(groups) for k, r in enumerate(g.responses)]
        P, C = max(len(p) for p, _, _ in rows), max(len(r) for _, r, _ in rows)
        prompt_ids = torch.tensor([[0] * (P - len(p)) + p for p, _, _ in rows])  # [B, P], left-padded
        prompt_mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p, _, _ in rows])
        completion_ids = torch.tensor([r + [0] * (C - len(r)) for _, r, _ in rows])  # [B, C], right-padded
        completion_mask = torch.tensor([[1] * len(r) + [0] * (C - len(r)) for _, r, _ in rows])
        advantages = torch.tensor([x for _, _, x in rows])
        total = completion_mask.sum().float()
        opt.zero_grad(set_to_none=True)
        for s in range(0, len(rows), a.real_trl_micro):
            part = slice(s, s + a.real_trl_micro)
            trainer._compute_loss(model, {"prompt_ids": prompt_ids[part], "prompt_mask": prompt_mask[part],
                                          "completion_ids": completion_ids[part],
                                          "completion_mask": completion_mask[part],
                                          "advantages": advantages[part], "num_items_in_batch": total}).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        steps.append({"step_s": time.perf_counter() - t, "tokens": int(prompt_mask.sum() + completion_mask.sum()),
                      "processed": len(rows) * (P + C)})
        if b + 1 < len(batches):
            turns.give()
    report({"steps": steps[1:]})  # and exit, holding the turn
