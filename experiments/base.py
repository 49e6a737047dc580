"""The base experiment config: every field, documented once. Experiments derive from get_config().

Fields of the original fine-tuning fork's train.py flags keep their meaning and default; the
mapping is `--flag` -> `section.field` (docs/fine_tuning.md).
"""

from __future__ import annotations

from ml_collections import ConfigDict


def check_variant(experiment: str, variant: str, variants: dict[str, str]) -> None:
    """Reject an unknown variant, listing the valid ones."""
    if variant not in variants:
        raise ValueError(f"unknown variant {variant!r} of experiments/{experiment}.py; "
                         f"use one of {', '.join(variants)}")


def get_config() -> ConfigDict:
    """Defaults: fine-tune 124M with Adam at 2e-5, batch 1, as the original train.py."""
    c = ConfigDict()
    c.mode = "train"  # what launch.py runs: "train", or "remat_ablation" (experiments/remat_ablation.py)
    c.run_name = "run1"  # --run_name: outputs go to WORKDIR/{checkpoint,samples,logs}/RUN_NAME
    c.workdir = "runs"  # where checkpoint/, samples/ and logs/ are created (launch.py --workdir sets it)
    c.seed = 0  # init (from scratch), batch order, noise and samples all derive from it

    c.model = ConfigDict()
    c.model.name = "124M"  # --model_name: a model directory, or a size (124M, 355M, 774M, 1558M) under models_dir
    c.model.models_dir = "models"  # where `gpt2-jax download` puts the sizes
    c.model.from_scratch = False  # True: random init with the shape below instead of pretrained weights
    c.model.n_ctx = 1024  # from scratch only: context length
    c.model.n_embd = 768  # from scratch only: width
    c.model.n_head = 12  # from scratch only: attention heads
    c.model.n_layer = 12  # from scratch only: blocks
    c.model.vocab = ""  # from scratch only: a dir with encoder.json + vocab.bpe, "bytes", or "" = find GPT-2's locally
    c.model.dtype = "float32"  # compute dtype; "bfloat16" = mixed precision (float32 weights and optimizer state)
    c.model.remat = "none"  # --memory_saving_gradients: a remat policy (none, full, dots, dots_no_batch, save_*) or auto
    c.model.memory_budget_gb = 0.0  # remat=auto: the compiled peak must fit this; 0 = the device's memory less 10%
    c.model.remat_auto_steps = 3  # remat=auto: steps timed per surviving candidate (0: take the largest micro-batch)
    c.model.scan_layers = False  # nn.scan over the blocks: one block compiled (faster compiles), params [n_layer, ...]
    c.model.attention = "auto"  # auto (cuDNN's fused kernel on GPU in bfloat16, else XLA), xla or cudnn
    c.model.vocab_multiple = 0  # logits matmul over the vocabulary padded to a multiple of this; 0: 128 on GPU/TPU, 1 on CPU

    c.data = ConfigDict()
    c.data.dataset = ""  # --dataset: a text file, directory, glob, .npz, .bin, or a glob of token shards (docs/data.md)
    c.data.combine = 50000  # --combine: concatenate files into chunks of at least this many characters
    c.data.encoding = "utf-8"  # --encoding: text encoding of the dataset files
    c.data.encoding_errors = "strict"  # "replace" substitutes undecodable bytes instead of stopping
    c.data.seq_len = 0  # tokens per training window; 0 = the model's n_ctx (the original's 1024)
    c.data.val_dataset = ""  # --val_dataset: validation data; "" = val_split, else windows of the training data
    c.data.val_split = 0.0  # hold out the last fraction of the training data for validation (never trained on)
    c.data.val_batch_size = 2  # --val_batch_size
    c.data.val_batch_count = 40  # --val_batch_count: a fixed set of batches, drawn once with a fixed seed
    c.data.val_every = 0  # --val_every: validate every N steps, and at the last of total_steps (0 = never)
    c.data.document_mask = False  # a window's documents (split at end-of-text ids) see only themselves; positions restart
    c.data.allow_changed = False  # resume although the data differ from what the run started on (not exact then)
    c.data.mixture = ""  # instead of dataset: weighted sources "NAME:WEIGHT=SPEC;NAME:WEIGHT=SPEC" (docs/data.md)
    c.data.mixture_stages = ""  # mixture weights from given steps on: "STEP:NAME=W,NAME=W;STEP:..." (left out: 0)
    c.data.mixture_block = 2048  # mixture rows per block: each block of a stage holds exactly each source's share

    c.train = ConfigDict()
    c.train.objective = "lm"  # lm: next-token loss; dpo: preference pairs, the dpo section (docs/fine_tuning.md)
    c.train.batch_size = 1  # --batch_size: windows (dpo: pairs) per micro-batch (the global batch across devices)
    c.train.accumulate_gradients = 1  # --accumulate_gradients: micro-batches summed into one update
    c.train.learning_rate = 2e-5  # --learning_rate: peak learning rate
    c.train.optimizer = "adam"  # --optimizer: adam, adamw, sgd or muon (Muon on the blocks' matrices: the muon section)
    c.train.b1 = 0.9  # Adam beta1
    c.train.b2 = 0.999  # Adam beta2
    c.train.eps = 1e-8  # Adam epsilon (TensorFlow's default, as the original)
    c.train.weight_decay = 0.01  # adamw only; biases, LayerNorm and embeddings are not decayed
    c.train.momentum = 0.0  # sgd only; 0 = plain SGD
    c.train.lr_schedule = "constant"  # constant, linear (decay), cosine (decay) or wsd (warmup-stable-decay)
    c.train.warmup_steps = 0  # linear warmup from 0 to learning_rate
    c.train.decay_steps = 0  # where the decay ends; 0 = total_steps
    c.train.min_lr_ratio = 0.1  # the decay ends at learning_rate * min_lr_ratio
    c.train.decay_fraction = 0.2  # wsd: decay over the last round(fraction * total_steps) steps (needs total_steps)
    c.train.decay_shape = "1-sqrt"  # wsd: 1-sqrt (Hägele et al. 2024) or linear, to learning_rate * min_lr_ratio
    c.train.grad_clip = 0.0  # clip gradients to this global norm (0 = off)
    c.train.skip_spikes = False  # a step whose loss is a spike (or not finite) is not applied; logged as `skipped`
    c.train.spike_sigma = 6.0  # skip_spikes: stds (Bessel) above the mean of past losses (maxtext's, OLMo-core's 6)
    c.train.spike_window = 128  # skip_spikes: past finite losses kept; judged once it holds about half (63 of 128)
    c.train.max_consecutive_skips = 10  # skip_spikes: stop the run at this many in a row (a level shift costs ~4)
    c.train.ema_decay = 0.0  # > 0: a float32 moving average of the weights (val_loss_ema; export/sample --ema)
    c.train.flat_optimizer = False  # optimizer state as one flat vector (optax.flatten): fewer, larger fusions
    c.train.only_train_transformer_layers = False  # --only_train_transformer_layers: freeze embeddings and ln_f
    c.train.noise = 0.0  # --noise: replace each input token by a random one with this probability
    c.train.loss_chunk = 0  # > 0: cross-entropy over this many positions at a time, never all [B, T, V] logits
    c.train.total_steps = 0  # stop after this many steps (0 = run until Ctrl-C, as the original)
    c.train.lora_rank = 0  # > 0: train LoRA adapters of this rank only, the base weights frozen (docs/fine_tuning.md)
    c.train.lora_alpha = 16.0  # the adapters' update is scaled by lora_alpha / lora_rank (peft's convention)
    c.train.lora_targets = "attn.c_attn"  # comma-separated: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj
    c.train.early_stop_patience = 0  # stop after N validations without improvement (0 = off; needs data.val_every)
    c.train.early_stop_min_delta = 0.0  # an improvement lowers the best validation loss by more than this
    c.train.dispatch_ahead = True  # queue step N+1 before reading step N's metrics (checks, logs, Ctrl-C one step late)
    c.train.peak_tflops = 0.0  # device peak for MFU; 0 = known accelerators in bfloat16, otherwise not shown

    c.dpo = ConfigDict()  # train.objective=dpo: data.dataset is a .jsonl of {"prompt", "chosen", "rejected"}
    c.dpo.beta = 0.1  # how far the policy may move from the reference (the rewards are beta x log-ratios)
    c.dpo.loss_type = "sigmoid"  # sigmoid (DPO), ipo, hinge or robust, as trl's DPOTrainer defines them
    c.dpo.label_smoothing = 0.0  # robust only: the assumed fraction of flipped preferences, in [0, 0.5)
    c.dpo.reference = ""  # "" = the weights the run starts from (LoRA: the base, adapters off); or a model dir/hub id
    c.dpo.precompute_reference = True  # reference log-probs computed once, kept with the run; False: every step
    c.dpo.tokenize = "apart"  # apart: after an end-of-text, each text encoded on its own (as SFT); trl: as trl does

    c.muon = ConfigDict()  # train.optimizer=muon: Muon on the blocks' matrices, AdamW (train.*) on the rest
    c.muon.learning_rate = 0.02  # Muon's peak, in train.lr_schedule's shape (Keller Jordan's 0.02; speedrun 0.05)
    c.muon.momentum = 0.95  # torch.optim.Muon's and Keller Jordan's
    c.muon.nesterov = True  # Nesterov momentum (torch's default)
    c.muon.ns_steps = 5  # Newton-Schulz iterations (torch's and Keller's 5)
    c.muon.ns_dtype = "bfloat16"  # the iteration's dtype: bfloat16 (torch's, Keller's) or float32
    c.muon.adjust_lr = "original"  # lr x sqrt(max(1, out/in)) (original, torch's) or 0.2 sqrt(max(in, out))
    c.muon.weight_decay = 0.0  # decoupled, p *= 1 - lr * wd (Keller's 0; torch's default 0.1)
    c.muon.split_qkv = False  # True: q, k and v of attn.c_attn orthogonalized apart (modded-nanogpt)

    c.eval = ConfigDict()  # benchmarks while training, on the live params (docs/evaluation.md)
    c.eval.tasks = ""  # lm-eval task names, comma-separated (logged as eval/TASK/METRIC); "" = none
    c.eval.include_path = ""  # a folder of local lm-eval task YAMLs (as gpt2-jax lm-eval --include_path)
    c.eval.hellaswag = ""  # HellaSwag's validation jsonl on disk, scored as llm.c does (eval/hellaswag_llmc/*)
    c.eval.every = 0  # evaluate every N steps and at the last of train.total_steps (0 = never)
    c.eval.limit = 0.0  # items per task: 0 = all, N >= 1 = the first N, a fraction below 1 = that share
    c.eval.batch_size = 8  # rows scored at once

    c.sample = ConfigDict()
    c.sample.sample_every = 100  # --sample_every: unconditional samples every N steps (0 = never)
    c.sample.prompt = ""  # text the samples continue; "" = unconditional, from <|endoftext|> (as the original)
    c.sample.sample_length = 1023  # --sample_length: tokens per sample (capped at what the context leaves)
    c.sample.sample_num = 1  # --sample_num: samples each time
    c.sample.top_k = 40  # --top_k
    c.sample.top_p = 0.0  # --top_p: > 0 overrides top_k
    c.sample.temperature = 1.0

    c.log = ConfigDict()  # where the records go beside metrics.jsonl and TensorBoard (process 0)
    c.log.wandb = False  # True: also to Weights & Biases (pip install 'gpt2-jax[wandb]'; WANDB_MODE=offline works)
    c.log.wandb_project = "gpt2-jax"  # the W&B project
    c.log.wandb_entity = ""  # the W&B team or user; "" = your default entity

    c.checkpoint = ConfigDict()
    c.checkpoint.restore_from = "latest"  # --restore_from: latest (resume, else pretrained), fresh, best, or a path
    c.checkpoint.keep_best = False  # keep the best validation step in checkpoint/RUN/best (a run directory)
    c.checkpoint.save_every = 1000  # --save_every: checkpoint every N steps (and always on exit)
    c.checkpoint.keep = 5  # keep the last N checkpoints ...
    c.checkpoint.keep_every_hours = 0.0  # ... plus one every K hours (0 = off)
    c.checkpoint.async_save = True  # write checkpoints in the background while training goes on
    # gs:// runs: a lock not renewed this long (by the store's clock) is stale, its job killed, and taken over; a
    # job whose renewals (retried) all fail this long stops before writing more. As long as store_timeout_s, so
    # that the store answering slowly for as long as a save may take does not cost the run its lock.
    c.checkpoint.lock_lease_s = 300.0
    c.checkpoint.store_timeout_s = 300.0  # a store (gs://) failing this long fails the save: one line, exit 3

    c.profile = ConfigDict()  # a jax.profiler trace of a few steps into WORKDIR/logs/RUN/profile/ (every process)
    c.profile.start_step = 0  # > 0: trace the steps after this one (0 = no trace); results are unchanged
    c.profile.steps = 3  # how many steps the trace covers: start_step + 1 ... start_step + steps

    c.mesh = ConfigDict()  # devices as a (data, fsdp) mesh; the product must equal the device count
    c.mesh.data = -1  # data parallelism: parameters replicated; -1 = all devices not used by fsdp
    c.mesh.fsdp = 1  # parameters and optimizer state sharded over this many devices (ZeRO-3)

    c.parallel = ConfigDict()  # multi-host: every process runs the same command
    c.parallel.distributed = ""  # "" = one process; "auto" = detect (SLURM, Kubernetes, TPU); "explicit" = below
    c.parallel.coordinator_address = ""  # host:port of process 0 (explicit)
    c.parallel.num_processes = 1  # explicit
    c.parallel.process_id = 0  # explicit
    c.parallel.timeout_s = 300  # give up joining after this many seconds, with an error
    c.parallel.heartbeat_s = 20  # a peer silent this long ends every survivor in one line, exit 4 (restart all to resume)

    c.ablation = ConfigDict()  # mode=remat_ablation only
    c.ablation.policies = "none,full"  # comma-separated remat policy names
    c.ablation.micro_batches = "1,2"  # comma-separated micro-batch sizes
    c.ablation.steps = 3  # timed steps after one warm-up step
    c.ablation.compile_only = False  # only compile: memory and FLOPs, no step time (for shapes too big to run)
    c.ablation.memory_budget_gb = 80.0  # report the largest micro-batch whose peak memory fits this
    return c
