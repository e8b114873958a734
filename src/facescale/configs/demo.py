from easydict import EasyDict as edict

# The built-in demo (`facescale demo`): synthetic identities, MobileFaceNet, Partial FC on CPU.
# `facescale demo` fills in `rec`, `num_classes`, `num_image` and `output`.
config = edict()
config.margin_list = (1.0, 0.0, 0.35)
config.scale = 32.0
config.network = "mbf"
config.embedding_size = 128
config.sample_rate = 0.5
config.fp16 = False
# CPU speed (benchmarks/RESULTS.md, "CPU training speed"): bfloat16 where the CPU computes it
# natively (AVX512-BF16 or AMX; float32 elsewhere, where it would be emulated and slower), and
# the backbone's training step compiled where a C++ compiler is at hand (the kernels are cached
# on disk, so later runs compile faster); with the channels-last layout (the CPU default) together
# over 2x the samples/s of float32, with the same held-out accuracy within one run's noise
config.bf16 = "auto"
config.compile = "auto"
config.optimizer = "sgd"
config.lr = 0.1
config.momentum = 0.9
config.weight_decay = 5e-4
config.batch_size = 32
config.num_epoch = 3
config.warmup_epoch = 0.5
config.num_workers = 1
config.frequent = 10
config.verbose = 100000
config.checkpoint_every = 0
config.val_targets = ["heldout"]
